"""Cortex REST teacher (httpx, SSE) against a loopback server streaming a real tiny model's text."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from servers import LoopbackServer, TinyLM

from trl_opsd.teachers import (
    CortexAuth,
    CortexTeacher,
    RemoteAuthError,
    RemoteTeacherError,
    RetryPolicy,
    TeacherCapabilityError,
)
from trl_opsd.teachers.sse import SSEEvent, SSEParser, SSEStreamCut

SECRET = "pat-loopback-SECRET-4d8e1b7a90"
FAST_RETRY = RetryPolicy(max_retries=4, base_delay=0.001, max_delay=0.002)
CHATS = [[{"role": "user", "content": "what is 2 + 2 ?"}], [{"role": "user", "content": "tom has 3 apples"}]]


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM(seed=1)


def expected_text(lm: TinyLM, chat, max_tokens: int) -> str:
    return lm.tokenizer.decode(lm.generate(lm.chat_ids(chat), max_tokens, 0.0), skip_special_tokens=True)


def make_teacher(srv: LoopbackServer, auth: CortexAuth, **kwargs) -> CortexTeacher:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout_s", 5.0)
    return CortexTeacher(srv.url, "mistral-large2", auth=auth, **kwargs)


# ------------------------------------------------------------------ the SSE parser

STREAM = (
    "\ufeff: comment line\n"
    'data: {"a": 1,\n'
    'data: "b": "é€"}\n'
    "\n"
    "event: error\r\n"
    "id: 7\r\n"
    "data:no-space\r\n"
    "\r\n"
    "retry: 100\r"
    "data: x\r"
    "\r"
    "data: [DONE]\n\n"
).encode()
EVENTS = [
    SSEEvent(data='{"a": 1,\n"b": "é€"}'),
    SSEEvent(data="no-space", event="error", id="7"),
    SSEEvent(data="x", id="7"),
    SSEEvent(data="[DONE]", id="7"),
]


def parse(chunks: list[bytes]) -> list[SSEEvent]:
    parser, events = SSEParser(), []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


def test_sse_parser_follows_the_spec_whatever_the_chunking():
    assert parse([STREAM]) == EVENTS
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EVENTS
    for cut in range(len(STREAM) + 1):  # every two-chunk split, including inside UTF-8 and CRLF
        assert parse([STREAM[:cut], STREAM[cut:]]) == EVENTS, cut


@pytest.mark.parametrize(
    "tail", [b'data: {"choices": [{"del', b"data: complete line\n", b"event: x\n", b"data: \xe2\x82"]
)
def test_sse_stream_ending_inside_an_event_is_a_cut(tail):
    with pytest.raises(SSEStreamCut):
        parse([b"data: ok\n\n", tail])


# ------------------------------------------------------------------ the teacher

def test_session_token_stream_parses_into_content_usage_model(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_SESSION_TOKEN", SECRET)
    with LoopbackServer(lm, cortex_tokens={"SESSION": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.session())
        gens = teacher.generate(CHATS, max_tokens=6, temperature=0.0)
        for gen, chat in zip(gens, CHATS):
            assert gen.text == expected_text(lm, chat, 6) and gen.text
            assert gen.model == "mistral-large2"
            assert gen.usage["prompt_tokens"] == len(lm.chat_ids(chat))
            assert gen.usage["completion_tokens"] == len(gen.text.split())  # the last event's running total
        request = next(r for r in server.log if r["body"]["messages"] == CHATS[0])
        assert request["path"] == "/api/v2/cortex/inference:complete"
        assert request["headers"]["accept"] == "text/event-stream"
        assert request["headers"]["authorization"] == f'Snowflake Token="{SECRET}"'
        assert "x-snowflake-authorization-token-type" not in request["headers"]
        assert request["body"] == {"model": "mistral-large2", "messages": CHATS[0], "max_tokens": 6,
                                   "temperature": 0.0, "stream": True}


@pytest.mark.parametrize("token_type", ["PROGRAMMATIC_ACCESS_TOKEN", "KEYPAIR_JWT", "OAUTH"])
def test_bearer_tokens_carry_their_type_header(lm, monkeypatch, token_type):
    monkeypatch.setenv("MY_SNOWFLAKE_TOKEN", SECRET)
    with LoopbackServer(lm, cortex_tokens={token_type: SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer(token_type, env="MY_SNOWFLAKE_TOKEN"))
        [gen] = teacher.generate(CHATS[:1], max_tokens=4, temperature=0.0)
        assert gen.text == expected_text(lm, CHATS[0], 4)
        headers = server.log[0]["headers"]
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert headers["x-snowflake-authorization-token-type"] == token_type


def test_comments_multiline_data_crlf_and_a_finish_reason_instead_of_done(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}, sse_variants=True,
                        sse_done=False, sse_chunk_bytes=5) as server:
        teacher = make_teacher(server, CortexAuth.bearer())
        [gen] = teacher.generate(CHATS[:1], max_tokens=6, temperature=0.0)
        assert gen.text == expected_text(lm, CHATS[0], 6)


@pytest.mark.parametrize("fault", ["sse_cut", "sse_drop", "sse_eof", "drop", "500", "503", "malformed"])
def test_transient_failures_are_retried(lm, monkeypatch, fault):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer())
        server.inject(fault)
        [gen] = teacher.generate(CHATS[:1], max_tokens=5, temperature=0.0)
        assert gen.text == expected_text(lm, CHATS[0], 5)
        assert teacher.metrics()["retries"] == 1 and server.total_requests == 2


def test_a_stream_that_keeps_getting_cut_fails_clearly(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer(), retry=RetryPolicy(max_retries=2, base_delay=0))
        server.inject("sse_cut", "sse_cut", "sse_cut")
        with pytest.raises(RemoteTeacherError, match="giving up after 3 attempts.*event stream cut"):
            teacher.generate(CHATS[:1], max_tokens=5, temperature=0.0)


def test_hung_response_times_out_and_is_retried(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}, hang_s=10) as server:
        teacher = make_teacher(server, CortexAuth.bearer(), timeout_s=0.5)
        server.inject("hang")
        [gen] = teacher.generate(CHATS[:1], max_tokens=3, temperature=0.0)
        assert gen.text == expected_text(lm, CHATS[0], 3) and teacher.metrics()["retries"] == 1


def test_retry_after_is_honoured_and_400_is_not_retried(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    sleeps: list[float] = []
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer(), sleep=sleeps.append, wall_clock=lambda: 1_800_000_000.0)
        server.inject("429:3", "429-date:1800000011")
        teacher.generate(CHATS[:1], max_tokens=3, temperature=0.0)
        assert sleeps == [3.0, 11.0]
        server.inject("400")
        with pytest.raises(RemoteTeacherError, match="HTTP 400 \\(not retried\\)"):
            teacher.generate(CHATS[1:], max_tokens=3, temperature=0.0)
        assert server.total_requests == 4


def test_mid_stream_error_event_is_reported(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer())
        server.inject("sse_error")
        with pytest.raises(RemoteTeacherError, match="error in the event stream.*model overloaded"):
            teacher.generate(CHATS[:1], max_tokens=3, temperature=0.0)


def test_rejected_token_names_its_source_never_its_value(lm, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SNOWFLAKE_JWT", SECRET)
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "trl_opsd"):
        caplog.set_level(logging.DEBUG, logger=name)
    with LoopbackServer(lm, cortex_tokens={"KEYPAIR_JWT": "another-token"}) as server:
        teacher = make_teacher(server, CortexAuth.bearer("KEYPAIR_JWT"), cache=tmp_path / "c.sqlite")
        with pytest.raises(RemoteAuthError) as err:
            teacher.generate(CHATS[:1], max_tokens=3, temperature=0.0)
        message = str(err.value)
        assert "HTTP 401" in message and "KEYPAIR_JWT token from environment variable SNOWFLAKE_JWT" in message
        assert server.total_requests == 1
        for text in (message, repr(teacher), repr(teacher.auth), caplog.text):
            assert SECRET not in text


def test_missing_token_is_reported_at_construction(lm, monkeypatch):
    monkeypatch.delenv("SNOWFLAKE_PAT", raising=False)
    with LoopbackServer(lm) as server:
        with pytest.raises(RemoteAuthError, match="set environment variable SNOWFLAKE_PAT"):
            make_teacher(server, CortexAuth.bearer())


def test_scoring_is_refused_with_the_reason(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, CortexAuth.bearer())
        for capability in ("topk", "sampled", "dense"):
            with pytest.raises(TeacherCapabilityError) as err:
                teacher.require(capability)
            assert "Cortex exposes no logprobs; use it for RS-SFT generation or as the PRM judge" in str(err.value)
            assert "It can: generate" in str(err.value)
        with pytest.raises(TeacherCapabilityError):
            teacher.score_topk([[1, 2]], [[3]], 2)
        assert server.total_requests == 0


def test_cache_makes_a_rerun_free_and_keeps_samples_apart(lm, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cortex.sqlite"
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = make_teacher(server, CortexAuth.bearer(), cache=cache)
        server.inject("503")
        first = teacher.generate(CHATS, max_tokens=4, temperature=0.7, n=2)
        assert server.total_requests == 2 * 2 + 1  # one request per sample, plus the retried 503
        teacher.close()
        rerun = make_teacher(server, CortexAuth.bearer(), cache=cache)
        again = rerun.generate(CHATS, max_tokens=4, temperature=0.7, n=2)
        assert server.total_requests == 5 and rerun.metrics()["cache_hits"] == 4
        assert [g.text for g in again] == [g.text for g in first]
        assert [(g.chat_index, g.sample_index) for g in again] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        rerun.close()
    assert SECRET not in caplog.text
    files = [p for p in tmp_path.iterdir() if p.name.startswith("cortex.sqlite")]
    assert files and all(SECRET.encode() not in Path(p).read_bytes() for p in files)
