"""Few-shot multiple-choice evaluation by log-likelihood (MMLU / BBH / ARC style, as lm-eval does it).

For an item with context c (k-shot examples + the item's prompt) and options o_1..o_m, each option is
scored as the continuation ``target_delimiter + o_j`` of c:

    LL_j      = Σ_{t ∈ cont_j} log p(x_t | x_<t)                    summed log-likelihood
    acc       : argmax_j LL_j
    acc_norm  : argmax_j LL_j / len(o_j)       (characters of the option string; lm-eval's ``acc_norm``)
    acc_token : argmax_j LL_j / |cont_j|       (tokens of the continuation; per-token normalisation)

lm-eval computes ``acc_norm`` with the character length of the choice string (``len(choice)``, without
the target delimiter); ``acc_bytes`` would use UTF-8 bytes instead and is equal for ASCII text.

Tokenisation follows lm-eval's ``_encode_pair``: trailing whitespace of the context is moved onto the
continuation; ``whole = enc(ctx + cont)``, ``ctx_enc = enc(ctx)``, the continuation tokens are the tail
``whole[len(ctx_enc):]`` (so ``|cont| = len(enc(ctx+cont)) − len(enc(ctx))``), and the model input is
``(ctx_enc + cont_enc)[-(max_length+1):][:-1]``. Tokens are encoded without special tokens; a BOS token is
prepended only with ``add_bos_token=True`` or when the context is empty (lm-eval's prefix token).

Pairs are batched right-padded (one forward per batch, longest first); right padding leaves every real
position of a causal LM unchanged, so batched scores equal unbatched ones up to float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from metalora.eval.prefix_cache import cached_loglikelihoods

__all__ = [
    "FewShotItem",
    "ForwardContext",
    "MCItem",
    "MCPrediction",
    "MCResult",
    "build_context",
    "encode_pair",
    "evaluate_multiple_choice",
    "loglikelihoods",
    "pool_for_task",
    "select_shots",
]

ForwardContext = Callable[[list[str]], AbstractContextManager[Any]]
"""``forward_context(task_names)`` → a context manager entered around each batch's forward, with one task
name per row; e.g. ``lambda names: ml.task_ids(model, names)`` for task-routed adapters."""


class MCItem(Protocol):
    """What this module reads of a multiple-choice example (``metalora.data.Example`` satisfies it)."""

    prompt: str
    options: list[str] | None
    answer: int | None
    task: str
    id: str


class FewShotItem(Protocol):
    """A solved example used as a k-shot demonstration: its target is ``options[answer]`` if it has
    options and an answer, else ``response``."""

    prompt: str
    response: str
    options: list[str] | None
    answer: int | None
    id: str


@dataclass
class MCPrediction:
    """Per-item scores and predictions (option indices)."""

    id: str
    task: str
    answer: int | None
    loglikelihoods: list[float]
    num_tokens: list[int]
    num_chars: list[int]
    is_greedy: list[bool]
    pred: int
    pred_norm: int
    pred_token: int


@dataclass
class MCResult:
    """``per_task[task] = {"acc", "acc_norm", "acc_token", "n"}``; ``overall`` the same micro-averaged over
    all items with an answer."""

    predictions: list[MCPrediction]
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- prompts


def shot_target(shot: FewShotItem) -> str:
    """The answer text a demonstration shows: ``options[answer]`` for MC examples, else ``response`` without
    its leading spaces (``build_context`` puts the target delimiter in front: ``"Answer:" + " " + target``)."""
    options, answer = getattr(shot, "options", None), getattr(shot, "answer", None)
    if options is not None and answer is not None:
        return options[answer]
    return shot.response.lstrip(" ")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def select_shots(
    item: MCItem,
    pool: Sequence[FewShotItem],
    k: int,
    seed: int = 0,
    sampler: Literal["first_n", "random"] = "first_n",
) -> list[FewShotItem]:
    """k demonstrations for ``item`` from ``pool``, never the item itself (same ``id``).

    ``first_n``: the first k of the pool (lm-eval's MMLU setting: the 5 dev examples in order).
    ``random``: k distinct examples drawn with ``numpy.random.default_rng([seed, blake2b(task, id)])``, so
    an item's shots depend only on the seed and the item, not on which other items are evaluated.
    """
    if k < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {k}")
    if k == 0:
        return []
    candidates = [s for s in pool if getattr(s, "id", None) != item.id]
    if len(candidates) < k:
        raise ValueError(
            f"task {item.task!r}: {k}-shot needs {k} demonstration examples, the pool has {len(candidates)}"
        )
    if sampler == "first_n":
        return list(candidates[:k])
    if sampler == "random":
        rng = np.random.default_rng([seed, _stable_int(f"{item.task}\x00{item.id}")])
        return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]
    raise ValueError(f"sampler must be 'first_n' or 'random', got {sampler!r}")


def build_context(
    prompt: str,
    shots: Sequence[FewShotItem],
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    description: str = "",
) -> str:
    """``description + Σ_shots (shot.prompt + target_delimiter + target + fewshot_delimiter) + prompt``."""
    demos = "".join(s.prompt + target_delimiter + shot_target(s) + fewshot_delimiter for s in shots)
    return description + demos + prompt


def pool_for_task(
    task: str, fewshot_pool: Mapping[str, Sequence[FewShotItem]] | Sequence[FewShotItem] | None
) -> Sequence[FewShotItem]:
    """The demonstrations of ``task``: ``pool[task]`` for a mapping, else the examples whose ``task`` matches."""
    if fewshot_pool is None:
        return []
    if isinstance(fewshot_pool, Mapping):
        return fewshot_pool.get(task, [])
    return [s for s in fewshot_pool if getattr(s, "task", task) == task]


# ---------------------------------------------------------------------------------------- tokenisation


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_token(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(
            "the tokenizer has neither a BOS nor an EOS token to use as prefix for an empty context"
        )
    return int(token)


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos_token: bool = False
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's ``_encode_pair``: the continuation is the tail
    ``enc(ctx + cont)[len(enc(ctx)):]``, after moving the context's trailing whitespace onto it."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx) :]
    if add_bos_token or not ctx:
        ctx = [_prefix_token(tokenizer)] + ctx
    if not cont:
        raise ValueError(
            f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}"
        )
    return ctx, cont


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class _Request:
    index: int
    task: str
    context: list[int]
    continuation: list[int]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_length(model: torch.nn.Module, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    task_names: Sequence[str] | None = None,
    batch_size: int = 8,
    forward_context: ForwardContext | None = None,
    max_length: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), whether the continuation is the greedy decode) per request.

    ``requests`` are (context tokens, continuation tokens). One forward per batch of right-padded rows,
    longest first; ``forward_context(task_names_of_batch)`` wraps each forward.
    """
    if task_names is None:
        task_names = [""] * len(requests)
    if len(task_names) != len(requests):
        raise ValueError(f"{len(task_names)} task names for {len(requests)} requests")
    reqs = [
        _Request(i, t, list(c), list(x))
        for i, ((c, x), t) in enumerate(zip(requests, task_names, strict=True))
    ]
    limit = _max_length(model, max_length)
    device = _model_device(model)
    order = sorted(reqs, key=lambda r: (-(len(r.context) + len(r.continuation)), r.index))
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    was_training = model.training
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc="loglikelihood", disable=not progress):
            inputs = []
            for r in batch:
                if len(r.continuation) > limit:
                    raise ValueError(
                        f"a continuation of {len(r.continuation)} tokens exceeds max_length={limit}"
                    )
                inputs.append((r.context + r.continuation)[-(limit + 1) :][:-1])
            width = max(len(x) for x in inputs)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(inputs):  # right padding: real tokens keep positions 0..len-1
                ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, : len(x)] = 1
            ctx = forward_context([r.task for r in batch]) if forward_context else contextlib.nullcontext()
            with ctx:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, (r, x) in enumerate(zip(batch, inputs, strict=True)):
                n = len(r.continuation)
                # logits at positions len(x)-n .. len(x)-1 predict the n continuation tokens; log-softmax
                # only there (a [B, L, V] fp32 copy is ~1 GB for 5-shot MMLU on a 49k vocabulary)
                lp = torch.log_softmax(logits[row, len(x) - n : len(x)].float(), dim=-1)  # [n, V]
                target = torch.tensor(r.continuation, device=lp.device)
                ll = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                out[r.index] = (float(ll), greedy)
    finally:
        model.train(was_training)
    return [o for o in out if o is not None]


def _argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def _requests(
    tokenizer: Any,
    items: Sequence[MCItem],
    fewshot_pool: Any,
    num_fewshot: int,
    seed: int,
    fewshot_sampler: Literal["first_n", "random"],
    target_delimiter: str,
    fewshot_delimiter: str,
    description: str | Callable[[str], str],
    add_bos_token: bool,
) -> tuple[list[tuple[list[int], list[int]]], list[str], list[tuple[int, int]]]:
    """(context, continuation) token pairs of every option of every item, each pair's task, and each
    item's span of pairs."""
    requests: list[tuple[list[int], list[int]]] = []
    names: list[str] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        if not item.options:
            raise ValueError(
                f"item {item.id!r} of task {item.task!r} has no options; it is not multiple choice"
            )
        if item.answer is not None and not 0 <= item.answer < len(item.options):
            raise ValueError(
                f"item {item.id!r}: answer {item.answer} out of range for {len(item.options)} options"
            )
        shots = select_shots(item, pool_for_task(item.task, fewshot_pool), num_fewshot, seed, fewshot_sampler)
        head = description(item.task) if callable(description) else description
        context = build_context(item.prompt, shots, target_delimiter, fewshot_delimiter, head)
        start = len(requests)
        for option in item.options:
            requests.append(encode_pair(tokenizer, context, target_delimiter + option, add_bos_token))
            names.append(item.task)
        spans.append((start, len(requests)))
    return requests, names, spans


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    fewshot_pool: Mapping[str, Sequence[FewShotItem]] | Sequence[FewShotItem] | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    fewshot_sampler: Literal["first_n", "random"] = "first_n",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    description: str | Callable[[str], str] = "",
    batch_size: int = 8,
    forward_context: ForwardContext | None = None,
    add_bos_token: bool = False,
    max_length: int | None = None,
    progress: bool = True,
    prefix_cache: bool = True,
) -> MCResult:
    """Score every option of every item by log-likelihood; see the module docstring for the definitions.

    ``prefix_cache``: compute each item's context, and the context prefix all items of a task share, once
    (``eval.prefix_cache``); the same sums as one full forward per option, to float rounding. Off, or
    when a context and option do not fit ``max_length``, every option runs a full forward.

    ``fewshot_pool``: demonstrations per task (a mapping task → examples, or a flat list grouped by each
    example's ``task``), typically the task's dev split; ``num_fewshot`` of them precede each prompt
    (``select_shots``). ``description`` (a string, or a function of the task name) heads each context, as
    MMLU's "The following are multiple choice questions (with answers) about …\\n\\n".
    """
    requests, names, spans = _requests(
        tokenizer,
        items,
        fewshot_pool,
        num_fewshot,
        seed,
        fewshot_sampler,
        target_delimiter,
        fewshot_delimiter,
        description,
        add_bos_token,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = _max_length(model, max_length)
    if prefix_cache and all(len(c) + len(x) <= limit for c, x in requests):
        grouped = [(names[a], requests[a][0], [requests[i][1] for i in range(a, b)]) for a, b in spans]
        scores = [
            s for item in cached_loglikelihoods(model, grouped, forward_context, pad, progress) for s in item
        ]
    else:
        scores = loglikelihoods(
            model, requests, names, batch_size, forward_context, max_length, pad, progress
        )

    predictions = [
        _prediction(item, [scores[i] for i in range(a, b)], [len(requests[i][1]) for i in range(a, b)])
        for item, (a, b) in zip(items, spans, strict=True)
    ]
    return MCResult(predictions, *_accuracies(predictions))


def _prediction(item: MCItem, scores: list[tuple[float, bool]], n_tok: list[int]) -> MCPrediction:
    """One item's prediction from its options' (log-likelihood, is-greedy) and continuation token counts."""
    lls = [ll for ll, _ in scores]
    n_chr = [len(o) for o in item.options]
    return MCPrediction(
        id=item.id,
        task=item.task,
        answer=item.answer,
        loglikelihoods=lls,
        num_tokens=n_tok,
        num_chars=n_chr,
        is_greedy=[greedy for _, greedy in scores],
        pred=_argmax(lls),
        pred_norm=_argmax([ll / max(c, 1) for ll, c in zip(lls, n_chr, strict=True)]),
        pred_token=_argmax([ll / t for ll, t in zip(lls, n_tok, strict=True)]),
    )


def _accuracies(predictions: Sequence[MCPrediction]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    groups: dict[str, list[MCPrediction]] = defaultdict(list)
    for p in predictions:
        if p.answer is not None:
            groups[p.task].append(p)

    def summarize(ps: Sequence[MCPrediction]) -> dict[str, float]:
        n = len(ps)
        return {
            "acc": sum(p.pred == p.answer for p in ps) / n,
            "acc_norm": sum(p.pred_norm == p.answer for p in ps) / n,
            "acc_token": sum(p.pred_token == p.answer for p in ps) / n,
            "n": n,
        }

    per_task = {task: summarize(ps) for task, ps in sorted(groups.items())}
    answered = [p for ps in groups.values() for p in ps]
    overall = summarize(answered) if answered else {}
    return per_task, overall
