"""Production behaviour shared by every remote teacher, in one place.

- bounded concurrency: a thread pool of ``max_concurrency`` workers (the trainer calls synchronously);
- a total deadline per request (:class:`DeadlineTransport`, used by every backend's HTTP client): headers and
  body within ``timeout_s``, however the server paces its bytes -- the per-read timeout alone lets a server
  that trickles a byte at a time hold a request open indefinitely;
- retries with jittered exponential backoff on 429, 5xx, timeouts, dropped connections, streams cut
  mid-event, malformed bodies and responses that break the wire format; ``Retry-After`` honoured, in
  seconds or as an HTTP-date (RFC 9110 section 10.2.3, read at https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/Retry-After);
- no retry on any other 4xx; 401/403 say which credential source was rejected, never its value;
- every secret read is registered with :mod:`trl_opsd.redaction`; errors leaving the executor are redacted,
  their chained causes included, and a context hidden by ``from None`` is dropped;
- a persistent response cache consulted before any request (``cache.py``);
- counters of requests, retries, cache hits and failures, exposed by ``metrics()``.

Backends (``openai_compat.py``, ``cortex.py``) only translate their client's failures into
:class:`RetryableError` or :class:`RemoteTeacherError`; this module owns the policy. The ``openai`` client
retries on its own (408/409/429/5xx, ``time.sleep`` with no injection point, no counters), so remote
teachers build it with ``max_retries=0``.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from .. import redaction
from .base import TeacherError
from .cache import ResponseCache, cache_key

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RemoteTeacherError(TeacherError):
    """A remote call failed for good: a non-retryable status, or retries exhausted. The message is redacted."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(redaction.redact(message))
        self.status = status


class InvalidResponseError(RemoteTeacherError):
    """A response that breaks the wire format (a missing or non-finite log-prob, lists of unequal length,
    a stream without its end marker). Raised inside a call, it is retried like a transient server fault;
    it reaches the caller only as the last error of a :class:`RemoteTeacherError`."""


class RemoteAuthError(RemoteTeacherError):
    """401/403, or a credential that is missing before any request is sent."""


class RetryableError(Exception):
    """A transient failure the executor may retry; ``retry_after`` is the server's requested delay."""

    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        reason = redaction.redact(reason)
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class SecretSource:
    """Where a secret comes from: an environment variable or a file (first non-empty wins).

    Only the *source* is ever printed; the value is read on each use (so rotated token files work)
    and never stored on the object.
    """

    def __init__(self, env: str | None = None, file: str | os.PathLike | None = None, *, what: str = "API key"):
        if env is None and file is None:
            raise ValueError(f"{what}: give an environment variable name or a file path")
        self.env = env
        self.file = Path(file) if file is not None else None
        self.what = what

    def describe(self) -> str:
        parts = []
        if self.env is not None:
            parts.append(f"environment variable {self.env}")
        if self.file is not None:
            parts.append(f"file {self.file}")
        return " or ".join(parts)

    def read(self) -> str:
        """The secret, registered with :mod:`trl_opsd.redaction` so no output can carry it."""
        if self.env is not None and os.environ.get(self.env, "").strip():
            value = os.environ[self.env].strip()
        elif self.file is not None and self.file.is_file() and self.file.read_text().strip():
            value = self.file.read_text().strip()
        else:
            raise RemoteAuthError(f"{self.what} not found: set {self.describe()}")
        redaction.register(value)
        return value

    def __repr__(self) -> str:
        return f"SecretSource({self.describe()})"


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """:func:`trl_opsd.redaction.redact`, with ``secrets`` redacted too (a teacher's own credentials)."""
    return redaction.redact(text, secrets)


class DeadlineTransport:
    """A transport whose requests end -- status, headers and the whole body -- within ``total_s`` seconds.

    httpx has per-phase timeouts only (connect, each read, each write), so a server sending a byte every
    fraction of a second keeps a request open for as long as it likes. Here the exchange runs in a worker
    thread that reads the body in full while the caller waits until the deadline; past it the caller gets
    ``httpx.ReadTimeout`` (which the backends turn into a retry) and the worker is told to drop the
    connection at its next chunk. The per-read timeout is capped at ``total_s`` as well, so an abandoned
    worker waiting on a silent server ends too. Bodies are buffered: both backends need the whole body
    before they can use any of it.

    ``http`` is the HTTP library module the client comes from: ``httpx`` (Cortex) or ``httpx2`` (the
    ``openai`` client's fork, same API); the transport protocol is the same, its classes are not shared.
    """

    def __init__(self, total_s: float, *, http: Any = httpx, inner: Any = None) -> None:
        if not total_s > 0:
            raise ValueError(f"the request deadline must be > 0 seconds, got {total_s}")
        self.total_s = float(total_s)
        self._http = http
        self._inner = inner or http.HTTPTransport(
            limits=http.Limits(max_connections=1000, max_keepalive_connections=100)
        )

    def __enter__(self) -> DeadlineTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def handle_request(self, request: Any) -> Any:
        timeouts = dict(request.extensions.get("timeout") or {})
        for phase in ("connect", "read", "write", "pool"):
            if timeouts.get(phase) is None or timeouts[phase] > self.total_s:
                timeouts[phase] = self.total_s
        request.extensions["timeout"] = timeouts
        exchange = _Exchange(self._http, self._inner, request, self.total_s)
        worker = threading.Thread(target=exchange.run, name="teacher-http-deadline", daemon=True)
        worker.start()
        if not exchange.done.wait(self.total_s):
            exchange.abandon()
            if not exchange.done.is_set():  # (set now: the worker finished, or failed on seeing abandon())
                raise self._http.ReadTimeout(
                    f"no complete response within the {self.total_s:g}s deadline", request=request
                )
        if exchange.error is not None:
            raise exchange.error
        return exchange.response

    def close(self) -> None:
        self._inner.close()


class _Exchange:
    """One request/response run by :class:`DeadlineTransport`'s worker thread."""

    def __init__(self, http: Any, inner: Any, request: Any, total_s: float) -> None:
        self.http, self.inner, self.request, self.total_s = http, inner, request, total_s
        self.done = threading.Event()
        self.response: Any = None
        self.error: BaseException | None = None
        self._abandoned = threading.Event()

    def abandon(self) -> None:
        self._abandoned.set()

    def run(self) -> None:
        response = None
        try:
            response = self.inner.handle_request(self.request)
            chunks = []
            for chunk in response.stream:
                if self._abandoned.is_set():  # the caller gave up: never hand back a cut body
                    raise self.http.ReadTimeout(
                        f"no complete response within the {self.total_s:g}s deadline", request=self.request
                    )
                chunks.append(chunk)
            self.response = self.http.Response(
                response.status_code, headers=response.headers, stream=self.http.ByteStream(b"".join(chunks)),
                extensions=response.extensions,
            )
        except BaseException as err:  # noqa: BLE001 (handed to the waiting caller)
            self.error = err
        finally:
            if response is not None:
                response.close()
            self.done.set()


def deadline_http_client(timeout_s: float) -> httpx.Client:
    """An ``httpx.Client`` whose every request ends within ``timeout_s`` (see :class:`DeadlineTransport`)."""
    return httpx.Client(transport=DeadlineTransport(timeout_s), timeout=httpx.Timeout(timeout_s))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date (``now`` is epoch s)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff: attempt ``n`` (0-based) waits ``min(max_delay, base * 2**n)``
    scaled by a uniform factor in ``[1 - jitter, 1]``; a server ``Retry-After`` replaces it unless it
    exceeds ``max_retry_after`` (then the call fails with a clear error instead of sleeping for hours)."""

    max_retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid retry policy {self}")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        delay = min(self.max_delay, self.base_delay * (2.0**attempt))
        return delay * (1.0 - self.jitter * rng.random())


class RemoteExecutor:
    """Runs remote calls for one teacher: cache first, then bounded-concurrency requests with retries.

    ``sleep``, ``wall_clock`` and ``rng`` are injectable so tests can measure backoff without waiting.
    """

    def __init__(
        self,
        name: str,
        *,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        cache: ResponseCache | None = None,
        secrets: Callable[[], Sequence[str]] = lambda: (),
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.name = name
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.cache = cache
        self._secrets = secrets
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0, "retry_wait_s": 0.0}

    def metrics(self) -> dict[str, float]:
        with self._counts_lock:
            return dict(self._counts)

    def _bump(self, counter: str, by: float = 1) -> None:
        with self._counts_lock:
            self._counts[counter] += by

    def run(self, key_parts: Mapping[str, Any], call: Callable[[], T]) -> T:
        """One call: the cached value for ``key_parts`` if present, else ``call()`` with retries.

        ``key_parts`` must identify the request completely and must not contain secrets; ``call``
        returns a JSON-serialisable value, which is what gets cached.
        """
        key = cache_key(key_parts)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._bump("cache_hits")
                return hit
        value = self._call_with_retries(call)
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    def map(self, jobs: Sequence[tuple[Mapping[str, Any], Callable[[], T]]]) -> list[T]:
        """Run ``jobs`` concurrently (at most ``max_concurrency`` in flight), results in input order.

        Jobs with identical keys are sent once. On the first failure, jobs not yet started are
        cancelled (a rejected credential costs one request, not one per row) and the error is raised.
        """
        keys = [cache_key(parts) for parts, _ in jobs]
        first_of: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_of.setdefault(key, i)
        unique = sorted(first_of.values())
        if len(unique) <= 1 or self.max_concurrency == 1:
            results = {i: self.run(*jobs[i]) for i in unique}
        else:
            pool = self._get_pool()
            futures = {i: pool.submit(self.run, *jobs[i]) for i in unique}
            done, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [f for f in futures.values() if f in done and f.exception() is not None]
            if failed:
                for future in pending:
                    future.cancel()
                wait(pending)
                raise failed[0].exception()
            results = {i: f.result() for i, f in futures.items()}
        return [results[first_of[key]] for key in keys]

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"teacher-{self.name}")
            return self._pool

    def _call_with_retries(self, call: Callable[[], T]) -> T:
        """``call()`` until it succeeds, retrying :class:`RetryableError` (and :class:`InvalidResponseError`).

        Every error raised from here is redacted, chained causes included; it is raised outside the
        ``except`` block so Python attaches no new ``__context__`` to it.
        """
        attempt = 0
        while True:
            self._bump("requests")
            failure: BaseException | None = None
            try:
                return call()
            except (RetryableError, InvalidResponseError) as err:
                reason = redact(str(err.reason if isinstance(err, RetryableError) else err), self._secrets())
                status, retry_after = err.status, getattr(err, "retry_after", None)
                if attempt >= self.retry.max_retries:
                    failure = RemoteTeacherError(
                        f"teacher {self.name!r}: giving up after {attempt + 1} attempts; last error: {reason}",
                        status=status,
                    )
                elif retry_after is not None and retry_after > self.retry.max_retry_after:
                    failure = RemoteTeacherError(
                        f"teacher {self.name!r}: server asked to wait {retry_after:.0f}s (Retry-After), more "
                        f"than max_retry_after={self.retry.max_retry_after:.0f}s; {reason}",
                        status=status,
                    )
            except Exception as err:
                failure = err
            if failure is not None:
                self._bump("failures")
                raise redaction.scrub_exception(failure)
            delay = self._delay(retry_after, attempt)
            logger.warning(
                "teacher %r: %s; retry %d/%d in %.2fs", self.name, reason, attempt + 1, self.retry.max_retries, delay,
            )
            self._bump("retries")
            self._bump("retry_wait_s", delay)
            self._sleep(delay)
            attempt += 1

    def _delay(self, retry_after: float | None, attempt: int) -> float:
        if retry_after is not None:
            return retry_after
        with self._rng_lock:
            return self.retry.backoff(attempt, self._rng)

    def retry_after_from(self, headers: Mapping[str, str] | None) -> float | None:
        """``Retry-After`` of a response, in seconds from now (``retry-after-ms`` is not standard; ignored)."""
        if headers is None:
            return None
        return parse_retry_after(headers.get("retry-after"), now=self._wall_clock())

    def status_error(
        self, status: int, body: str, *, who: str, credential: str | None, headers: Mapping[str, str] | None
    ) -> Exception:
        """The exception for an HTTP error status: retryable (429, 5xx) or final (other 4xx).

        401/403 name the credential *source* (``credential``, e.g. "environment variable X").
        """
        message = redact(body.strip(), self._secrets())[:500]
        if status in RETRYABLE_STATUS or status >= 500:
            retry_after = self.retry_after_from(headers)
            return RetryableError(f"HTTP {status}: {message}", status=status, retry_after=retry_after)
        if status in (401, 403):
            rejected = f"the credential from {credential}" if credential else "the request (no credential configured)"
            return RemoteAuthError(f"{who}: HTTP {status}, server rejected {rejected}: {message}", status=status)
        return RemoteTeacherError(f"{who}: HTTP {status} (not retried): {message}", status=status)
