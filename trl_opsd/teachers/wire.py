"""Checks of remote responses against their wire formats, before anything is parsed into scores or cached.

A response that breaks the format raises :class:`~trl_opsd.teachers.http.InvalidResponseError` naming the
field and position; the executor retries it like any transient server fault, and caches nothing. Formats
(see ``openai_compat.py`` for where each was read):

- completions ``choices[0].logprobs`` (OpenAI legacy, vLLM echo): ``tokens`` (strings), ``token_logprobs``
  (numbers, ``null`` allowed at position 0, which has no context), ``top_logprobs`` (``{token: logprob}``
  or ``null`` at position 0), ``text_offset`` (integers, non-decreasing): all of ``len(tokens)``;
- vLLM ``choices[0].prompt_logprobs``: one entry per prompt token, ``null`` at 0, then
  ``{"<token id>": {"logprob": number, "rank": int | null, "decoded_token": str | null}}``;
- chat completions ``choices[0].message.content`` (string or ``null``).

A log-prob is a finite number <= 0. vLLM writes ``-inf`` as ``-9999.0`` (finite, kept). A positive value up to
:data:`LOGPROB_ROUNDING` is float rounding of a log-prob of 0 and reads as 0.0; NaN, +-inf, a larger positive
value, a string, ``true`` or a missing value is a broken response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .http import InvalidResponseError

LOGPROB_ROUNDING = 1e-4


def logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidResponseError(f"{where}: log-prob must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value > LOGPROB_ROUNDING:
        raise InvalidResponseError(f"{where}: log-prob must be a finite number <= 0, got {value!r}")
    return min(float(value), 0.0)


def expect_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidResponseError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def expect_list(value: Any, where: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise InvalidResponseError(f"{where}: expected a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise InvalidResponseError(f"{where}: {len(value)} entries where {length} were expected")
    return value


def first_choice(data: Any) -> dict:
    """``choices[0]`` of a completions or chat response (an object with a non-empty ``choices`` list)."""
    data = expect_dict(data, "response")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidResponseError("response: no choices")
    if data.get("usage") is not None:
        expect_dict(data["usage"], "response.usage")
    return expect_dict(choices[0], "choices[0]")


def chat_result(data: Any, default_model: str) -> dict[str, Any]:
    """``{text, model, usage}`` of a chat completion."""
    choice = first_choice(data)
    message = expect_dict(choice.get("message"), "choices[0].message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise InvalidResponseError(f"choices[0].message.content: expected a string, got {type(content).__name__}")
    model = data.get("model", default_model)
    if not isinstance(model, str):
        raise InvalidResponseError(f"response.model: expected a string, got {type(model).__name__}")
    return {"text": content or "", "model": model, "usage": data.get("usage") or {}}


def echo_block(logprobs: Any, n_sent: int, *, scored_from: int, k: int | None, at_least: int = 1) -> Mapping[str, list]:
    """Check an echoed ``logprobs`` block covering ``n_sent`` prompt tokens (and possibly generated ones).

    Positions ``scored_from .. n_sent - 1`` are read as scores (``k`` top entries each; ``k=None``: only
    ``tokens`` is read). Returns the block with its lists checked for type and equal length.
    """
    block = expect_dict(logprobs, "choices[0].logprobs")
    tokens = expect_list(block.get("tokens"), "logprobs.tokens")
    if len(tokens) < n_sent:
        raise InvalidResponseError(f"logprobs.tokens: the server echoed {len(tokens)} tokens for a {n_sent}-token prompt")
    for pos, token in enumerate(tokens):
        if not isinstance(token, str):
            raise InvalidResponseError(f"logprobs.tokens[{pos}]: expected a string, got {type(token).__name__}")
    if block.get("text_offset") is not None:
        offsets = expect_list(block["text_offset"], "logprobs.text_offset", len(tokens))
        if any(isinstance(o, bool) or not isinstance(o, int) for o in offsets) or any(
            b < a for a, b in zip(offsets, offsets[1:])
        ):
            raise InvalidResponseError("logprobs.text_offset: expected non-decreasing integers")
    if k is None:
        return block
    token_logprobs = expect_list(block.get("token_logprobs"), "logprobs.token_logprobs", len(tokens))
    top = block.get("top_logprobs")
    if k > 0 or top is not None:
        top = expect_list(top, "logprobs.top_logprobs", len(tokens))
    for pos in range(scored_from, n_sent):
        logprob(token_logprobs[pos], f"logprobs.token_logprobs[{pos}]")
        if k > 0:
            entry = expect_dict(top[pos], f"logprobs.top_logprobs[{pos}]")
            top_k_count(len(entry), k, f"logprobs.top_logprobs[{pos}]", at_least=at_least)
            for token, value in entry.items():
                logprob(value, f"logprobs.top_logprobs[{pos}][{token!r}]")
    return block


def prompt_logprobs_entries(prompt_logprobs: Any, n_sent: int, *, scored_from: int, k: int, at_least: int = 1) -> list:
    """Check vLLM's ``prompt_logprobs``: one entry per sent token; the read positions fully typed."""
    entries = expect_list(prompt_logprobs, "choices[0].prompt_logprobs", n_sent)
    for pos in range(scored_from, n_sent):
        entry = expect_dict(entries[pos], f"prompt_logprobs[{pos}]")
        top_k_count(len(entry), k, f"prompt_logprobs[{pos}]", at_least=at_least)
        for token_id, info in entry.items():
            where = f"prompt_logprobs[{pos}][{token_id!r}]"
            if not (isinstance(token_id, str) and token_id.isdigit()):
                raise InvalidResponseError(f"{where}: a key must be a token id")
            info = expect_dict(info, where)
            logprob(info.get("logprob"), f"{where}.logprob")
            rank = info.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise InvalidResponseError(f"{where}.rank: expected an integer >= 1 or null, got {rank!r}")
    return entries


def top_k_count(count: int, k: int, where: str, *, at_least: int = 1) -> None:
    """A position holds the top ``k`` plus the actual token when it is not among them: at most ``k + 1``
    entries, and at least ``at_least`` (vLLM: ``min(k, vocabulary)``; token-string dialects may merge
    tokens that decode alike, so 1)."""
    low = max(1, at_least)
    if count < low or count > k + 1:
        raise InvalidResponseError(f"{where}: {count} entries for top_k={k} (expected {low} to {k + 1})")
