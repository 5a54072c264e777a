"""Snowflake Cortex REST teacher: text generation over ``/api/v2/cortex/inference:complete`` (httpx).

Wire format, and where it was read: the request line, headers and body in the seed notebook (seeds/000,
section 2.5) and Snowflake's reference client ``snowflake-ml-python`` (``snowflake/cortex/_complete.py``:
``Snowflake Token="..."`` header, ``"stream": true`` body, ``choices[0].delta.content`` per event, an
``"error"`` payload as ``MidStreamException``; ``complete_test.py``: its loopback SSE server); the bearer
token-type header in Snowflake's "Authenticating Snowflake REST APIs" docs; the error codes in the
Snowflake REST reference ("Cortex Inference"). The ``id``/``model``/``usage`` fields of each event follow the
Cortex REST API docs' streamed example as quoted in issue 4's brief; the stored docs available offline
only say "streams generated tokens back as server-sent events", so the parser treats all three as optional.

    POST {account_url}/api/v2/cortex/inference:complete
    Content-Type: application/json
    Accept: text/event-stream
    Authorization: Snowflake Token="<session-token>"                 (session token), or
    Authorization: Bearer <token>
    X-Snowflake-Authorization-Token-Type: PROGRAMMATIC_ACCESS_TOKEN | KEYPAIR_JWT | OAUTH

    {"model": "...", "messages": [{"role": "user", "content": "..."}], "max_tokens": 160,
     "temperature": 0.0, "stream": true}

The answer is a server-sent event stream whose ``data`` payloads are JSON objects
``{"id": ..., "model": ..., "choices": [{"delta": {"content": "..."}}], "usage": {...}}``; the text is the
concatenation of ``choices[0].delta.content``; a payload with ``"error"`` is a mid-stream error
(``MidStreamException`` in snowflake-ml-python, and an SSE ``event: error``).

When the answer is complete: a truncated text must never be cached, so a stream counts as complete only on
an end marker. OpenAI-style streams end with ``data: [DONE]``; snowflake-ml-python's client parses every
``data`` payload as JSON and raises on one that is not (``_return_stream_response``), so Cortex's own
endpoint evidently ends some streams without ``[DONE]``, and the offline docs do not show its last event.
Accepted, exactly: ``data: [DONE]``; or a body that ends cleanly right after an event whose
``choices[0].finish_reason`` is a non-empty string (the final chunk of the OpenAI chunk format). Anything
else -- the body ending after an ordinary delta, or inside an event -- is a truncation, retried.
``usage`` is taken from the last event that carries one (running totals). The documented error codes
(Snowflake REST reference, "Cortex Inference"): 429 and 503/504 are to be retried with jittered backoff;
400/401/403/404 are not.

Cortex exposes no log-probs, so this teacher generates only: RS-SFT data and the PRM judge. Cortex's
OpenAI-compatible chat endpoint is reached with ``OpenAICompatTeacher.for_cortex`` instead.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from .base import Generation, Teacher
from .. import redaction
from .cache import ResponseCache, request_key_parts
from .http import (
    InvalidResponseError,
    RemoteExecutor,
    RemoteTeacherError,
    RetryableError,
    RetryPolicy,
    SecretSource,
    deadline_http_client,
)
from .sse import SSEEvent, SSEParser, SSEStreamCut

COMPLETE_PATH = "/api/v2/cortex/inference:complete"
BEARER_TOKEN_TYPES = ("PROGRAMMATIC_ACCESS_TOKEN", "KEYPAIR_JWT", "OAUTH")
DEFAULT_TOKEN_ENV = {
    "SESSION": "SNOWFLAKE_SESSION_TOKEN",
    "PROGRAMMATIC_ACCESS_TOKEN": "SNOWFLAKE_PAT",
    "KEYPAIR_JWT": "SNOWFLAKE_JWT",
    "OAUTH": "SNOWFLAKE_OAUTH_TOKEN",
}
NO_LOGPROBS = "Cortex exposes no logprobs; use it for RS-SFT generation or as the PRM judge"


class CortexAuth:
    """A Snowflake credential source and how to present it. The token is read per request, never stored."""

    def __init__(self, token_type: str, *, env: str | None = None, file: str | os.PathLike | None = None) -> None:
        if token_type != "SESSION" and token_type not in BEARER_TOKEN_TYPES:
            raise ValueError(f"token_type must be 'SESSION' or one of {BEARER_TOKEN_TYPES}, got {token_type!r}")
        self.token_type = token_type
        if env is None and file is None:
            env = DEFAULT_TOKEN_ENV[token_type]
        self.source = SecretSource(env, file, what=f"Snowflake {token_type.lower().replace('_', ' ')} token")

    @classmethod
    def session(cls, *, env: str | None = None, file: str | os.PathLike | None = None) -> CortexAuth:
        return cls("SESSION", env=env, file=file)

    @classmethod
    def bearer(cls, token_type: str = "PROGRAMMATIC_ACCESS_TOKEN", *, env: str | None = None,
               file: str | os.PathLike | None = None) -> CortexAuth:
        return cls(token_type, env=env, file=file)

    def describe(self) -> str:
        return f"{self.token_type} token from {self.source.describe()}"

    def headers(self) -> dict[str, str]:
        token = self.source.read()
        if self.token_type == "SESSION":
            return {"Authorization": f'Snowflake Token="{token}"'}
        return {"Authorization": f"Bearer {token}", "X-Snowflake-Authorization-Token-Type": self.token_type}

    def __repr__(self) -> str:
        return f"CortexAuth({self.describe()})"


class CortexTeacher(Teacher):
    """Generates text with a Cortex model; scoring requests fail at ``require`` with the reason."""

    capabilities = frozenset({"generate"})
    capability_notes = {"dense": NO_LOGPROBS, "topk": NO_LOGPROBS, "sampled": NO_LOGPROBS}

    def __init__(
        self,
        account_url: str,
        model: str,
        *,
        auth: CortexAuth,
        name: str | None = None,
        max_concurrency: int = 4,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        cache: ResponseCache | str | os.PathLike | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name or f"cortex:{model}", max_top_k=0)
        self.account_url = account_url.rstrip("/")
        redaction.register_url(self.account_url)
        self.model = model
        self.auth = auth
        self.timeout_s = timeout_s
        auth.headers()  # fail now, naming the variable, if the credential is missing
        if isinstance(cache, (str, os.PathLike)):
            cache = ResponseCache(cache)
        self.executor = RemoteExecutor(
            self.name, max_concurrency=max_concurrency, retry=retry, cache=cache,
            secrets=lambda: (self._current_token(),), sleep=sleep, wall_clock=wall_clock, rng=rng,
        )
        self._client = deadline_http_client(timeout_s)

    def __repr__(self) -> str:
        return redaction.redact(
            f"CortexTeacher(name={self.name!r}, account_url={self.account_url!r}, model={self.model!r}, "
            f"auth={self.auth!r})"
        )

    def metrics(self) -> dict[str, float]:
        return self.executor.metrics()

    def close(self) -> None:
        self.executor.close()
        self._client.close()

    def generate(
        self, chats: Sequence[Sequence[dict[str, Any]]], *, max_tokens: int, temperature: float, n: int = 1
    ) -> list[Generation]:
        """``n`` completions per chat, chat-major (Cortex has no ``n``: one request per sample, each cached
        under its ``sample_index``)."""
        self.require("generate")
        jobs = []
        for chat in chats:
            body = {"model": self.model, "messages": [dict(m) for m in chat], "max_tokens": max_tokens,
                    "temperature": temperature, "stream": True}
            for sample_index in range(n):
                payload = {"body": body, "sample_index": sample_index}
                key = request_key_parts("cortex", self.account_url, self.model, payload)
                jobs.append((key, lambda body=body: self._complete(body)))
        results = self.executor.map(jobs)
        return [
            Generation(text=r["content"], model=r["model"], usage=r["usage"], chat_index=i // n, sample_index=i % n)
            for i, r in enumerate(results)
        ]

    def _current_token(self) -> str:
        try:
            return self.auth.source.read()
        except RemoteTeacherError:
            return ""

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One streamed request parsed into ``{content, usage, model}``; only a complete stream returns."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self.auth.headers()}
        stream = _CortexStream(self.model)
        try:
            with self._client.stream("POST", self.account_url + COMPLETE_PATH, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise self.executor.status_error(
                        resp.status_code, resp.read().decode("utf-8", "replace"), who=repr(self),
                        credential=self.auth.describe(), headers=resp.headers,
                    )
                parser = SSEParser()
                for chunk in resp.iter_bytes():
                    if any(stream.absorb(event) for event in parser.feed(chunk)):
                        break
                else:
                    for event in parser.close():
                        stream.absorb(event)
        except httpx.TimeoutException:
            raise RetryableError(f"no complete response within the {self.timeout_s:g}s deadline") from None
        except httpx.TransportError as err:
            raise RetryableError(f"connection failed: {type(err).__name__}") from None
        except SSEStreamCut as err:
            raise RetryableError(f"event stream cut: {err}") from None
        return stream.result()


class _CortexStream:
    """The events of one Cortex answer folded into ``{content, usage, model}``, and whether it ended."""

    def __init__(self, model: str) -> None:
        self.pieces: list[str] = []
        self.usage: dict[str, Any] = {}
        self.model = model
        self.done = False  # [DONE] seen
        self.finished = False  # the last event so far carried a finish_reason
        self.events = 0

    def absorb(self, event: SSEEvent) -> bool:
        """Fold one event in; True at ``[DONE]``."""
        if event.data.strip() == "[DONE]":
            self.done = True
            return True
        if event.event == "error":
            raise RemoteTeacherError(f"Cortex: error in the event stream (event: error): {redaction.redact(event.data)[:300]}")
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError:
            raise InvalidResponseError("malformed JSON in an event-stream payload") from None
        if not isinstance(payload, dict):
            raise InvalidResponseError(f"event-stream payload is a {type(payload).__name__}, not an object")
        if payload.get("error"):
            raise RemoteTeacherError(f"Cortex: error in the event stream: {redaction.redact(str(payload['error']))[:300]}")
        self.events += 1
        choices = payload.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise InvalidResponseError("event-stream payload: choices is not a list")
        self.finished = False
        for choice in (choices or [])[:1]:
            if not isinstance(choice, dict):
                raise InvalidResponseError("event-stream payload: choices[0] is not an object")
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise InvalidResponseError("event-stream payload: choices[0].delta is not an object")
            piece = delta.get("content") if delta.get("content") is not None else delta.get("text")
            if piece is not None and not isinstance(piece, str):
                raise InvalidResponseError("event-stream payload: choices[0].delta.content is not a string")
            if piece:
                self.pieces.append(piece)
            reason = choice.get("finish_reason")
            self.finished = isinstance(reason, str) and bool(reason)
        if payload.get("usage"):
            if not isinstance(payload["usage"], dict):
                raise InvalidResponseError("event-stream payload: usage is not an object")
            self.usage = payload["usage"]
        if isinstance(payload.get("model"), str) and payload["model"]:
            self.model = payload["model"]
        return False

    def result(self) -> dict[str, Any]:
        if not (self.done or self.finished):
            raise InvalidResponseError(
                f"the event stream ended after {self.events} event(s) without its end marker ([DONE], or a "
                "final event with a finish_reason): the answer is truncated"
            )
        return {"content": "".join(self.pieces), "usage": self.usage, "model": self.model}
