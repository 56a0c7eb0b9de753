"""Tokenize `Example`s into training features with prompt-masked labels, an explicit truncation policy,
and accounting (the losses on these labels live in ``metalora.train.loss``).

Prompt and response are tokenized separately and concatenated, so the boundary is exact: every prompt
token gets label ``-100``, every response token its own id (shifting is left to the model, as in HF).
The prompt keeps the tokenizer's special tokens (e.g. BOS); ``add_eos`` appends EOS to the response.

Truncation policies (applied when ``len(prompt) + len(response) > max_length``):

* ``"left_prompt"`` (default): keep the response, cut the prompt from the left (keeping a leading BOS);
  if the response alone does not fit, it is cut from the right too.
* ``"right"``: cut the whole sequence from the right (the response may be cut away entirely).
* ``"drop"``: drop the sample.
* ``"error"``: raise `MetaloraDataError`.

A sample whose labels end up all ``-100`` (empty response, or response cut away) is counted in
``TokenizeStats.all_masked`` and kept unless ``drop_all_masked=True``; ``metalora.train.loss.per_sample_loss``
gives it loss 0 and ``valid=False`` instead of the NaN of a 0/0 mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example

IGNORE_INDEX = -100
TRUNCATE_POLICIES = ("left_prompt", "right", "drop", "error")
TEMPLATES = ("plain", "chat")


@dataclass
class TokenizeStats:
    """What happened while tokenizing a list of examples."""

    total: int = 0
    """Examples seen."""
    kept: int = 0
    """Features returned."""
    truncated: int = 0
    """Kept samples that lost at least one token."""
    response_truncated: int = 0
    """Kept samples that lost response tokens."""
    dropped_too_long: int = 0
    """Samples dropped by ``truncate="drop"``."""
    all_masked: int = 0
    """Samples with no response token left (all labels -100)."""
    dropped_all_masked: int = 0
    """Of those, how many were dropped (``drop_all_masked=True``)."""
    truncated_ids: list[str] = field(default_factory=list)
    all_masked_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, other: TokenizeStats) -> TokenizeStats:
        """The sum of two stats (e.g. over tasks)."""
        out = TokenizeStats()
        for k, v in asdict(self).items():
            setattr(out, k, v + getattr(other, k))
        return out


def render(
    example: Example, tokenizer: Any, template: str = "plain", system_prompt: str | None = None
) -> tuple[str, str]:
    """The (prompt, response) texts to tokenize.

    ``"plain"``: the example's own prompt/response. ``"chat"``: the tokenizer's chat template, with the
    prompt as the user turn (or the example's ``meta["messages"]``) and the response as the assistant
    turn; the response text is what the template adds after the generation prompt (so it includes the
    end-of-turn marker).
    """
    if template == "plain":
        return example.prompt, example.response
    if template != "chat":
        raise MetaloraDataError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise MetaloraDataError(
            "template='chat' but the tokenizer has no chat template; use template='plain'"
        )
    messages = list(example.meta.get("messages") or [{"role": "user", "content": example.prompt}])
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    response = example.response.lstrip(" ")  # the assistant turn starts fresh: no separator space
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise MetaloraDataError(
            "the tokenizer's chat template does not extend the generation prompt; use 'plain'"
        )
    return prompt, full[len(prompt) :]


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    task_id: int = 0,
    max_length: int | None = 1024,
    truncate: str = "left_prompt",
    template: str = "plain",
    add_eos: bool = True,
    system_prompt: str | None = None,
) -> tuple[dict[str, Any] | None, dict[str, bool]]:
    """One feature ``{input_ids, labels, task_id, sample_id}`` (or ``None`` if dropped) and flags
    ``{truncated, response_truncated, all_masked, dropped}``."""
    if truncate not in TRUNCATE_POLICIES:
        raise MetaloraDataError(
            f"unknown truncate policy {truncate!r}; choose one of {list(TRUNCATE_POLICIES)}"
        )
    prompt_text, response_text = render(example, tokenizer, template, system_prompt)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"]) if prompt_text else []
    response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and template == "plain":
        response_ids.append(eos)
    flags = {"truncated": False, "response_truncated": False, "all_masked": False, "dropped": False}
    n_resp = len(response_ids)
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        flags["truncated"] = True
        if truncate == "drop":
            flags["dropped"] = True
            return None, flags
        if truncate == "error":
            raise MetaloraDataError(
                f"example {example.id!r}: {len(prompt_ids) + len(response_ids)} tokens exceed max_length={max_length}"
            )
        if truncate == "left_prompt":
            bos = tokenizer.bos_token_id
            head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
            response_ids = response_ids[: max(0, max_length - len(head))]
            budget = max_length - len(head) - len(response_ids)
            rest = prompt_ids[len(head) :]
            prompt_ids = head + (rest[len(rest) - budget :] if budget > 0 else [])
        else:  # right
            keep_prompt = prompt_ids[:max_length]
            response_ids = response_ids[: max(0, max_length - len(keep_prompt))]
            prompt_ids = keep_prompt
    flags["response_truncated"] = len(response_ids) < n_resp
    flags["all_masked"] = len(response_ids) == 0
    feature = {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "task_id": int(task_id),
        "sample_id": example.id,
    }
    return feature, flags


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    task_to_id: Mapping[str, int] | None = None,
    *,
    max_length: int | None = 1024,
    truncate: str = "left_prompt",
    template: str = "plain",
    add_eos: bool = True,
    system_prompt: str | None = None,
    drop_all_masked: bool = False,
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize ``examples``; ``task_to_id`` maps each example's task to its id (all 0 when ``None``).

    Returns the features and a `TokenizeStats` counting truncated, dropped and all-masked samples.
    """
    stats = TokenizeStats()
    features = []
    for ex in examples:
        stats.total += 1
        if task_to_id is None:
            tid = 0
        elif ex.task in task_to_id:
            tid = task_to_id[ex.task]
        else:
            raise MetaloraDataError(
                f"task {ex.task!r} of example {ex.id!r} is not in the task-id map {dict(task_to_id)}"
            )
        feat, flags = tokenize_example(
            ex,
            tokenizer,
            task_id=tid,
            max_length=max_length,
            truncate=truncate,
            template=template,
            add_eos=add_eos,
            system_prompt=system_prompt,
        )
        if flags["dropped"]:
            stats.dropped_too_long += 1
            continue
        if flags["all_masked"]:
            stats.all_masked += 1
            stats.all_masked_ids.append(ex.id)
            if drop_all_masked:
                stats.dropped_all_masked += 1
                continue
        if flags["truncated"]:
            stats.truncated += 1
            stats.truncated_ids.append(ex.id)
        stats.response_truncated += int(flags["response_truncated"])
        features.append(feat)
    stats.kept = len(features)
    return features, stats
