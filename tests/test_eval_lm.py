"""Multiple-choice log-likelihood and generation on a tiny random-init Llama, against unbatched oracles."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from metalora.eval.generation import evaluate_generation, generate, truncate_at_stop
from metalora.eval.multiple_choice import (
    build_context,
    encode_pair,
    evaluate_multiple_choice,
    select_shots,
)
from metalora.testing import tiny_llama

CORPUS = [
    "The cat sat on the mat.",
    "Question: what is 2 + 3? Answer: 5",
    "A dog ran in the park with a red ball.",
    "The answer is (B). Options: (A) blue (B) green (C) red",
    "Paris is the capital of France; Rome is the capital of Italy.",
]


@dataclass
class Ex:
    prompt: str
    response: str
    task: str
    id: str
    options: list[str] | None = None
    answer: int | None = None
    meta: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_llama(
        vocab_size=len(tok),
        max_position_embeddings=512,
        initializer_range=0.3,  # peaked distributions: no near-ties in argmax / greedy decoding
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def mc_items() -> tuple[list[Ex], list[Ex]]:
    items = [
        Ex("Question: what color is the sky?\nAnswer:", "", "colors", "c0", ["blue", "green", "red sky"], 0),
        Ex(
            "Question: the cat sat on the\nAnswer:", "", "colors", "c1", ["mat", "dog in the park", "ball"], 0
        ),
        Ex("Capital of France?", "", "geo", "g0", ["Paris", "Rome", "a city of Italy", "B"], 2),
        Ex("Capital of Italy? ", "", "geo", "g1", ["Rome", "Paris"], 1),  # trailing space in the prompt
        Ex("2 + 3 =", "", "geo", "g2", ["5", "six", "(C) 7"], None),  # unanswered: scored, not counted
    ]
    dev = [
        Ex("Question: what color is grass?\nAnswer:", "green", "colors", "d0", ["blue", "green"], 1),
        Ex("Question: what color is a rose?\nAnswer:", "red", "colors", "d1", None, None),
        Ex("Capital of Spain?", "Madrid", "geo", "d2", ["Madrid", "Lisbon"], 0),
        Ex("Capital of Peru?", "Lima", "geo", "d3", None, None),
    ]
    return items, dev


# ----------------------------------------------------------------------------- the unbatched oracle


def reference_loglikelihood(model64, tok, context: str, continuation: str, bias=None) -> tuple[float, int]:
    """Summed float64 log p(continuation | context), one sequence at a time, continuation tokens taken as
    the tail enc(ctx+cont)[len(enc(ctx)):] after moving the context's trailing spaces onto the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    whole = tok(stripped + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        hook = None
        if bias is not None:
            hook = model64.model.embed_tokens.register_forward_hook(lambda m, i, o: o + bias)
        logits = model64(input_ids=ids).logits[0].double()
        if hook is not None:
            hook.remove()
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t, token in enumerate(cont):
        total += logp[len(ctx) + t - 1, token].item()  # position p predicts token p+1
    return total, len(cont)


def test_build_context_and_shots() -> None:
    items, dev = mc_items()
    shots = select_shots(items[0], dev[:2], k=2)
    assert [s.id for s in shots] == ["d0", "d1"]
    ctx = build_context("Q?", shots, target_delimiter=" ", fewshot_delimiter="\n\n", description="Head.\n\n")
    expected = (
        "Head.\n\n"
        "Question: what color is grass?\nAnswer: green\n\n"  # MC shot shows options[answer]
        "Question: what color is a rose?\nAnswer: red\n\n"  # other shot shows its response
        "Q?"
    )
    assert ctx == expected
    # a response stored with its leading space (the SFT convention) is shown after one delimiter space
    spaced = Ex("Question: 2 + 2?\nAnswer:", " 4", "colors", "d9", None, None)
    assert build_context("Q?", [spaced]) == "Question: 2 + 2?\nAnswer: 4\n\nQ?"
    # random sampler: deterministic per (seed, item), never the item itself, depends on the seed
    pool = dev + [items[0]]
    a = [s.id for s in select_shots(items[0], pool, k=3, seed=7, sampler="random")]
    b = [s.id for s in select_shots(items[0], pool, k=3, seed=7, sampler="random")]
    assert a == b and "c0" not in a and len(set(a)) == 3
    draws = {tuple(s.id for s in select_shots(items[0], pool, 2, seed, "random")) for seed in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="needs 5"):
        select_shots(items[0], pool, k=5)


def test_encode_pair_moves_trailing_space(tok) -> None:
    ctx, cont = encode_pair(tok, "Capital of Italy? ", "Rome")
    assert ctx == tok("Capital of Italy?", add_special_tokens=False)["input_ids"]
    whole = tok("Capital of Italy? Rome", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert len(cont) == len(whole) - len(ctx)
    # empty context: the BOS token is the prefix, as lm-eval does
    ctx, cont = encode_pair(tok, "", "Rome")
    assert ctx == [tok.bos_token_id] and cont == tok("Rome", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("num_fewshot", [0, 1])
def test_multiple_choice_equals_unbatched_float64_loop(model, tok, num_fewshot: int) -> None:
    items, dev = mc_items()
    result = evaluate_multiple_choice(
        model, tok, items, fewshot_pool=dev, num_fewshot=num_fewshot, batch_size=4, progress=False
    )
    model64 = copy.deepcopy(model).double()
    per_task: dict[str, list[tuple[int, int, int, int]]] = {}
    for item, pred in zip(items, result.predictions, strict=True):
        shots = [d for d in dev if d.task == item.task][:num_fewshot]
        context = "".join(f"{s.prompt} {s.options[s.answer] if s.options else s.response}\n\n" for s in shots)
        context += item.prompt
        refs = [reference_loglikelihood(model64, tok, context, " " + o) for o in item.options]
        ll = np.array([r[0] for r in refs])
        np.testing.assert_allclose(pred.loglikelihoods, ll, atol=1e-5, rtol=0)
        assert pred.num_tokens == [r[1] for r in refs]
        assert pred.num_chars == [len(o) for o in item.options]
        assert pred.pred == int(np.argmax(ll))
        assert pred.pred_norm == int(np.argmax(ll / np.array([len(o) for o in item.options])))
        assert pred.pred_token == int(np.argmax(ll / np.array([r[1] for r in refs])))
        if item.answer is not None:
            row = (pred.pred == item.answer, pred.pred_norm == item.answer, pred.pred_token == item.answer, 1)
            per_task.setdefault(item.task, []).append(row)
    for task, rows in per_task.items():
        acc, acc_norm, acc_token, n = (sum(col) for col in zip(*rows, strict=True))
        assert result.per_task[task] == pytest.approx(
            {"acc": acc / n, "acc_norm": acc_norm / n, "acc_token": acc_token / n, "n": n}
        )
    assert result.overall["n"] == 4  # the unanswered item is not counted


def test_continuation_is_the_tail_of_the_whole_encoding(model, tok) -> None:
    """Options that continue a word: enc(ctx) + enc(cont) differs from enc(ctx + cont), so only the lm-eval
    rule (the tail of the whole encoding) matches the oracle."""
    items = [Ex("The c", "", "w", "w0", ["apital of France", "at sat on the mat."], 0)]
    whole = tok("The capital of France", add_special_tokens=False)["input_ids"]
    split = (
        tok("The c", add_special_tokens=False)["input_ids"]
        + tok("apital of France", add_special_tokens=False)["input_ids"]
    )
    assert whole != split  # the case this test is about
    result = evaluate_multiple_choice(model, tok, items, target_delimiter="", progress=False)
    model64 = copy.deepcopy(model).double()
    ll = [reference_loglikelihood(model64, tok, "The c", o)[0] for o in items[0].options]
    np.testing.assert_allclose(result.predictions[0].loglikelihoods, ll, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_forward_context_routes_rows_by_task(model, tok, prefix_cache) -> None:
    """A task-dependent hook installed by forward_context must see rows in the order of the names given;
    with the prefix cache every forward holds one task's rows (its shared prefix, an item's context, the
    item's options), and the scores still equal the float64 reference with each task's bias."""
    items, _ = mc_items()
    torch.manual_seed(1)
    bias = {"colors": torch.randn(32) * 0.5, "geo": torch.randn(32) * 0.5}
    calls: list[list[str]] = []

    @contextlib.contextmanager
    def route(task_names: list[str]):
        calls.append(list(task_names))
        rows = torch.stack([bias[t] for t in task_names])[:, None, :]  # [B, 1, H]
        hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: o + rows)
        try:
            yield
        finally:
            hook.remove()

    result = evaluate_multiple_choice(
        model, tok, items, batch_size=3, forward_context=route, progress=False, prefix_cache=prefix_cache
    )
    n_pairs = sum(len(i.options) for i in items)
    assert {t for c in calls for t in c} == {"colors", "geo"}
    if prefix_cache:
        assert all(len(set(c)) == 1 for c in calls)  # one task per forward
    else:
        assert len(calls) == math.ceil(n_pairs / 3) and sum(len(c) for c in calls) == n_pairs
        assert any(len(set(c)) == 2 for c in calls)  # at least one mixed-task batch
    model64 = copy.deepcopy(model).double()
    for item, pred in zip(items, result.predictions, strict=True):
        b = bias[item.task].double()
        ll = [reference_loglikelihood(model64, tok, item.prompt, " " + o, bias=b)[0] for o in item.options]
        # fp32 against float64: a log-likelihood near -65 has an fp32 spacing of 7.6e-6, so a fixed 1e-5
        # is one or two roundings; rtol=1e-6 (8 fp32 ulps) bounds the summed rounding at any magnitude
        np.testing.assert_allclose(pred.loglikelihoods, ll, atol=1e-5, rtol=1e-6)


def test_multiple_choice_rejects_bad_items(model, tok) -> None:
    with pytest.raises(ValueError, match="no options"):
        evaluate_multiple_choice(model, tok, [Ex("p", "r", "t", "x")], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        evaluate_multiple_choice(model, tok, [Ex("p", "r", "t", "x", ["a", "b"], 2)], progress=False)


# --------------------------------------------------------------------------------------- generation

PROMPTS = [
    "The cat",
    "Question: what is 2 + 3? Answer:",
    "A dog ran in the park with",
    "Paris is the capital",
]


def greedy_reference(model, tok, prompt: str, n: int) -> list[int]:
    """Unbatched greedy decoding with no cache: argmax of a full forward at each step."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
    return out


def test_batched_generation_equals_one_by_one(model, tok) -> None:
    batched = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    reference = [tok.decode(greedy_reference(model, tok, p, 8), skip_special_tokens=True) for p in PROMPTS]
    assert batched == reference
    assert all(len(text) > 0 for text in batched)


def test_generation_stops_at_stop_string(model, tok) -> None:
    free = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    stop = free[1][2:4]  # a substring the unconstrained output contains
    assert stop
    stopped = generate(model, tok, PROMPTS, max_new_tokens=8, stop=[stop], batch_size=2)
    assert stopped == [truncate_at_stop(t, [stop]) for t in free]
    assert stopped[1] == free[1][: free[1].index(stop)]


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"
    assert truncate_at_stop("abc", ["zz", ""]) == "abc"


def test_evaluate_generation_exact_match(model, tok) -> None:
    free = generate(model, tok, PROMPTS[:2], max_new_tokens=6)
    items = [
        Ex(PROMPTS[0], free[0].strip() + "\nignored", "t1", "a"),  # first line matches the generation
        Ex(PROMPTS[1], "something else entirely", "t2", "b"),
    ]
    res = evaluate_generation(
        model, tok, items, extractor="first_line", stop=(), max_new_tokens=6, batch_size=2, progress=False
    )
    assert [p.generation for p in res.predictions] == free
    assert [p.correct for p in res.predictions] == [True, False]
    assert res.per_task == {"t1": {"exact_match": 1.0, "n": 1}, "t2": {"exact_match": 0.0, "n": 1}}
    assert res.overall == {"exact_match": 0.5, "n": 2}


def test_evaluate_generation_prefers_meta_target(model, tok) -> None:
    free = generate(model, tok, PROMPTS[:1], max_new_tokens=6)
    item = Ex(
        PROMPTS[0], "a long worked solution", "t", "a", meta={"target": free[0].strip().splitlines()[0]}
    )
    res = evaluate_generation(
        model, tok, [item], extractor="first_line", stop=(), max_new_tokens=6, progress=False
    )
    assert res.predictions[0].gold == item.meta["target"] and res.predictions[0].correct
