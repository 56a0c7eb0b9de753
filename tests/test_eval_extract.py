"""Answer extraction and exact-match normalisation on hand-made strings."""

from __future__ import annotations

import pytest

from metalora.eval.extract import (
    exact_match,
    extract_first_line,
    extract_gsm8k,
    extract_letter,
    extract_number,
    get_extractor,
    normalize_answer,
    normalize_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("Total 1,000 apples\n#### 1,200", "1200"),  # the marker wins over earlier numbers
        ("#### -3.50", "-3.5"),
        ("#### $18.", "18"),
        ("no marker: 5 apples then 7 pears", "7"),  # fallback: the last number
        ("costs $1,234.", "1234"),
        ("It is 2.0 or 3.00 hours", "3"),
        ("nothing numeric here", None),
        ("#### x but 4 later", "4"),  # an empty marker falls back
    ],
)
def test_extract_gsm8k(text: str, expected: str | None) -> None:
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("answer: (b)", "B"),
        ("Answer:D because", "D"),
        ("I compared (A) and then chose... the answer is D", "D"),  # answer phrase beats "(A)"
        ("Options (a) and (c) seem wrong; (e) fits", "A"),  # first parenthesised letter
        ("B. because it is green", "B"),
        ("C) red", "C"),
        ("  E  ", "E"),
        ("the answer is a cat", None),  # a lower-case article is not option A
        ("I think so", None),  # nor is the pronoun I
        ("", None),
    ],
)
def test_extract_letter(text: str, expected: str | None) -> None:
    assert extract_letter(text) == expected


def test_extract_letter_respects_letter_set() -> None:
    assert extract_letter("Answer: E", letters="ABCD") is None
    assert extract_letter("Answer: E (B)", letters="ABCD") == "B"


def test_numbers_and_lines() -> None:
    assert extract_number("from 3 to -4.25 degrees") == "-4.25"
    assert extract_number("1,234,567 people") == "1234567"
    assert extract_number(".5 of it") == "0.5"
    assert normalize_number("1,000.50") == "1000.5"
    assert normalize_number("12.") == "12"
    assert normalize_number("abc") is None
    assert extract_first_line("\n\n  Paris \nRome") == "Paris"
    assert extract_first_line("  \n") is None


def test_exact_match_normalisation() -> None:
    assert normalize_answer("  The  Cat. ") == "the cat"
    assert exact_match("72.00", "72")
    assert exact_match("1,000", "1000")
    assert exact_match("Paris!", "paris")
    assert not exact_match("Paris", "Rome")
    assert not exact_match(None, "3")
    assert not exact_match("3", "4")


def test_get_extractor() -> None:
    assert get_extractor("gsm8k") is extract_gsm8k
    custom = str.strip
    assert get_extractor(custom) is custom
    with pytest.raises(ValueError, match="unknown extractor 'nope'; known:"):
        get_extractor("nope")
