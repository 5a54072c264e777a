"""Final-answer extraction and correctness for GSM8K-style math word problems.

The single implementation used by the reward functions (``trl_opsd.rewards``), the gradient-geometry
diagnostics and the evaluation harness. The strict form is GSM8K's own ``#### N`` line. The flexible
forms cover what chat models write instead: "The answer is N", ``\\boxed{N}``, and as a last resort
the last number in the text (lm-eval's ``flexible-extract`` filter does the same). Numbers may carry
thousands commas, a dollar sign, markdown bold or a trailing period.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"####\s*\**\s*(" + _NUMBER + ")")
_FLEXIBLE = [
    re.compile(r"answer\s+is\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
]
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written with commas, a dollar sign or a trailing period.

    ``"$1,000.00"`` -> ``"1000"``, ``"-3.50"`` -> ``"-3.5"``; ``None`` when ``text`` holds no number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # not quantize(): that raises past 28 digits, which models do write
    return format(value.normalize(), "f")


def answer_span(text: str, strict: bool = False) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the final answer's number in ``text``, or ``None``.

    Order of preference: the ``#### N`` line; unless ``strict``, then the last "The answer is N", the
    last ``\\boxed{N}``, and finally the last number anywhere.
    """
    match = _STRICT.search(text)
    if match:
        return match.span(1)
    if strict:
        return None
    for pattern in _FLEXIBLE:
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].span(1)
    numbers = list(_ANY_NUMBER.finditer(text))
    return numbers[-1].span() if numbers else None


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer of a completion, normalised, or ``None`` (see :func:`answer_span` for the forms)."""
    span = answer_span(text, strict=strict)
    return None if span is None else normalize_number(text[span[0] : span[1]])


def is_correct(completion: str, gold: str | int | float, strict: bool = False) -> bool:
    """Whether the completion's final answer equals the gold answer as a number."""
    predicted = extract_answer(completion, strict=strict)
    expected = normalize_number(str(gold))
    if expected is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return predicted is not None and predicted == expected
