"""Collapse detection: the metrics that precede a collapse, against the run's own early baseline.

:func:`detect_collapse` is a pure function over a metrics history (a list of dicts with a ``step``, such as
``trainer.state.log_history``); :class:`CollapseGuard` is the thin ``TrainerCallback`` that runs it, warns with the
evidence and, in ``"stop"`` mode, stops training and names the last healthy checkpoint. Given the trainer's metric
buffers (``OPSDTrainer`` and ``UnifiedTrainer`` pass them), the guard sees every optimizer step, whatever
``logging_steps`` is: a collapse that happens within ten steps is over before a default log.

Signals (each against the median of the first ``baseline_steps`` rows, and each required on ``patience`` consecutive
rows, except non-finite values, which fire at once):

- ``nonfinite``: the loss, grad norm or mean divergence is NaN or infinite, or a micro-batch was skipped for it.
- ``entropy``: the student's entropy fell below ``entropy_ratio`` x baseline (the policy turned deterministic).
- ``entropy_rise``: the student's entropy rose above ``entropy_rise_ratio`` x baseline (the policy dissolved).
- ``length_zero`` / ``length_pinned``: mean completion length fell below ``length_ratio`` x baseline, or sits at the
  generation cap while the baseline did not.
- ``concentration``: ``kl_max_over_mean`` rose above ``concentration_ratio`` x baseline (the divergence sits on ever
  fewer tokens).
- ``clipped``: ``clipped_fraction`` rose above ``clipped_ratio`` x baseline and above ``clipped_floor``.
- ``clip_removes_divergence``: the KL clip removes at least ``clipped_mass_share_limit`` of the divergence
  (``clipped_mass_share``). Not relative to the baseline: from the first step, such a clip leaves the loss with
  almost no pull toward the teacher (``clamp``: no gradient above the cap) or a negative value that pushes the
  student away from the teacher's preferred tokens (``pointwise``; ``trl_opsd.losses.pointwise_clip``).
- ``reward``: the mean on-policy reward of the last ``patience`` rows fell below ``reward_ratio`` x baseline (where a
  reward is logged).

The thresholds were set on collapsing and healthy runs of the arithmetic world recorded in ``tests/data`` (README,
Status, has the detection and false-alarm figures).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

GUARD_MODES = ("off", "warn", "stop")
REWARD_KEYS = ("reward_mean", "reward")


@dataclass(frozen=True)
class CollapseThresholds:
    baseline_steps: int = 1  # the first row holds the rollouts of the untouched start model
    patience: int = 2
    entropy_ratio: float = 0.5
    entropy_rise_ratio: float = 1.5
    length_ratio: float = 0.5
    length_cap_fraction: float = 0.98
    concentration_ratio: float = 4.0
    clipped_ratio: float = 3.0
    clipped_floor: float = 0.05
    clipped_mass_share_limit: float = 0.9
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
    step: int | None  # the step at which the guard fires
    last_healthy_step: int | None  # the last step before the window of the signals that fired
    evidence: tuple[Evidence, ...]  # the signals of the logs that made the verdict
    baseline: dict[str, float]

    def message(self) -> str:
        if not self.collapsed:
            return "no collapse signal"
        lines = "; ".join(str(item) for item in self.evidence)
        return f"collapse suspected at step {self.step} (last healthy step: {self.last_healthy_step}): {lines}"


WATCHED = ("loss", "grad_norm", "kl_mean", "student_entropy", "completion_length", "kl_max_over_mean",
           "clipped_fraction", "clipped_mass_share", "skipped_nonfinite_steps", *REWARD_KEYS)
RELATIVE = ("student_entropy", "completion_length", "kl_max_over_mean", "clipped_fraction")


def metric_rows(history: list[dict]) -> list[dict]:
    """The rows of a history that carry training metrics (not the final summary, evaluation or accuracy rows)."""
    return [row for row in history
            if "step" in row and "train_runtime" not in row and any(key in row for key in WATCHED)]


def _reward(row: dict) -> float | None:
    return next((row[key] for key in REWARD_KEYS if key in row), None)


def _finite_median(values) -> float | None:
    values = [value for value in values if value is not None and math.isfinite(value)]
    return statistics.median(values) if values else None


def _baseline(rows: list[dict]) -> dict[str, float]:
    baseline = {key: _finite_median(row.get(key) for row in rows) for key in RELATIVE}
    baseline["reward"] = _finite_median(map(_reward, rows))
    return {key: value for key, value in baseline.items() if value is not None}


def _window_mean(window: list[dict], value_of) -> float | None:
    """The mean of a metric over the window's rows, or None unless every row has a finite value."""
    values = [value_of(row) for row in window]
    if any(value is None or not math.isfinite(value) for value in values):
        return None
    return statistics.fmean(values)


def _signals(window: list[dict], baseline: dict, limits: CollapseThresholds, max_completion_length: int | None,
             relative: bool):
    """The signals on the last ``patience`` rows (``window``): each compares the metric's mean over the window to
    its limit, so one noisy step neither fires nor hides a trend. ``relative`` is False while the baseline forms."""
    row, step = window[-1], window[-1]["step"]
    for metric in ("loss", "grad_norm", "kl_mean"):
        if metric in row and not math.isfinite(row[metric]):
            yield Evidence("nonfinite", step, metric, row[metric], None, None)
    if row.get("skipped_nonfinite_steps"):
        yield Evidence("nonfinite", step, "skipped_nonfinite_steps", row["skipped_nonfinite_steps"], None, None)

    def mean(metric):
        return _window_mean(window, lambda r: r.get(metric))

    share = mean("clipped_mass_share")
    if share is not None and share >= limits.clipped_mass_share_limit:
        yield Evidence("clip_removes_divergence", step, "clipped_mass_share", share, None,
                       limits.clipped_mass_share_limit)
    if not relative:
        return

    def below(signal, metric, value, ratio):
        if value is not None and metric in baseline and value < ratio * baseline[metric]:
            yield Evidence(signal, step, metric, value, baseline[metric], ratio * baseline[metric])

    def above(signal, metric, value, ratio, floor=-math.inf):
        if value is not None and metric in baseline and value > max(ratio * baseline[metric], floor):
            yield Evidence(signal, step, metric, value, baseline[metric], max(ratio * baseline[metric], floor))

    entropy, length = mean("student_entropy"), mean("completion_length")
    yield from below("entropy", "student_entropy", entropy, limits.entropy_ratio)
    yield from above("entropy_rise", "student_entropy", entropy, limits.entropy_rise_ratio)
    yield from below("length_zero", "completion_length", length, limits.length_ratio)
    if max_completion_length and length is not None and "completion_length" in baseline:
        pinned = limits.length_cap_fraction * max_completion_length
        if length >= pinned > baseline["completion_length"]:
            yield Evidence("length_pinned", step, "completion_length", length, baseline["completion_length"], pinned)
    yield from above("concentration", "kl_max_over_mean", mean("kl_max_over_mean"), limits.concentration_ratio)
    yield from above("clipped", "clipped_fraction", mean("clipped_fraction"), limits.clipped_ratio,
                     limits.clipped_floor)
    if baseline.get("reward", 0.0) >= limits.reward_floor:
        yield from below("reward", "reward", _window_mean(window, _reward), limits.reward_ratio)


def detect_collapse(
    history: list[dict],
    thresholds: CollapseThresholds | None = None,
    max_completion_length: int | None = None,
) -> CollapseVerdict:
    """Whether the metrics of ``history`` show a collapse, the first step at which they do, and why.

    ``history``: rows with a ``step`` (:func:`metric_rows` picks the ones with training metrics); ``max_completion_length``
    enables the ``length_pinned`` signal. The verdict is at the first row where a signal's mean over the last
    ``patience`` rows crosses its limit (a non-finite value: at once); the last healthy step is the one before that
    window.
    """
    limits = thresholds or CollapseThresholds()
    rows = metric_rows(history)
    baseline = _baseline(rows[: limits.baseline_steps])
    for index, row in enumerate(rows):
        window = rows[max(0, index + 1 - limits.patience): index + 1]
        found = list(_signals(window, baseline, limits, max_completion_length,
                              relative=index >= limits.baseline_steps and len(window) == limits.patience))
        nonfinite = [item for item in found if item.signal == "nonfinite"]
        windowed = [item for item in found if item.signal != "nonfinite"] if len(window) == limits.patience else []
        if nonfinite or windowed:
            first = index if nonfinite else index + 1 - len(window)
            last_healthy = rows[first - 1]["step"] if first > 0 else None
            return CollapseVerdict(True, row["step"], last_healthy, tuple(nonfinite or windowed), baseline)
    return CollapseVerdict(False, None, None, (), baseline)


class CollapseGuard(TrainerCallback):
    """Runs :func:`detect_collapse` as training goes.

    With ``step_metrics`` (a callable returning the trainer's metric buffers: name -> values appended since the last
    log, TRL's ``trainer._metrics["train"]``), the guard keeps its own history of one row per optimizer step, the mean
    of what that step appended, and checks it at every step; the logged loss and grad norm join the row of their
    step. Without it, it checks ``state.log_history`` at every log.

    ``mode="warn"`` logs a warning with the evidence once; ``"stop"`` also sets ``control.should_training_stop``.
    Either way, on firing it writes ``collapse_guard.json`` into the output directory: the verdict and the last
    checkpoint saved at or before the last healthy step (``last_healthy_checkpoint``, None if there is none),
    the one to resume from or keep. The collapsed weights are not saved by the guard.
    """

    def __init__(self, mode: str = "warn", thresholds: CollapseThresholds | None = None,
                 max_completion_length: int | None = None,
                 step_metrics: Callable[[], dict[str, list[float]]] | None = None):
        if mode not in GUARD_MODES:
            raise ValueError(f"collapse_guard must be one of {GUARD_MODES}, got {mode!r}")
        self.mode, self.thresholds, self.max_completion_length = mode, thresholds, max_completion_length
        self.step_metrics = step_metrics
        self.history: list[dict] = []  # one row per optimizer step (with step_metrics)
        self._seen: dict[str, int] = {}  # how many values of each buffer earlier steps consumed
        self.verdict: CollapseVerdict | None = None
        self.last_healthy_checkpoint: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode == "off" or self.step_metrics is None or self.verdict is not None:
            return control
        row = {"step": state.global_step}
        for name, values in self.step_metrics().items():
            new = values[self._seen.get(name, 0):]
            self._seen[name] = len(values)
            if new:
                row[name] = statistics.fmean(new)
        self.history.append(row)
        return self._check(self.history, args, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mode == "off" or self.verdict is not None:
            return control
        if self.step_metrics is None:
            return self._check(state.log_history, args, state, control)
        self._seen = {}  # the trainer's log() empties its buffers
        if logs and self.history and self.history[-1]["step"] == state.global_step:
            self.history[-1].update({key: logs[key] for key in ("loss", "grad_norm") if key in logs})
            return self._check(self.history, args, state, control)
        return control

    def _check(self, history, args, state, control):
        verdict = detect_collapse(history, self.thresholds, self.max_completion_length)
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
