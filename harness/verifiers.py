"""Final-answer extraction and correctness for GSM8K-style answers (re-exported from ``trl_opsd.verify``).

The trainer's reward functions need the verifier and ``trl_opsd`` must not import ``harness``, so the
single implementation lives in ``trl_opsd.verify``; the harness uses it under this name.
"""

from trl_opsd.verify import answer_span, extract_answer, is_correct, normalize_number

__all__ = ["answer_span", "extract_answer", "is_correct", "normalize_number"]
