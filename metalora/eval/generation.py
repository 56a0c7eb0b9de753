"""Greedy generation with answer extraction and exact match (GSM8K style).

    ŷ_i  = extract(greedy_decode(context_i) cut at the first stop string)
    y_i  = meta_i["target"] if the example has one, else gold_extract(response_i) (else the response)
    EM   = (1/n) Σ_i [normalize(ŷ_i) = normalize(y_i)]

Prompts are left-padded and decoded together, ``batch_size`` at a time (longest first), with
``do_sample=False``; HF ``generate`` derives position ids from the attention mask, so a batched decode
equals decoding each prompt alone. Decoding of a row ends at EOS, after ``max_new_tokens``, or once its
text contains a stop string (the text is then cut before the earliest stop string).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from metalora.eval.extract import exact_match, get_extractor
from metalora.eval.multiple_choice import (
    FewShotItem,
    ForwardContext,
    build_context,
    pool_for_task,
    select_shots,
)

__all__ = ["GenItem", "GenPrediction", "GenResult", "evaluate_generation", "generate", "truncate_at_stop"]


class GenItem(Protocol):
    """What this module reads of a generation example (``metalora.data.Example`` satisfies it)."""

    prompt: str
    response: str
    task: str
    id: str


@dataclass
class GenPrediction:
    id: str
    task: str
    generation: str
    prediction: str | None
    gold: str
    correct: bool


@dataclass
class GenResult:
    """``per_task[task] = {"exact_match", "n"}``; ``overall`` micro-averaged over all items."""

    predictions: list[GenPrediction]
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Per-row: done once the decoded new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _encode_prompt(tokenizer: Any, text: str, add_bos_token: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos_token or not ids:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(bos)] + ids
    return ids


def _left_padded(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with left padding: every prompt ends at the last column."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[row, width - len(e) :] = 1
    return ids, mask


def _decode_new(tokenizer: Any, new: list[int], stop: Sequence[str]) -> str:
    """The generated tokens up to the first EOS, decoded without special tokens, cut at a stop string."""
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return truncate_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    task_names: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    forward_context: ForwardContext | None = None,
    add_bos_token: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens removed, cut at the first stop string).

    ``forward_context(task_names_of_batch)`` is entered around each batch's whole ``generate`` call (every
    decoding step keeps the batch's rows in order, so per-row task routing stays valid).
    """
    if task_names is None:
        task_names = [""] * len(prompts)
    if len(task_names) != len(prompts):
        raise ValueError(f"{len(task_names)} task names for {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    encoded = [_encode_prompt(tokenizer, p, add_bos_token) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc="generate", disable=not progress):
            ids, mask = _left_padded([encoded[i] for i in batch], pad)
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, ids.shape[1])] if stop else [])
            names = [task_names[i] for i in batch]
            ctx = forward_context(names) if forward_context else contextlib.nullcontext()
            with ctx:
                seqs = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=criteria,
                )
            for row, i in enumerate(batch):
                out[i] = _decode_new(tokenizer, seqs[row, ids.shape[1] :].tolist(), stop)
    finally:
        model.train(was_training)
    return out


def _gold(item: GenItem, extract_gold: Callable[[str], str | None]) -> str:
    """``meta["target"]`` when the example carries a short gold answer there (the data layer's GSM8K),
    else ``extract_gold(response)``, else the stripped response."""
    meta = getattr(item, "meta", None)
    if isinstance(meta, Mapping) and meta.get("target") is not None:
        return str(meta["target"])
    gold = extract_gold(item.response)
    return gold if gold is not None else item.response.strip()


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenItem],
    extractor: str | Callable[[str], str | None] = "gsm8k",
    gold_extractor: str | Callable[[str], str | None] | None = None,
    fewshot_pool: Mapping[str, Sequence[FewShotItem]] | Sequence[FewShotItem] | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    fewshot_sampler: Literal["first_n", "random"] = "first_n",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    description: str | Callable[[str], str] = "",
    stop: Sequence[str] = ("\n\n",),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    forward_context: ForwardContext | None = None,
    add_bos_token: bool = False,
    progress: bool = True,
) -> GenResult:
    """Generate for every item (k-shot contexts as in ``evaluate_multiple_choice``), extract answers with
    the named ``extractor`` (see ``metalora.eval.extract.EXTRACTORS``) and score exact match against
    the gold answer: ``item.meta["target"]`` if present, else ``gold_extractor(response)`` (default: the
    same extractor), else the response itself."""
    extract = get_extractor(extractor)
    extract_gold = get_extractor(gold_extractor) if gold_extractor is not None else extract
    contexts = []
    for item in items:
        pool = pool_for_task(item.task, fewshot_pool)
        shots = select_shots(item, pool, num_fewshot, seed, fewshot_sampler)  # type: ignore[arg-type]
        head = description(item.task) if callable(description) else description
        contexts.append(build_context(item.prompt, shots, target_delimiter, fewshot_delimiter, head))
    generations = generate(
        model,
        tokenizer,
        contexts,
        [item.task for item in items],
        max_new_tokens,
        stop,
        batch_size,
        forward_context,
        add_bos_token,
        progress,
    )
    predictions = []
    for item, text in zip(items, generations, strict=True):
        pred = extract(text)
        gold = _gold(item, extract_gold)
        predictions.append(GenPrediction(item.id, item.task, text, pred, gold, exact_match(pred, gold)))
    return GenResult(predictions, *_exact_match_rates(predictions))


def _exact_match_rates(
    predictions: list[GenPrediction],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Exact match and item count per task and overall (empty overall for no items)."""
    groups: dict[str, list[GenPrediction]] = defaultdict(list)
    for p in predictions:
        groups[p.task].append(p)
    per_task = {
        t: {"exact_match": sum(p.correct for p in ps) / len(ps), "n": len(ps)}
        for t, ps in sorted(groups.items())
    }
    overall = (
        {"exact_match": sum(p.correct for p in predictions) / len(predictions), "n": len(predictions)}
        if predictions
        else {}
    )
    return per_task, overall
