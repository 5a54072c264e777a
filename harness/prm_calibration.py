"""PRM calibration against the verifier (seed section 2.6b): before a judge is trusted as a reward or a
data filter, measure how well its scores rank rollouts the verifier marks correct above wrong ones.

For each judge model and each aggregation (``min``, ``mean``, ``last``; ``product`` with probabilities) the
report gives AUROC (``harness.stats.auroc_ci``, stratified bootstrap) and Spearman's rho between score and
the 0/1 verifier label (``harness.stats.spearman_ci``), and applies the seed's decision rule:

- AUROC > 0.85: the judge separates correct from incorrect well; safe as a reward function;
- 0.70 <= AUROC <= 0.85: usable, but ensemble it (3 judge calls at temperature 0.5, majority vote per
  step: ``--ensemble 3``) before wiring it into training;
- AUROC < 0.70: the rubric is not fit for the task; rewrite it and re-run on the same rollouts.

The rule reads the point estimate, as the seed does; when the 95% CI crosses a boundary the report says
the verdict is not settled at this sample size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.io import read_jsonl
from harness.prm import PRMJudge, StubJudge, add_judge_arguments, judges_from_args, split_steps
from harness.stats import auroc_ci, spearman_ci
from harness.verifiers import is_correct

SAFE_AUROC, ENSEMBLE_AUROC = 0.85, 0.70
DECISION_RULE = (
    "AUROC > 0.85: safe as a reward function; 0.70-0.85: usable, but ensemble it (temperature 0.5, majority vote "
    "across 3 judge calls) before wiring into training; < 0.70: rubric not fit for the task, rewrite it and re-run."
)


@dataclass(frozen=True)
class Rollout:
    """A completion with its verifier label."""

    question: str
    text: str
    correct: bool


@dataclass(frozen=True)
class Decision:
    level: str  # "safe" | "ensemble" | "rewrite" | "undefined"
    action: str
    settled: bool  # False when the AUROC CI straddles a decision boundary


def _level(auroc: float) -> str:
    if auroc > SAFE_AUROC:
        return "safe"
    return "ensemble" if auroc >= ENSEMBLE_AUROC else "rewrite"


def decide(auroc: float | None, ci: tuple[float, float] | None = None, ensemble_size: int = 1) -> Decision:
    """The seed's decision rule on the AUROC point estimate (``ci`` only qualifies it)."""
    if auroc is None:
        return Decision("undefined", "AUROC is undefined: the rollouts need both correct and incorrect ones", False)
    level = _level(auroc)
    if level == "safe":
        action = "safe as a reward function"
    elif level == "ensemble":
        action = ("usable, but ensemble it before wiring into training (--ensemble 3 --ensemble-temperature 0.5)"
                  if ensemble_size == 1 else
                  f"usable; already an ensemble of {ensemble_size}: tweak the rubric before wiring into training")
    else:
        action = "rubric not fit for the task: rewrite it and re-run on the same rollouts"
    settled = ci is None or _level(ci[0]) == _level(ci[1])
    return Decision(level, action, settled)


def calibrate(
    rollouts: Sequence[Rollout],
    judges: Mapping[str, PRMJudge],
    aggregations: Sequence[str] = ("min", "mean", "last"),
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Judge every rollout with every judge (through the judge cache) and score each aggregation."""
    labels = np.array([r.correct for r in rollouts], dtype=bool)
    both_classes = 0 < labels.sum() < labels.size
    steps = [split_steps(r.text) for r in rollouts]
    rows = []
    for name, judge in judges.items():
        results = judge.judge_many([(r.question, s) for r, s in zip(rollouts, steps)], progress=progress)
        unusable = sum(not res.ok and bool(res.steps) for res in results)
        for how in aggregations:
            scores = np.array([res.score(how) for res in results])
            auroc = auroc_ci(scores, labels, n_resamples=n_resamples, seed=seed) if both_classes else None
            rho = (spearman_ci(scores, labels, n_resamples=n_resamples, seed=seed)
                   if both_classes and np.ptp(scores) > 0 else None)
            decision = decide(auroc.value if auroc else None, (auroc.ci_low, auroc.ci_high) if auroc else None,
                              judge.samples)
            rows.append({
                "judge": name, "aggregation": how, "n": int(labels.size), "correct": int(labels.sum()),
                "unusable_replies": unusable,
                "auroc": _est(auroc), "spearman": _est(rho), "decision": asdict(decision),
                "judge_settings": judge.describe(),
            })
    return {"rollouts": len(rollouts), "correct": int(labels.sum()), "decision_rule": DECISION_RULE, "rows": rows}


def _est(estimate) -> dict[str, float] | None:
    if estimate is None:
        return None
    return {"value": estimate.value, "ci_low": estimate.ci_low, "ci_high": estimate.ci_high}


def _fmt(d: dict | None) -> str:
    return "n/a" if d is None else f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# PRM calibration against the verifier", "",
             f"{report['rollouts']} rollouts, {report['correct']} correct by the verifier. 95% bootstrap CIs.", "",
             "| judge | agg | AUROC | Spearman rho | verdict |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        d = row["decision"]
        verdict = f"**{d['level']}**: {d['action']}" + ("" if d["settled"] else " (CI crosses a boundary: not settled)")
        lines.append(f"| {row['judge']} | {row['aggregation']} | {_fmt(row['auroc'])} | {_fmt(row['spearman'])} | "
                     f"{verdict} |")
    unusable = {row["judge"]: row["unusable_replies"] for row in report["rows"] if row["unusable_replies"]}
    if unusable:
        lines += ["", f"Rollouts without a usable judge reply (scored 0): {unusable}."]
    lines += ["", f"Decision rule (seed 2.6b): {report['decision_rule']}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# rollouts
# --------------------------------------------------------------------------------------------


def load_rollouts(path: str | Path) -> list[Rollout]:
    """Rollouts from JSONL: ``trl-opsd rs-sft``'s ``samples.jsonl`` (one line per prompt with
    ``completions``), or one rollout per line with ``question`` (or ``messages``), ``completion`` (or
    ``text``) and ``correct`` (or a gold ``answer`` for the verifier)."""
    rollouts = []
    for i, row in enumerate(read_jsonl(path)):
        if "completions" in row:
            question = next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
            for c in row["completions"]:
                correct = c["correct"] if c.get("correct") is not None else is_correct(c["text"], row["answer"])
                rollouts.append(Rollout(question, c["text"], bool(correct)))
            continue
        question = row.get("question") or next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
        text = row.get("completion", row.get("text"))
        if text is None:
            raise ValueError(f"{path} row {i + 1}: no 'completion' or 'text'")
        correct = row["correct"] if "correct" in row else is_correct(text, row["answer"])
        rollouts.append(Rollout(question, text, bool(correct)))
    return rollouts


# --------------------------------------------------------------------------------------------
# `trl-opsd prm-calibrate`
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags; where fresh rollouts come from is added by the caller
    (``harness.world.prm_calibration`` for ``trl-opsd prm-calibrate``)."""
    parser.add_argument("--out", required=True, help="output directory for report.json / report.md")
    parser.add_argument("--rollouts", default=None,
                        help="rollouts JSONL (rs-sft samples.jsonl or question/completion/correct rows)")
    parser.add_argument("--aggregations", nargs="+", choices=("min", "mean", "last", "product"), default=None,
                        help="default: min mean last (+ product with --probabilities)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    add_judge_arguments(parser, several_models=True)


def run(args: argparse.Namespace, rollouts: Sequence[Rollout], stub_judge: StubJudge | None = None) -> int:
    """Calibrate the judges of the flags on ``rollouts``; ``stub_judge`` serves ``--judge stub``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    aggregations = args.aggregations or (["min", "mean", "last"] + (["product"] if args.probabilities else []))
    if args.judge == "none":
        raise SystemExit("prm-calibrate needs a judge (--judge stub or --judge remote)")
    with judges_from_args(args, out / "judge_cache.sqlite", stub_judge) as judges:
        report = calibrate(rollouts, judges, aggregations, n_resamples=args.bootstrap, progress=True)
        report["judge_calls_this_run"] = {name: judge.metrics() for name, judge in judges.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = render_markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"judge calls this run: {report['judge_calls_this_run']}")
    return 0
