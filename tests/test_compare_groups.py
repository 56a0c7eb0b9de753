"""Task groups in ``metalora compare``'s summary (MMLU, MMLU-math, BBH as one column each), by hand."""

from __future__ import annotations

import pytest

from metalora.compare.summary import MMLU_MATH, WIDE, markdown, summarize, task_groups


def _result(seed: int, scores: dict[str, tuple[float, int]]) -> dict:
    return {
        "recipe": "r",
        "seed": seed,
        "lr": 1e-4,
        "trainable_params": 10,
        "counters": dict.fromkeys(("optimizer_steps", "samples", "tokens", "wall_time_s"), 1.0),
        "losses": [],
        "scores": {
            t: {"primary": "acc", "acc": acc, "n": n, "items": {"ids": [f"{t}{i}" for i in range(n)], "acc": [acc] * n}}
            for t, (acc, n) in scores.items()
        },
    }  # fmt: skip


def test_groups_are_the_suites_with_two_or_more_tasks():
    tasks = [
        "mmlu:anatomy",
        "mmlu:high_school_mathematics",
        "mmlu:college_mathematics",
        "bbh:navigate",
        "boolq",
    ]
    assert task_groups(tasks) == {
        "mmlu": ["mmlu:anatomy", "mmlu:high_school_mathematics", "mmlu:college_mathematics"],
        "mmlu_math": ["mmlu:high_school_mathematics", "mmlu:college_mathematics"],
    }
    assert "high_school_statistics" in MMLU_MATH and "anatomy" not in MMLU_MATH


def test_group_score_is_the_item_weighted_mean_by_hand():
    """Seed 0: MMLU (0.5·10 + 0.8·30 + 0.2·10) / 50, MMLU-math (college_mathematics and abstract_algebra,
    not anatomy) (0.8·30 + 0.2·10) / 40, BBH (0.2·5 + 0.6·15) / 20 = 0.5; seed 1 likewise."""
    seeds = [
        {"mmlu:anatomy": (0.5, 10), "mmlu:college_mathematics": (0.8, 30), "mmlu:abstract_algebra": (0.2, 10),
         "bbh:navigate": (0.2, 5), "bbh:snarks": (0.6, 15)},
        {"mmlu:anatomy": (0.7, 10), "mmlu:college_mathematics": (0.4, 30), "mmlu:abstract_algebra": (0.6, 10),
         "bbh:navigate": (0.4, 5), "bbh:snarks": (0.2, 15)},
    ]  # fmt: skip
    row = summarize([_result(s, sc) for s, sc in enumerate(seeds)], reference=None, resamples=10)["recipes"][
        "r"
    ]
    assert row["groups"]["mmlu"]["per_seed"] == pytest.approx([(5 + 24 + 2) / 50, (7 + 12 + 6) / 50])
    assert row["groups"]["mmlu_math"]["per_seed"] == pytest.approx([(24 + 2) / 40, (12 + 6) / 40])
    assert row["groups"]["bbh"]["per_seed"] == pytest.approx([(1 + 9) / 20, (2 + 3) / 20])
    assert row["groups"]["bbh"]["mean"] == pytest.approx(0.375)


def test_a_wide_table_shows_groups_instead_of_every_task():
    scores = {f"mmlu:s{i}": (0.5, 4) for i in range(WIDE)} | {
        "bbh:a": (0.1, 2),
        "bbh:b": (0.3, 2),
        "boolq": (0.9, 3),
    }
    text = markdown(summarize([_result(0, scores), _result(1, scores)], reference=None, resamples=10))
    header = next(line for line in text.splitlines() if line.startswith("| recipe"))
    assert header.startswith("| recipe | seeds | lr | mmlu | bbh | boolq | macro |")
    narrow = markdown(summarize([_result(0, {"bbh:a": (0.1, 2), "bbh:b": (0.3, 2)})], None, resamples=10))
    assert "| recipe | seeds | lr | bbh:a | bbh:b | bbh | macro |" in narrow
