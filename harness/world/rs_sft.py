"""``trl-opsd rs-sft`` on the arithmetic world: its problems as prompts, its warm-started student, the stub judge.

The sampling, filtering, resuming and report are :mod:`harness.rs_sft`'s; this module only supplies the
world's inputs (``--prompts FILE`` and ``--model PATH`` still take any other).
"""

from __future__ import annotations

import argparse

from harness import rs_sft
from harness.rs_sft import PromptRow, prompt_from_row
from harness.world.arithmetic import generate_problems
from harness.world.stub_judge import STUB_JUDGE
from harness.world.warm_start import WORLD_MODEL, checkpoint, load


def world_prompts(n: int, split: str = "train", seed: int = 1) -> list[PromptRow]:
    """``n`` arithmetic-world problems as prompts (with gold answers)."""
    return [prompt_from_row(p.to_row(), i) for i, p in enumerate(generate_problems(n, split, seed=seed))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rs_sft.add_arguments(parser)
    world = parser.add_argument_group("arithmetic-world prompts (without --prompts)")
    world.add_argument("--num-prompts", type=int, default=200)
    world.add_argument("--prompt-split", default="train")
    world.add_argument("--prompt-seed", type=int, default=1)
    parser.set_defaults(model=WORLD_MODEL)


def prompts_from_args(args: argparse.Namespace) -> list[PromptRow]:
    if args.prompts:
        return rs_sft.load_prompts(args.prompts)
    return world_prompts(args.num_prompts, args.prompt_split, args.prompt_seed)


def sampler_from_args(args: argparse.Namespace) -> rs_sft.StudentSampler | rs_sft.TeacherSampler:
    if args.sampler == "teacher":
        return rs_sft.teacher_sampler_from_args(args)
    path = checkpoint(args.model)
    model, tokenizer = load(path)
    return rs_sft.student_sampler(model, tokenizer, path, args)


def run(args: argparse.Namespace) -> int:
    rs_sft.check_arguments(args)  # flags refused before any prompt file is read or model loaded
    return rs_sft.run(args, prompts_from_args(args), sampler_from_args(args), STUB_JUDGE)
