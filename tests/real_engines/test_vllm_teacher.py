"""OpenAICompatTeacher against a real vLLM server serving the arithmetic world; every number is compared with the
same model computed in process (fp32).

The loopback servers of ``tests/servers`` imitate vLLM's wire format; here vLLM itself answers, so a change in
its format, its tokenization or its log-prob semantics shows up as a failure.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from real_reference import assert_topk_equal, chats, greedy_texts, load_model, prompt_ids, scoring_batch

from harness.prm import PRMJudge, split_steps
from harness.remote_teachers import remote_teacher
from harness.rs_sft import FilterSettings, PromptRow, TeacherSampler, run_rs_sft
from harness.verifiers import extract_answer
from harness.world.arithmetic import generate_problems
from trl_opsd.teachers import OpenAICompatTeacher, RemoteTeacherError, TokenizerMismatchError

pytestmark = pytest.mark.slow  # starts a vLLM server: minutes on a 2-core machine


@pytest.fixture(scope="module")
def world(vllm_world):
    return load_model(vllm_world.model)


@pytest.fixture(scope="module")
def batch(world):
    return scoring_batch(*world)


def teacher_for(vllm, tokenizer, **kwargs) -> OpenAICompatTeacher:
    kwargs.setdefault("timeout_s", 120.0)  # a loaded 2-core machine serves slowly
    return OpenAICompatTeacher(vllm.base_url, vllm.model, student_tokenizer=tokenizer, **kwargs)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_by_prompt_logprobs_equals_the_in_process_model(vllm_world, world, batch, k):
    model, tokenizer = world
    prompts, completions = batch
    teacher = teacher_for(vllm_world, tokenizer, server="vllm")
    assert_topk_equal(teacher.score_topk(prompts, completions, k), model, prompts, completions, k)
    teacher.close()


@pytest.mark.parametrize("k", [5, 20])
def test_topk_by_echo_and_token_strings_equals_the_in_process_model(vllm_world, world, batch, k):
    """OpenAI's legacy dialect (echo + logprobs, token strings, max_tokens 1), answered by vLLM."""
    model, tokenizer = world
    prompts, completions = batch
    teacher = teacher_for(vllm_world, tokenizer, server="openai", max_top_k=20)
    assert_topk_equal(teacher.score_topk(prompts, completions, k), model, prompts, completions, k)
    teacher.close()


@pytest.mark.parametrize("server", ["vllm", "openai"])
def test_sampled_token_scoring_equals_the_in_process_model(vllm_world, world, batch, server):
    model, tokenizer = world
    prompts, completions = batch
    teacher = teacher_for(vllm_world, tokenizer, server=server)
    scores = teacher.score_topk(prompts, completions, 0)
    assert scores.k == 0
    assert_topk_equal(scores, model, prompts, completions, 0)
    teacher.close()


def test_the_servers_max_logprobs_is_a_clear_non_retried_error(vllm_world, world, batch):
    _, tokenizer = world
    prompts, completions = batch
    from vllm_server import MAX_LOGPROBS

    teacher = teacher_for(vllm_world, tokenizer, max_top_k=MAX_LOGPROBS + 1, check_tokenizer=False)
    with pytest.raises(RemoteTeacherError, match="HTTP 400 \\(not retried\\)"):
        teacher.score_topk(prompts[:1], completions[:1], MAX_LOGPROBS + 1)
    assert teacher.metrics()["retries"] == 0
    teacher.close()


def test_the_tokenizer_probe_passes_for_the_served_tokenizer(vllm_world, world, batch):
    _, tokenizer = world
    prompts, completions = batch
    teacher = teacher_for(vllm_world, tokenizer)
    teacher.verify_tokenizer([*prompts[0], *completions[0]])
    assert teacher._tokenizer_verified and teacher.metrics()["requests"] == 1
    teacher.close()


def test_the_tokenizer_probe_refuses_a_student_that_tokenizes_differently(vllm_world, world, batch):
    """A student BPE with fewer merges splits the same text into other ids: refused before anything is scored."""
    from harness.world.tiny import build_tokenizer

    _, tokenizer = world
    other = build_tokenizer(vocab_size=300)
    text = "Mia has 12 apples. She buys 7 more apples."
    assert other(text)["input_ids"] != tokenizer(text)["input_ids"]  # the premise
    prompts = [other(tokenizer.decode(p), add_special_tokens=False)["input_ids"] for p in batch[0][:2]]
    completions = [other(tokenizer.decode(c), add_special_tokens=False)["input_ids"] for c in batch[1][:2]]
    teacher = teacher_for(vllm_world, other)
    with pytest.raises(TokenizerMismatchError, match="does not tokenize like the student tokenizer"):
        teacher.score_topk(prompts, completions, 5)
    assert teacher.metrics()["requests"] == 1  # the probe; nothing was scored
    teacher.close()


def test_chat_generation_equals_in_process_greedy_generation(vllm_world, world):
    model, tokenizer = world
    chats_ = chats(6)
    teacher = remote_teacher(vllm_world.base_url, vllm_world.model, "vllm", student_tokenizer=tokenizer)
    gens = teacher.generate(chats_, max_tokens=40, temperature=0.0)
    assert [g.text for g in gens] == greedy_texts(model, tokenizer, chats_, max_new_tokens=40)
    for g, chat in zip(gens, chats_):
        assert g.model == vllm_world.model and g.usage["prompt_tokens"] == len(prompt_ids(tokenizer, chat))
    teacher.close()


def test_rs_sft_samples_from_the_real_server_and_verifies_them(vllm_world, world, tmp_path):
    """RS-SFT's teacher sampler over the real server (temperature 1): most samples end in an answer the verifier
    reads, and most hinted prompts keep an accepted sample (the world solves most problems given the answer)."""
    from harness.world.arithmetic import hinted_messages

    _, tokenizer = world
    problems = generate_problems(8, "validation")
    prompts = [PromptRow(id=p.uid, messages=hinted_messages(p), answer=p.answer) for p in problems]
    teacher = remote_teacher(vllm_world.base_url, vllm_world.model, "vllm", student_tokenizer=tokenizer)
    sampler = TeacherSampler(teacher, temperature=1.0, max_tokens=48)
    report = run_rs_sft(prompts, sampler, tmp_path, samples=2, settings=FilterSettings(filter="verifier"),
                        progress=False, n_resamples=200)
    records = [line for line in (tmp_path / "samples.jsonl").read_text().splitlines() if line]
    assert len(records) == len(prompts)
    texts = [c["text"] for r in map(json.loads, records) for c in r["completions"]]
    assert len(texts) == 2 * len(prompts)
    assert sum(extract_answer(t) is not None for t in texts) >= 0.8 * len(texts), texts
    assert report["sft_rows"] >= len(prompts) // 2, report
    teacher.close()


def test_prm_judge_asks_the_real_server_and_reads_its_replies(vllm_world, world, tmp_path):
    """The judge's chats reach vLLM and come back as the model's greedy text. The world model was not trained to
    judge, so its replies never follow the judge's format: the judge must say so (one corrective turn, then the
    rollout is counted unjudged) rather than invent verdicts. (The default rubric alone is longer than the world
    model's 512-token context: a short one.)"""
    from harness.prm import judge_messages

    model, tokenizer = world
    problem = generate_problems(1, "validation")[0]
    steps = split_steps(problem.solution)
    rubric = "Mark each step 1 if it is right and 0 if it is wrong."
    teacher = remote_teacher(vllm_world.base_url, vllm_world.model, "vllm", student_tokenizer=tokenizer)
    judge = PRMJudge(teacher, rubric, cache=tmp_path / "judge.sqlite", max_tokens=24, max_retries=1)
    result = judge.judge(problem.question, steps)
    assert not result.ok and result.failed_samples == 1
    assert {k: judge.metrics()[k] for k in ("requests", "retries", "unjudged")} == {
        "requests": 2, "retries": 1, "unjudged": 1}
    assert teacher.metrics()["requests"] == 2
    [reply] = teacher.generate([judge_messages(rubric, problem.question, steps)], max_tokens=24, temperature=0.0)
    assert reply.text == greedy_texts(model, tokenizer, [judge_messages(rubric, problem.question, steps)], 24)[0]
    teacher.close()


def test_response_cache_second_pass_sends_nothing_and_stores_the_real_answers(vllm_world, world, batch, tmp_path):
    model, tokenizer = world
    prompts, completions = batch
    path = tmp_path / "teacher.sqlite"
    first = teacher_for(vllm_world, tokenizer, cache=path)
    expected = first.score_topk(prompts, completions, 8)
    assert first.metrics()["requests"] == len(prompts) + 1  # + the tokenizer probe
    first.close()
    assert_topk_equal(expected, model, prompts, completions, 8)

    rerun = teacher_for(vllm_world, tokenizer, cache=path)  # a fresh process re-running the job
    again = rerun.score_topk(prompts, completions, 8)
    assert rerun.metrics()["requests"] == 0 and rerun.metrics()["cache_hits"] == len(prompts) + 1
    assert torch.equal(again.topk_ids, expected.topk_ids) and torch.equal(again.topk_logprobs, expected.topk_logprobs)
    rerun.close()

    uncached = teacher_for(vllm_world, tokenizer, cache=None, check_tokenizer=False).score_topk(prompts, completions, 8)
    torch.testing.assert_close(uncached.topk_logprobs, expected.topk_logprobs, atol=1e-5, rtol=0)
    with sqlite3.connect(path) as db:
        assert db.execute("select count(*) from responses").fetchone()[0] == len(prompts) + 1


def test_results_are_the_same_at_concurrency_1_and_8(vllm_world, world, batch):
    _, tokenizer = world
    prompts, completions = batch
    results = {}
    for concurrency in (1, 8):
        teacher = teacher_for(vllm_world, tokenizer, max_concurrency=concurrency, check_tokenizer=False)
        results[concurrency] = teacher.score_topk(prompts, completions, 20)
        teacher.close()
    # vLLM batches concurrent requests together; fp32 CPU kernels may round a batch differently from one row
    assert torch.equal(results[1].topk_ids, results[8].topk_ids)
    torch.testing.assert_close(results[1].topk_logprobs, results[8].topk_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1].sampled_logprobs, results[8].sampled_logprobs, atol=1e-5, rtol=0)
