"""``trl-opsd world``: build and warm-start the arithmetic world (cached), then print its accuracies."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the warm start")
    parser.add_argument("--cache-dir", default=None,
                        help="where checkpoints are cached (default: $TRL_OPSD_CACHE or ~/.cache/trl_opsd)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")


def run(args: argparse.Namespace) -> int:
    from harness.world.warm_start import WarmStartSettings, warm_start

    result = warm_start(WarmStartSettings(seed=args.seed), cache_dir=args.cache_dir, force=args.force)
    print(json.dumps({key: value for key, value in asdict(result).items() if key != "history"}, indent=2))
    gap = result.hint_accuracy - result.no_hint_accuracy
    print(
        f"\nwarm-started tiny model, {result.num_eval_problems} held-out test problems: "
        f"{result.no_hint_accuracy:.1%} without the hint, {result.hint_accuracy:.1%} with it "
        f"(gap {gap:+.1%}); checkpoint at {result.path}"
    )
    return 0 if result.reached_target else 1
