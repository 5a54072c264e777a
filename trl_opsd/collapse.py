"""Collapse detection: the logged metrics that precede a collapse, against the run's own early baseline.

:func:`detect_collapse` is a pure function over a metrics history (``trainer.state.log_history``: a list of logged
dicts); :class:`CollapseGuard` is the thin ``TrainerCallback`` that runs it at every log, warns with the evidence and,
in ``"stop"`` mode, stops training and names the last healthy checkpoint.

Signals (each against the median of the run's first ``baseline_logs`` training logs, and each required on
``patience`` consecutive logs, except non-finite values, which fire at once):

- ``nonfinite``: the loss, grad norm or mean divergence is NaN or infinite.
- ``entropy``: the student's entropy fell below ``entropy_ratio`` x baseline (the policy turned deterministic).
- ``entropy_rise``: the student's entropy rose above ``entropy_rise_ratio`` x baseline (the policy dissolved).
- ``length_zero`` / ``length_pinned``: mean completion length fell below ``length_ratio`` x baseline, or sits at the
  generation cap while the baseline did not.
- ``concentration``: ``kl_max_over_mean`` rose above ``concentration_ratio`` x baseline (the divergence sits on ever
  fewer tokens).
- ``clipped``: ``clipped_fraction`` rose above ``clipped_ratio`` x baseline and above ``clipped_floor``.
- ``reward``: the on-policy reward fell below ``reward_ratio`` x baseline (where a reward is logged).

The default thresholds are a first setting checked against the runs recorded in ``tests/data`` (README, Status):
on those, the guard detects an outcome-RL collapse only after held-out accuracy has fallen, and misses a slow
degradation that none of these metrics shows. It is a net for gross failures (non-finite values, runaway lengths,
a collapsing reward or entropy), not yet an early warning.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

GUARD_MODES = ("off", "warn", "stop")
REWARD_KEYS = ("reward_mean", "reward")


@dataclass(frozen=True)
class CollapseThresholds:
    baseline_logs: int = 2
    patience: int = 2
    entropy_ratio: float = 0.5
    entropy_rise_ratio: float = 1.5
    length_ratio: float = 0.5
    length_cap_fraction: float = 0.98
    concentration_ratio: float = 4.0
    clipped_ratio: float = 3.0
    clipped_floor: float = 0.05
    reward_ratio: float = 0.5
    reward_floor: float = 0.05  # a baseline reward below this is too small to halve meaningfully


@dataclass(frozen=True)
class Evidence:
    """One signal on one log: ``value`` against ``limit`` (derived from ``baseline``)."""

    signal: str
    step: int
    metric: str
    value: float
    baseline: float | None
    limit: float | None

    def __str__(self) -> str:
        if self.baseline is None:
            return f"step {self.step}: {self.signal}: {self.metric} = {self.value}"
        return (f"step {self.step}: {self.signal}: {self.metric} = {self.value:.4g} "
                f"(baseline {self.baseline:.4g}, limit {self.limit:.4g})")


@dataclass(frozen=True)
class CollapseVerdict:
    collapsed: bool
    step: int | None  # the log step at which the guard fires
    last_healthy_step: int | None  # the last logged step before the signals that fired began
    evidence: tuple[Evidence, ...]  # the signals of the logs that made the verdict
    baseline: dict[str, float]

    def message(self) -> str:
        if not self.collapsed:
            return "no collapse signal"
        lines = "; ".join(str(item) for item in self.evidence)
        return (f"collapse suspected at step {self.step} (last healthy log: step {self.last_healthy_step}): {lines}")


def training_logs(history: list[dict]) -> list[dict]:
    """The per-step training logs of a ``log_history`` (not the final summary, evaluation or accuracy rows)."""
    return [row for row in history if "loss" in row and "train_runtime" not in row and "step" in row]


def _reward(row: dict) -> float | None:
    return next((row[key] for key in REWARD_KEYS if key in row), None)


def _baseline(logs: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    baseline = {}
    for key in keys:
        values = [row[key] for row in logs if key in row and math.isfinite(row[key])]
        if values:
            baseline[key] = statistics.median(values)
    reward = [value for value in map(_reward, logs) if value is not None and math.isfinite(value)]
    if reward:
        baseline["reward"] = statistics.median(reward)
    return baseline


def _signals(row: dict, baseline: dict, limits: CollapseThresholds, max_completion_length: int | None):
    step = row["step"]
    for metric in ("loss", "grad_norm", "kl_mean"):
        if metric in row and not math.isfinite(row[metric]):
            yield Evidence("nonfinite", step, metric, row[metric], None, None)

    def below(signal, metric, value, ratio):
        if value is not None and metric in baseline and value < ratio * baseline[metric]:
            yield Evidence(signal, step, metric, value, baseline[metric], ratio * baseline[metric])

    def above(signal, metric, value, ratio, floor=-math.inf):
        if value is not None and metric in baseline and value > max(ratio * baseline[metric], floor):
            yield Evidence(signal, step, metric, value, baseline[metric], max(ratio * baseline[metric], floor))

    yield from below("entropy", "student_entropy", row.get("student_entropy"), limits.entropy_ratio)
    yield from above("entropy_rise", "student_entropy", row.get("student_entropy"), limits.entropy_rise_ratio)
    yield from below("length_zero", "completion_length", row.get("completion_length"), limits.length_ratio)
    length = row.get("completion_length")
    if max_completion_length and length is not None and "completion_length" in baseline:
        pinned = limits.length_cap_fraction * max_completion_length
        if length >= pinned > baseline["completion_length"]:
            yield Evidence("length_pinned", step, "completion_length", length, baseline["completion_length"], pinned)
    yield from above("concentration", "kl_max_over_mean", row.get("kl_max_over_mean"), limits.concentration_ratio)
    yield from above("clipped", "clipped_fraction", row.get("clipped_fraction"), limits.clipped_ratio,
                     limits.clipped_floor)
    if baseline.get("reward", 0.0) >= limits.reward_floor:
        yield from below("reward", "reward", _reward(row), limits.reward_ratio)


def detect_collapse(
    history: list[dict],
    thresholds: CollapseThresholds | None = None,
    max_completion_length: int | None = None,
) -> CollapseVerdict:
    """Whether the logged metrics of ``history`` show a collapse, the first log step at which they do, and why.

    ``history`` is a ``trainer.state.log_history`` (other rows are ignored); ``max_completion_length`` enables the
    ``length_pinned`` signal. The verdict is at the first log where one signal has held for ``patience``
    consecutive logs (a non-finite value: at once); its evidence lists every signal on those logs.
    """
    limits = thresholds or CollapseThresholds()
    logs = training_logs(history)
    keys = ("student_entropy", "completion_length", "kl_max_over_mean", "clipped_fraction")
    baseline = _baseline(logs[: limits.baseline_logs], keys)
    streaks: dict[str, list[Evidence]] = {}
    for index, row in enumerate(logs):
        found = list(_signals(row, baseline, limits, max_completion_length)) if index >= limits.baseline_logs else []
        signals = {item.signal for item in found}
        for name in list(streaks):
            if name not in signals:
                del streaks[name]
        for item in found:
            streaks.setdefault(item.signal, []).append(item)
        fired = [items for items in streaks.values() if items[0].signal == "nonfinite" or len(items) >= limits.patience]
        if fired:
            first = index + 1 - max(len(items) for items in fired)  # where the longest fired streak began
            last_healthy = logs[first - 1]["step"] if first > 0 else None
            evidence = tuple(item for items in fired for item in items)
            return CollapseVerdict(True, row["step"], last_healthy, evidence, baseline)
    return CollapseVerdict(False, None, None, (), baseline)


class CollapseGuard(TrainerCallback):
    """Runs :func:`detect_collapse` on the trainer's log history at every log.

    ``mode="warn"`` logs a warning with the evidence once; ``"stop"`` also sets ``control.should_training_stop``.
    Either way, on firing it writes ``collapse_guard.json`` into the output directory: the verdict and the last
    checkpoint saved at or before the last healthy log step (``last_healthy_checkpoint``, None if there is none),
    the one to resume from or keep. The collapsed weights are not saved by the guard.
    """

    def __init__(self, mode: str = "warn", thresholds: CollapseThresholds | None = None,
                 max_completion_length: int | None = None):
        if mode not in GUARD_MODES:
            raise ValueError(f"collapse_guard must be one of {GUARD_MODES}, got {mode!r}")
        self.mode, self.thresholds, self.max_completion_length = mode, thresholds, max_completion_length
        self.verdict: CollapseVerdict | None = None
        self.last_healthy_checkpoint: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mode == "off" or self.verdict is not None:
            return control
        verdict = detect_collapse(state.log_history, self.thresholds, self.max_completion_length)
        if not verdict.collapsed:
            return control
        self.verdict = verdict
        self.last_healthy_checkpoint = last_checkpoint_at_or_before(args.output_dir, verdict.last_healthy_step)
        action = "stopping training" if self.mode == "stop" else "training continues (collapse_guard='stop' stops)"
        logger.warning("CollapseGuard: %s; last healthy checkpoint: %s; %s", verdict.message(),
                       self.last_healthy_checkpoint, action)
        if state.is_world_process_zero:
            report = {"mode": self.mode, **asdict(verdict), "last_healthy_checkpoint": self.last_healthy_checkpoint}
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "collapse_guard.json").write_text(json.dumps(report, indent=1, default=str))
        if self.mode == "stop":
            control.should_training_stop = True
        return control


def last_checkpoint_at_or_before(output_dir: str, step: int | None) -> str | None:
    """The ``checkpoint-N`` directory of ``output_dir`` with the largest N <= ``step``, or None."""
    if step is None or not Path(output_dir).is_dir():
        return None
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and int(match.group(1)) <= step:
            found.append((int(match.group(1)), str(path)))
    return max(found)[1] if found else None
