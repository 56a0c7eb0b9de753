"""Option log-likelihoods that compute each shared context once (a KV cache), for few-shot multiple choice.

``loglikelihoods`` (``multiple_choice.py``) runs one full forward per (context, option) row, so a 4-option
5-shot MMLU item pays for its ~600-token context four times, and every item of a subject pays again for the
same ~500 tokens of exemplars. Here, per task:

1. the longest token prefix shared by every item's context (the description and the few-shot exemplars
   under the ``first_n`` sampler) runs once, and its KV cache is kept;
2. per item, the rest of its context runs once on a copy of that cache; the last position's logits score
   every option's first token;
3. the cache is repeated once per option and the options' remaining tokens run as one right-padded batch
   behind it; position j of option i scores token j+1.

The sums are the same log p(continuation | context) as the plain path (equal to ~1e-5 in fp32: only the
shapes of the matmuls differ). Items whose context and option do not fit ``max_length`` go through the
plain path, which truncates as lm-eval does. Written by hand: HF ``generate`` reuses caches only for
decoding, and lm-eval has no cross-request prefix cache.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

Request = tuple[list[int], list[int]]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix that every sequence starts with."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for j in range(n):
        if any(s[j] != first[j] for s in sequences):
            return j
    return n


@torch.no_grad()
def cached_loglikelihoods(
    model: torch.nn.Module,
    items: Sequence[tuple[str, list[int], list[list[int]]]],
    forward_context: Any = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> list[list[tuple[float, bool]]]:
    """For each item (task, context tokens, option continuations): [(Σ log p, is greedy)] per option."""
    was_training = model.training
    model.eval()
    try:
        return _score_items(model, items, forward_context, pad_token_id, progress)
    finally:
        model.train(was_training)


def _score_items(model, items, forward_context, pad_token_id, progress) -> list[list[tuple[float, bool]]]:
    device = next(model.parameters()).device
    bar = tqdm(total=len(items), desc="loglikelihood (cached)", disable=not progress)
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, (task, _, _) in enumerate(items):
        by_task[task].append(index)
    out: list[list[tuple[float, bool]]] = [[] for _ in items]
    for task, indices in by_task.items():
        contexts = [items[i][1] for i in indices]
        shared = max(0, min(common_prefix_length(contexts), min(len(c) for c in contexts) - 1))
        route = (lambda rows, t=task: forward_context([t] * rows)) if forward_context else _no_route
        prefix_cache = None
        if shared > 0:
            with route(1):
                prefix = torch.tensor([contexts[0][:shared]], device=device)
                prefix_cache = _returned_cache(model(input_ids=prefix, use_cache=True))
        for i in indices:
            _, context, options = items[i]
            out[i] = _score_item(model, prefix_cache, shared, context, options, route, pad_token_id, device)
            bar.update(1)
    bar.close()
    return out


def _no_route(rows: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _cache_key(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


def _returned_cache(result: Any) -> Any:
    return result["cache"] if "cache" in result else result["past_key_values"]


def _score_item(
    model, prefix_cache, shared, context, options, route, pad, device
) -> list[tuple[float, bool]]:
    cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else None
    rest = torch.tensor([context[shared:]], device=device)
    mask = torch.ones((1, len(context)), dtype=torch.long, device=device)
    with route(1):
        result = model(input_ids=rest, attention_mask=mask, use_cache=True, **{_cache_key(model): cache})
    first = torch.log_softmax(result.logits[0, -1].float(), dim=-1)  # scores each option's first token
    tails = [o[:-1] for o in options]  # inputs that predict tokens 1..n-1
    width = max(len(t) for t in tails)
    later = None
    if width > 0:
        cache = _returned_cache(result)
        cache.batch_repeat_interleave(len(options))
        ids = torch.full((len(options), width), pad, dtype=torch.long, device=device)
        tail_mask = torch.zeros((len(options), width), dtype=torch.long, device=device)
        for row, t in enumerate(tails):  # right padding: real tokens keep their positions
            ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
            tail_mask[row, : len(t)] = 1
        full_mask = torch.cat([mask.expand(len(options), -1), tail_mask], dim=1)
        with route(len(options)):
            later = model(input_ids=ids, attention_mask=full_mask, **{_cache_key(model): cache}).logits
    return [_option_score(first, later, row, option) for row, option in enumerate(options)]


def _option_score(
    first: torch.Tensor, later: torch.Tensor | None, row: int, option: list[int]
) -> tuple[float, bool]:
    ll = float(first[option[0]])
    greedy = int(first.argmax()) == option[0]
    if len(option) > 1:
        assert later is not None
        lp = torch.log_softmax(later[row, : len(option) - 1].float(), dim=-1)  # [n-1, V]
        target = torch.tensor(option[1:], device=lp.device)
        ll += float(lp.gather(-1, target[:, None]).sum())
        greedy = greedy and bool((lp.argmax(-1) == target).all())
    return ll, greedy
