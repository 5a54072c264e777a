"""Training arms on the arithmetic world: one OPSD/OPD configuration each, evaluated on paired problems.

An arm is a named set of ``OPSDConfig`` overrides (and optionally an external teacher checkpoint).
Every arm starts from the same warm-started checkpoint, trains on the same prompts with the same seed,
and is evaluated without the hint on the same held-out problems, so arms compare pairwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from harness.generation import generate_texts, score_answers
from harness.world.arithmetic import Problem, generate_problems, problems_to_rows
from harness.world.warm_start import load
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.rewards import math_answer_reward
from trl_opsd.unified import UnifiedConfig, UnifiedTrainer

logger = logging.getLogger(__name__)

WORLD_TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=64,
    learning_rate=1e-3,
    lr_scheduler_type="linear",  # a decaying rate is what makes the gain robust across seeds (DESIGN.md)
    max_new_tokens=40,
    temperature=1.0,
    lmbda=1.0,
    max_prompt_length=128,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
)


@dataclass
class Arm:
    name: str
    overrides: dict = field(default_factory=dict)
    teacher_path: str | None = None  # an external in-process teacher (OPD); None = self-teacher
    unified: bool = False  # train with UnifiedTrainer (overrides name a preset) and the verifier's reward


# The OPSD arms of issue 3's table and the demo, by name: loss overrides on top of the trainer's defaults.
OPSD_ARMS = {
    "opsd_reverse_kl": {"beta": 1.0},
    "opsd_reverse_kl_clamp1.0": {"beta": 1.0, "kl_clip": 1.0, "kl_clip_mode": "clamp"},
    "opsd_reverse_kl_scale1.0": {"beta": 1.0, "kl_clip": 1.0, "kl_clip_mode": "scale"},
    "opsd_jsd0.5": {"beta": 0.5},
    "opsd_forward_kl": {"beta": 0.0},
    "opsd_forward_kl_clamp1.0": {"beta": 0.0, "kl_clip": 1.0, "kl_clip_mode": "clamp"},
    "opsd_forward_kl_clamp0.3": {"beta": 0.0, "kl_clip": 0.3, "kl_clip_mode": "clamp"},
    "opsd_forward_kl_scale0.3": {"beta": 0.0, "kl_clip": 0.3, "kl_clip_mode": "scale"},
    # The reference OPSD code's clip (each vocabulary entry's term capped before the sum), at its default cap.
    "opsd_forward_kl_pointwise0.05": {"beta": 0.0, "kl_clip": 0.05, "kl_clip_mode": "pointwise"},
    "opsd_reverse_kl_pointwise0.05": {"beta": 1.0, "kl_clip": 0.05, "kl_clip_mode": "pointwise"},
    # A per-token clamp at the reference's cap: the collapse DESIGN.md reports (the CollapseGuard's test case).
    "opsd_forward_kl_clamp0.05": {"beta": 0.0, "kl_clip": 0.05, "kl_clip_mode": "clamp"},
}

# UnifiedTrainer arms (``Arm(..., unified=True)``): outcome RL at the step that works and at one that destroys the
# model (tests/test_unified.py measured both); logged every 5 steps, for the CollapseGuard's histories.
_RL_OUTCOME = {"preset": "rl_outcome", "num_generations": 4, "per_device_train_batch_size": 32, "logging_steps": 5}
UNIFIED_ARMS = {
    "rl_outcome": {**_RL_OUTCOME, "learning_rate": 1e-4},
    "rl_outcome_lr1e-3": {**_RL_OUTCOME, "learning_rate": 1e-3},
}


def arm_by_name(name: str) -> Arm:
    """The named arm of :data:`OPSD_ARMS` or :data:`UNIFIED_ARMS`."""
    if name in OPSD_ARMS:
        return Arm(name, dict(OPSD_ARMS[name]))
    if name in UNIFIED_ARMS:
        return Arm(name, dict(UNIFIED_ARMS[name]), unified=True)
    raise ValueError(f"unknown arm {name!r}; known: {sorted(OPSD_ARMS) + sorted(UNIFIED_ARMS)}")


class HeldOutAccuracy(TrainerCallback):
    """Greedy no-hint accuracy on held-out problems every ``every`` optimizer steps, appended to the log history as
    ``{"step", "heldout_accuracy"}`` rows: when a run goes wrong, and what its logged metrics showed before."""

    def __init__(self, tokenizer, problems: list[Problem], every: int):
        self.tokenizer, self.problems, self.every = tokenizer, problems, every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return control
        was_training = model.training
        texts = generate_texts(model, self.tokenizer, [p.to_row()["messages"] for p in self.problems])
        model.train(was_training)
        correct = score_answers(texts, [p.answer for p in self.problems])
        state.log_history.append({"step": state.global_step, "heldout_accuracy": sum(correct) / len(correct)})
        return control


class ProgressLines(TrainerCallback):
    """One short line per logging step, for runs side by side whose progress bars would interleave."""

    def __init__(self, name: str):
        self.name = name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"  {self.name}: step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4g}", flush=True)


def _train_and_save(trainer, tokenizer, out_dir: Path, quiet: bool) -> list:
    """Train, then write the weights, the tokenizer and, last, ``log_history.json``: the marker of a finished run.

    ``quiet`` replaces the progress bar (and the log printer that stands in for it) by ``ProgressLines``.
    """
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines(out_dir.name))
    trainer.train()
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return trainer.state.log_history


def train_arm(
    arm: Arm,
    start_path: str,
    out_dir: str | Path,
    max_steps: int,
    seed: int = 0,
    quiet: bool = False,
    eval_every: int = 0,
    eval_problems: list[Problem] | None = None,
    logging_steps: int | None = None,
) -> tuple[str, list]:
    """Train ``arm`` from ``start_path``; returns (checkpoint path, the trainer's log history).

    A finished arm (its checkpoint and log written) is reused, so a killed demo resumes where it stopped.
    ``quiet`` prints a line per logging step instead of a progress bar. ``eval_every`` > 0 evaluates
    ``eval_problems`` every that many steps (:class:`HeldOutAccuracy`); ``logging_steps`` overrides the arm's.
    """
    out_dir = Path(out_dir) / arm.name
    if (out_dir / "log_history.json").exists():
        return str(out_dir), json.loads((out_dir / "log_history.json").read_text())
    model, tokenizer = load(start_path)
    values = {**WORLD_TRAINING_DEFAULTS, "max_steps": max_steps, "seed": seed, "disable_tqdm": quiet, **arm.overrides}
    if logging_steps:
        values["logging_steps"] = logging_steps
    config_class, trainer_class, extra = OPSDConfig, OPSDTrainer, {}
    if arm.unified:
        config_class, trainer_class, extra = UnifiedConfig, UnifiedTrainer, {"reward_funcs": [math_answer_reward]}
        values.setdefault("geometry_steps", 0)
    args = config_class(output_dir=str(out_dir), **values)
    prompts = generate_problems(args.per_device_train_batch_size * max_steps, "train", seed=seed + 1)
    teacher = load(arm.teacher_path)[0] if arm.teacher_path else None
    trainer = trainer_class(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(problems_to_rows(prompts)),
        processing_class=tokenizer,
        teacher_processing_class=AutoTokenizer.from_pretrained(arm.teacher_path) if arm.teacher_path else None,
        **extra,
    )
    if eval_every:
        trainer.add_callback(HeldOutAccuracy(tokenizer, eval_problems, eval_every))
    return str(out_dir), _train_and_save(trainer, tokenizer, out_dir, quiet)


def train_sft(
    start_path: str,
    out_dir: str | Path,
    max_steps: int,
    seed: int = 0,
    quiet: bool = False,
    batch_size: int = WORLD_TRAINING_DEFAULTS["per_device_train_batch_size"],
    learning_rate: float = 1e-3,
) -> str:
    """Plain SFT on gold worked solutions from ``start_path`` (no hints): the supervised reference point,
    and a stronger separate teacher for OPD.

    Like ``train_arm``, a finished run (its log written after the weights) is reused.
    """
    out_dir = Path(out_dir)
    if (out_dir / "log_history.json").exists():
        return str(out_dir)
    model, tokenizer = load(start_path)
    problems = generate_problems(batch_size * max_steps, "train", seed=seed + 2)
    rows = [
        {"prompt": p.to_row()["messages"], "completion": [{"role": "assistant", "content": p.solution}]}
        for p in problems
    ]
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=max_steps,
        learning_rate=learning_rate, lr_scheduler_type="linear", logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=seed, max_length=256, disable_tqdm=quiet,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    _train_and_save(trainer, tokenizer, out_dir, quiet)
    return str(out_dir)


def no_hint_correctness(path: str, problems: list[Problem], batch_size: int = 128) -> list[bool]:
    """Greedy, verifier-scored correctness of the checkpoint at ``path`` on each problem, without the hint."""
    model, tokenizer = load(path)
    texts = generate_texts(model, tokenizer, [p.to_row()["messages"] for p in problems], batch_size=batch_size)
    return score_answers(texts, [p.answer for p in problems])


def main(argv: list[str] | None = None) -> None:
    """``python -m harness.world.arms ARM[,ARM...] STEPS [OUT] [--eval-every N] [--logging-steps N] [--pairwise]``: train arms from the warm
    start and print, per arm, held-out no-hint accuracy on 300 paired test problems with its Wilson CI and exact
    McNemar p against the start; ``--pairwise`` adds McNemar between every two arms; ``--eval-every N`` logs
    no-hint accuracy on 200 other held-out problems every N steps into the arm's log history."""
    import argparse
    import itertools
    import time

    from harness.stats import mcnemar_test, wilson_interval
    from harness.world.warm_start import warm_start

    parser = argparse.ArgumentParser(prog="python -m harness.world.arms")
    parser.add_argument("names")
    parser.add_argument("steps", type=int)
    parser.add_argument("out_dir", nargs="?", default="runs/arms")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=None)
    parser.add_argument("--pairwise", action="store_true")
    options = parser.parse_args(argv)
    world = warm_start()
    problems = generate_problems(300, "test")
    # Periodic checks draw their own held-out problems (another seed), apart from the final 300.
    check_problems = generate_problems(200, "test", seed=7) if options.eval_every else None
    start = no_hint_correctness(world.path, problems)
    print(json.dumps({"arm": "start", "accuracy": sum(start) / len(start)}), flush=True)
    results = {}
    for name in options.names.split(","):
        started = time.perf_counter()
        path, history = train_arm(
            arm_by_name(name), world.path, options.out_dir, options.steps, eval_every=options.eval_every,
            eval_problems=check_problems, logging_steps=options.logging_steps,
        )
        after = results[name] = no_hint_correctness(path, problems)
        test = mcnemar_test(start, after)
        logged = [row for row in history if "completion_length" in row]
        print(json.dumps({
            "arm": name, "accuracy": sum(after) / len(after), "wilson95": wilson_interval(sum(after), len(after)),
            "up": test.b01, "down": test.b10, "mcnemar_p": test.pvalue, "seconds": round(time.perf_counter() - started),
            "final_completion_length": logged[-1]["completion_length"] if logged else None,
        }, default=float), flush=True)
    if options.pairwise:
        for first, second in itertools.combinations(results, 2):
            test = mcnemar_test(results[first], results[second])
            print(json.dumps({"pair": [first, second], "only_second": test.b01, "only_first": test.b10,
                              "mcnemar_p": test.pvalue}, default=float), flush=True)


if __name__ == "__main__":
    main()
