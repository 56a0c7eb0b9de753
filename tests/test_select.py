"""Selection baselines on hand-made corpora with known answers, and against explicit computations."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from metalora.select.bm25 import bm25_scores
from metalora.select.classifier import classifier_scores, pareto_keep
from metalora.select.dsir import bag_of_ngrams_log_probs, dsir_log_importance, gumbel_top_k
from metalora.select.hashing import hashed_ngram_counts, ngrams, stable_bucket, tokenize
from metalora.select.mix import mix_counts, mix_rows

MATH = [
    "solve the equation for x and take the derivative",
    "the integral of the polynomial equals the area",
    "compute the derivative of the polynomial at zero",
    "an equation with two unknowns has a solution set",
    "the integral and the derivative are inverse operations",
]
COOKING = [
    "preheat the oven and mix the flour with butter",
    "knead the dough and let the bread rise overnight",
    "season the soup with salt pepper and fresh basil",
    "whisk the eggs with sugar for the sponge cake",
    "roast the vegetables in the oven with olive oil",
]


# ------------------------------------------------------------------------------------------- hashing


def test_hashing_is_stable_blake2b() -> None:
    digest = hashlib.blake2b(b"the cat", digest_size=8).digest()
    assert stable_bucket("the cat", 10_000) == int.from_bytes(digest, "little") % 10_000
    assert stable_bucket("the cat", 10_000) == 2360  # fixed across runs and machines (no salted hash())
    assert tokenize("The cat's hat!") == ["the", "cat", "'", "s", "hat", "!"]
    assert ngrams(["a", "b", "c"]) == ["a", "b", "c", "a b", "b c"]
    counts = hashed_ngram_counts(["a b a"], num_buckets=10_000)
    expected = Counter(stable_bucket(f, 10_000) for f in ["a", "b", "a", "a b", "b a"])
    assert {int(j): int(v) for j, v in zip(counts.indices, counts.data, strict=True)} == dict(expected)


# ---------------------------------------------------------------------------------------------- BM25


def test_bm25_rare_shared_terms_rank_first() -> None:
    candidates = [
        "the weather today is sunny and warm",
        "photosynthesis converts light into chemical energy in chloroplasts",
        "the market was busy and the weather was warm",
        "cats sleep most of the day",
    ]
    targets = ["how do chloroplasts perform photosynthesis"]
    scores = bm25_scores(candidates, targets)
    assert int(np.argmax(scores)) == 1
    assert scores[0] == scores[3] == 0.0  # no shared (non-stop-word) term


def test_bm25_equals_hand_computed_lucene_formula() -> None:
    # After tokenisation (stop words out): d0 = [quantum, gluon, gluon], d1 = [cat, sat, mat], d2 = [cat, dog]
    candidates = ["quantum gluon gluon", "the cat sat on the mat", "cat and dog"]
    k1, b, n_docs, avgdl = 1.5, 0.75, 3, 8 / 3

    def term(tf: int, df: int, dl: int) -> float:
        idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
        return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))

    expected = [term(2, 1, 3), term(1, 2, 3), term(1, 2, 2)]  # query "gluon cat"
    np.testing.assert_allclose(bm25_scores(candidates, ["gluon cat"]), expected, rtol=1e-5)


def test_bm25_aggregates() -> None:
    candidates = MATH + COOKING
    q1, q2 = "derivative of the polynomial", "bread in the oven"
    s1, s2 = bm25_scores(candidates, [q1]), bm25_scores(candidates, [q2])
    np.testing.assert_allclose(bm25_scores(candidates, [q1, q2]), s1 + s2, rtol=1e-6)
    np.testing.assert_allclose(bm25_scores(candidates, [q1, q2], aggregate="mean"), (s1 + s2) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        bm25_scores(candidates, [q1, q2], aggregate="max"), np.maximum(s1, s2), rtol=1e-6
    )
    np.testing.assert_allclose(
        bm25_scores(candidates, [q1, q2], aggregate="concat"),
        bm25_scores(candidates, [q1 + " " + q2]),
        rtol=1e-6,
    )
    assert bm25_scores(candidates, ["zzz unknownword"]).tolist() == [0.0] * len(candidates)
    with pytest.raises(ValueError, match="aggregate"):
        bm25_scores(candidates, [q1], aggregate="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        bm25_scores(candidates, [])


# ---------------------------------------------------------------------------------------------- DSIR


def test_dsir_log_ratio_matches_explicit_computation() -> None:
    candidates = MATH[:3] + COOKING
    target = MATH[3:]
    buckets = 64  # small, so that collisions happen and are handled like the reference

    def explicit_counts(texts: list[str]) -> Counter:
        c: Counter = Counter()
        for t in texts:
            words = tokenize(t)
            feats = words + [f"{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]
            for f in feats:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little") % buckets
                c[h] += 1
        return c

    tgt, raw = explicit_counts(target), explicit_counts(candidates)
    n_tgt, n_raw = sum(tgt.values()), sum(raw.values())
    doc = explicit_counts([candidates[0]])
    expected = sum(
        cnt * (math.log((tgt[b] + 1) / (n_tgt + buckets)) - math.log((raw[b] + 1) / (n_raw + buckets)))
        for b, cnt in doc.items()
    )
    # our Laplace option (the earlier estimator and buckets); the default is the package's (test below)
    got = dsir_log_importance(candidates, target, num_buckets=buckets, smoothing=1.0, hash_name="blake2b")
    assert got[0] == pytest.approx(expected, rel=1e-12)


def test_dsir_ranks_target_like_documents_first() -> None:
    new_math = [
        "take the derivative of the polynomial equation",
        "the integral of x equals the area under the polynomial",
        "solve for the unknowns of the equation",
    ]
    candidates = COOKING[:3] + new_math + COOKING[3:]
    logw = dsir_log_importance(candidates, MATH)
    top = set(gumbel_top_k(logw, 3, temperature=0.0).tolist())
    assert top == {3, 4, 5}
    # an explicit raw corpus works too, and the probabilities are normalised
    logp = bag_of_ngrams_log_probs(hashed_ngram_counts(MATH, 100), smoothing=1.0)
    assert np.exp(logp).sum() == pytest.approx(1.0)
    logw_raw = dsir_log_importance(candidates, MATH, raw=COOKING + MATH[:2])
    assert set(np.argsort(-logw_raw)[:3].tolist()) == {3, 4, 5}


def test_gumbel_top_k() -> None:
    logw = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    a, b = gumbel_top_k(logw, 3, seed=11), gumbel_top_k(logw, 3, seed=11)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3
    assert len({tuple(gumbel_top_k(logw, 3, seed=s).tolist()) for s in range(30)}) > 1  # seed matters
    assert gumbel_top_k(logw, 3, temperature=0.0).tolist() == [1, 3, 4]  # deterministic top-k
    for seed in range(20):  # tiny temperature: the noise cannot reorder weights this far apart
        assert gumbel_top_k(logw, 3, seed=seed, temperature=1e-6).tolist() == [1, 3, 4]
    # temperature 1, k = 1 is the Gumbel-max trick: P(i) = w_i / Σ w
    draws = Counter(int(gumbel_top_k(logw, 1, seed=s)[0]) for s in range(4000))
    freq = np.array([draws[i] / 4000 for i in range(5)])
    np.testing.assert_allclose(freq, np.exp(logw), atol=0.03)
    with pytest.raises(ValueError, match="k must be"):
        gumbel_top_k(logw, 6)


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_separates_vocabularies() -> None:
    new_math = ["the derivative of this equation", "integral of a polynomial with unknowns"]
    new_cook = ["bake the bread in a hot oven", "mix flour eggs and sugar for cake"]
    candidates = new_math + new_cook
    scores = classifier_scores(candidates, MATH, raw=COOKING)
    assert scores.shape == (4,)
    assert min(scores[:2]) > 0.5 > max(scores[2:])
    # same inputs and seed -> same scores
    np.testing.assert_array_equal(scores, classifier_scores(candidates, MATH, raw=COOKING))


def test_pareto_keep() -> None:
    scores = np.array([0.0, 0.5, 0.9, 1.0] * 5000)
    keep = pareto_keep(scores, alpha=2.0, seed=3)
    np.testing.assert_array_equal(keep, np.random.default_rng(3).pareto(2.0, len(scores)) > 1 - scores)
    # numpy's pareto is Lomax: P(keep | s) = (2 - s)^-alpha
    for s in (0.0, 0.5, 0.9, 1.0):
        assert keep[scores == s].mean() == pytest.approx((2 - s) ** -2.0, abs=0.02)
    assert pareto_keep(scores, 9.0, seed=3).mean() < keep.mean()  # larger alpha keeps less


# ----------------------------------------------------------------------------------------------- MIX


def test_mix_counts_are_exact() -> None:
    assert mix_counts(100, 10, ratio=5) == (50, 10)
    assert mix_counts(100, 10, ratio=20) == (100, 5)  # the largest mix that fits 20:1
    assert mix_counts(100, 10, ratio=2, k=30) == (20, 10)
    assert mix_counts(100, 10, ratio=None) == (100, 10)
    assert mix_counts(100, 10, ratio=0) == (0, 10)
    with pytest.raises(ValueError, match="needs 90 training and 10 validation rows; there are 50 and 10"):
        mix_counts(50, 10, ratio=9, k=100)
    with pytest.raises(ValueError, match="ratio"):
        mix_counts(50, 10, ratio=None, k=20)


def test_mix_rows() -> None:
    train = [{"prompt": f"t{i}"} for i in range(100)]
    val = [{"prompt": f"v{i}"} for i in range(10)]
    rows = mix_rows(train, val, ratio=5, seed=1)
    sources = Counter(r["selection_source"] for r in rows)
    assert sources == {"candidates": 50, "target": 10}
    assert len({r["prompt"] for r in rows}) == 60  # without replacement
    assert all(r["prompt"].startswith("t" if r["selection_source"] == "candidates" else "v") for r in rows)
    assert rows == mix_rows(train, val, ratio=5, seed=1)
    assert rows != mix_rows(train, val, ratio=5, seed=2)
    assert "selection_source" not in train[0]  # inputs untouched


def test_dsir_default_is_the_data_selection_package_formula_by_hand() -> None:
    """The default log-weights are ``data-selection`` 1.0.3's: SHA-256 buckets of the lower-cased word/punct
    n-grams, log(p + 1e-8) estimates (written out here from its source, with 50 buckets); ``smoothing=1``
    with blake2b buckets is the earlier Laplace estimator."""

    def bucket(f: str) -> int:
        return int(hashlib.sha256(f.encode("utf-8")).hexdigest(), 16) % 50

    def counts(text: str) -> np.ndarray:
        words = re.findall(r"\w+|[^\w\s]+", text.lower())
        c = np.zeros(50)
        for f in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            c[bucket(f)] += 1
        return c

    candidates, target = COOKING[:4] + MATH[:2], MATH[2:]
    raw = sum(counts(t) for t in candidates)
    tgt = sum(counts(t) for t in target)
    log_diff = np.log(tgt / tgt.sum() + 1e-8) - np.log(raw / raw.sum() + 1e-8)
    expected = np.array([counts(t) @ log_diff for t in candidates])
    np.testing.assert_allclose(dsir_log_importance(candidates, target, num_buckets=50), expected, rtol=1e-12)
    laplace = dsir_log_importance(candidates, target, num_buckets=50, smoothing=1.0, hash_name="blake2b")
    assert not np.allclose(laplace, expected)


@pytest.mark.optional
def test_dsir_equals_the_data_selection_package() -> None:
    """Against the authors' package itself, when it is importable (it is not a dependency)."""
    data_selection = pytest.importorskip("data_selection", reason="needs data-selection==1.0.3 importable")
    import json
    import tempfile

    candidates, target = COOKING + MATH[:2], MATH[2:]
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in (("raw", candidates), ("target", target)):
            Path(tmp, f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        dsir = data_selection.HashedNgramDSIR(
            [f"{tmp}/raw.jsonl"],
            [f"{tmp}/target.jsonl"],
            cache_dir=f"{tmp}/c",
            num_proc=1,
            min_example_length=0,
        )
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
        theirs = np.load(f"{tmp}/c/log_importance_weights/0.npy")
    np.testing.assert_allclose(dsir_log_importance(candidates, target), theirs, rtol=1e-9, atol=1e-9)
