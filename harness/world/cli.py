"""``trl-opsd world``: show the arithmetic world's warm-started model (shipped with the package), or rebuild it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the world and the warm start (not 0: a custom world, built once and cached)")
    parser.add_argument("--cache-dir", default=None,
                        help="where built checkpoints are cached (default: $TRL_OPSD_CACHE or ~/.cache/trl_opsd)")
    parser.add_argument("--rebuild", action="store_true",
                        help="train from scratch into the cache (minutes), even if a shipped or cached one exists, "
                             "and compare with the shipped world")


def run(args: argparse.Namespace) -> int:
    from harness.world.console import quiet_libraries
    from harness.world.warm_start import WarmStartSettings, library_versions, shipped, warm_start

    quiet_libraries()
    settings = WarmStartSettings(seed=args.seed)
    result = warm_start(settings, cache_dir=args.cache_dir, force=args.rebuild)
    print(json.dumps({key: value for key, value in asdict(result).items() if key not in ("history", "settings")},
                     indent=2))
    gap = result.hint_accuracy - result.no_hint_accuracy
    print(
        f"\nwarm-started tiny model, {result.num_eval_problems} held-out test problems: "
        f"{result.no_hint_accuracy:.1%} without the hint, {result.hint_accuracy:.1%} with it "
        f"(gap {gap:+.1%}, {result.steps} steps); checkpoint at {result.path}"
    )
    reference = shipped(settings)
    if args.rebuild and reference is not None:
        same = (reference.steps, reference.no_hint_accuracy, reference.hint_accuracy) == (
            result.steps, result.no_hint_accuracy, result.hint_accuracy)
        print(f"shipped world: {reference.no_hint_accuracy:.1%} / {reference.hint_accuracy:.1%} at step "
              f"{reference.steps}, built with {reference.built_with}; this rebuild "
              f"{'reproduces it exactly' if same else 'DIFFERS'} (running {library_versions()})")
    return 0 if result.reached_target else 1
