"""The response cache and the shared remote-call policy (retries, backoff, concurrency, counters, secrets)."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from trl_opsd.teachers import RemoteAuthError, RemoteTeacherError, ResponseCache, RetryPolicy, SecretSource
from trl_opsd.teachers.cache import cache_key, request_key_parts
from trl_opsd.teachers.http import RemoteExecutor, RetryableError, parse_retry_after, redact


def test_cache_key_is_canonical_and_covers_every_part():
    a = request_key_parts("openai-compat/vllm", "http://h:8000/v1/", "m", {"prompt": [1, 2], "logprobs": 5})
    b = {"payload": {"logprobs": 5, "prompt": [1, 2]}, "model": "m", "base_url": "http://h:8000/v1",
         "backend": "openai-compat/vllm"}
    assert cache_key(a) == cache_key(b)
    for changed in (
        request_key_parts("cortex", "http://h:8000/v1", "m", {"prompt": [1, 2], "logprobs": 5}),
        request_key_parts("openai-compat/vllm", "http://other/v1", "m", {"prompt": [1, 2], "logprobs": 5}),
        request_key_parts("openai-compat/vllm", "http://h:8000/v1", "m2", {"prompt": [1, 2], "logprobs": 5}),
        request_key_parts("openai-compat/vllm", "http://h:8000/v1", "m", {"prompt": [1, 2], "logprobs": 4}),
        request_key_parts("openai-compat/vllm", "http://h:8000/v1", "m", {"prompt": [2, 1], "logprobs": 5}),
    ):
        assert cache_key(changed) != cache_key(a)
    with pytest.raises(ValueError):
        cache_key({"x": float("nan")})


def test_cache_persists_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "c.sqlite"
    cache = ResponseCache(path)
    assert cache.journal_mode() == "wal"
    cache.put("k", {"ids": [1, 2], "lp": [-0.1234567890123, -9999.0], "text": "é"})
    cache.close()
    again = ResponseCache(path)
    assert again.get("k") == {"ids": [1, 2], "lp": [-0.1234567890123, -9999.0], "text": "é"}
    assert again.get("missing") is None and len(again) == 1


def test_cache_is_safe_across_threads_and_connections(tmp_path):
    path = tmp_path / "c.sqlite"
    caches = [ResponseCache(path), ResponseCache(path)]  # two connections, as two processes would hold
    errors = []

    def worker(i: int) -> None:
        try:
            cache = caches[i % 2]
            for j in range(50):
                cache.put(f"{i}-{j}", [i, j])
                assert cache.get(f"{i}-{j}") == [i, j]
        except Exception as err:  # noqa: BLE001 (collected and asserted below)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(caches[0]) == 8 * 50


def executor(**kwargs) -> RemoteExecutor:
    kwargs.setdefault("sleep", lambda s: None)
    kwargs.setdefault("retry", RetryPolicy(max_retries=3, base_delay=0.01))
    return RemoteExecutor("t", **kwargs)


class Flaky:
    """A call that fails ``failures`` times with ``error`` and then returns ``value``; counts calls."""

    def __init__(self, failures: int, error: Exception, value=None) -> None:
        self.failures, self.error, self.value, self.calls = failures, error, value, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.value


def test_retries_then_success_counts_requests_and_retries():
    ex = executor()
    call = Flaky(2, RetryableError("HTTP 503"), {"ok": 1})
    assert ex.run({"a": 1}, call) == {"ok": 1}
    m = ex.metrics()
    assert (m["requests"], m["retries"], m["failures"], call.calls) == (3, 2, 0, 3)


def test_retries_exhausted_is_one_failure_with_the_last_reason():
    ex = executor()
    call = Flaky(10, RetryableError("HTTP 500: boom"))
    with pytest.raises(RemoteTeacherError, match="giving up after 4 attempts; last error: HTTP 500: boom"):
        ex.run({"a": 1}, call)
    assert call.calls == 4 and ex.metrics()["failures"] == 1


def test_final_errors_are_not_retried():
    ex = executor()
    call = Flaky(1, RemoteTeacherError("HTTP 404"))
    with pytest.raises(RemoteTeacherError, match="404"):
        ex.run({"a": 1}, call)
    assert call.calls == 1 and ex.metrics()["retries"] == 0 and ex.metrics()["failures"] == 1


def test_backoff_is_exponential_jittered_and_capped():
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, nominal in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal * 0.3  # actually jittered
    sleeps: list[float] = []
    ex = executor(sleep=sleeps.append, rng=random.Random(1), retry=RetryPolicy(max_retries=3, base_delay=1.0, jitter=0))
    ex.run({"a": 1}, Flaky(3, RetryableError("HTTP 502")))
    assert sleeps == [1.0, 2.0, 4.0] and ex.metrics()["retry_wait_s"] == 7.0


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("5", now=now) == 5.0
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0  # in the past: retry now
    assert parse_retry_after("soon", now=now) is None and parse_retry_after(None, now=now) is None


def test_server_retry_after_replaces_backoff():
    sleeps: list[float] = []
    ex = executor(sleep=sleeps.append)
    ex.run({"a": 1}, Flaky(1, RetryableError("HTTP 429", retry_after=2.5)))
    assert sleeps == [2.5]


def test_cache_hits_skip_the_call_and_identical_jobs_run_once(tmp_path):
    ex = executor(cache=ResponseCache(tmp_path / "c.sqlite"), max_concurrency=4)
    calls = []

    def job(i):
        return lambda: calls.append(i) or {"v": i}

    results = ex.map([({"k": 1}, job(1)), ({"k": 2}, job(2)), ({"k": 1}, job(3))])
    assert results == [{"v": 1}, {"v": 2}, {"v": 1}] and sorted(calls) == [1, 2]
    assert ex.map([({"k": 2}, job(4)), ({"k": 1}, job(5))]) == [{"v": 2}, {"v": 1}]
    assert sorted(calls) == [1, 2] and ex.metrics()["cache_hits"] == 2 and ex.metrics()["requests"] == 2


def test_concurrency_is_bounded_and_used():
    ex = executor(max_concurrency=3)
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def job():
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return 1

    assert ex.map([({"i": i}, job) for i in range(9)]) == [1] * 9
    assert peak[0] == 3
    ex.close()


def test_map_raises_the_first_failure_and_cancels_jobs_not_started():
    ex = executor(max_concurrency=2)
    calls = []

    def rejected():
        calls.append(1)
        time.sleep(0.05)
        raise RemoteTeacherError("HTTP 401")

    with pytest.raises(RemoteTeacherError, match="HTTP 401"):
        ex.map([({"i": i}, rejected) for i in range(12)])
    assert 2 <= len(calls) <= 4  # the two in flight (and at most a couple picked up meanwhile), not all 12
    ex.close()


def test_secret_source_reads_env_then_file_and_never_shows_the_value(tmp_path, monkeypatch):
    secret = "tok-SECRET-abcdef123456"
    path = tmp_path / "token"
    source = SecretSource("MY_TOKEN", path)
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(RemoteAuthError, match="set environment variable MY_TOKEN or file .*token"):
        source.read()
    path.write_text(secret + "\n")
    assert source.read() == secret
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert source.read() == "from-env"
    assert secret not in repr(source) and "from-env" not in repr(source)
    assert redact(f"bad key {secret}!", [secret]) == "bad key <redacted>!"


def test_status_errors_are_classified(tmp_path):
    ex = executor(wall_clock=lambda: 0.0)
    assert isinstance(ex.status_error(503, "busy", who="t", credential=None, headers={}), RetryableError)
    err = ex.status_error(429, "slow down", who="t", credential=None, headers={"retry-after": "4"})
    assert isinstance(err, RetryableError) and err.retry_after == 4.0
    auth = ex.status_error(403, "no", who="t", credential="environment variable K", headers={})
    assert isinstance(auth, RemoteAuthError) and "environment variable K" in str(auth)
    final = ex.status_error(422, "bad", who="t", credential=None, headers={})
    assert type(final) is RemoteTeacherError and "not retried" in str(final)


def test_cache_keys_hold_no_url_credentials():
    with_credentials = request_key_parts("b", "https://bob:pw-0123456789@h/v1?api_key=key-0123456789&x=1", "m", {})
    rotated = request_key_parts("b", "https://bob:pw-9876543210@h/v1?api_key=key-9876543210&x=1", "m", {})
    assert with_credentials == rotated  # a rotated password keeps the cache
    text = json.dumps(with_credentials)
    assert "0123456789" not in text and "x=1" in text

