"""Answer extraction from generated text, and exact-match normalisation.

Extractors map a model's free-form output to a canonical answer string (or ``None`` when nothing
answer-like is found); ``exact_match`` compares the canonical forms.

- ``gsm8k``:  the number after ``#### `` (GSM8K's answer marker); failing that, the last number in the
  text. Commas (thousands separators), ``$`` and a trailing period are dropped, and numbers are put in a
  canonical form (``"1,000.50"`` → ``"1000.5"``, ``"3.0"`` → ``"3"``), so ``72`` matches ``72.00``.
- ``number``: the last number in the text, canonicalised the same way.
- ``letter``: an option letter: ``"answer is (B)"``, ``"Answer: B"``, ``"(B)"``, ``"B."``, ``"B)"``, or a
  bare ``"B"``; explicit "answer" phrases win over the first parenthesised letter, which wins over a
  letter at the start of the text (``"B."``, ``"B)"``, ``"B:"``) or a text that is only the letter.
- ``first_line``: the first non-empty line, stripped (for short free-text answers).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

__all__ = [
    "EXTRACTORS",
    "exact_match",
    "extract_first_line",
    "extract_gsm8k",
    "extract_letter",
    "extract_number",
    "get_extractor",
    "normalize_answer",
    "normalize_number",
]

Extractor = Callable[[str], str | None]

# A number: optional sign, digits with optional thousands commas, optional decimals; or ".5".
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_GSM8K_MARKER = re.compile(r"####\s*(-?\$?\s?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of a number written with optional ``$``, commas, trailing period.

    ``"1,234.50"`` → ``"1234.5"``; ``"-3.0"`` → ``"-3"``; returns ``None`` if ``text`` is not a number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The last number in ``text``, canonicalised by ``normalize_number``."""
    matches = _NUMBER.findall(text)
    for candidate in reversed(matches):
        number = normalize_number(candidate)
        if number is not None:
            return number
    return None


def extract_gsm8k(text: str) -> str | None:
    """GSM8K: the number after ``####``; otherwise the last number in the text (lm-eval's flexible match)."""
    match = _GSM8K_MARKER.search(text)
    if match is not None:
        number = normalize_number(match.group(1))
        if number is not None:
            return number
    return extract_number(text)


def _letter_patterns(letters: str) -> list[re.Pattern[str]]:
    upper = f"[{re.escape(letters.upper())}]"
    both = f"[{re.escape(letters.upper() + letters.lower())}]"
    return [
        # "the answer is (B)", "Answer: B", "answer: (b)" — explicit answer phrases first. A bare letter
        # must be upper-case here ("the answer is a cat" is not option A); a parenthesised one may not be.
        re.compile(rf"(?i:answer)\s*(?:is|:)?\s*:?\s*(?:\(({both})\)|({upper})(?![A-Za-z]))"),
        # "(B)" anywhere.
        re.compile(rf"\(({both})\)"),
        # "B." / "B)" / "B:" at the start, or the whole text is "B" ("I think A" is not option I).
        re.compile(rf"^\s*({upper})(?:[.):]|\s*$)"),
    ]


def extract_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """An option letter (upper-case) from ``"Answer: B"``, ``"(B)"``, ``"B."`` or a bare ``"B"``."""
    for pattern in _letter_patterns(letters):
        match = pattern.search(text)
        if match is not None:
            return next(g for g in match.groups() if g is not None).upper()
    return None


def extract_first_line(text: str) -> str | None:
    """The first non-empty line, stripped."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


EXTRACTORS: dict[str, Extractor] = {
    "gsm8k": extract_gsm8k,
    "number": extract_number,
    "letter": extract_letter,
    "first_line": extract_first_line,
}


def get_extractor(name: str | Extractor) -> Extractor:
    """An extractor by name (see ``EXTRACTORS``), or the callable itself."""
    if callable(name):
        return name
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown extractor {name!r}; known: {sorted(EXTRACTORS)}") from None


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Exact-match normal form: numbers canonicalised; otherwise lower-case, punctuation removed, whitespace
    collapsed (``"  The Cat. "`` → ``"the cat"``)."""
    if text is None:
        return ""
    number = normalize_number(text)
    if number is not None:
        return number
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(prediction: str | None, gold: str | None) -> bool:
    """``normalize_answer(prediction) == normalize_answer(gold)``; a missing prediction never matches."""
    if prediction is None or gold is None:
        return False
    return normalize_answer(prediction) == normalize_answer(gold)
