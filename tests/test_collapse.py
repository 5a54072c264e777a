"""CollapseGuard: the pure detection function on synthetic and recorded histories, and the callback's actions."""

import json
import math
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from trl_opsd.collapse import CollapseGuard, CollapseThresholds, detect_collapse, last_checkpoint_at_or_before
from trl_opsd.config import OPSDConfig


def _log(step, entropy=2.0, length=20.0, max_over_mean=10.0, **extra):
    return {"loss": 0.1, "grad_norm": 1.0, "kl_mean": 0.1, "student_entropy": entropy, "completion_length": length,
            "kl_max_over_mean": max_over_mean, "step": step, **extra}


def _history(values, **fixed):
    """One log every 10 steps; ``values`` is a list of dicts overriding ``_log``'s defaults."""
    return [_log(10 * (index + 1), **{**fixed, **value}) for index, value in enumerate(values)]


def test_a_steady_run_is_healthy():
    history = _history([{}] * 15) + [{"step": 150, "heldout_accuracy": 0.3}, {"train_runtime": 1.0, "step": 150}]
    verdict = detect_collapse(history)
    assert not verdict.collapsed and verdict.step is None and verdict.evidence == ()
    assert verdict.baseline["student_entropy"] == 2.0


def test_falling_entropy_fires_once_the_window_mean_crosses_with_the_last_healthy_step():
    history = _history([{}, {}, {}, {"entropy": 0.8}, {"entropy": 0.5}, {"entropy": 0.2}])
    verdict = detect_collapse(history)
    assert verdict.collapsed and verdict.step == 50 and verdict.last_healthy_step == 30
    assert {item.signal for item in verdict.evidence} == {"entropy"}
    assert "student_entropy" in verdict.message() and "step 50" in verdict.message()


def test_skipped_nonfinite_steps_fire_at_once():
    verdict = detect_collapse(_history([{}, {}, {"skipped_nonfinite_steps": 1.0}]))
    assert verdict.collapsed and verdict.step == 30 and verdict.evidence[0].metric == "skipped_nonfinite_steps"


def test_a_single_blip_does_not_fire():
    assert not detect_collapse(_history([{}, {}, {"entropy": 0.5}, {}, {"length": 2.0}, {}, {}])).collapsed


def test_nonfinite_fires_at_once():
    history = _history([{}, {}, {}])
    history[2]["loss"] = math.nan
    verdict = detect_collapse(history)
    assert verdict.collapsed and verdict.step == 30 and verdict.last_healthy_step == 20
    assert verdict.evidence[0].signal == "nonfinite"


@pytest.mark.parametrize(
    "change, signal",
    [
        ({"length": 1.0}, "length_zero"),
        ({"length": 40.0}, "length_pinned"),
        ({"max_over_mean": 80.0}, "concentration"),
        ({"entropy": 5.0}, "entropy_rise"),
        ({"clipped_fraction": 0.6}, "clipped"),
        ({"reward_mean": 0.05}, "reward"),
    ],
)
def test_each_signal(change, signal):
    history = _history([{}, {}, {}, change, change, change], clipped_fraction=0.1, reward_mean=0.3)
    verdict = detect_collapse(history, max_completion_length=40)
    assert verdict.collapsed and verdict.step in (40, 50), verdict  # the 2-row window's mean crosses the limit
    assert signal in {item.signal for item in verdict.evidence}


def test_signals_compare_the_window_mean_so_one_noisy_row_neither_fires_nor_hides_a_trend():
    # reward baseline 0.2 (first row), limit 0.1: 0.13 then 0.05 average 0.09
    history = _history([{"reward_mean": 0.2}, {"reward_mean": 0.13}, {"reward_mean": 0.05}])
    verdict = detect_collapse(history)
    assert verdict.collapsed and verdict.step == 30 and verdict.last_healthy_step == 10
    assert not detect_collapse(_history([{"reward_mean": 0.2}, {"reward_mean": 0.02}, {"reward_mean": 0.2}])).collapsed


def test_a_clip_that_removes_the_divergence_fires_from_the_start():
    """Absolute, not against the baseline: such a clip is wrong from the first step."""
    history = _history([{"clipped_mass_share": 1.01}, {"clipped_mass_share": 0.95}, {}])
    verdict = detect_collapse(history)
    assert verdict.collapsed and verdict.step == 20 and verdict.last_healthy_step is None
    assert [item.signal for item in verdict.evidence] == ["clip_removes_divergence"]
    assert not detect_collapse(_history([{"clipped_mass_share": 0.5}] * 5)).collapsed


def test_thresholds_are_knobs():
    history = _history([{}, {}, {"entropy": 1.5}, {"entropy": 1.5}])
    assert not detect_collapse(history).collapsed
    assert detect_collapse(history, CollapseThresholds(entropy_ratio=0.8)).collapsed


def _callback_run(tmp_path, mode, history, checkpoints=()):
    for step in checkpoints:
        (tmp_path / f"checkpoint-{step}").mkdir()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    guard, state, control = CollapseGuard(mode), TrainerState(), TrainerControl()
    for row in history:
        state.log_history.append(row)
        control = guard.on_log(args, state, control, logs=row)
    return guard, control


def test_stop_mode_stops_and_names_the_last_healthy_checkpoint(tmp_path):
    history = _history([{}, {}, {}, {}, {"entropy": 0.1}, {"entropy": 0.1}, {"entropy": 0.1}])
    guard, control = _callback_run(tmp_path, "stop", history, checkpoints=(20, 40, 60))
    assert control.should_training_stop and guard.verdict.step == 60 and guard.verdict.last_healthy_step == 40
    assert guard.last_healthy_checkpoint == str(tmp_path / "checkpoint-40")
    report = json.loads((tmp_path / "collapse_guard.json").read_text())
    assert report["last_healthy_checkpoint"].endswith("checkpoint-40") and report["step"] == 60


def test_warn_mode_warns_once_and_does_not_stop(tmp_path, caplog):
    history = _history([{}, {}, {"entropy": 0.1}, {"entropy": 0.1}, {"entropy": 0.1}])
    with caplog.at_level("WARNING", logger="trl_opsd.collapse"):
        guard, control = _callback_run(tmp_path, "warn", history)
    assert not control.should_training_stop and guard.verdict.collapsed
    assert sum("CollapseGuard" in record.getMessage() for record in caplog.records) == 1
    assert guard.last_healthy_checkpoint is None


def test_with_the_trainers_buffers_the_guard_checks_every_step_whatever_logging_steps_is(tmp_path):
    """The trainer appends per micro-batch and empties its buffers at each log (here every 10 steps): the guard
    keeps one row per optimizer step, the mean of that step's values, and fires at step 4, before any log."""
    buffers = {"reward_mean": [], "student_entropy": []}
    guard = CollapseGuard("stop", step_metrics=lambda: buffers)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    for step, rewards in enumerate([(0.2, 0.3), (0.2, 0.2), (0.1, 0.05), (0.05, 0.05)], start=1):
        buffers["reward_mean"].extend(rewards)  # two micro-batches per optimizer step
        buffers["student_entropy"].extend((0.2, 0.2))
        state.global_step = step
        control = guard.on_step_end(args, state, control)
        if control.should_training_stop:
            break
    assert [row["reward_mean"] for row in guard.history] == pytest.approx([0.25, 0.2, 0.075, 0.05])
    assert guard.verdict.step == 4 and guard.verdict.last_healthy_step == 2 and control.should_training_stop
    # a log empties the trainer's buffers: the guard starts counting from zero again
    guard2 = CollapseGuard("warn", step_metrics=lambda: buffers)
    buffers.update(reward_mean=[0.3], student_entropy=[0.2])
    state.global_step = 1
    guard2.on_step_end(args, state, control)
    guard2.on_log(args, state, control, logs={"loss": 0.5, "grad_norm": 1.0})
    buffers.update(reward_mean=[0.31], student_entropy=[0.21])
    state.global_step = 2
    guard2.on_step_end(args, state, control)
    assert guard2.history == [{"step": 1, "reward_mean": 0.3, "student_entropy": 0.2, "loss": 0.5, "grad_norm": 1.0},
                              {"step": 2, "reward_mean": 0.31, "student_entropy": 0.21}]


def test_off_mode_and_bad_mode(tmp_path):
    guard, control = _callback_run(tmp_path, "off", _history([{}, {}, {"entropy": 0.1}, {"entropy": 0.1}]))
    assert guard.verdict is None and not control.should_training_stop
    with pytest.raises(ValueError, match="collapse_guard"):
        CollapseGuard("loud")
    with pytest.raises(ValueError, match="collapse_guard"):
        OPSDConfig(output_dir=str(tmp_path), collapse_guard="loud", report_to="none", use_cpu=True)


def test_last_checkpoint_at_or_before(tmp_path):
    for name in ("checkpoint-10", "checkpoint-30", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    assert last_checkpoint_at_or_before(str(tmp_path), 29) == str(tmp_path / "checkpoint-10")
    assert last_checkpoint_at_or_before(str(tmp_path), 5) is None
    assert last_checkpoint_at_or_before(str(tmp_path), None) is None
    assert last_checkpoint_at_or_before(str(tmp_path / "missing"), 100) is None


@pytest.mark.parametrize("mode", ["warn", "stop", "off"])
def test_the_trainer_carries_the_guard_unless_off(tiny_tokenizer, tmp_path, mode):
    from datasets import Dataset

    from harness.world.arithmetic import generate_problems, problems_to_rows
    from harness.world.tiny import build_tiny_model
    from trl_opsd import OPSDTrainer

    args = OPSDConfig(output_dir=str(tmp_path), collapse_guard=mode, max_new_tokens=8, report_to="none", use_cpu=True,
                      bf16=False)
    trainer = OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=args, processing_class=tiny_tokenizer,
                          train_dataset=Dataset.from_list(problems_to_rows(generate_problems(4, "train"))))
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CollapseGuard)]
    assert [guard.mode for guard in guards] == ([] if mode == "off" else [mode])
    assert all(guard.max_completion_length == 8 for guard in guards)


# -- recorded histories of the arithmetic world (tests/data, README "Status", BENCHMARKS.md "CollapseGuard") --------
# Every run logged each optimizer step (--logging-steps 1) and checked held-out accuracy on 200 other problems
# periodically (start: 45/200). Collapses: the first check significantly below the start is where accuracy "fell";
# the guard must fire at an earlier step. Healthy runs: the guard must not fire.

DATA = Path(__file__).parent / "data"
COLLAPSES = {  # run: (first significant fall, the step the guard fires at, the signal)
    "opsd_forward_kl_clamp0.05": (5, 2, "clip_removes_divergence"),
    "opsd_forward_kl_pointwise0.05": (5, 2, "clip_removes_divergence"),
    "opsd_reverse_kl_pointwise0.05": (5, 2, "clip_removes_divergence"),
    "rl_outcome_lr1e-3": (4, 3, "reward"),
}
HEALTHY = ["opsd_reverse_kl", "opsd_forward_kl", "opsd_reverse_kl_clamp1.0", "opsd_reverse_kl_scale1.0", "rl_outcome"]


def _recorded(name):
    return json.loads((DATA / f"history_{name}.json").read_text())


def _first_significant_fall(record):
    """The first periodic check whose held-out accuracy is below the start's Wilson 95% lower bound."""
    from harness.stats import wilson_interval

    low, _ = wilson_interval(record["start_check_correct"], record["num_check_problems"])
    return next((row["step"] for row in record["history"] if row.get("heldout_accuracy", 1.0) < low), None)


@pytest.mark.parametrize("name", sorted(COLLAPSES))
def test_the_guard_fires_on_each_recorded_collapse_before_accuracy_fell(name):
    fall, fires_at, signal = COLLAPSES[name]
    record = _recorded(name)
    verdict = detect_collapse(record["history"], max_completion_length=record["max_new_tokens"])
    assert _first_significant_fall(record) == fall
    assert verdict.collapsed and verdict.step == fires_at < fall, verdict.message()
    assert {item.signal for item in verdict.evidence} == {signal}


@pytest.mark.parametrize("name", HEALTHY)
def test_the_guard_stays_silent_on_each_recorded_healthy_run(name):
    record = _recorded(name)
    verdict = detect_collapse(record["history"], max_completion_length=record["max_new_tokens"])
    assert not verdict.collapsed, verdict.message()
    steps = [row["step"] for row in record["history"] if "loss" in row]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 60  # every step, a whole run
