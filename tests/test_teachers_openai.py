"""OpenAI-compatible teacher against a loopback vLLM/OpenAI server computing log-probs with a real tiny model.

The real ``openai`` client talks HTTP to ``tests/servers``; every number is compared with the tiny
model's own log-softmax computed directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from servers import LoopbackServer, LoopbackServerProcess, TinyLM

from trl_opsd.teachers import (
    OpenAICompatTeacher,
    RemoteAuthError,
    RemoteTeacherError,
    RetryPolicy,
    TeacherCapabilityError,
    TokenizerMismatchError,
    TokenMappingError,
)
from trl_opsd.teachers.openai_compat import StudentVocab

SECRET = "sk-loopback-SECRET-7f3a9c2e51"
FAST_RETRY = RetryPolicy(max_retries=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM(seed=0)


@pytest.fixture()
def batch(lm):
    tok = lm.tokenizer
    prompts = ["tom has 3 apples and buys 2 more", "what is 2 + 2 ?", "hint : 7 . what is 3 + 4 ?"]
    completions = ["so tom has 5 apples", "4", "first 3 + 4 = 7 so the answer is 7 ."]
    return (
        [tok(p)["input_ids"] for p in prompts],
        [tok(c, add_special_tokens=False)["input_ids"] for c in completions],
    )


def reference(lm: TinyLM, prompt: list[int], completion: list[int], k: int):
    """Top-k and sampled-token log-probs of each completion token, straight from the model."""
    rows = lm.next_token_logprobs(prompt + completion)
    p = len(prompt)
    dist = rows[p - 1 : p - 1 + len(completion)]
    top = dist.topk(k) if k else None
    sampled = dist.gather(1, torch.tensor(completion)[:, None])[:, 0]
    return top, sampled


def make_teacher(srv: LoopbackServer, lm: TinyLM, **kwargs) -> OpenAICompatTeacher:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("sleep", lambda s: None)
    return OpenAICompatTeacher(srv.url + "/v1", srv.model_name, student_tokenizer=lm.tokenizer, **kwargs)


def assert_matches_model(scores, lm, prompts, completions, k):
    assert scores.topk_ids.shape == (len(prompts), max(map(len, completions)), k)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        t = len(completion)
        top, sampled = reference(lm, prompt, completion, k)
        assert scores.mask[b, :t].all() and not scores.mask[b, t:].any()
        torch.testing.assert_close(scores.sampled_logprobs[b, :t], sampled, atol=1e-5, rtol=0)
        if k:
            assert torch.equal(scores.topk_ids[b, :t], top.indices)
            torch.testing.assert_close(scores.topk_logprobs[b, :t], top.values, atol=1e-5, rtol=0)
        assert (scores.topk_ids[b, t:] == -1).all() and torch.isinf(scores.topk_logprobs[b, t:]).all()


@pytest.mark.parametrize("k", [1, 4, 20])
def test_vllm_scores_equal_the_models_own_log_softmax(lm, batch, k):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm)
        scores = teacher.score_topk(prompts, completions, k)
        assert_matches_model(scores, lm, prompts, completions, k)
        body = next(e["body"] for e in server.log if isinstance(e["body"]["prompt"], list))
        # the vLLM dialect: token-id prompt, echo, max_tokens 0, prompt_logprobs via extra_body, token_id:N
        assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == k
        assert body["prompt_logprobs"] == k and body["return_tokens_as_token_ids"] is True
        teacher.close()


def test_openai_dialect_token_strings_and_max_tokens_1(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm, flavor="openai") as server:
        teacher = make_teacher(server, lm, server="openai")
        scores = teacher.score_topk(prompts, completions, 5)
        assert_matches_model(scores, lm, prompts, completions, 5)
        assert all("prompt_logprobs" not in e["body"] for e in server.log)
        assert all(e["body"]["max_tokens"] == 1 for e in server.log)
        teacher.close()


def test_sampled_only_scoring_with_k_0(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        scores = make_teacher(server, lm).score_topk(prompts, completions, 0)
        assert scores.k == 0
        assert_matches_model(scores, lm, prompts, completions, 0)


def test_provider_caps_on_k_fail_at_construction(lm):
    with LoopbackServer(lm) as server:
        with pytest.raises(TeacherCapabilityError, match="top_k=6 exceeds the provider cap of 5"):
            make_teacher(server, lm, server="openai", top_k=6)
        with pytest.raises(TeacherCapabilityError, match="top_k=21 exceeds the provider cap of 20"):
            make_teacher(server, lm, server="vllm", top_k=21)
        make_teacher(server, lm, server="openai", max_top_k=20, top_k=20)  # providers that allow 20
        assert server.total_requests == 0


def test_server_side_cap_is_a_clear_non_retried_error(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, max_top_k=30, check_tokenizer=False)
        with pytest.raises(RemoteTeacherError, match="greater than max allowed: 20"):
            teacher.score_topk(prompts[:1], completions[:1], 25)
        assert server.requests_to("/v1/completions") == 1


def test_tokenizer_mismatch_is_refused_by_the_text_probe(lm, batch):
    prompts, completions = batch
    server_lm = TinyLM(seed=0, permuted_tokenizer=True)
    with LoopbackServer(server_lm) as server:
        teacher = make_teacher(server, lm)
        with pytest.raises(TokenizerMismatchError, match="does not tokenize like the student tokenizer"):
            teacher.score_topk(prompts, completions, 4)
        assert server.total_requests == 1  # the probe; nothing was scored


def test_tokenizer_mismatch_is_refused_in_the_token_string_dialect(lm, batch):
    prompts, completions = batch
    with LoopbackServer(TinyLM(seed=0, permuted_tokenizer=True), flavor="openai") as server:
        teacher = make_teacher(server, lm, server="openai", check_tokenizer=False)
        with pytest.raises(TokenizerMismatchError, match="where id .* was sent"):
            teacher.score_topk(prompts, completions, 3)


def test_token_strings_map_to_exactly_one_student_id(lm):
    vocab = StudentVocab(lm.tokenizer)
    assert vocab.id_of("apples") == lm.tokenizer.convert_tokens_to_ids("apples")
    with pytest.raises(TokenMappingError, match="not a token of the student vocabulary"):
        vocab.id_of("banana")

    class Collides:  # two ids whose decoded text is the same string
        def get_vocab(self):
            return {"\u2581a": 0, "a": 1}

        def __len__(self):
            return 2

        def decode(self, ids):
            return "a"

    with pytest.raises(TokenMappingError, match="several student ids"):
        StudentVocab(Collides()).id_of("a")


def test_retries_on_500_503_and_dropped_connections(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, max_concurrency=1)
        server.inject("500", "drop", "503")
        scores = teacher.score_topk(prompts, completions, 4)
        assert_matches_model(scores, lm, prompts, completions, 4)
        m = teacher.metrics()
        assert m["retries"] == 3 and m["failures"] == 0
        assert m["requests"] == server.requests_to("/v1/completions") == len(prompts) + 3


def test_timeout_on_a_hung_response_is_retried(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm, hang_s=10) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, timeout_s=0.5)
        server.inject("hang")
        scores = teacher.score_topk(prompts[:1], completions[:1], 2)
        assert_matches_model(scores, lm, prompts[:1], completions[:1], 2)
        assert teacher.metrics()["retries"] == 1


def test_malformed_json_is_retried_then_reported(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, retry=RetryPolicy(max_retries=2, base_delay=0))
        server.inject("malformed")
        assert_matches_model(teacher.score_topk(prompts[:1], completions[:1], 2), lm, prompts[:1], completions[:1], 2)
        server.inject("malformed", "malformed", "malformed")
        with pytest.raises(RemoteTeacherError, match="giving up after 3 attempts.*malformed JSON"):
            teacher.score_topk(prompts[1:2], completions[1:2], 2)
        assert teacher.metrics()["failures"] == 1


def test_retry_after_seconds_and_http_date_are_honoured(lm, batch):
    prompts, completions = batch
    sleeps: list[float] = []
    with LoopbackServer(lm) as server:
        teacher = make_teacher(
            server, lm, check_tokenizer=False, max_concurrency=1, sleep=sleeps.append,
            wall_clock=lambda: 1_700_000_000.0, retry=RetryPolicy(base_delay=0.01, max_delay=0.01),
        )
        server.inject("429:2", "429-date:1700000007", "500")
        teacher.score_topk(prompts[:1], completions[:1], 2)
        assert sleeps[:2] == [2.0, 7.0]
        assert 0.005 <= sleeps[2] <= 0.01  # no Retry-After: jittered backoff within [1 - jitter, 1] x base


def test_retry_after_beyond_the_limit_fails_clearly(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, retry=RetryPolicy(max_retry_after=60))
        server.inject("429:3600")
        with pytest.raises(RemoteTeacherError, match="asked to wait 3600s"):
            teacher.score_topk(prompts[:1], completions[:1], 2)


def test_no_retry_on_400(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False)
        server.inject("400")
        with pytest.raises(RemoteTeacherError, match="HTTP 400 \\(not retried\\)"):
            teacher.score_topk(prompts[:1], completions[:1], 2)
        assert server.total_requests == 1 and teacher.metrics()["retries"] == 0


def test_401_names_the_variable_never_the_value(lm, batch, monkeypatch, caplog, tmp_path):
    prompts, completions = batch
    monkeypatch.setenv("TEACHER_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "trl_opsd"):
        caplog.set_level(logging.DEBUG, logger=name)
    with LoopbackServer(lm, api_key="a-different-key") as server:
        teacher = make_teacher(server, lm, api_key_env="TEACHER_API_KEY", cache=tmp_path / "c.sqlite")
        with pytest.raises(RemoteAuthError) as err:
            teacher.score_topk(prompts, completions, 2)
        assert "environment variable TEACHER_API_KEY" in str(err.value) and "HTTP 401" in str(err.value)
        assert server.total_requests == 1 and teacher.metrics()["retries"] == 0
        assert server.log[0]["headers"]["authorization"] == f"Bearer {SECRET}"  # it was sent, to the server only
        for text in (str(err.value), repr(err.value), repr(teacher), repr(teacher.executor), caplog.text):
            assert SECRET not in text


def test_missing_key_is_reported_at_construction(lm, monkeypatch):
    monkeypatch.delenv("TEACHER_API_KEY", raising=False)
    with LoopbackServer(lm) as server:
        with pytest.raises(RemoteAuthError, match="set environment variable TEACHER_API_KEY"):
            make_teacher(server, lm, api_key_env="TEACHER_API_KEY")


def test_secret_never_reaches_logs_reprs_or_the_cache_file(lm, batch, monkeypatch, caplog, tmp_path):
    prompts, completions = batch
    key_file = tmp_path / "key.txt"
    key_file.write_text(SECRET + "\n")
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "trl_opsd"):
        caplog.set_level(logging.DEBUG, logger=name)
    cache = tmp_path / "cache.sqlite"
    with LoopbackServer(lm, api_key=SECRET) as server:
        teacher = make_teacher(server, lm, api_key_file=key_file, cache=cache)
        server.inject("500", "429:0")
        teacher.score_topk(prompts, completions, 3)
        teacher.generate([[{"role": "user", "content": "what is 2 + 2 ?"}]], max_tokens=4, temperature=0)
        assert teacher.metrics()["retries"] == 2
        assert SECRET not in caplog.text and "retry" in caplog.text
        assert SECRET not in repr(teacher)
        teacher.close()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("cache.sqlite")]
    assert files and all(SECRET.encode() not in Path(p).read_bytes() for p in files)


def test_cache_hit_scores_nothing_twice_and_a_rerun_sends_zero_requests(lm, batch, tmp_path):
    prompts, completions = batch
    cache = tmp_path / "teacher-cache.sqlite"
    with LoopbackServer(lm) as server:
        first = make_teacher(server, lm, cache=cache)
        expected = first.score_topk(prompts, completions, 4)
        sent = server.total_requests
        assert sent == len(prompts) + 1  # + the tokenizer probe
        again = first.score_topk(prompts, completions, 4)
        assert server.total_requests == sent and first.metrics()["cache_hits"] == len(prompts)
        first.close()

        rerun = make_teacher(server, lm, cache=cache)  # a fresh process re-running the finished job
        result = rerun.score_topk(prompts, completions, 4)
        assert server.total_requests == sent
        assert rerun.metrics()["requests"] == 0 and rerun.metrics()["cache_hits"] == len(prompts) + 1
        for got in (again, result):
            assert torch.equal(got.topk_ids, expected.topk_ids)
            assert torch.equal(got.topk_logprobs, expected.topk_logprobs)

        rerun.score_topk(prompts, completions, 2)  # a different request is not served from the cache
        assert server.total_requests == sent + len(prompts)


def test_server_in_its_own_process_serving_cached_responses(lm, batch):
    """The benchmark's setting: the server is a spawned process, and a repeated request is served from its cache
    (re-enveloped bytes) with the same log-probs as the computed one."""
    prompts, completions = batch
    with LoopbackServerProcess(lm_seed=0, cache_completions=True) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, cache=None)
        for _ in range(2):
            assert_matches_model(teacher.score_topk(prompts, completions, 4), lm, prompts, completions, 4)
        assert server.completions_computed == len(prompts)
        assert server.total_requests == 2 * len(prompts)
        teacher.close()


def test_identical_rows_in_a_batch_are_sent_once(lm, batch):
    prompts, completions = batch
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False)
        scores = teacher.score_topk([prompts[0]] * 3 + [prompts[1]], [completions[0]] * 3 + [completions[1]], 3)
        assert server.total_requests == 2
        assert torch.equal(scores.topk_logprobs[0], scores.topk_logprobs[2])


def test_a_fraction_of_500s_under_concurrency(lm, batch):
    prompts, completions = batch
    digit = lm.tokenizer.convert_tokens_to_ids
    prompts, completions = prompts * 3, [c + [digit(str(i))] for i, c in enumerate(completions * 3)]  # 9 distinct
    with LoopbackServer(lm, fraction_500=0.3, seed=3) as server:
        teacher = make_teacher(server, lm, check_tokenizer=False, max_concurrency=4,
                               retry=RetryPolicy(max_retries=10, base_delay=0.001, max_delay=0.002))
        scores = teacher.score_topk(prompts, completions, 4)
        assert_matches_model(scores, lm, prompts, completions, 4)
        m = teacher.metrics()
        assert m["retries"] > 0 and m["requests"] == server.total_requests == len(prompts) + m["retries"]


def test_chat_generation_returns_the_models_text(lm):
    chats = [[{"role": "user", "content": "what is 2 + 2 ?"}], [{"role": "user", "content": "tom has 3 apples"}]]
    with LoopbackServer(lm) as server:
        teacher = make_teacher(server, lm)
        gens = teacher.generate(chats, max_tokens=6, temperature=0.0, n=2)
        assert [(g.chat_index, g.sample_index) for g in gens] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for g in gens:
            ids = lm.chat_ids(chats[g.chat_index])
            expected = lm.tokenizer.decode(lm.generate(ids, 6, 0.0), skip_special_tokens=True)
            assert g.text == expected and g.model == server.model_name
            assert g.usage["prompt_tokens"] == len(ids)
        assert server.requests_to("/v1/chat/completions") == 4


def test_cortex_openai_compatible_endpoint_generates_and_refuses_scoring(lm, monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    chat = [{"role": "user", "content": "what is 2 + 2 ?"}]
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        teacher = OpenAICompatTeacher.for_cortex(server.url, "llama3.1-8b", retry=FAST_RETRY)
        [gen] = teacher.generate([chat], max_tokens=5, temperature=0.0)
        expected = lm.tokenizer.decode(lm.generate(lm.chat_ids(chat), 5, 0.0), skip_special_tokens=True)
        assert gen.text == expected
        assert server.log[0]["path"] == "/api/v2/cortex/v1/chat/completions"
        assert server.log[0]["headers"]["authorization"] == f"Bearer {SECRET}"
        with pytest.raises(TeacherCapabilityError, match="Cortex exposes no logprobs; use it for RS-SFT"):
            teacher.require("topk", top_k=5)
        assert SECRET not in repr(teacher)


def test_scoring_without_a_student_tokenizer_is_refused(lm):
    with LoopbackServer(lm) as server:
        teacher = OpenAICompatTeacher(server.url + "/v1", "m")
        with pytest.raises(ValueError, match="needs student_tokenizer"):
            teacher.require("topk", top_k=2)
        assert teacher._client.max_retries == 0  # the retry policy is ours alone


def test_log_probs_must_be_finite_numbers_at_most_zero():
    from trl_opsd.teachers.http import InvalidResponseError
    from trl_opsd.teachers.wire import logprob

    assert logprob(-9999.0, "x") == -9999.0  # vLLM's spelling of -inf: probability 0, kept
    assert logprob(-0.25, "x") == -0.25 and logprob(3e-6, "x") == 0.0  # float rounding of log 1 reads as 0
    for bad in (None, float("nan"), float("inf"), float("-inf"), 0.5, True, "-1.0", [-1.0]):
        with pytest.raises(InvalidResponseError, match="x: log-prob must be"):
            logprob(bad, "x")

