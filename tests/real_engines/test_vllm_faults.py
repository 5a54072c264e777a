"""The teacher's retries against real vLLM responses: ``FaultProxy`` in front of the real server breaks some
exchanges; after the faults the values equal the fault-free ones, and a broken answer is never cached.

The full fault catalogue (hangs, trickles, Retry-After dates, every wire-format break, secrets in error
bodies) stays on the loopback servers (tests/test_teachers_openai.py, tests/adversarial/test_remote_faults.py);
this file checks that the same machinery works when the bytes come from vLLM.
"""

from __future__ import annotations

import pytest
import torch
from fault_proxy import FaultProxy
from real_reference import chats, load_model, scoring_batch

from trl_opsd.teachers import OpenAICompatTeacher, RemoteTeacherError, RetryPolicy
from trl_opsd.teachers.base import TopKScores
from trl_opsd.teachers.cache import ResponseCache

pytestmark = pytest.mark.slow  # starts a vLLM server: minutes on a 2-core machine

RETRY = RetryPolicy(max_retries=3, base_delay=0.0, max_delay=0.0)


@pytest.fixture(scope="module")
def world(vllm_world):
    return load_model(vllm_world.model)


@pytest.fixture(scope="module")
def batch(world):
    prompts, completions = scoring_batch(*world, n=3)
    return prompts, completions


@pytest.fixture(scope="module")
def fault_free(vllm_world, world, batch):
    teacher = OpenAICompatTeacher(vllm_world.base_url, vllm_world.model, student_tokenizer=world[1],
                                  max_concurrency=1, check_tokenizer=False, timeout_s=120.0)
    scores = teacher.score_topk(*batch, 8)
    teacher.close()
    return scores


@pytest.fixture()
def proxy(vllm_world):
    with FaultProxy(vllm_world.base_url.removesuffix("/v1")) as proxy:
        yield proxy


def through(proxy, server, tokenizer, **kwargs) -> OpenAICompatTeacher:
    kwargs.setdefault("retry", RETRY)
    kwargs.setdefault("timeout_s", 120.0)
    return OpenAICompatTeacher(proxy.url + "/v1", server.model, student_tokenizer=tokenizer, max_concurrency=1,
                               check_tokenizer=False, **kwargs)


def assert_same_scores(got, expected) -> None:
    assert torch.equal(got.topk_ids, expected.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, expected.topk_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, expected.sampled_logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("faults", [("500", "429", "503"), ("reset", "truncate"), ("wrong_shape",)])
def test_scores_after_faults_equal_the_fault_free_scores(vllm_world, world, batch, fault_free, proxy, faults):
    teacher = through(proxy, vllm_world, world[1])
    proxy.inject(*faults)
    assert_same_scores(teacher.score_topk(*batch, 8), fault_free)
    assert proxy.pending == 0
    metrics = teacher.metrics()
    assert metrics["retries"] == len(faults) and metrics["failures"] == 0
    assert metrics["requests"] == len(batch[0]) + len(faults)
    teacher.close()


@pytest.mark.parametrize("fault", ["wrong_shape", "truncate"])
def test_a_broken_answer_is_never_cached(vllm_world, world, batch, fault_free, proxy, tmp_path, fault):
    prompts, completions = batch
    path = tmp_path / "teacher.sqlite"
    teacher = through(proxy, vllm_world, world[1], cache=path)
    proxy.inject(*[fault] * (RETRY.max_retries + 1))
    with pytest.raises(RemoteTeacherError, match="giving up after 4 attempts"):
        teacher.score_topk(prompts[:1], completions[:1], 8)
    assert len(ResponseCache(path)) == 0

    forwarded = proxy.forwarded
    scores = teacher.score_topk(prompts[:1], completions[:1], 8)  # no faults left: the real answer, now cached
    assert proxy.forwarded == forwarded + 1 and len(ResponseCache(path)) == 1
    t = len(completions[0])
    assert_same_scores(scores, TopKScores(fault_free.topk_ids[:1, :t], fault_free.topk_logprobs[:1, :t],
                                          fault_free.sampled_logprobs[:1, :t], fault_free.mask[:1, :t]))
    teacher.close()


def test_chat_generation_after_faults_equals_the_fault_free_text(vllm_world, world, proxy):
    chats_ = chats(3)
    direct = OpenAICompatTeacher(vllm_world.base_url, vllm_world.model, timeout_s=120.0)
    expected = [g.text for g in direct.generate(chats_, max_tokens=24, temperature=0.0)]
    teacher = through(proxy, vllm_world, world[1], retry=RetryPolicy(max_retries=4, base_delay=0.0, max_delay=0.0))
    proxy.inject("500", "reset", "wrong_shape", "truncate")  # all four on the first chat's request
    assert [g.text for g in teacher.generate(chats_, max_tokens=24, temperature=0.0)] == expected
    assert teacher.metrics()["retries"] == 4
    direct.close()
    teacher.close()
