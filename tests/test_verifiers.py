"""Final-answer extraction for GSM8K-format text."""

import pytest

from harness.verifiers import extract_answer, is_correct, normalize_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12+7=19\n#### 19", "19"),
        ("#### 1,000", "1000"),
        ("#### $42.", "42"),
        ("So she has $1,234.50 left.\n#### 1234.5", "1234.5"),
        ("The answer is 72.", "72"),
        ("the answer is: -3", "-3"),
        ("We get \\boxed{18}", "18"),
        ("first 3 then 4 then 5", "5"),
        ("no number here", None),
        ("#### 7\nThe answer is 9", "7"),  # the GSM8K line wins over prose
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strict_mode_only_accepts_the_gsm8k_line():
    assert extract_answer("The answer is 72.", strict=True) is None
    assert extract_answer("x\n#### 72", strict=True) == "72"


def test_is_correct_compares_numbers_not_strings():
    assert is_correct("#### 1,000.00", 1000)
    assert is_correct("The answer is $5.", "5")
    assert not is_correct("#### 51", "5")
    assert not is_correct("nothing", "5")
    assert normalize_number("3.50") == "3.5"
    with pytest.raises(ValueError, match="gold answer"):
        is_correct("#### 5", "five")
