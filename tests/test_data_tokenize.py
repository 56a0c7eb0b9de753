"""Tokenization (prompt masking, truncation accounting, chat template), collation and the NaN-free
per-sample loss."""

from __future__ import annotations

import math

import pytest
import torch

from metalora.data import (
    IGNORE_INDEX,
    Example,
    MetaloraDataError,
    collate,
    tokenize_example,
    tokenize_examples,
)
from metalora.testing import word_tokenizer
from metalora.train.loss import per_sample_loss

VOCAB = [
    "<pad>",
    "<eos>",
    "<unk>",
    "<bos>",
    "Q:",
    "what",
    "is",
    "two",
    "plus",
    "A:",
    "four",
    "five",
    "a",
    "b",
    "c",
]


@pytest.fixture(scope="module")
def word_tok():
    """A whitespace word-level tokenizer: token ids are the positions in VOCAB, known by hand."""
    return word_tokenizer(VOCAB, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from metalora.models import convert_embedded

    return AutoTokenizer.from_pretrained(convert_embedded("smollm2-135m"))


def ex(prompt: str, response: str, i: int = 0, task: str = "t") -> Example:
    return Example(prompt, response, task, f"{task}/{i}")


def test_labels_masked_on_prompt_by_hand(word_tok):
    feat, flags = tokenize_example(ex("Q: what is two plus two A:", " four"), word_tok, task_id=3)
    # Q:=4 what=5 is=6 two=7 plus=8 two=7 A:=9 | four=10 <eos>=1
    assert feat["input_ids"] == [4, 5, 6, 7, 8, 7, 9, 10, 1]
    assert feat["labels"] == [-100] * 7 + [10, 1]
    assert feat["task_id"] == 3 and feat["sample_id"] == "t/0"
    assert flags == {"truncated": False, "response_truncated": False, "all_masked": False, "dropped": False}
    feat, _ = tokenize_example(ex("Q: what", " four"), word_tok, add_eos=False)
    assert feat["labels"] == [-100, -100, 10]


def test_labels_masked_with_real_tokenizer(smol_tok):
    prompt, response = "The capital of France is", " Paris"
    feat, _ = tokenize_example(ex(prompt, response), smol_tok)
    p_ids = smol_tok(prompt)["input_ids"]
    r_ids = smol_tok(response, add_special_tokens=False)["input_ids"]
    assert feat["input_ids"] == p_ids + r_ids + [smol_tok.eos_token_id]
    n_masked = sum(1 for x in feat["labels"] if x == IGNORE_INDEX)
    assert n_masked == len(p_ids) == 5  # "The", " capital", " of", " France", " is"
    assert smol_tok.decode([x for x in feat["labels"] if x != IGNORE_INDEX]) == " Paris<|im_end|>"


def test_chat_template_masks_everything_but_the_assistant_turn(smol_tok):
    feat, _ = tokenize_example(ex("What is 2+2?", " 4"), smol_tok, template="chat")
    text = smol_tok.decode(feat["input_ids"])
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    answer = smol_tok.decode([x for x in feat["labels"] if x != IGNORE_INDEX])
    assert answer == "4<|im_end|>\n"
    prompt = smol_tok.decode(
        [t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_truncation_policies_and_accounting(word_tok):
    examples = [
        ex("Q: what is two plus two A:", " four", 0),  # 7 + 2 = 9 tokens
        ex("Q: two A:", " four", 1),  # 3 + 2 = 5 tokens
        ex("Q: what is two plus two A:", " a b c a b c", 2),  # 7 + 7 = 14 tokens
    ]
    feats, stats = tokenize_examples(examples, word_tok, max_length=6, truncate="left_prompt")
    assert [len(f["input_ids"]) for f in feats] == [6, 5, 6]
    assert feats[0]["input_ids"] == [7, 8, 7, 9, 10, 1]  # prompt cut from the left
    assert feats[0]["labels"] == [-100, -100, -100, -100, 10, 1]
    assert feats[2]["labels"] == [12, 13, 14, 12, 13, 14]  # response alone fills max_length, cut on the right
    assert (stats.total, stats.kept, stats.truncated, stats.response_truncated) == (3, 3, 2, 1)
    assert stats.truncated_ids == ["t/0", "t/2"] and stats.all_masked == 0

    feats, stats = tokenize_examples(examples, word_tok, max_length=6, truncate="right")
    assert feats[0]["input_ids"] == [4, 5, 6, 7, 8, 7] and feats[0]["labels"] == [-100] * 6
    assert stats.all_masked == 2 and stats.all_masked_ids == ["t/0", "t/2"] and stats.kept == 3

    feats, stats = tokenize_examples(examples, word_tok, max_length=6, truncate="right", drop_all_masked=True)
    assert [f["sample_id"] for f in feats] == ["t/1"] and stats.dropped_all_masked == 2

    feats, stats = tokenize_examples(examples, word_tok, max_length=6, truncate="drop")
    assert [f["sample_id"] for f in feats] == ["t/1"] and stats.dropped_too_long == 2 and stats.truncated == 0

    with pytest.raises(MetaloraDataError, match="'t/0': 9 tokens exceed max_length=6"):
        tokenize_examples(examples, word_tok, max_length=6, truncate="error")
    with pytest.raises(MetaloraDataError, match="unknown truncate policy"):
        tokenize_examples(examples, word_tok, truncate="middle")


def test_empty_response_is_all_masked_and_counted(word_tok):
    feats, stats = tokenize_examples([ex("Q: two", "", 0)], word_tok, add_eos=False)
    assert feats[0]["labels"] == [-100, -100] and stats.all_masked == 1


def test_task_ids_from_map(word_tok):
    exs = [ex("Q:", " a", 0, "x"), ex("Q:", " b", 1, "y")]
    feats, _ = tokenize_examples(exs, word_tok, {"x": 5, "y": 2})
    assert [f["task_id"] for f in feats] == [5, 2]
    with pytest.raises(MetaloraDataError, match="task 'y' of example 'y/1' is not in the task-id map"):
        tokenize_examples(exs, word_tok, {"x": 0})


def test_collate_right_pads(word_tok):
    exs = [ex("Q: two", " four", 0, "x"), ex("Q: what is two", " five", 1, "y")]
    feats, _ = tokenize_examples(exs, word_tok, {"x": 0, "y": 1})
    batch = collate(feats, pad_token_id=word_tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[4, 7, 10, 1, 0, 0], [4, 5, 6, 7, 11, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [[-100, -100, 10, 1, -100, -100], [-100] * 4 + [11, 1]]
    assert batch["task_ids"].tolist() == [0, 1] and batch["task_ids"].dtype == torch.long
    assert batch["sample_ids"] == ["x/0", "y/1"]
    assert collate(feats, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)
    with pytest.raises(MetaloraDataError, match="no features"):
        collate([], 0)


def test_per_sample_loss_matches_manual_and_is_zero_when_all_masked():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, -100, -100], [-100, -100, -100, 4]])
    loss, valid = per_sample_loss(logits, labels)
    logp = torch.log_softmax(logits.detach(), dim=-1)
    # sample 0: tokens 2 (predicted at position 0) and 3 (at position 1); sample 2: token 4 at position 2
    expect0 = -(logp[0, 0, 2] + logp[0, 1, 3]) / 2
    expect2 = -logp[2, 2, 4]
    assert torch.allclose(loss, torch.stack([expect0, torch.tensor(0.0), expect2]), atol=1e-6)
    assert valid.tolist() == [True, False, True]
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
    # the plain HF-style mean over an all-masked batch would be NaN; ours is not
    all_masked = torch.full((2, 4), -100)
    loss, valid = per_sample_loss(logits.detach()[:2], all_masked)
    assert loss.tolist() == [0.0, 0.0] and not valid.any()
    assert math.isnan(torch.nn.functional.cross_entropy(logits[0, :3], all_masked[0, 1:]).item())


def test_chat_template_with_messages_schema_and_system_prompt(smol_tok):
    from pathlib import Path

    from metalora.data import load_task

    fix = Path(__file__).parent / "fixtures" / "data" / "chat.jsonl"
    task = load_task({"name": "chat", "path": str(fix), "schema": "messages", "split": (1, 0, 0)})
    by_id = {e.id: e for e in task.train}
    feat, _ = tokenize_example(by_id["chat/all/0"], smol_tok, template="chat")
    text = smol_tok.decode(feat["input_ids"])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert smol_tok.decode([x for x in feat["labels"] if x != IGNORE_INDEX]) == "Paris.<|im_end|>\n"
    feat, _ = tokenize_example(by_id["chat/all/1"], smol_tok, template="chat", system_prompt="Be exact.")
    assert smol_tok.decode(feat["input_ids"]).startswith(
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n2+2?"
    )
