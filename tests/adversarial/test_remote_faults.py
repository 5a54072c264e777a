"""Remote teachers against a server that breaks the wire format, trickles, or ends streams early.

For every fault: the call either retries and ends identical to a fault-free run, or fails with a project
error (a ``TeacherError``), never a bare ``IndexError``/``KeyError``/``TypeError``; and the cache holds
nothing wrong: a later fault-free run on the same cache returns the right answer, paying exactly for the
requests whose answers were not stored.
"""

from __future__ import annotations

import pytest
import torch
from servers import LoopbackServer, TinyLM
from servers.loopback import BROKEN_CHATS, BROKEN_COMPLETIONS

from trl_opsd.teachers import (
    CortexAuth,
    CortexTeacher,
    OpenAICompatTeacher,
    RemoteTeacherError,
    ResponseCache,
    RetryPolicy,
    TeacherError,
    TokenizerMismatchError,
)

MAX_RETRIES = 2
RETRY = RetryPolicy(max_retries=MAX_RETRIES, base_delay=0.0, max_delay=0.0)
TOKEN = "pat-adversarial-4e1b9d7c3a"
CHATS = [[{"role": "user", "content": "what is 2 + 2 ?"}], [{"role": "user", "content": "tom has 3 apples"}]]
# Faults a single retry recovers from, and faults that are a project error at once.
FINAL = {"wrong_echo_ids": TokenizerMismatchError, "sse_error": RemoteTeacherError,
         "sse_error_echo": RemoteTeacherError, "echo_headers_400": RemoteTeacherError}


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM(seed=0)


@pytest.fixture(scope="module")
def batch(lm):
    tok = lm.tokenizer
    prompts = ["tom has 3 apples and buys 2 more", "what is 2 + 2 ?"]
    completions = ["so tom has 5 apples", "4 ."]
    return ([tok(p)["input_ids"] for p in prompts], [tok(c, add_special_tokens=False)["input_ids"] for c in completions])


def scorer(server: LoopbackServer, lm: TinyLM, cache, **kwargs) -> OpenAICompatTeacher:
    # No tokenizer probe: the injected fault must hit a scoring request.
    return OpenAICompatTeacher(server.url + "/v1", server.model_name, student_tokenizer=lm.tokenizer,
                               server=server.flavor, retry=RETRY, timeout_s=kwargs.pop("timeout_s", 5.0),
                               check_tokenizer=False, max_concurrency=1, cache=cache, sleep=lambda s: None, **kwargs)


def as_tuple(scores):
    return scores.topk_ids, scores.topk_logprobs, scores.sampled_logprobs, scores.mask


def assert_same(a, b):
    for x, y in zip(as_tuple(a), as_tuple(b)):
        assert torch.equal(x, y)


def outcome(run, fault: str):
    """Run ``run()``: its value, or the project error it raised (anything else fails the test)."""
    try:
        return run(), None
    except TeacherError as err:
        expected = FINAL.get(fault, RemoteTeacherError)
        assert isinstance(err, expected), f"{fault}: {type(err).__name__}: {err}"
        return None, err


def rerun_pays_only_for_what_is_missing(server, cache_path, run_clean, expected, same):
    """A fault-free run on the cache the faulty run left: right answer, one paid request per missing entry."""
    server.clear_faults()
    before_requests, before_entries = server.total_requests, len(ResponseCache(cache_path))
    value = run_clean()
    after_entries = len(ResponseCache(cache_path))
    same(value, expected)
    assert server.total_requests - before_requests == after_entries - before_entries


# ------------------------------------------------------------------------------------- completions (scoring)

COMPLETION_FAULTS = [*BROKEN_COMPLETIONS, "malformed", "trickle", "echo_headers", "echo_headers_400", "drop"]


@pytest.mark.parametrize("flavor", ["vllm", "openai"])
@pytest.mark.parametrize("fault", COMPLETION_FAULTS)
@pytest.mark.parametrize("times", [1, MAX_RETRIES + 1], ids=["once", "every-attempt"])
def test_broken_scoring_responses_are_retried_or_refused_and_never_cached(lm, batch, tmp_path, flavor, fault, times):
    prompts, completions = batch
    k = 3
    cache = tmp_path / "scores.sqlite"
    with LoopbackServer(lm, flavor=flavor, trickle_s=0.05) as server:
        expected = scorer(server, lm, None).score_topk(prompts, completions, k)
        server.inject(*[fault] * times)
        timeout = 1.5 if fault == "trickle" else 5.0
        value, error = outcome(lambda: scorer(server, lm, cache, timeout_s=timeout).score_topk(prompts, completions, k),
                               fault)
        if times == 1 and fault not in FINAL:
            assert error is None, f"{fault}: one fault must be absorbed by a retry, got {error!r}"
            assert_same(value, expected)
        if times > 1 or fault in FINAL:
            assert error is not None, f"{fault} on every attempt must end in a project error"
        if fault == "trickle" and error is not None:
            assert "deadline" in str(error)
        rerun_pays_only_for_what_is_missing(
            server, cache, lambda: scorer(server, lm, cache).score_topk(prompts, completions, k), expected, assert_same
        )


# ------------------------------------------------------------------------------------- chat completions

CHAT_FAULTS = [*BROKEN_CHATS, "malformed", "trickle", "echo_headers", "drop"]


def chat_teacher(server, cache, **kwargs):
    return OpenAICompatTeacher(server.url + "/v1", server.model_name, server="vllm", retry=RETRY, cache=cache,
                               max_concurrency=1, sleep=lambda s: None, **kwargs)


def texts(gens):
    return [g.text for g in gens]


@pytest.mark.parametrize("fault", CHAT_FAULTS)
@pytest.mark.parametrize("times", [1, MAX_RETRIES + 1], ids=["once", "every-attempt"])
def test_broken_chat_responses_are_retried_or_refused_and_never_cached(lm, tmp_path, fault, times):
    cache = tmp_path / "chat.sqlite"
    with LoopbackServer(lm, trickle_s=0.05) as server:
        expected = texts(chat_teacher(server, None).generate(CHATS, max_tokens=6, temperature=0.0))
        server.inject(*[fault] * times)
        timeout = 1.5 if fault == "trickle" else 5.0
        value, error = outcome(
            lambda: texts(chat_teacher(server, cache, timeout_s=timeout).generate(CHATS, max_tokens=6, temperature=0.0)),
            fault,
        )
        assert (error is None) == (times == 1), f"{fault} x{times}: {error!r}"
        if error is None:
            assert value == expected
        rerun_pays_only_for_what_is_missing(
            server, cache, lambda: texts(chat_teacher(server, cache).generate(CHATS, max_tokens=6, temperature=0.0)),
            expected, lambda a, b: (a == b) or pytest.fail(f"{a} != {b}"),
        )


# ------------------------------------------------------------------------------------- Cortex SSE

CORTEX_FAULTS = ["sse_eof", "sse_cut", "sse_drop", "malformed", "trickle", "echo_headers", "drop", "sse_error",
                 "sse_error_echo"]


def cortex_teacher(server, cache, **kwargs):
    return CortexTeacher(server.url, "mistral-large2", auth=CortexAuth.bearer(), retry=RETRY, cache=cache,
                         max_concurrency=1, sleep=lambda s: None, **kwargs)


@pytest.mark.parametrize("fault", CORTEX_FAULTS)
@pytest.mark.parametrize("times", [1, MAX_RETRIES + 1], ids=["once", "every-attempt"])
def test_broken_cortex_streams_are_retried_or_refused_and_never_cached(lm, tmp_path, monkeypatch, fault, times):
    monkeypatch.setenv("SNOWFLAKE_PAT", TOKEN)
    cache = tmp_path / "cortex.sqlite"
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": TOKEN}, trickle_s=0.05) as server:
        expected = texts(cortex_teacher(server, None).generate(CHATS, max_tokens=6, temperature=0.0))
        server.inject(*[fault] * times)
        timeout = 1.5 if fault == "trickle" else 5.0
        value, error = outcome(
            lambda: texts(cortex_teacher(server, cache, timeout_s=timeout).generate(CHATS, max_tokens=6,
                                                                                    temperature=0.0)),
            fault,
        )
        if times == 1 and fault not in FINAL:
            assert error is None and value == expected, f"{fault}: {error!r}"
        else:
            assert error is not None, f"{fault} x{times} must end in a project error"
        rerun_pays_only_for_what_is_missing(
            server, cache, lambda: texts(cortex_teacher(server, cache).generate(CHATS, max_tokens=6, temperature=0.0)),
            expected, lambda a, b: (a == b) or pytest.fail(f"{a} != {b}"),
        )


def test_a_stream_ending_on_a_finish_reason_without_done_is_complete(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", TOKEN)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": TOKEN}, sse_done=False) as server:
        teacher = cortex_teacher(server, None)
        assert texts(teacher.generate(CHATS, max_tokens=6, temperature=0.0))[0]
        assert teacher.metrics()["retries"] == 0


# ------------------------------------------------------------------------------------- the deadline

def test_a_trickling_server_cannot_hold_a_request_past_its_deadline(lm, batch):
    """One byte every 0.05 s of a multi-kilobyte body would take minutes; each attempt is cut at 1.5 s."""
    prompts, completions = batch
    with LoopbackServer(lm, trickle_s=0.05) as server:
        server.inject(*["trickle"] * (MAX_RETRIES + 1))
        teacher = scorer(server, lm, None, timeout_s=1.5)
        with pytest.raises(RemoteTeacherError, match=f"giving up after {MAX_RETRIES + 1} attempts.*deadline"):
            teacher.score_topk(prompts[:1], completions[:1], 2)
        assert server.total_requests == MAX_RETRIES + 1
