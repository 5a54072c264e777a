"""``trl-opsd prm-calibrate`` on the arithmetic world: fresh, verifier-labelled rollouts of its warm-started
student, judged by the stub judge unless told otherwise.

The calibration and its report are :mod:`harness.prm_calibration`'s; this module only supplies the world's
rollouts (``--rollouts FILE`` still takes any other).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import prm_calibration
from harness.io import write_jsonl
from harness.prm_calibration import Rollout
from harness.rs_sft import StudentSampler
from harness.verifiers import is_correct
from harness.world.rs_sft import world_prompts
from harness.world.stub_judge import STUB_JUDGE
from harness.world.warm_start import WORLD_MODEL, checkpoint, load


def world_rollouts(model: str, *, num_prompts: int, samples: int, temperature: float, split: str,
                   prompt_seed: int, seed: int, max_new_tokens: int = 48) -> list[Rollout]:
    """Fresh student rollouts on the arithmetic world, labelled by the verifier (seed 2.6b / 2.7b)."""
    path = checkpoint(model)
    student, tokenizer = load(path)
    sampler = StudentSampler(student, tokenizer, name=path, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed)
    prompts = world_prompts(num_prompts, split, prompt_seed)
    rollouts = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start:start + 16]
        for prompt, texts in zip(chunk, sampler.sample(chunk, samples)):
            rollouts += [Rollout(prompt.question, t, is_correct(t, prompt.answer)) for t in texts]
    return rollouts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prm_calibration.add_arguments(parser)
    world = parser.add_argument_group("fresh arithmetic-world rollouts (without --rollouts)")
    world.add_argument("--model", default=WORLD_MODEL, help="student checkpoint (default: %(default)s, the "
                       "warm-started world model)")
    world.add_argument("--num-prompts", type=int, default=100)
    world.add_argument("--samples", "-k", type=int, default=4)
    world.add_argument("--temperature", type=float, default=0.7)
    world.add_argument("--prompt-split", default="validation")
    world.add_argument("--prompt-seed", type=int, default=2)
    world.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.rollouts:
        rollouts = prm_calibration.load_rollouts(args.rollouts)
    else:
        rollouts = world_rollouts(args.model, num_prompts=args.num_prompts, samples=args.samples,
                                  temperature=args.temperature, split=args.prompt_split,
                                  prompt_seed=args.prompt_seed, seed=args.seed)
        write_jsonl(Path(args.out) / "rollouts.jsonl",
                    [{"question": r.question, "completion": r.text, "correct": r.correct} for r in rollouts])
    return prm_calibration.run(args, rollouts, STUB_JUDGE)
