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
import json
import logging
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from harness import compare
from harness.world.arms import OPSD_ARMS, Arm, train_arm, train_sft
from harness.world.parallel import plan_workers, process_pool, subprocess_env
from harness.world.warm_start import warm_start

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """How much work each stage does; ``quick`` is a one-minute smoke version of the same pipeline."""

    steps_per_arm: int = 150  # fewer left the default arm's gain insignificant (README, Status)
    batch_size: int = 64
    teacher_sft_steps: int = 100  # already a much stronger teacher than the start (README, Status)
    eval_limit: int = 500
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(steps_per_arm=3, batch_size=8, teacher_sft_steps=3, eval_limit=40)


def demo_arms(teacher_path: str) -> list[Arm]:
    """The arms of the demo. Reverse KL is the default OPSD configuration (see the README for why)."""
    names = ["opsd_reverse_kl", "opsd_reverse_kl_clamp1.0", "opsd_reverse_kl_scale1.0"]
    return [Arm(name, dict(OPSD_ARMS[name])) for name in names] + [
        Arm("opd_reverse_kl", {"beta": 1.0, "privileged_from": None}, teacher_path=teacher_path)
    ]


def evaluate_with_lm_eval(model_path: str, out_dir: Path, limit: int, env: dict | None = None) -> Path:
    """Run the opsd_arith lm-eval task on ``model_path`` (greedy, no hint) with per-sample logs."""
    command = [
        sys.executable, "-m", "harness.cli", "eval", "--model", "hf",
        "--model_args", f"pretrained={model_path},dtype=float32", "--tasks", "opsd_arith",
        "--apply_chat_template", "--log_samples", "--output_path", str(out_dir),
        "--device", "cpu", "--batch_size", "64", "--limit", str(limit),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return out_dir


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
    """
    checkpoints_dir = out_dir / "checkpoints"
    teacher_dir = checkpoints_dir / "sft_gold"
    arms = demo_arms(str(teacher_dir))
    for arm in arms:
        arm.overrides.setdefault("per_device_train_batch_size", settings.batch_size)
    self_arms, teacher_arms = [a for a in arms if a.teacher_path is None], [a for a in arms if a.teacher_path]
    histories = {}
    with process_pool(len(arms)) as pool, tqdm(total=len(arms) + 1, desc="[2/4] training arms") as bar:
        teacher_future = pool.submit(train_sft, world_path, teacher_dir, settings.teacher_sft_steps,
                                     settings.seed, quiet=True)
        futures = {pool.submit(train_arm, arm, world_path, checkpoints_dir, settings.steps_per_arm,
                               settings.seed, quiet=True): arm.name for arm in self_arms}
        teacher_path = teacher_future.result()
        bar.update()
        futures.update({pool.submit(train_arm, arm, world_path, checkpoints_dir, settings.steps_per_arm,
                                    settings.seed, quiet=True): arm.name for arm in teacher_arms})
        for future in as_completed(futures):
            path, history = future.result()
            histories[futures[future]] = (path, history)
            bar.update()
    checkpoints = {"start": world_path, "sft_gold (OPD teacher)": teacher_path}
    checkpoints.update({arm.name: histories[arm.name][0] for arm in arms})
    return checkpoints, {arm.name: histories[arm.name][1] for arm in arms}


def evaluate_all(checkpoints: dict, out_dir: Path, limit: int) -> list[Path]:
    """lm-eval every checkpoint, as concurrent subprocesses with the cores shared between them."""
    workers, _ = plan_workers(len(checkpoints))
    env = subprocess_env(len(checkpoints))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(evaluate_with_lm_eval, path, out_dir / "lm_eval" / name.split(" ")[0], limit, env)
                   for name, path in checkpoints.items()]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=f"[3/4] lm-eval opsd_arith ({limit} problems)"):
            pass
        return [future.result() for future in futures]


def run_demo(out_dir: Path, settings: DemoSettings) -> dict:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    world = warm_start()
    print(f"[1/4] warm start: {world.no_hint_accuracy:.1%} without the hint, {world.hint_accuracy:.1%} with it "
          f"({world.num_eval_problems} held-out problems, {world.steps} steps)")
    checkpoints, histories = train_all_arms(world.path, out_dir, settings)
    concentration = {name: _concentration(history) for name, history in histories.items()}
    runs = evaluate_all(checkpoints, out_dir, settings.eval_limit)

    print("[4/4] paired comparison")
    report = compare.compare(runs, list(checkpoints), settings=compare.Settings(bucket_edges=(1, 2)))
    markdown = compare.to_markdown(report)
    compare.forest_plot(report, out_dir / "forest.png")
    summary = {
        "settings": asdict(settings),
        "warm_start": {"no_hint": world.no_hint_accuracy, "hint": world.hint_accuracy, "steps": world.steps},
        "concentration": concentration,
        "comparison": report,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "report.md").write_text(_markdown_report(summary, markdown))
    print(markdown)
    print(_concentration_table(concentration))
    print(f"report: {out_dir / 'report.md'} (wall time {summary['wall_seconds']} s)")
    return summary


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
