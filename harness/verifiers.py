"""Final-answer extraction and correctness for GSM8K-style math word problems.

The strict form is GSM8K's own ``#### N`` line. The flexible forms cover what chat models write
instead: "The answer is N", ``\\boxed{N}``, and as a last resort the last number in the text
(lm-eval's ``flexible-extract`` filter does the same).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"####\s*(" + _NUMBER + ")")
_FLEXIBLE = [
    re.compile(r"answer\s+is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE),
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
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer of a completion, normalised, or ``None``.

    With ``strict=True`` only a ``#### N`` line counts (GSM8K's format); otherwise the flexible
    forms and finally the last number in the text are tried, in that order.
    """
    match = _STRICT.search(text)
    if match:
        return normalize_number(match.group(1))
    if strict:
        return None
    for pattern in _FLEXIBLE:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(completion: str, gold: str | int | float, strict: bool = False) -> bool:
    """Whether the completion's final answer equals the gold answer as a number."""
    predicted = extract_answer(completion, strict=strict)
    expected = normalize_number(str(gold))
    if expected is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return predicted is not None and predicted == expected
