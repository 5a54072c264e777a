"""RS-SFT data generation: report numbers against hand counts, resume after a kill, zero calls on a re-run,
and (slow) the end-to-end claim on the arithmetic world: SFT on the filtered self-samples beats the student.

Samplers: an in-process tiny model (the real ``StudentSampler``) and an API teacher whose replies are
scripted by a loopback chat server; the PRM judge is the verifier-backed stub over the same wire format.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter

import pytest

from harness.prm import PRMJudge
from harness.world.arithmetic import generate_problems
from harness.world.stub_judge import STUB_MODEL, StubJudgeServer
from harness.rs_sft import (
    FilterSettings,
    PromptRow,
    StudentSampler,
    TeacherSampler,
    build_report,
    load_prompts,
    prompt_from_row,
    render_markdown,
    run_rs_sft,
)
from harness.stats import wilson_interval
from harness.world.rs_sft import world_prompts
from trl_opsd.teachers import OpenAICompatTeacher


@pytest.fixture()
def stub_judge(tmp_path):
    with StubJudgeServer() as server:
        teacher = OpenAICompatTeacher(f"{server.url}/v1", STUB_MODEL, server="openai", timeout_s=10.0)
        yield server, PRMJudge(teacher, cache=tmp_path / "judge.sqlite")


# --------------------------------------------------------------------------------------------
# a scripted API "student": per question, a fixed multiset of K replies
# --------------------------------------------------------------------------------------------

SLIP = "1000+1=1002\n#### 1002"  # arithmetic slip: the stub PRM catches it, the verifier rejects it
MISREAD = "1000+1=1001\n#### 1001"  # consistent but wrong (world answers are < 1000): the stub passes it
GIVE_UP = "I give up"


class ScriptedSolver:
    """Chat responder: the j-th request about a question gets ``plans[question][j]`` ('G' = the gold
    solution, 'S' = SLIP, 'M' = MISREAD, 'X' = GIVE_UP)."""

    def __init__(self, problems, plans):
        self.gold = {p.question: p.solution for p in problems}
        self.plans = {p.question: plan for p, plan in zip(problems, plans)}
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, body):
        question = body["messages"][-1]["content"]
        with self.lock:
            kind = self.plans[question][self.seen[question]]
            self.seen[question] += 1
        return {"G": self.gold[question], "S": SLIP, "M": MISREAD, "X": GIVE_UP}[kind]


PLANS = ["GGGG", "GGSM", "SSMM", "GXXX"]  # correct per prompt: 4, 2, 0, 1


def scripted_job(tmp_path, judge, out="out", plans=PLANS, settings=None):
    problems = generate_problems(len(plans), "train", seed=3)
    solver = ScriptedSolver(problems, plans)
    with StubJudgeServer(solver) as server:
        teacher = OpenAICompatTeacher(f"{server.url}/v1", "scripted-student", server="openai", timeout_s=10.0)
        prompts = [prompt_from_row(p.to_row(), i) for i, p in enumerate(problems)]
        report = run_rs_sft(prompts, TeacherSampler(teacher, temperature=1.0), tmp_path / out, samples=4,
                            judge=judge, settings=settings or FilterSettings("both", "min", 1.0), chunk_prompts=2,
                            progress=False, n_resamples=200)
        return report, server.total_requests


def test_report_matches_hand_counts(tmp_path, stub_judge):
    _, judge = stub_judge
    report, calls = scripted_job(tmp_path, judge)
    assert calls == 16
    assert report["pass_at_1"]["value"] == pytest.approx((4 / 4 + 2 / 4 + 0 + 1 / 4) / 4)  # 0.4375
    assert report["pass_at_4"]["value"] == pytest.approx(3 / 4)
    assert report["headroom"]["value"] == pytest.approx(0.75 - 0.4375)
    # pass@2 = 1 - C(n - c, 2) / C(4, 2) per prompt: 1, 1 - 1/6, 0, 1 - 3/6
    assert report["pass_at_k_curve"]["2"] == pytest.approx((1 + 5 / 6 + 0 + 0.5) / 4)
    # verifier AND stub-PRM min >= 1: exactly the gold solutions, 7 of 16, 3 unique SFT rows
    assert (report["acceptance"]["k"], report["acceptance"]["n"]) == (7, 16)
    assert report["prompts_with_accepted"] == 3 and report["sft_rows"] == 3
    # PRM alone. min: G and M score 1 (7 correct + 3 misreads accepted), S and X score 0.
    min_tau1 = next(r for r in report["tau_sweep"]["min"] if r["tau"] == 1.0)
    assert (min_tau1["tp"], min_tau1["fp"], min_tau1["fn"]) == (7, 3, 0)
    assert min_tau1["precision"]["value"] == pytest.approx(0.7) and min_tau1["recall"]["value"] == 1.0
    assert (min_tau1["precision"]["ci_low"], min_tau1["precision"]["ci_high"]) == pytest.approx((0.3968, 0.8922),
                                                                                                 abs=1e-4)
    assert min_tau1["f1"] == pytest.approx(2 * 0.7 / 1.7)
    # mean: S scores 1/2, so taus up to 0.5 also accept the 3 slips
    mean = {r["tau"]: (r["tp"], r["fp"]) for r in report["tau_sweep"]["mean"]}
    assert mean[0.0] == (7, 9) and mean[0.5] == (7, 6) and mean[0.6] == (7, 3) and mean[1.0] == (7, 3)
    assert report["usable_filter"]["found"] is False and report["usable_filter"]["precision"] == pytest.approx(0.7)
    text = render_markdown(report)
    assert "NO tau reaches precision > 95% with recall > 50%" in text and "| min | 0.1-1.0 | 10 |" in text
    rows = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user" for r in rows)
    assert [r["messages"][-1]["content"] for r in rows] == [p.solution for i, p in
                                                            enumerate(generate_problems(4, "train", seed=3)) if i != 2]


def test_usable_flag_when_the_prm_is_precise(tmp_path, stub_judge):
    _, judge = stub_judge
    report, _ = scripted_job(tmp_path, judge, plans=["GGGG", "GGSS", "GSSS", "SSSS"] * 3)
    best = report["usable_filter"]
    assert best["found"] and best["precision"] == 1.0 and best["recall"] == 1.0
    assert best["precision_ci_low_above_threshold"] is False  # 21 of 21 is not enough to confirm 95% at 95%
    assert wilson_interval(21, 21)[0] < 0.95
    assert "YES" in render_markdown(report)


def test_second_run_of_a_finished_job_makes_zero_calls(tmp_path, stub_judge):
    judge_server, judge = stub_judge
    first, sampler_calls = scripted_job(tmp_path, judge)
    judge_calls = judge_server.total_requests
    assert sampler_calls == 16 and judge_calls > 0
    log = (tmp_path / "out" / "samples.jsonl").read_bytes()
    again, sampler_calls = scripted_job(tmp_path, judge)
    assert sampler_calls == 0 and judge_server.total_requests == judge_calls
    assert (tmp_path / "out" / "samples.jsonl").read_bytes() == log
    assert again["pass_at_1"] == first["pass_at_1"] and again["tau_sweep"] == first["tau_sweep"]
    # a new tau or filter is applied to the stored scores: still no call
    relaxed, sampler_calls = scripted_job(tmp_path, judge, settings=FilterSettings("prm", "mean", 0.5))
    assert sampler_calls == 0 and judge_server.total_requests == judge_calls
    assert relaxed["acceptance"]["k"] == 7 + 6


def test_filter_needs_what_it_filters_with(tmp_path, stub_judge):
    _, judge = stub_judge
    no_answer = [PromptRow("a", [{"role": "user", "content": "hi"}])]
    with pytest.raises(ValueError, match="gold 'answer'"):
        run_rs_sft(no_answer, TeacherSampler(judge.teacher), tmp_path / "x", judge=judge, progress=False)
    with pytest.raises(ValueError, match="needs a PRM judge"):
        run_rs_sft(no_answer, TeacherSampler(judge.teacher), tmp_path / "x", settings=FilterSettings("prm"),
                   progress=False)


def test_prompt_rows_follow_the_dataset_contract(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "old"}],
         "answer": 3},
        {"prompt": "q2"},
    ]) + "\n")
    a, b = load_prompts(path)
    assert (a.id, a.messages, a.answer) == ("a", [{"role": "user", "content": "q1"}], "3")
    assert b.question == "q2" and b.answer is None and len(b.id) == 16
    with pytest.raises(ValueError, match="row 0"):
        prompt_from_row({"messages": [{"role": "system", "content": "s"}]}, 0)


# --------------------------------------------------------------------------------------------
# kill and resume with the in-process student
# --------------------------------------------------------------------------------------------


class Killed(RuntimeError):
    pass


class KilledAfter:
    """The same sampler, but the process 'dies' when asked for chunk number ``chunks + 1``."""

    def __init__(self, inner, chunks: int | None):
        self.inner, self.chunks, self.calls = inner, chunks, 0
        self.whole_chunks = inner.whole_chunks

    def describe(self):
        return self.inner.describe()

    def sample(self, prompts, k):
        if self.chunks is not None and self.calls >= self.chunks:
            raise Killed
        self.calls += 1
        return self.inner.sample(prompts, k)


@pytest.fixture(scope="module")
def tiny_student(tiny_tokenizer):
    from harness.world.tiny import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return StudentSampler(model, tiny_tokenizer, name="tiny-random", temperature=1.0, max_new_tokens=12, seed=5)


def student_job(out, sampler, judge, kill_after=None):
    wrapped = KilledAfter(sampler, kill_after)
    run_rs_sft(world_prompts(10, "train", seed=4), wrapped, out, samples=3, judge=judge, chunk_prompts=3,
               settings=FilterSettings("prm", "min", 0.0), progress=False, n_resamples=100)  # keeps every row
    return wrapped.calls


def files(out):
    return {name: (out / name).read_text() for name in ("job.json", "samples.jsonl", "sft.jsonl", "report.json")}


def test_killed_and_resumed_job_equals_an_uninterrupted_one(tmp_path, tiny_student, stub_judge):
    _, judge = stub_judge
    assert student_job(tmp_path / "whole", tiny_student, judge) == 4  # chunks of 3, 3, 3, 1 prompts
    whole = files(tmp_path / "whole")
    assert len(whole["samples.jsonl"].splitlines()) == 10 and len(whole["sft.jsonl"].splitlines()) > 10

    with pytest.raises(Killed):
        student_job(tmp_path / "killed", tiny_student, judge, kill_after=2)
    assert len((tmp_path / "killed" / "samples.jsonl").read_text().splitlines()) == 6
    assert student_job(tmp_path / "killed", tiny_student, judge) == 2
    assert files(tmp_path / "killed") == whole

    # killed while writing: the log ends inside chunk 2 with a torn line
    torn = tmp_path / "torn"
    torn.mkdir()
    shutil.copy(tmp_path / "whole" / "job.json", torn / "job.json")
    lines = whole["samples.jsonl"].splitlines(keepends=True)
    (torn / "samples.jsonl").write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    assert student_job(torn, tiny_student, judge) == 3  # chunk 2 is sampled again, whole, with its own seed
    assert files(torn) == whole

    assert student_job(tmp_path / "whole", tiny_student, judge) == 0  # finished: no sampling at all
    assert files(tmp_path / "whole") == whole


def test_resume_refuses_other_settings(tmp_path, tiny_student, stub_judge):
    _, judge = stub_judge
    prompts = world_prompts(2, "train", seed=4)
    run_rs_sft(prompts, tiny_student, tmp_path, samples=2, judge=judge, settings=FilterSettings("verifier"),
               progress=False, n_resamples=100)
    with pytest.raises(ValueError, match="other settings"):
        run_rs_sft(prompts, tiny_student, tmp_path, samples=3, judge=judge, settings=FilterSettings("verifier"),
                   progress=False)


def test_job_file_is_written_atomically_and_a_torn_one_says_how_to_recover(tmp_path, tiny_student, monkeypatch):
    import harness.io

    prompts = world_prompts(2, "train", seed=4)
    settings = FilterSettings("verifier")

    def killed(source, target):
        raise KeyboardInterrupt  # killed between writing the new file and renaming it over the old one

    monkeypatch.setattr(harness.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_rs_sft(prompts, tiny_student, tmp_path / "killed", samples=2, settings=settings, progress=False)
    assert list((tmp_path / "killed").iterdir()) == []  # no job.json, half or whole, and no temporary file
    monkeypatch.undo()

    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "job.json").write_text('{"sampler": {"kind": "stu')  # an older version's non-atomic write, cut short
    with pytest.raises(ValueError, match=r"torn/job\.json is not valid JSON .*delete it and rerun the same command"):
        run_rs_sft(prompts, tiny_student, torn, samples=2, settings=settings, progress=False)
    (torn / "job.json").unlink()
    report = run_rs_sft(prompts, tiny_student, torn, samples=2, settings=settings, progress=False, n_resamples=100)
    assert report["sft_rows"] >= 0 and json.loads((torn / "job.json").read_text())["samples"] == 2


def test_build_report_without_gold_answers_skips_pass_at_k():
    records = [{"id": "a", "messages": [], "answer": None, "completions": [
        {"text": "1+1=2", "correct": None, "steps": ["1+1=2"], "prm": {"ok": True, "step_scores": [1.0]}},
        {"text": "", "correct": None, "steps": [], "prm": {"ok": False, "step_scores": []}},
    ]}]
    report = build_report(records, FilterSettings("prm", "min", 1.0), samples=2)
    assert report["acceptance"]["k"] == 1 and "pass_at_1" not in report and "tau_sweep" not in report
    assert report["empty_completions"] == 1 and report["judge_unusable_replies"] == 0


def test_rs_sft_command_with_an_api_sampler_and_the_stub_judge(tmp_path, capsys):
    from harness.cli import main

    problems = generate_problems(4, "train", seed=3)
    argv = ["rs-sft", "--out", str(tmp_path / "cli"), "--num-prompts", "4", "--prompt-seed", "3", "--samples", "4",
            "--sampler", "teacher", "--teacher-model", "scripted-student", "--judge", "stub"]
    for expected_calls in (16, 0):
        with StubJudgeServer(ScriptedSolver(problems, PLANS)) as server:
            assert main([*argv, "--teacher-url", f"{server.url}/v1"]) == 0
            assert server.total_requests == expected_calls
    printed = capsys.readouterr().out
    assert "| pass@1 | 43.8% [" in printed and "accepted 7 of 16 completions" in printed
    assert "'requests': 0" in printed  # the second run's judge made no request either


# --------------------------------------------------------------------------------------------
# end to end on the arithmetic world
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "measured on the shipped world (torch 2.13.0, transformers 5.24.0, trl 1.16.0: 22.6% without the hint): "
    "no-hint accuracy 22.6% -> 24.4% (58 up / 49 down, McNemar p = 0.44), not significant; it was on the earlier "
    "build of the world (23.4%). Kept running so a setting that makes the gain significant again shows up"))
def test_sft_on_filtered_self_samples_beats_the_student(tmp_path, warm_world):
    """RS-SFT on the world: K=8 samples at temperature 1 from the warm-started student on 512 train prompts,
    kept when the verifier AND the stub PRM (min >= 1) accept them; TRL's SFTTrainer on the rows; greedy
    no-hint accuracy on 500 held-out test problems against the student, paired (exact McNemar)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from harness.generation import generate_texts, score_answers
    from harness.stats import mcnemar_test
    from harness.world.stub_judge import serve_stub_judge

    student, tokenizer = warm_world.load()
    sampler = StudentSampler(student, tokenizer, name=warm_world.path, temperature=1.0, max_new_tokens=40, seed=0)
    with serve_stub_judge() as url:
        judge = PRMJudge(OpenAICompatTeacher(f"{url}/v1", STUB_MODEL, server="openai"), cache=tmp_path / "j.sqlite")
        report = run_rs_sft(world_prompts(512, "train", seed=11), sampler, tmp_path / "rs", samples=8, judge=judge,
                            settings=FilterSettings("both", "min", 1.0), chunk_prompts=32, progress=False)
    print(render_markdown(report))
    assert report["headroom"]["ci_low"] > 0  # best-of-8 has something to teach
    rows = [json.loads(line) for line in (tmp_path / "rs" / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == report["sft_rows"] > 100

    tuned, _ = warm_world.load()
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=32, learning_rate=1e-3,
                     num_train_epochs=4, lr_scheduler_type="linear", logging_steps=10, save_strategy="no",
                     report_to="none", seed=0, use_cpu=True, bf16=False, max_length=256, assistant_only_loss=True)
    SFTTrainer(model=tuned, args=args, train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
               processing_class=tokenizer).train()

    test = generate_problems(500, "test", seed=0)
    chats, answers = [p.to_row()["messages"] for p in test], [p.answer for p in test]
    before = score_answers(generate_texts(student, tokenizer, chats), answers)
    after = score_answers(generate_texts(tuned, tokenizer, chats), answers)
    result = mcnemar_test(before, after)
    print(f"no-hint accuracy {sum(before) / 500:.1%} -> {sum(after) / 500:.1%}; {result}")
    assert sum(after) > sum(before) and result.b01 > result.b10 and result.pvalue < 0.05
