"""``trl-opsd demo``: the whole story offline on CPU, on the arithmetic world.

1. build and warm-start the world (cached): a tiny model mediocre without the hint, strong with it;
2. train arms from that same start on the same prompts, side by side in worker processes: OPSD in its
   default configuration (reverse KL, no clip), the same with the per-token clip in ``clamp`` and in
   ``scale`` mode, and OPD from a stronger separate teacher (plain SFT on the gold solutions, also
   reported as the supervised reference point);
3. evaluate every arm, without the hint, through the ``opsd_arith`` lm-eval task (the stock lm-eval
   machinery, with ``--log_samples``);
4. compare the runs pairwise (Wilson CIs, exact McNemar, bootstrap gap, difficulty buckets) and report
   how concentrated each arm's per-token divergence was; write Markdown, JSON and PNG to a report folder.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import queue
import statistics
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from harness import compare
from harness.world.arms import OPSD_ARMS, Arm, train_arm, train_sft
from harness.world.console import StepsToBar, quiet_libraries
from harness.world.parallel import plan_workers, process_pool
from harness.world.warm_start import warm_start

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """How much work each stage does; ``quick`` is a one-minute smoke version of the same pipeline."""

    steps_per_arm: int = 150  # fewer left the default arm's gain insignificant (README, Status)
    batch_size: int = 64
    teacher_sft_steps: int = 100  # already a much stronger teacher than the start (README, Status)
    eval_limit: int = 500
    geometry_prompts: int = 128  # held-out prompts whose per-token divergence the concentration plot shows
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(steps_per_arm=3, batch_size=8, teacher_sft_steps=3, eval_limit=40, geometry_prompts=16)


def demo_arms(teacher_path: str) -> list[Arm]:
    """The arms of the demo. Reverse KL is the default OPSD configuration (see the README for why)."""
    names = ["opsd_reverse_kl", "opsd_reverse_kl_clamp1.0", "opsd_reverse_kl_scale1.0"]
    return [Arm(name, dict(OPSD_ARMS[name])) for name in names] + [
        Arm("opd_reverse_kl", {"beta": 1.0, "privileged_from": None}, teacher_path=teacher_path)
    ]


def evaluate_with_lm_eval(model_path: str, out_dir: Path, limit: int) -> Path:
    """Run the opsd_arith lm-eval task on ``model_path`` (greedy, no hint) with per-sample logs in ``out_dir``.

    Through lm-eval's Python API, as its CLI does it (``simple_evaluate`` + ``EvaluationTracker``), in this
    process: a worker that evaluates several checkpoints imports lm-eval and indexes the tasks once, and only
    this project's tasks are indexed. lm-eval's own console output goes to ``<out_dir>.log``, shown only when it
    fails.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    log = out_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), \
            _logging_to(stream):
        try:
            tracker = EvaluationTracker(output_path=str(out_dir))
            results = simple_evaluate(
                model="hf", model_args=f"pretrained={model_path},dtype=float32", tasks=["opsd_arith"],
                task_manager=_project_tasks(), apply_chat_template=True, log_samples=True, limit=limit,
                device="cpu", batch_size=64,
            )
            samples = results.pop("samples")
            tracker.save_results_aggregated(results=results, samples=samples)
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        except Exception as error:
            traceback.print_exc(file=stream)
            failure = error
        else:
            failure = None
    if failure is not None:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"lm-eval on {model_path} failed ({failure!r}); log {log}:\n{tail}")
    return out_dir


@functools.cache
def _project_tasks():
    """lm-eval's task index of this project's tasks only (indexing lm-eval's own thousands of tasks is most of its
    start-up time)."""
    from lm_eval.tasks import TaskManager

    from harness.tasks import include_path

    return TaskManager(include_path=include_path(), include_defaults=False)


@contextlib.contextmanager
def _logging_to(stream):
    """Send the root logger's records (lm-eval and transformers log through it) to ``stream`` for a while."""
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


class _QueueBar:
    """A worker's stand-in for the main process's phase bar: each update goes through a queue."""

    def __init__(self, steps: queue.Queue):
        self.steps = steps

    def update(self, n: int = 1) -> None:
        self.steps.put(n)


def _train_in_worker(job, steps: queue.Queue, *args, **kwargs):
    """Run ``arms.train_arm`` / ``arms.train_sft`` in a worker, each optimizer step advancing the phase bar.

    A quiet arm adds ``arms.ProgressLines`` (one printed line per logging step) to its trainer; here the
    phase bar takes its place.
    """
    from harness.world import arms

    quiet_libraries()
    arms.ProgressLines = lambda name: StepsToBar(_QueueBar(steps))
    return job(*args, **kwargs)


def _evaluate_in_worker(model_path: str, out_dir: Path, limit: int) -> Path:
    quiet_libraries()
    return evaluate_with_lm_eval(model_path, out_dir, limit)


def _concentration(log_history: list[dict]) -> dict:
    """Median over logged steps of the per-token divergence's concentration statistics."""
    summary = {}
    for key in ("kl_mean", "kl_max_over_mean", "kl_top5pct_share", "clipped_fraction"):
        values = [row[key] for row in log_history if key in row]
        if values:
            summary[key] = statistics.median(values)
    return summary


def train_all_arms(world_path: str, out_dir: Path, settings: DemoSettings) -> tuple[dict, dict]:
    """Train the OPD teacher and every arm, side by side in worker processes; returns (checkpoints, logs).

    OPD starts once its teacher (SFT on gold solutions) is trained; the OPSD arms need nothing but the start.
    One bar counts the optimizer steps of all of them.
    """
    checkpoints_dir = out_dir / "checkpoints"
    teacher_dir = checkpoints_dir / "sft_gold"
    arms = demo_arms(str(teacher_dir))
    for arm in arms:
        arm.overrides.setdefault("per_device_train_batch_size", settings.batch_size)
    self_arms, teacher_arms = [a for a in arms if a.teacher_path is None], [a for a in arms if a.teacher_path]
    total = settings.teacher_sft_steps + len(arms) * settings.steps_per_arm
    print(f"[2/4] training the OPD teacher (SFT, {settings.teacher_sft_steps} steps) and {len(arms)} arms "
          f"({settings.steps_per_arm} steps each, batch {settings.batch_size}) side by side: {total} steps")
    histories = {}
    with multiprocessing.get_context("spawn").Manager() as manager, process_pool(len(arms)) as pool, \
            tqdm(total=total, desc="[2/4] training", unit="step") as bar:
        steps = manager.Queue()

        def submit(job, *args, **kwargs):
            return pool.submit(_train_in_worker, job, steps, *args, **kwargs)

        teacher = submit(train_sft, world_path, teacher_dir, settings.teacher_sft_steps, settings.seed, quiet=True)
        pending = {submit(train_arm, arm, world_path, checkpoints_dir, settings.steps_per_arm, settings.seed,
                          quiet=True): arm.name for arm in self_arms}
        pending[teacher] = "sft_gold"
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while not steps.empty():
                bar.update(steps.get())
            for future in done:
                name = pending.pop(future)
                if future is teacher:
                    teacher_path = future.result()
                    pending.update({submit(train_arm, arm, world_path, checkpoints_dir, settings.steps_per_arm,
                                           settings.seed, quiet=True): arm.name for arm in teacher_arms})
                else:
                    histories[name] = future.result()
    checkpoints = {"start": world_path, "sft_gold (OPD teacher)": teacher_path}
    checkpoints.update({arm.name: histories[arm.name][0] for arm in arms})
    logs = {"sft_gold": json.loads((teacher_dir / "log_history.json").read_text())}
    logs.update({arm.name: histories[arm.name][1] for arm in arms})
    return checkpoints, logs


def evaluate_all(checkpoints: dict, out_dir: Path, limit: int) -> list[Path]:
    """lm-eval every checkpoint, in worker processes with the cores shared between them."""
    workers, _ = plan_workers(len(checkpoints))
    print(f"[3/4] evaluating {len(checkpoints)} checkpoints with the opsd_arith lm-eval task on {limit} held-out "
          f"problems, without the hint ({workers} at a time)")
    with process_pool(len(checkpoints)) as pool:
        futures = [pool.submit(_evaluate_in_worker, path, out_dir / "lm_eval" / name.split(" ")[0], limit)
                   for name, path in checkpoints.items()]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="[3/4] lm-eval", unit="model"):
            pass
        return [future.result() for future in futures]


def run_demo(out_dir: Path, settings: DemoSettings) -> dict:
    started = time.perf_counter()
    quiet_libraries()
    out_dir.mkdir(parents=True, exist_ok=True)
    world = warm_start()
    print(f"[1/4] world: warm-started tiny model ({world.path}): {world.no_hint_accuracy:.1%} without the hint, "
          f"{world.hint_accuracy:.1%} with it ({world.num_eval_problems} held-out problems, {world.steps} steps)")
    phase = time.perf_counter()
    checkpoints, histories = train_all_arms(world.path, out_dir, settings)
    print(f"      trained in {time.perf_counter() - phase:.0f} s")
    concentration = {name: _concentration(history) for name, history in histories.items() if name != "sft_gold"}
    phase = time.perf_counter()
    runs = evaluate_all(checkpoints, out_dir, settings.eval_limit)
    print(f"      evaluated in {time.perf_counter() - phase:.0f} s")

    print("[4/4] paired comparison")
    report = compare.compare(runs, list(checkpoints), settings=compare.Settings(bucket_edges=(1, 2)))
    markdown = compare.to_markdown(report)
    compare.forest_plot(report, out_dir / "forest.png")
    summary = {
        "settings": asdict(settings),
        "warm_start": {"no_hint": world.no_hint_accuracy, "hint": world.hint_accuracy, "steps": world.steps,
                       "path": world.path, "built_with": world.built_with},
        "concentration": concentration,
        "comparison": report,
        "training": histories,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    markdown_report = _markdown_report(summary, markdown)
    (out_dir / "report.md").write_text(markdown_report)
    page = _html_report(out_dir, markdown_report, histories, runs, list(checkpoints),
                        world.path, checkpoints["sft_gold (OPD teacher)"], settings)
    print(markdown)
    print(_concentration_table(concentration))
    print(f"report: {page} and {out_dir / 'report.md'} (wall time {summary['wall_seconds']} s)")
    return summary


def _sample_completions(runs: list[Path], names: list[str], before: str, after: str, count: int = 6) -> list[dict]:
    """Held-out problems where ``after`` differs from ``before`` (improvements first), with both completions."""
    sections, _ = compare.pair_runs(runs, names)
    section = sections[0]
    metric = compare.choose_metric(section, names, None)
    first, second = section.samples[names.index(before)], section.samples[names.index(after)]

    def reply(sample: dict) -> str:
        response = sample.get("filtered_resps") or sample.get("resps") or [""]
        while isinstance(response, list):
            response = response[0] if response else ""
        return str(response)

    rows = [{"question": a["doc"]["question"], "gold": a["doc"]["answer"], "before": reply(a), "after": reply(b),
             "before_correct": bool(a[metric]), "after_correct": bool(b[metric])} for a, b in zip(first, second)]
    improved = [r for r in rows if r["after_correct"] and not r["before_correct"]]
    worsened = [r for r in rows if r["before_correct"] and not r["after_correct"]]
    return improved[: count - min(2, len(worsened))] + worsened[:2] or rows[:count]


def _html_report(out_dir: Path, markdown_report: str, histories: dict, runs: list[Path], names: list[str],
                 world_path: str, teacher_path: str, settings: DemoSettings) -> Path:
    """``report.html``: the Markdown report, the forest plot, the OPD-vs-OPSD divergence concentration, the
    training curves and sample completions before/after, in one self-contained page."""
    from harness import report_html
    from harness.plots import plot_geometry, plot_training_curves
    from harness.world.arithmetic import generate_problems
    from harness.world.geometry import opd_and_opsd_geometry

    problems = generate_problems(settings.geometry_prompts, "validation", seed=settings.seed)
    opd, opsd = opd_and_opsd_geometry(world_path, teacher_path, problems, beta=1.0, max_new_tokens=40,
                                      sample_seed=settings.seed)
    geometry_png = plot_geometry(opd, opsd, out_dir / "geometry.png")
    curves_png, drawn = plot_training_curves(histories, out_dir / "training_curves.png")
    missing = [key for key in ("loss", "kl_mean", "entropy", "completion_length", "clipped_fraction") if key not in drawn]
    after = "opsd_reverse_kl"
    # the figures right after the overall paired table, before the per-difficulty rows
    overall, bucket_header, buckets = markdown_report.partition("\n| bucket |")
    sections = [
        report_html.markdown_to_html(overall),
        report_html.figure(out_dir / "forest.png", "Paired gap in held-out accuracy against the start model, with "
                           "its bootstrap CI, overall and per difficulty bucket"),
        report_html.figure(geometry_png, f"Per-token divergence of the start model's own samples on "
                           f"{len(problems)} held-out prompts: OPD (separate SFT teacher) vs OPSD (self-teacher "
                           "with the hint); the right panel shows how concentrated each is"),
        report_html.figure(curves_png, "Training curves per arm, from the trainers' log_history"
                           + (f" (not logged by these trainers: {', '.join(missing)})" if missing else "")),
        "<h2>Per difficulty, and the rest of the report</h2>",
        report_html.markdown_to_html(bucket_header.lstrip("\n") + buckets),
        f"<h2>Sample completions: start vs {after}</h2>",
        report_html.samples_table(_sample_completions(runs, names, "start", after), "start", after),
    ]
    return report_html.render_page("trl-opsd demo report", sections, out_dir / "report.html")


def _concentration_table(concentration: dict) -> str:
    lines = ["| arm | kl_mean | max/mean | top-5% share | clipped |", "|---|---|---|---|---|"]
    for name, stats in concentration.items():
        cells = [f"{stats.get(k, float('nan')):.3g}" for k in ("kl_mean", "kl_max_over_mean", "kl_top5pct_share")]
        clipped = stats.get("clipped_fraction")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if clipped is None else f'{clipped:.1%}'} |")
    return "\n".join(lines)


def _markdown_report(summary: dict, comparison_markdown: str) -> str:
    warm = summary["warm_start"]
    return "\n\n".join([
        "# trl-opsd demo report",
        f"Warm start: {warm['no_hint']:.1%} without the hint, {warm['hint']:.1%} with it ({warm['steps']} steps).",
        "## Held-out accuracy without the hint (paired against the start model)",
        comparison_markdown,
        "## Per-token divergence concentration (median over logged steps)",
        _concentration_table(summary["concentration"]),
        "Plain SFT on the gold solutions is listed too: on this world it is the most efficient use of gold "
        "data. The demo shows OPSD working (learning from its own samples and a hint, with no worked "
        "solution), not OPSD beating supervised learning.",
        f"Wall time: {summary['wall_seconds']} s.",
    ]) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke version of the same pipeline")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    run_demo(Path(args.out), settings)
    return 0
