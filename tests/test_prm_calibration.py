"""PRM calibration plumbing: judge scores against verifier labels, AUROC / Spearman against independent
references (ties included), the seed's decision rule, rollout loading and the ``prm-calibrate`` command.

The statistics themselves are tested in test_stats.py; here the point is that the right scores reach them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from harness.cli import main
from harness.prm import PRMJudge
from harness.prm_calibration import Rollout, calibrate, decide, load_rollouts, render_markdown
from harness.world.stub_judge import STUB_MODEL, StubJudgeServer
from trl_opsd.teachers import OpenAICompatTeacher

Q = "Mia has 12 apples. She buys 7 more apples. She gives away 5 apples. How many apples does Mia have now?"
# (text, verifier label, the stub's step verdicts)
CASES = [
    ("12+7=19\n19-5=14\n#### 14", True, [1, 1, 1]),
    ("12+7=19\n19-5=14\n#### 14", True, [1, 1, 1]),
    ("12 + 7 = 19\n19 - 5 = 14\n#### 14", True, [1, 1, 1]),
    ("12+7=19\n19-5=14\nso #### 14", True, [1, 1, 0, 1]),  # a prose step the stub cannot check
    ("12+7=19\n19-5=14\nthe answer is 14", True, [1, 1, 0]),
    ("12+7=19\n19-5=14\n#### 14\n", True, [1, 1, 1]),
    ("12+7=18\n18-5=13\n#### 13", False, [0, 1, 1]),  # arithmetic slip: caught
    ("12+7=19\n19-5=13\n#### 13", False, [1, 0, 1]),
    ("12+7=19\n#### 19", False, [1, 1]),  # stops a step early: the stub cannot tell
    ("12+9=21\n21-5=16\n#### 16", False, [1, 1, 1]),  # misread the question: the stub cannot tell
    ("12+7=19\n19-5=14\n#### 15", False, [1, 1, 0]),
    ("I do not know", False, [0]),
]


def rollouts() -> list[Rollout]:
    return [Rollout(Q, text, label) for text, label, _ in CASES]


@pytest.fixture()
def stub_judge(tmp_path):
    with StubJudgeServer() as server:
        teacher = OpenAICompatTeacher(f"{server.url}/v1", STUB_MODEL, server="openai", timeout_s=10.0)
        yield server, PRMJudge(teacher, cache=tmp_path / "judge.sqlite")


def rank_auroc(scores, labels) -> float:
    """Independent reference: the Mann-Whitney U statistic from scipy, divided by n_pos * n_neg."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    return sps.mannwhitneyu(scores[labels], scores[~labels]).statistic / (labels.sum() * (~labels).sum())


def test_calibration_scores_are_the_judges_and_match_references(stub_judge):
    server, judge = stub_judge
    report = calibrate(rollouts(), {"stub": judge}, ("min", "mean", "last"), n_resamples=500)
    labels = [label for _, label, _ in CASES]
    verdicts = [v for _, _, v in CASES]
    expected = {"min": [min(v) for v in verdicts], "mean": [sum(v) / len(v) for v in verdicts],
                "last": [v[-1] for v in verdicts]}
    rows = {row["aggregation"]: row for row in report["rows"]}
    assert report["rollouts"] == 12 and report["correct"] == 6
    for how, scores in expected.items():
        assert rows[how]["auroc"]["value"] == pytest.approx(rank_auroc(scores, labels))
        assert rows[how]["spearman"]["value"] == pytest.approx(sps.spearmanr(scores, labels).statistic)
        assert rows[how]["auroc"]["ci_low"] <= rows[how]["auroc"]["value"] <= rows[how]["auroc"]["ci_high"]
    # hand count for min (heavy ties): positives score 1,1,1,0,0,1; negatives 0,0,1,1,0,0
    # pairs pos > neg: 4 positives at 1 x 4 negatives at 0 = 16; ties: 4x2 + 2x4 = 16 -> (16 + 8) / 36
    assert rows["min"]["auroc"]["value"] == pytest.approx(24 / 36)
    assert rows["min"]["decision"]["level"] == "rewrite"
    assert server.total_requests == 10  # rollouts 0, 1 and 5 segment to the same steps: asked once


def test_recalibrating_another_aggregation_makes_no_call(stub_judge):
    server, judge = stub_judge
    calibrate(rollouts(), {"stub": judge}, ("min",), n_resamples=200)
    calls = server.total_requests
    report = calibrate(rollouts(), {"stub": judge}, ("mean", "last", "product"), n_resamples=200)
    assert server.total_requests == calls and len(report["rows"]) == 3


@pytest.mark.parametrize("auroc, ci, level, settled", [
    (0.90, (0.86, 0.95), "safe", True),
    (0.86, (0.80, 0.90), "safe", False),
    (0.85, (0.84, 0.85), "ensemble", True),  # the boundary belongs to the ensemble band
    (0.70, (0.70, 0.80), "ensemble", True),
    (0.6999, (0.60, 0.69), "rewrite", True),
    (0.50, (0.30, 0.72), "rewrite", False),
])
def test_decision_rule(auroc, ci, level, settled):
    decision = decide(auroc, ci)
    assert (decision.level, decision.settled) == (level, settled)


def test_decision_actions_say_what_to_do():
    assert "reward" in decide(0.9).action
    assert "--ensemble 3" in decide(0.8).action
    assert "already an ensemble of 3" in decide(0.8, ensemble_size=3).action
    assert "rewrite" in decide(0.6).action
    assert decide(None).level == "undefined"


def test_one_class_only_gives_an_undefined_verdict(stub_judge):
    _, judge = stub_judge
    report = calibrate([Rollout(Q, t, True) for t, label, _ in CASES if label], {"stub": judge}, ("min",))
    row = report["rows"][0]
    assert row["auroc"] is None and row["spearman"] is None and row["decision"]["level"] == "undefined"
    assert "n/a" in render_markdown(report)


def test_load_rollouts_from_rs_sft_log_and_flat_rows(tmp_path):
    log = tmp_path / "samples.jsonl"
    record = {"id": "p1", "messages": [{"role": "user", "content": Q}], "answer": "14",
              "completions": [{"text": "#### 14", "correct": True}, {"text": "#### 3", "correct": None}]}
    log.write_text(json.dumps(record) + "\n")
    assert load_rollouts(log) == [Rollout(Q, "#### 14", True), Rollout(Q, "#### 3", False)]
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"question": Q, "completion": "#### 14", "answer": "14"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": Q}], "text": "x", "correct": True}) + "\n")
    assert load_rollouts(flat) == [Rollout(Q, "#### 14", True), Rollout(Q, "x", True)]


def test_prm_calibrate_command_prints_the_verdict_and_reruns_free(tmp_path, capsys):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"question": Q, "completion": t, "correct": c}) + "\n" for t, c, _ in CASES))
    argv = ["prm-calibrate", "--rollouts", str(path), "--out", str(tmp_path / "out"), "--judge", "stub",
            "--bootstrap", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| arithmetic-stub-judge | min | 0.667" in printed and "Decision rule (seed 2.6b)" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["aggregation"] for row in report["rows"]] == ["min", "mean", "last"]
    assert report["judge_calls_this_run"][STUB_MODEL]["requests"] == 10
    assert main(argv) == 0  # a new stub server, the same judge cache: not one request
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judge_calls_this_run"][STUB_MODEL]["requests"] == 0
