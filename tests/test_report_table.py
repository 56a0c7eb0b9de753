"""``report.format_table``: base vs adapted with the difference, or one score column for a base model."""

from __future__ import annotations

from metalora.report import format_table


def test_table_against_the_base_shows_both_and_the_difference():
    after = {"arc": {"primary": "acc_norm", "acc_norm": 0.5, "acc": 0.1, "n": 4}}
    before = {"arc": {"primary": "acc_norm", "acc_norm": 0.25, "acc": 0.9, "n": 4}}
    assert format_table(after, before).splitlines()[2] == "| arc | 4 | acc_norm | 0.250 | 0.500 | +0.250 |"


def test_a_base_model_alone_gets_one_score_column_and_no_nan():
    after = {"gsm8k": {"primary": "exact_match", "exact_match": 0.125, "n": 8}}
    table = format_table(after)
    assert table.splitlines() == [
        "| task | n | metric | score |",
        "|---|---|---|---|",
        "| gsm8k | 8 | exact_match | 0.125 |",
    ]
    assert "nan" not in table
