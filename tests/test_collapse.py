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


def test_falling_entropy_fires_after_patience_with_the_last_healthy_step():
    history = _history([{}, {}, {}, {"entropy": 0.8}, {"entropy": 0.5}, {"entropy": 0.2}])
    verdict = detect_collapse(history)
    assert verdict.collapsed and verdict.step == 50 and verdict.last_healthy_step == 30
    assert {item.signal for item in verdict.evidence} == {"entropy"}
    assert "student_entropy" in verdict.message() and "step 50" in verdict.message()


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
    history = _history([{}, {}, {}, change, change], clipped_fraction=0.1, reward_mean=0.3)
    verdict = detect_collapse(history, max_completion_length=40)
    assert verdict.collapsed and verdict.step == 50, verdict
    assert signal in {item.signal for item in verdict.evidence}


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

    from harness.arithmetic import generate_problems, problems_to_rows
    from harness.tiny_models import build_tiny_model
    from trl_opsd import OPSDTrainer

    args = OPSDConfig(output_dir=str(tmp_path), collapse_guard=mode, max_new_tokens=8, report_to="none", use_cpu=True,
                      bf16=False)
    trainer = OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=args, processing_class=tiny_tokenizer,
                          train_dataset=Dataset.from_list(problems_to_rows(generate_problems(4, "train"))))
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CollapseGuard)]
    assert [guard.mode for guard in guards] == ([] if mode == "off" else [mode])
    assert all(guard.max_completion_length == 8 for guard in guards)


# -- recorded histories of the arithmetic world (tests/data, BENCHMARKS.md "CollapseGuard") -------------------------

DATA = Path(__file__).parent / "data"


def _recorded(name):
    return json.loads((DATA / f"history_{name}.json").read_text())


def _first_significant_fall(record):
    """The first periodic check whose held-out accuracy is below the start's Wilson 95% lower bound."""
    from harness.stats import wilson_interval

    low, _ = wilson_interval(record["start_check_correct"], record["num_check_problems"])
    return next((row["step"] for row in record["history"] if row.get("heldout_accuracy", 1.0) < low), None)


def test_the_guard_detects_the_recorded_outcome_rl_collapse_but_only_after_accuracy_fell():
    """Outcome RL at lr 1e-3 destroys the model within its first 10 steps (held-out 22.5% -> 3% at the first check,
    step 10); the reward signal fires at step 20, the earliest its 2-log baseline and patience of 2 allow with logs
    every 5 steps. Recorded so that a change of thresholds shows what it does to this case (README, Status)."""
    record = _recorded("rl_outcome_lr1e-3")
    verdict = detect_collapse(record["history"], max_completion_length=record["max_new_tokens"])
    assert _first_significant_fall(record) == 10
    assert verdict.collapsed and verdict.step == 20 and verdict.last_healthy_step == 10
    assert {item.signal for item in verdict.evidence} == {"reward"}


def test_the_guard_misses_the_recorded_pointwise_degradation():
    """Forward KL with the pointwise clip at 0.05 took held-out accuracy from 22.5% to 8.5% by the first check
    (step 25) and ended at 13.5%, while entropy, length, concentration and the clipped fraction stayed within the
    thresholds: a degradation the logged metrics do not show. Recorded so that a change of thresholds shows what
    it does to this case (README, Status)."""
    record = _recorded("opsd_forward_kl_pointwise0.05")
    assert _first_significant_fall(record) == 25
    assert not detect_collapse(record["history"], max_completion_length=record["max_new_tokens"]).collapsed
