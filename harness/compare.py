"""Paired comparison of lm-eval runs from their ``--log_samples`` files.

``compare_main(argv)`` (or ``add_arguments`` + ``run`` for a subcommand table) backs
``trl-opsd compare RUN_A RUN_B [RUN_C ...]``. Each RUN is an lm-eval
output folder (searched recursively for ``samples_<task>_<date>.jsonl``) or one such file.

What is read from each line of a sample log (schema of lm-eval 0.4.13, ``evaluator.py`` and
``EvaluationTracker.save_results_samples``): ``doc_id``, ``filter``, ``doc_hash``,
``prompt_hash``, ``target_hash``, ``resps`` and the per-document metric values, which lm-eval
writes as top-level keys (e.g. ``"exact_match": 1.0``). Two optional top-level fields, logged by
this project's tasks through ``process_results``, are used when present: ``num_output_tokens``
and ``difficulty`` (number of reasoning steps in the gold solution).

Documents are paired by ``(doc_id, filter)`` within a task. Runs whose document sets differ, or
whose ``doc_hash`` differs on any paired document, are refused. For each task and filter the report
gives, per run: accuracy with a Wilson CI and output tokens per correct answer; per run after the
first: the gap vs the first run (``run - first``) with a paired-bootstrap CI, the exact McNemar
p-value, the discordant counts and the minimum detectable difference; and the same per difficulty
bucket. Output: a markdown report on stdout, optionally ``--markdown``, ``--json`` and a forest plot
``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import stats

TOKENS_FIELD = "num_output_tokens"
DIFFICULTY_FIELD = "difficulty"
# Below this many discordant documents the percentile bootstrap of a paired 0/1 gap is too narrow
# (a resample rarely draws a discordant document of the rarer direction); McNemar's exact test is not.
FEW_DISCORDANT = 10
# Keys lm-eval writes on every sample line; every other top-level key is a per-document metric.
SAMPLE_SCHEMA_KEYS = frozenset(
    {
        "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
        "doc_hash", "prompt_hash", "target_hash",
    }
)
# lm-eval names sample logs samples_<task>_<date_id>, date_id = datetime.now().isoformat() with ":" -> "-".
_SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+?)(?:_(?P<date>\d{4}-\d{2}-\d{2}T[\d.\-]+))?\.jsonl$")


class CompareError(ValueError):
    """A problem with the inputs that the user must fix; its message says what and where."""


# --------------------------------------------------------------------------------------------
# reading sample logs
# --------------------------------------------------------------------------------------------


def task_of(sample_file: Path) -> str:
    """Task name from an lm-eval sample-log file name ``samples_<task>_<date_id>.jsonl``."""
    match = _SAMPLES_NAME.match(sample_file.name)
    if match is None:
        raise CompareError(f"{sample_file}: not an lm-eval sample log (expected samples_<task>_<date>.jsonl)")
    return match.group("task")


def find_sample_files(run: Path) -> dict[str, Path]:
    """Map task -> sample-log file for one run: a ``samples_*.jsonl`` file or a folder searched
    recursively. Two logs of the same task in one run (re-runs or several models under one output
    path) are ambiguous and refused."""
    if not run.exists():
        raise CompareError(f"{run}: no such file or folder")
    files = [run] if run.is_file() else sorted(run.rglob("samples_*.jsonl"))
    if not files:
        raise CompareError(f"{run}: no samples_*.jsonl files (was lm_eval run with --log_samples?)")
    by_task: dict[str, Path] = {}
    for path in files:
        task = task_of(path)
        if task in by_task:
            raise CompareError(
                f"{run}: two sample logs for task {task!r} ({by_task[task]} and {path}); "
                "pass the folder or file of a single evaluation"
            )
        by_task[task] = path
    return by_task


def read_samples(sample_file: Path) -> dict[str, dict[int, dict]]:
    """Sample lines of one log grouped as ``{filter: {doc_id: sample}}``."""
    grouped: dict[str, dict[int, dict]] = {}
    with open(sample_file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{sample_file}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CompareError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as err:
                raise CompareError(f"{where}: not valid JSON ({err.msg})") from None
            check_sample(sample, where)
            per_filter = grouped.setdefault(sample["filter"], {})
            if sample["doc_id"] in per_filter:
                raise CompareError(
                    f"{sample_file}: doc_id {sample['doc_id']} appears twice for filter {sample['filter']!r}"
                )
            per_filter[sample["doc_id"]] = sample
    if not grouped:
        raise CompareError(f"{sample_file}: empty sample log")
    return grouped


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sample(sample, where: str) -> None:
    """Refuse a sample line whose fields compare reads with the wrong types, naming ``where`` (file:line)."""
    if not isinstance(sample, dict):
        raise CompareError(f"{where}: a sample line must be a JSON object, got {type(sample).__name__}")
    missing = [key for key in ("doc_id", "filter", "doc_hash") if key not in sample]
    if missing:
        raise CompareError(f"{where}: sample lacks {', '.join(missing)}")
    expected = {"doc_id": (int, "an integer"), "filter": (str, "a string"), "doc_hash": (str, "a string")}
    for key, (kind, name) in expected.items():
        value = sample[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CompareError(f"{where}: field {key!r} must be {name}, got {type(value).__name__} {value!r}")
    for key in (TOKENS_FIELD, DIFFICULTY_FIELD):
        value = sample.get(key)
        if _is_number(value) and not math.isfinite(value):
            raise CompareError(f"{where}: field {key!r} is {value}; it must be a finite number")
    if _is_number(sample.get(TOKENS_FIELD)) and sample[TOKENS_FIELD] < 0:
        raise CompareError(f"{where}: field {TOKENS_FIELD!r} is negative ({sample[TOKENS_FIELD]})")


# --------------------------------------------------------------------------------------------
# pairing
# --------------------------------------------------------------------------------------------


@dataclass
class PairedSection:
    """One task and filter with the samples of every run aligned on the same sorted doc_ids."""

    task: str
    filter: str
    doc_ids: list[int]
    samples: list[list[dict]]
    notes: list[str]


def pair_section(task: str, filter_name: str, per_run: list[dict[int, dict]], names: list[str]) -> PairedSection:
    """Align runs on doc_id; refuse different document sets or different ``doc_hash``."""
    base_ids = set(per_run[0])
    for name, docs in zip(names[1:], per_run[1:]):
        only_base, only_other = base_ids - set(docs), set(docs) - base_ids
        if only_base or only_other:
            example = sorted(only_base or only_other)[:5]
            raise CompareError(
                f"{task} / filter {filter_name!r}: {len(only_base)} doc(s) only in run {names[0]!r} and "
                f"{len(only_other)} only in run {name!r} (e.g. doc_id {', '.join(map(str, example))}); "
                "evaluate every run on the same documents (same --limit / --samples)"
            )
    doc_ids = sorted(base_ids)
    samples = [[docs[d] for d in doc_ids] for docs in per_run]
    notes = []
    for name, run_samples in zip(names[1:], samples[1:]):
        for base, other in zip(samples[0], run_samples):
            if base["doc_hash"] != other["doc_hash"]:
                raise CompareError(
                    f"{task}: doc_id {base['doc_id']} has doc_hash {base['doc_hash'][:12]} in run {names[0]!r} "
                    f"but {other['doc_hash'][:12]} in run {name!r}; the runs did not evaluate the same "
                    "document, refusing to pair them"
                )
        for field, meaning in (
            ("target_hash", "gold targets differ (different task versions?)"),
            ("prompt_hash", "prompts differ (expected across chat templates or few-shot settings)"),
        ):
            differing = sum(base.get(field) != other.get(field) for base, other in zip(samples[0], run_samples))
            if differing:
                notes.append(f"{name} vs {names[0]}: {meaning} on {differing} of {len(doc_ids)} documents.")
    return PairedSection(task, filter_name, doc_ids, samples, notes)


def pair_runs(runs: list[Path], names: list[str]) -> tuple[list[PairedSection], list[str]]:
    """All (task, filter) sections the runs share, plus notes on what was left out."""
    files = [find_sample_files(run) for run in runs]
    notes = []
    common_tasks = sorted(set.intersection(*(set(f) for f in files)))
    for name, run_files in zip(names, files):
        skipped = sorted(set(run_files) - set(common_tasks))
        if skipped:
            notes.append(f"run {name!r}: tasks not in every run, skipped: {', '.join(skipped)}.")
    if not common_tasks:
        listing = "; ".join(f"{name}: {', '.join(sorted(run_files))}" for name, run_files in zip(names, files))
        raise CompareError(f"the runs share no task: {listing}")
    sections = []
    for task in common_tasks:
        per_run = [read_samples(run_files[task]) for run_files in files]
        filters = [f for f in per_run[0] if all(f in grouped for grouped in per_run)]
        for name, grouped in zip(names, per_run):
            skipped = sorted(set(grouped) - set(filters))
            if skipped:
                notes.append(f"{task}, run {name!r}: filters not in every run, skipped: {', '.join(skipped)}.")
        if not filters:
            raise CompareError(f"{task}: the runs share no filter")
        sections.extend(pair_section(task, f, [grouped[f] for grouped in per_run], names) for f in filters)
    return sections, notes


# --------------------------------------------------------------------------------------------
# per-document values
# --------------------------------------------------------------------------------------------


def _is_binary(value) -> bool:
    return isinstance(value, (bool, int, float)) and value in (0, 1)


def choose_metric(section: PairedSection, names: list[str], requested: str | None) -> str:
    """The requested metric, or the first metric whose values are 0/1 in every run (metrics keep
    the order the task's ``process_results`` returned them in; the token and difficulty fields
    are never chosen)."""
    samples = [s for run in section.samples for s in run]
    if requested is None:
        skip = SAMPLE_SCHEMA_KEYS | {TOKENS_FIELD, DIFFICULTY_FIELD}
        candidates = [k for k in section.samples[0][0] if k not in skip]
        for metric in candidates:
            if all(_is_binary(s.get(metric)) for s in samples):
                return metric
        raise CompareError(
            f"{section.task} / filter {section.filter!r}: no metric is present and 0/1 on every document of every run "
            f"(metrics: {', '.join(candidates) or 'none'}); pass --metric"
        )
    for name, run in zip(names, section.samples):
        for sample in run:
            if requested not in sample:
                available = [k for k in sample if k not in SAMPLE_SCHEMA_KEYS]
                raise CompareError(
                    f"{section.task}: run {name!r} has no metric {requested!r} "
                    f"(doc_id {sample['doc_id']}; available: {', '.join(available)})"
                )
            if not _is_binary(sample[requested]):
                raise CompareError(
                    f"{section.task}: metric {requested!r} is not binary (value {sample[requested]!r} at doc_id "
                    f"{sample['doc_id']} in run {name!r}); compare needs one 0/1 outcome per document"
                )
    return requested


def output_tokens(samples: list[dict]) -> tuple[np.ndarray | None, str]:
    """Per-document output token counts and where they came from.

    ``num_output_tokens`` when every sample logs it; otherwise whitespace-separated words of all
    raw responses (``resps``, every request and repeat); ``None`` when responses are not text
    (log-likelihood tasks).
    """
    if all(isinstance(s.get(TOKENS_FIELD), (int, float)) for s in samples):
        return np.array([float(s[TOKENS_FIELD]) for s in samples]), TOKENS_FIELD
    counts = []
    for sample in samples:
        texts = [r for request in sample.get("resps", []) for r in request]
        if not texts or not all(isinstance(t, str) for t in texts):
            return None, "unavailable (responses are not generated text)"
        counts.append(sum(len(t.split()) for t in texts))
    return np.array(counts, dtype=float), "whitespace words of resps"


def difficulties(samples: list[dict]) -> np.ndarray | None:
    """Per-document ``difficulty`` when every sample logs a number, else ``None``."""
    values = [s.get(DIFFICULTY_FIELD) for s in samples]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=float)
    return None


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Statistical settings of one comparison."""

    confidence: float = 0.95
    n_resamples: int = 10_000
    seed: int = 0
    bucket_edges: tuple[float, ...] = stats.DEFAULT_BUCKET_EDGES
    bucket_names: tuple[str, ...] = stats.DEFAULT_BUCKET_NAMES

    def __post_init__(self) -> None:
        stats.difficulty_buckets([], self.bucket_edges, self.bucket_names)  # validates edges and names


def _accuracy_row(name: str, outcome: np.ndarray, settings: Settings) -> dict:
    k, n = int(outcome.sum()), int(outcome.size)
    low, high = stats.wilson_interval(k, n, settings.confidence)
    return {"run": name, "n": n, "correct": k, "accuracy": k / n, "ci": [low, high]}


def _gap_row(
    name: str, baseline: str, gap: stats.Estimate, test: stats.McNemarResult, n: int, base_accuracy: float
) -> dict:
    """Gap, CI, McNemar and the paired MDE at the observed discordance (None when the runs never
    disagree: then no gap is detectable and the formula's 0 would mislead)."""
    discordant = test.b01 + test.b10
    mde = None
    if discordant:
        mde = stats.minimum_detectable_difference(n, base_accuracy, paired=True, discordant_rate=discordant / n)
    return {
        "run": name,
        "baseline": baseline,
        "gap": gap.value,
        "ci": [gap.ci_low, gap.ci_high],
        "mcnemar_p": test.pvalue,
        "b01": test.b01,
        "b10": test.b10,
        "mde": mde,
    }


def analyse_section(section: PairedSection, names: list[str], metric: str, settings: Settings) -> dict:
    """Statistics of one task and filter, as a JSON-ready dict."""
    outcomes = [np.array([bool(s[metric]) for s in run]) for run in section.samples]
    n = len(section.doc_ids)
    runs = []
    for name, outcome, run_samples in zip(names, outcomes, section.samples):
        row = _accuracy_row(name, outcome, settings)
        tokens, source = output_tokens(run_samples)
        row["output_tokens"] = None if tokens is None else float(tokens.sum())
        has_ratio = tokens is not None and row["correct"] > 0
        row["tokens_per_correct"] = float(tokens.sum()) / row["correct"] if has_ratio else None
        row["tokens_source"] = source
        runs.append(row)
    notes = list(section.notes)
    for row in runs:
        if row["tokens_source"] != TOKENS_FIELD:
            notes.append(
                f"{row['run']}: output tokens are {row['tokens_source']}; the task does not log {TOKENS_FIELD}."
            )
    gaps = []
    for name, outcome in zip(names[1:], outcomes[1:]):
        gap = stats.paired_bootstrap(outcomes[0], outcome, settings.n_resamples, settings.confidence, settings.seed)
        gaps.append(_gap_row(name, names[0], gap, stats.mcnemar_test(outcomes[0], outcome), n, runs[0]["accuracy"]))
    for gap in gaps:
        discordant = gap["b01"] + gap["b10"]
        if 0 < discordant < FEW_DISCORDANT:
            notes.append(
                f"{gap['run']}: only {discordant} discordant documents; the bootstrap CI is too narrow with so "
                "few, rely on the exact McNemar p."
            )
    difficulty = difficulties(section.samples[0])
    if difficulty is None:
        notes.append(f"no per-document {DIFFICULTY_FIELD!r} in run {names[0]!r}: no difficulty buckets.")
    return {
        "task": section.task,
        "filter": section.filter,
        "metric": metric,
        "n": n,
        "runs": runs,
        "gaps": gaps,
        "buckets": [] if difficulty is None else _buckets(outcomes, difficulty, names, settings),
        "notes": notes,
    }


def _buckets(outcomes: list[np.ndarray], difficulty: np.ndarray, names: list[str], settings: Settings) -> list[dict]:
    edges, labels = settings.bucket_edges, settings.bucket_names
    per_run = [stats.bucket_accuracy(o, difficulty, edges, labels, settings.confidence) for o in outcomes]
    per_gap = [
        stats.bucket_paired_gap(
            outcomes[0], o, difficulty, edges, labels, settings.n_resamples, settings.confidence, settings.seed
        )
        for o in outcomes[1:]
    ]
    rows = []
    for j, base_bucket in enumerate(per_run[0]):
        rows.append(
            {
                "bucket": base_bucket.name,
                "low": None if math.isinf(base_bucket.low) else base_bucket.low,
                "high": None if math.isinf(base_bucket.high) else base_bucket.high,
                "n": base_bucket.n,
                "runs": [
                    {"run": name, "correct": b[j].correct, "accuracy": b[j].accuracy, "ci": [b[j].ci_low, b[j].ci_high]}
                    for name, b in zip(names, per_run)
                ],
                "gaps": [
                    _gap_row(name, names[0], g[j].gap, g[j].mcnemar, g[j].n, base_bucket.accuracy)
                    for name, g in zip(names[1:], per_gap)
                ],
            }
        )
    return rows


def compare(runs: list[Path], names: list[str], metric: str | None = None, settings: Settings = Settings()) -> dict:
    """Pair the runs and compute every statistic of the report (JSON-ready)."""
    if len(runs) < 2:
        raise CompareError("compare needs at least two runs")
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise CompareError(f"need {len(runs)} distinct run names, got {names}")
    sections, notes = pair_runs(runs, names)
    return {
        "runs": [{"name": name, "path": str(path)} for name, path in zip(names, runs)],
        "settings": {
            "confidence": settings.confidence,
            "n_resamples": settings.n_resamples,
            "seed": settings.seed,
            "bucket_edges": list(settings.bucket_edges),
            "bucket_names": list(settings.bucket_names),
        },
        "sections": [analyse_section(s, names, choose_metric(s, names, metric), settings) for s in sections],
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _ci(ci: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p(p: float) -> str:
    return "<1e-300" if p == 0 else f"{p:.2g}"


def _bounds(row: dict) -> str:
    if row["low"] is None:
        return f"<= {row['high']:g}"
    if row["high"] is None:
        return f"> {row['low']:g}"
    return f"({row['low']:g}, {row['high']:g}]"


def _gap_cells(gap: dict | None) -> list[str]:
    if gap is None:
        return ["—"] * 5
    mde = "n/a" if gap["mde"] is None else f"{gap['mde']:.3f}"
    counts = f"{gap['b01']} / {gap['b10']}"
    return [f"{gap['gap']:+.3f}", _ci(gap["ci"], signed=True), _p(gap["mcnemar_p"]), counts, mde]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def to_markdown(report: dict) -> str:
    """The report as markdown: one section per task and filter, overall rows then buckets."""
    settings = report["settings"]
    level = f"{settings['confidence']:.0%}"
    lines = [
        "# Paired comparison",
        "",
        "Runs: " + ", ".join(f"`{r['name']}` = `{r['path']}`" for r in report["runs"]) + ".",
        f"{level} CIs: Wilson for accuracy, paired percentile bootstrap ({settings['n_resamples']} resamples, "
        f"seed {settings['seed']}) for the gap = run - {report['runs'][0]['name']}. McNemar p is exact (binomial). "
        f"b01 = documents {report['runs'][0]['name']} got wrong and the run got right, b10 the reverse. "
        "MDE = smallest gap detectable at alpha 0.05 with 80% power at this n and observed discordance "
        "(normal approximation; n/a when the runs never disagree). With fewer than "
        f"{FEW_DISCORDANT} discordant documents trust McNemar's p over the bootstrap CI. p-values are not "
        "adjusted for multiple comparisons.",
    ]
    gap_header = [f"gap vs {report['runs'][0]['name']}", f"{level} CI", "McNemar p", "b01 / b10", "MDE"]
    for section in report["sections"]:
        title = f"## {section['task']} · filter `{section['filter']}` · {section['metric']} · n = {section['n']}"
        lines += ["", title, ""]
        rows = []
        for i, run in enumerate(section["runs"]):
            tpc = "n/a" if run["tokens_per_correct"] is None else f"{run['tokens_per_correct']:.1f}"
            gap = section["gaps"][i - 1] if i else None
            rows.append([run["run"], f"{run['accuracy']:.3f}", _ci(run["ci"])] + _gap_cells(gap) + [tpc])
        lines += _table(["run", "accuracy", f"{level} CI"] + gap_header + ["output tokens / correct"], rows)
        if section["buckets"]:
            rows = []
            for bucket in section["buckets"]:
                for i, run in enumerate(bucket["runs"]):
                    gap = bucket["gaps"][i - 1] if i else None
                    cells = [bucket["bucket"], _bounds(bucket), str(bucket["n"]), run["run"], f"{run['accuracy']:.3f}"]
                    rows.append(cells + [_ci(run["ci"])] + _gap_cells(gap))
            header = ["bucket", DIFFICULTY_FIELD, "n", "run", "accuracy", f"{level} CI"] + gap_header
            lines += [""] + _table(header, rows)
        if section["notes"]:
            lines += [""] + [f"- {note}" for note in section["notes"]]
    if report["notes"]:
        lines += ["", "Notes:"] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def forest_plot(report: dict, path: Path) -> None:
    """Forest plot PNG: one row per (task, filter, bucket, run), the gap vs the first run with its
    CI and a line at zero. Uses matplotlib's Agg canvas without touching the global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise CompareError("--plot needs matplotlib: pip install 'trl-opsd[plots]'") from err
    rows = []  # (label, gap row, is a bucket row)
    for section in report["sections"]:
        prefix = f"{section['task']} [{section['filter']}]"
        rows += [(f"{prefix} {g['run']}", g, False) for g in section["gaps"]]
        for bucket in section["buckets"]:
            rows += [(f"{prefix} {g['run']} · {bucket['bucket']} (n={bucket['n']})", g, True) for g in bucket["gaps"]]
    if not rows:
        raise CompareError("nothing to plot")
    figure = Figure(figsize=(8, 1.2 + 0.35 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    y = np.arange(len(rows))[::-1]
    gaps = np.array([g["gap"] for _, g, _ in rows])
    lows = np.array([g["ci"][0] for _, g, _ in rows])
    highs = np.array([g["ci"][1] for _, g, _ in rows])
    for is_bucket, colour in ((False, "black"), (True, "grey")):
        mask = np.array([bucket == is_bucket for _, _, bucket in rows])
        if mask.any():
            err = [gaps[mask] - lows[mask], highs[mask] - gaps[mask]]
            axes.errorbar(gaps[mask], y[mask], xerr=err, fmt="o", color=colour, ecolor=colour, capsize=3)
    axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(y, [label for label, _, _ in rows])
    axes.set_xlabel(f"gap vs {report['runs'][0]['name']} ({report['settings']['confidence']:.0%} paired bootstrap CI)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


HELP = "paired comparison of lm-eval --log_samples runs: Wilson, McNemar, bootstrap gap, buckets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` options, for ``trl-opsd``'s subcommand table or :func:`compare_main`."""
    parser.add_argument(
        "runs", nargs="+", type=Path, help="lm-eval output folders or samples_*.jsonl files; the first is the baseline"
    )
    parser.add_argument("--names", type=_csv, help="comma-separated run labels (default: folder names)")
    parser.add_argument(
        "--metric", help="0/1 per-document metric (default: the first binary one, e.g. exact_match or acc)"
    )
    parser.add_argument("--json", type=Path, help="write the full report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the markdown report")
    parser.add_argument("--plot", type=Path, help="write a forest plot of the gaps (PNG)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--n-resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bucket-edges",
        type=lambda s: tuple(float(x) for x in _csv(s)),
        default=stats.DEFAULT_BUCKET_EDGES,
        help="difficulty edges, bucket j = (e_j, e_j+1] (default 2,4: easy <= 2 < medium <= 4 < hard)",
    )
    parser.add_argument(
        "--bucket-names", type=_csv, help="one name per bucket (default easy,medium,hard for two edges)"
    )


def _default_names(runs: list[Path]) -> list[str]:
    names = [(run.parent if run.is_file() else run).resolve().name or str(run) for run in runs]
    if len(set(names)) == len(names):
        return names
    return [f"run{i + 1}:{name}" for i, name in enumerate(names)]


def check_output_paths(paths: list[Path | None]) -> None:
    """Refuse outputs that cannot be written before anything is computed or written (no half-written set)."""
    for path in filter(None, paths):
        if path.is_dir():
            raise CompareError(f"{path}: is a folder; give a file path")
        if not path.parent.is_dir():
            raise CompareError(f"{path}: its folder {path.parent} does not exist; create it first")


def report_json(report: dict) -> str:
    """The report as strict JSON (a NaN or infinity would make the file unreadable to strict parsers)."""
    try:
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    except ValueError as err:
        raise CompareError(f"the report holds a non-finite number and cannot be written as JSON ({err})") from None


def run(args: argparse.Namespace) -> int:
    """Run a comparison from parsed :func:`add_arguments` options; exit status 0, or 2 with the
    reason on stderr when the inputs are unusable."""
    try:
        check_output_paths([args.json, args.markdown, args.plot])
        names = args.names or _default_names(args.runs)
        bucket_names = args.bucket_names
        if bucket_names is None:
            if len(args.bucket_edges) != len(stats.DEFAULT_BUCKET_NAMES) - 1:
                raise CompareError("--bucket-edges with other than two edges needs --bucket-names")
            bucket_names = stats.DEFAULT_BUCKET_NAMES
        settings = Settings(args.confidence, args.n_resamples, args.seed, tuple(args.bucket_edges), tuple(bucket_names))
        report = compare(args.runs, names, args.metric, settings)
        markdown = to_markdown(report)
        json_text = report_json(report) if args.json else None
        if args.plot:  # first: the one output that can still fail ("nothing to plot")
            forest_plot(report, args.plot)
        if args.json:
            args.json.write_text(json_text, encoding="utf-8")
        if args.markdown:
            args.markdown.write_text(markdown, encoding="utf-8")
    except (CompareError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown)
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-opsd compare``: parse ``argv`` and :func:`run`."""
    parser = argparse.ArgumentParser(prog="trl-opsd compare", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
