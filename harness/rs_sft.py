"""Rejection-sampling SFT data (seed sections 2.7 and 2.7b): sample K completions per prompt, keep the
ones the verifier and/or the PRM judge accept, and write an SFT-ready chat dataset plus a report.

Files in the output directory:

- ``job.json``: what produced the samples (sampler, K, judge); a resumed job must match it. Written
  atomically (a kill leaves the old file or the new one, never half of one).
- ``samples.jsonl``: the append-only log, one line per prompt with all K completions, their verifier
  labels and PRM step scores, written and flushed as each chunk of prompts finishes. It is keyed by
  prompt id: a killed job resumes where it stopped (a torn last line is cut off and redone), never
  writes a prompt twice, and a finished job re-run makes no sampling or judge call at all.
- ``sft.jsonl``: the accepted completions as chat ``messages`` rows (``SFTTrainer``-ready), rebuilt
  from the log at the end of every run, so a new ``--tau`` or ``--filter`` costs no call.
- ``report.json`` / ``report.md``: pass@1, pass@K and the headroom between them, acceptance, and the
  PRM filter's precision / recall / F1 against the verifier over a tau sweep (``min`` and ``mean``).

Reproducibility: the in-process student samples a fixed chunk of prompts (by position in the prompt
list) in one batch with a seed derived from the chunk, so a resumed job regenerates a half-written
chunk exactly. An API teacher's samples are reproducible through its response cache (``--teacher-cache``).

What a kill costs: the samples of the unfinished chunk of prompts (``--chunk-prompts``), and the PRM judge's
verdicts on them: the judge cache (``--judge-cache``) saves verdicts per batch of up to 64 rollouts, so a kill
re-pays at most the judge calls of one such batch, none with ``--judge-http-cache`` (every reply is cached as it
arrives).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from harness.io import atomic_write_text, read_jsonl_objects, write_jsonl
from harness.prm import PRMJudge, StubJudge, add_judge_arguments, aggregate, judges_from_args, split_steps
from harness.remote_teachers import add_text_teacher_arguments
from harness.stats import bootstrap_mean, pass_at_k, pass_at_k_mean, wilson_interval
from harness.verifiers import is_correct
from trl_opsd.teachers import Teacher
from trl_opsd.teachers.cache import canonical_json

FILTERS = ("verifier", "prm", "both")
SWEEP_AGGREGATIONS = ("min", "mean")
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(11))
USABLE_PRECISION, USABLE_RECALL = 0.95, 0.5  # seed 2.7b: the PRM filter is operationally usable above both
_EPS = 1e-9  # score >= tau, tolerant of float noise in means such as 7/10

# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its chat (no trailing assistant turn), the question the judge sees, an optional gold answer."""

    id: str
    messages: list[dict]
    answer: str | None = None

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m.get("role") == "user")


def prompt_from_row(row: dict[str, Any], index: int) -> PromptRow:
    """A dataset-contract row (``messages`` or ``prompt``; optional ``id`` and ``answer``) as a prompt."""
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages:
        raise ValueError(f"row {index}: no 'messages' or 'prompt'")
    messages = [dict(m) for m in messages]
    while messages and messages[-1].get("role") == "assistant":  # a trailing completion is not part of the prompt
        messages.pop()
    if not any(m.get("role") == "user" for m in messages):
        raise ValueError(f"row {index}: the chat has no user turn")
    uid = row.get("id") or hashlib.sha256(canonical_json(messages).encode()).hexdigest()[:16]
    answer = row.get("answer")
    return PromptRow(str(uid), messages, None if answer is None else str(answer))


def load_prompts(path: str | os.PathLike) -> list[PromptRow]:
    """Prompts of a JSONL file; a line that is not a JSON object is refused with the file and line number."""
    prompts = []
    for line_number, row in read_jsonl_objects(path):
        try:
            prompts.append(prompt_from_row(row, len(prompts)))
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
    return prompts


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------


class StudentSampler:
    """K completions per prompt from an in-process model (``harness.generation.generate_texts``).

    A chunk of prompts is one batch seeded from ``seed`` and the chunk's first prompt id, so the same chunk
    always gives the same completions (this is what makes resuming exact).
    """

    whole_chunks = True  # resuming a half-written chunk must regenerate the whole chunk

    def __init__(self, model, tokenizer, *, name: str, temperature: float = 1.0, max_new_tokens: int = 48,
                 seed: int = 0) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed

    def describe(self) -> dict[str, Any]:
        return {"kind": "student", "model": self.name, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}

    def sample(self, prompts: Sequence[PromptRow], k: int) -> list[list[str]]:
        from harness.generation import generate_texts

        chats = [p.messages for p in prompts for _ in range(k)]
        chunk_seed = int(hashlib.sha256(f"{self.seed}/{prompts[0].id}".encode()).hexdigest()[:8], 16)
        texts = generate_texts(self.model, self.tokenizer, chats, max_new_tokens=self.max_new_tokens,
                               batch_size=len(chats), temperature=self.temperature, seed=chunk_seed)
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


class TeacherSampler:
    """K completions per prompt from a text teacher over its API (``Teacher.generate``)."""

    whole_chunks = False

    def __init__(self, teacher: Teacher, *, temperature: float = 1.0, max_tokens: int = 512) -> None:
        teacher.require("generate")
        self.teacher, self.temperature, self.max_tokens = teacher, temperature, max_tokens

    def describe(self) -> dict[str, Any]:
        return {"kind": "teacher", "teacher": self.teacher.name, "model": getattr(self.teacher, "model", None),
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def sample(self, prompts: Sequence[PromptRow], k: int) -> list[list[str]]:
        generations = self.teacher.generate([p.messages for p in prompts], max_tokens=self.max_tokens,
                                            temperature=self.temperature, n=k)
        out: list[list[str]] = [[""] * k for _ in prompts]
        for g in generations:
            out[g.chat_index][g.sample_index] = g.text
        return out


# --------------------------------------------------------------------------------------------
# the append-only sample log
# --------------------------------------------------------------------------------------------


class SampleLog:
    """``samples.jsonl``: one JSON line per finished prompt, appended and flushed; read back on resume.

    A torn last line (the job was killed while writing it) is cut off; anything else malformed is an error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        for line_end in _line_ends(data):
            line = data[good_end:line_end]
            if not line.endswith(b"\n"):
                break  # torn tail
            record = json.loads(line)
            if record["id"] in self.records:
                raise ValueError(f"{self.path}: prompt {record['id']!r} appears twice")
            self.records[record["id"]] = record
            good_end = line_end
        if good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)

    def append(self, records: Sequence[dict]) -> None:
        with open(self.path, "a") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[record["id"]] = record
            handle.flush()
            os.fsync(handle.fileno())


def _line_ends(data: bytes) -> list[int]:
    ends, start = [], 0
    while start < len(data):
        newline = data.find(b"\n", start)
        end = len(data) if newline < 0 else newline + 1
        ends.append(end)
        start = end
    return ends


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


@dataclass
class FilterSettings:
    """How completions are accepted: the verifier, the PRM at ``tau`` under ``aggregation``, or both."""

    filter: str = "both"
    aggregation: str = "min"
    tau: float = 1.0
    max_per_prompt: int | None = None  # unique accepted completions kept per prompt (None: all)
    taus: tuple[float, ...] = field(default=DEFAULT_TAUS)

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter!r}")
        aggregate([1.0], self.aggregation)  # validates the name


def prm_score(completion: dict, aggregation: str) -> float:
    """A completion's PRM score from its stored step scores (0 when the judge gave no usable reply)."""
    prm = completion.get("prm")
    if prm is None:
        raise ValueError("this completion was not judged (the job ran without a judge)")
    return aggregate(prm["step_scores"], aggregation) if prm["ok"] else 0.0


def is_accepted(completion: dict, settings: FilterSettings) -> bool:
    keep = True
    if settings.filter in ("verifier", "both"):
        if completion["correct"] is None:
            raise ValueError("the verifier filter needs gold answers; use --filter prm")
        keep = bool(completion["correct"])
    if settings.filter in ("prm", "both"):
        keep = keep and prm_score(completion, settings.aggregation) >= settings.tau - _EPS
    return keep


def run_rs_sft(
    prompts: Sequence[PromptRow],
    sampler: StudentSampler | TeacherSampler,
    out_dir: str | os.PathLike,
    *,
    samples: int = 8,
    judge: PRMJudge | None = None,
    settings: FilterSettings | None = None,
    chunk_prompts: int = 16,
    progress: bool = True,
    n_resamples: int = 2000,
) -> dict[str, Any]:
    """Sample, verify, judge and log every pending prompt, then write ``sft.jsonl`` and the report.

    Returns the report. Prompts already in ``samples.jsonl`` are skipped, so calling this again after a
    kill (or after it finished) is safe and, for finished prompts, free.
    """
    settings = settings or FilterSettings()
    if settings.filter != "verifier" and judge is None:
        raise ValueError(f"--filter {settings.filter} needs a PRM judge")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids are not unique")
    if settings.filter != "prm" and any(p.answer is None for p in prompts):
        raise ValueError("the verifier filter needs a gold 'answer' on every prompt; use --filter prm")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"sampler": sampler.describe(), "samples": samples, "judge": judge.describe() if judge else None}
    if sampler.whole_chunks:  # the chunking decides the student's seeds
        fingerprint["chunk_prompts"] = chunk_prompts
    _check_job(out / "job.json", fingerprint)
    log = SampleLog(out / "samples.jsonl")
    done = sum(p.id in log.records for p in prompts)
    if progress and done:
        print(f"rs-sft: resuming, {done} of {len(prompts)} prompts already in {log.path}", file=sys.stderr)
    chunks = [list(prompts[i:i + chunk_prompts]) for i in range(0, len(prompts), chunk_prompts)]
    pending_chunks = [c for c in chunks if any(p.id not in log.records for p in c)]
    bar = tqdm(total=len(prompts), initial=done, desc="rs-sft prompts", unit="prompt", disable=not progress)
    for chunk in pending_chunks:
        pending = [p for p in chunk if p.id not in log.records]
        to_sample = chunk if sampler.whole_chunks else pending
        texts = dict(zip((p.id for p in to_sample), sampler.sample(to_sample, samples)))
        log.append(_records(pending, [texts[p.id] for p in pending], judge))
        bar.update(len(pending))
    bar.close()
    records = [log.records[p.id] for p in prompts]
    rows = sft_rows(records, settings)
    write_jsonl(out / "sft.jsonl", rows)
    report = build_report(records, settings, samples=samples, n_resamples=n_resamples)
    report.update(sampler=sampler.describe(), judge=judge.describe() if judge else None, sft_rows=len(rows))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _check_job(path: Path, fingerprint: dict[str, Any]) -> None:
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}): a run killed while writing it (before it was written "
                f"atomically). It only records the job's settings: delete it and rerun the same command to resume "
                f"from {path.parent / 'samples.jsonl'}, or use a new --out"
            ) from None
        if stored != json.loads(json.dumps(fingerprint)):
            raise ValueError(
                f"{path.parent} holds a job made with other settings:\n  stored:  {stored}\n  now:     {fingerprint}\n"
                "resume with the same sampler, K and judge, or use a new --out"
            )
    else:
        atomic_write_text(path, json.dumps(fingerprint, indent=2))


def _records(prompts: Sequence[PromptRow], texts: Sequence[Sequence[str]], judge: PRMJudge | None) -> list[dict]:
    completions = [[{"text": t, "correct": None if p.answer is None else is_correct(t, p.answer)} for t in ts]
                   for p, ts in zip(prompts, texts)]
    if judge is not None:
        flat = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
        for _, c in flat:
            c["steps"] = split_steps(c["text"])
        results = judge.judge_many([(p.question, c["steps"]) for p, c in flat])
        for (_, c), result in zip(flat, results):
            c["prm"] = {"ok": result.ok, "step_scores": list(result.step_scores),
                        "scores": result.scores() if result.ok else None}
    return [{"id": p.id, "messages": p.messages, "answer": p.answer, "completions": cs}
            for p, cs in zip(prompts, completions)]


def sft_rows(records: Sequence[dict], settings: FilterSettings) -> list[dict]:
    """Accepted completions as chat rows, unique per prompt, in prompt order."""
    rows = []
    for record in records:
        kept: list[str] = []
        for completion in record["completions"]:
            if completion["text"] not in kept and is_accepted(completion, settings):
                kept.append(completion["text"])
        for text in kept[:settings.max_per_prompt]:
            rows.append({"id": record["id"], "messages": [*record["messages"], {"role": "assistant", "content": text}],
                         "answer": record["answer"]})
    return rows


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _estimate(est) -> dict[str, float]:
    return {"value": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high}


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "value": k / n if n else None, "ci_low": low, "ci_high": high}


def filter_quality(scores: np.ndarray, labels: np.ndarray, tau: float) -> dict[str, Any]:
    """Precision / recall / F1 of ``score >= tau`` against the verifier labels, with Wilson CIs."""
    accepted = scores >= tau - _EPS
    tp = int(np.sum(accepted & labels))
    fp = int(np.sum(accepted & ~labels))
    fn = int(np.sum(~accepted & labels))
    precision, recall = _rate(tp, tp + fp), _rate(tp, tp + fn)
    p, r = precision["value"], recall["value"]
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else 0.0
    return {"tau": tau, "accepted": tp + fp, "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
            "f1": f1}


def build_report(records: Sequence[dict], settings: FilterSettings, *, samples: int,
                 n_resamples: int = 2000) -> dict[str, Any]:
    completions = [c for r in records for c in r["completions"]]
    accepted = sum(is_accepted(c, settings) for c in completions)
    report: dict[str, Any] = {
        "prompts": len(records), "samples_per_prompt": samples, "completions": len(completions),
        "filter": {"filter": settings.filter, "aggregation": settings.aggregation, "tau": settings.tau},
        "acceptance": _rate(accepted, len(completions)),
        "prompts_with_accepted": sum(any(is_accepted(c, settings) for c in r["completions"]) for r in records),
    }
    judged = [c for c in completions if "prm" in c]
    if judged:
        report["judge_unusable_replies"] = sum(not c["prm"]["ok"] and bool(c["steps"]) for c in judged)
        report["empty_completions"] = sum(not c["steps"] for c in judged)
    if not completions or any(c["correct"] is None for c in completions):
        return report  # no gold answers: no pass@k and no filter-quality sweep
    n = np.array([len(r["completions"]) for r in records])
    c = np.array([sum(bool(x["correct"]) for x in r["completions"]) for r in records])
    pass1, passk = pass_at_k(n, c, 1), pass_at_k(n, c, samples)
    report["pass_at_1"] = _estimate(pass_at_k_mean(n, c, 1, n_resamples=n_resamples))
    report[f"pass_at_{samples}"] = _estimate(pass_at_k_mean(n, c, samples, n_resamples=n_resamples))
    report["pass_at_k_curve"] = {str(k): float(np.mean(pass_at_k(n, c, k))) for k in _ks(samples)}
    report["headroom"] = _estimate(bootstrap_mean(np.atleast_1d(passk - pass1), n_resamples=n_resamples))
    if judged and len(judged) == len(completions):
        labels = np.array([bool(x["correct"]) for x in completions])
        sweep = {agg: [filter_quality(np.array([prm_score(x, agg) for x in completions]), labels, tau)
                       for tau in settings.taus] for agg in SWEEP_AGGREGATIONS}
        report["tau_sweep"] = sweep
        report["usable_filter"] = _usable(sweep)
    return report


def _ks(samples: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < samples]
    return [*ks, samples]


def _usable(sweep: dict[str, list[dict]]) -> dict[str, Any]:
    """Seed 2.7b: is there a tau with precision > 0.95 and recall > 0.5? Also whether the Wilson lower bound
    of that precision clears 0.95 (the point estimate can clear it on few samples by luck)."""
    rows = [(agg, row) for agg, table in sweep.items() for row in table]
    hits = [(agg, row) for agg, row in rows
            if (row["precision"]["value"] or 0.0) > USABLE_PRECISION
            and (row["recall"]["value"] or 0.0) > USABLE_RECALL]
    pool = hits or rows
    agg, best = max(pool, key=lambda item: (item[1]["f1"], item[1]["tau"]))
    return {"found": bool(hits), "aggregation": agg, "tau": best["tau"], "precision": best["precision"]["value"],
            "recall": best["recall"]["value"], "f1": best["f1"],
            "precision_ci_low_above_threshold": bool(hits) and best["precision"]["ci_low"] > USABLE_PRECISION}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ci(d: dict) -> str:
    return f"{_pct(d['value'])} [{_pct(d['ci_low'])}, {_pct(d['ci_high'])}]"


def render_markdown(report: dict[str, Any]) -> str:
    k = report["samples_per_prompt"]
    f = report["filter"]
    lines = ["# RS-SFT data report", "",
             f"{report['prompts']} prompts x {k} samples = {report['completions']} completions; sampler "
             f"`{json.dumps(report.get('sampler'))}`; judge `{json.dumps(report.get('judge'))}`.", ""]
    if "pass_at_1" in report:
        lines += ["| metric | value [95% CI] |", "|---|---|",
                  f"| pass@1 | {_ci(report['pass_at_1'])} |", f"| pass@{k} | {_ci(report[f'pass_at_{k}'])} |",
                  f"| headroom pass@{k} - pass@1 | {_ci(report['headroom'])} |",
                  "| pass@k curve | " + ", ".join(f"k={kk}: {_pct(v)}" for kk, v in report["pass_at_k_curve"].items())
                  + " |", ""]
    lines += [f"Filter `{f['filter']}`" + (f" (PRM `{f['aggregation']}` >= {f['tau']})" if f["filter"] != "verifier"
                                           else "") + f": accepted {report['acceptance']['k']} of "
              f"{report['acceptance']['n']} completions = {_ci(report['acceptance'])}; "
              f"{report['prompts_with_accepted']} prompts with at least one; "
              f"{report.get('sft_rows', '?')} unique SFT rows written.", ""]
    if "judge_unusable_replies" in report:
        lines += [f"Judge: {report['judge_unusable_replies']} completions without a usable judge reply, "
                  f"{report['empty_completions']} empty completions (both score 0).", ""]
    if "tau_sweep" in report:
        lines += ["## PRM filter vs the verifier (tau sweep; consecutive taus with the same decisions merged)", "",
                  "| agg | tau | accepted | precision [95% Wilson] | recall [95% Wilson] | F1 |",
                  "|---|---|---|---|---|---|"]
        for agg, table in report["tau_sweep"].items():
            for first, last in _merge_runs(table):
                tau = f"{first['tau']:.1f}" if first is last else f"{first['tau']:.1f}-{last['tau']:.1f}"
                lines.append(f"| {agg} | {tau} | {first['accepted']} | {_ci(first['precision'])} | "
                             f"{_ci(first['recall'])} | {first['f1']:.3f} |")
        u = report["usable_filter"]
        verdict = (f"YES: PRM `{u['aggregation']}` >= {u['tau']} reaches precision {_pct(u['precision'])} with recall "
                   f"{_pct(u['recall'])} (F1 {u['f1']:.3f}); the Wilson lower bound of precision is "
                   + ("also" if u["precision_ci_low_above_threshold"] else "NOT") + " above 95%"
                   if u["found"] else
                   f"NO tau reaches precision > 95% with recall > 50%; best F1 is PRM `{u['aggregation']}` >= "
                   f"{u['tau']} (precision {_pct(u['precision'])}, recall {_pct(u['recall'])})")
        lines += ["", f"**PRM filter usable without gold answers (precision > 95% and recall > 50%)?** {verdict}.", ""]
    return "\n".join(lines)


def _merge_runs(table: list[dict]) -> list[tuple[dict, dict]]:
    runs: list[tuple[dict, dict]] = []
    for row in table:
        if runs and (runs[-1][0]["tp"], runs[-1][0]["fp"]) == (row["tp"], row["fp"]):
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs


# --------------------------------------------------------------------------------------------
# `trl-opsd rs-sft`
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags; where prompts and the student come from is added by the caller
    (``harness.world.rs_sft`` for ``trl-opsd rs-sft``)."""
    parser.add_argument("--out", required=True, help="output directory (resumable: rerun the same command)")
    src = parser.add_argument_group("prompts")
    src.add_argument("--prompts", default=None, help="JSONL in the dataset contract (messages|prompt, id, answer)")
    smp = parser.add_argument_group("sampling")
    smp.add_argument("--sampler", choices=("student", "teacher"), default="student")
    smp.add_argument("--model", default=None, help="student checkpoint (with --sampler student; default: %(default)s)")
    smp.add_argument("--teacher-model", default=None, help="text teacher model (with --sampler teacher)")
    add_text_teacher_arguments(smp, "teacher", "text teacher")
    smp.add_argument("--samples", "-k", type=int, default=8, help="completions per prompt (K)")
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--max-new-tokens", type=int, default=48)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--chunk-prompts", type=int, default=16, help="prompts per sampling batch and log flush "
                     "(a kill re-pays the unfinished chunk's samples, and its judge calls without "
                     "--judge-http-cache)")
    flt = parser.add_argument_group("filter")
    flt.add_argument("--filter", choices=FILTERS, default="both")
    flt.add_argument("--aggregation", choices=("min", "mean", "last", "product"), default="min")
    flt.add_argument("--tau", type=float, default=1.0, help="accept when the PRM score >= tau")
    flt.add_argument("--max-per-prompt", type=int, default=None, help="unique accepted completions kept per prompt")
    add_judge_arguments(parser)


def teacher_sampler_from_args(args: argparse.Namespace) -> TeacherSampler:
    """``--sampler teacher``: a text teacher over its API, from the ``--teacher-*`` flags."""
    from harness.remote_teachers import remote_teacher_from_args

    if not args.teacher_model:
        raise SystemExit("--sampler teacher needs --teacher-model")
    teacher = remote_teacher_from_args(args, "teacher", args.teacher_model)
    return TeacherSampler(teacher, temperature=args.temperature, max_tokens=args.max_new_tokens)


def student_sampler(model, tokenizer, name: str, args: argparse.Namespace) -> StudentSampler:
    """``--sampler student``: the loaded ``model`` with the sampling flags."""
    return StudentSampler(model, tokenizer, name=name, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flag values that would fail (or silently mislead) only after models load, naming the flag."""
    for flag, minimum in (("samples", 1), ("chunk_prompts", 1), ("num_prompts", 1), ("max_new_tokens", 1),
                          ("ensemble", 1), ("teacher_concurrency", 1), ("judge_concurrency", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.max_per_prompt is not None and args.max_per_prompt < 1:
        raise ValueError(f"--max-per-prompt must be at least 1 (or left out), got {args.max_per_prompt}")
    for flag in ("temperature", "tau", "ensemble_temperature"):
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if args.temperature < 0 or (args.sampler == "student" and args.temperature == 0):
        raise ValueError(f"--temperature must be > 0 for sampling (>= 0 for --sampler teacher), got {args.temperature}")
    for prefix, used in (("teacher", args.sampler == "teacher"), ("judge", args.judge == "remote")):
        env = getattr(args, f"{prefix}_api_key_env", None)
        if used and env and not os.environ.get(env):
            raise ValueError(f"--{prefix}-api-key-env names {env}, which is not set (or empty) in this environment")
        key_file = getattr(args, f"{prefix}_api_key_file", None)
        if used and key_file and not os.path.isfile(key_file):
            raise ValueError(f"--{prefix}-api-key-file {key_file}: no such file")


def run(args: argparse.Namespace, prompts: Sequence[PromptRow], sampler: StudentSampler | TeacherSampler,
        stub_judge: StubJudge | None = None) -> int:
    """The command on given prompts and sampler; ``stub_judge`` serves ``--judge stub``."""
    settings = FilterSettings(filter=args.filter, aggregation=args.aggregation, tau=args.tau,
                              max_per_prompt=args.max_per_prompt)
    with judges_from_args(args, Path(args.out) / "judge_cache.sqlite", stub_judge) as judges:
        judge = next(iter(judges.values()), None)
        report = run_rs_sft(prompts, sampler, args.out, samples=args.samples, judge=judge, settings=settings,
                            chunk_prompts=args.chunk_prompts)
        if judge is not None:
            print(f"judge calls this run: {judge.metrics()}")
    print(render_markdown(report))
    return 0
