"""The ``trl-opsd`` command line: one entry point, one subcommand per job.

Subcommands register themselves in ``SUBCOMMANDS``; each is a (help, add_arguments, run) triple so
that ``trl-opsd --help`` lists exactly what exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict


def _add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the warm start")
    parser.add_argument("--cache-dir", default=None, help="where checkpoints are cached (default: $TRL_OPSD_CACHE "
                        "or ~/.cache/trl_opsd)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")


def _run_world(args: argparse.Namespace) -> int:
    """Build and warm-start the arithmetic world, then print its held-out accuracies."""
    from harness.warm_start import WarmStartSettings, warm_start

    result = warm_start(WarmStartSettings(seed=args.seed), cache_dir=args.cache_dir, force=args.force)
    summary = {key: value for key, value in asdict(result).items() if key != "history"}
    print(json.dumps(summary, indent=2))
    gap = result.hint_accuracy - result.no_hint_accuracy
    print(
        f"\nwarm-started tiny model, {result.num_eval_problems} held-out test problems: "
        f"{result.no_hint_accuracy:.1%} without the hint, {result.hint_accuracy:.1%} with it "
        f"(gap {gap:+.1%}); checkpoint at {result.path}"
    )
    return 0 if result.reached_target else 1


def _compare_subcommand():
    from harness import compare

    return compare.HELP, compare.add_arguments, compare.run


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "world": (
        "build and warm-start the offline arithmetic world (cached) and report its accuracies",
        _add_world_arguments,
        _run_world,
    ),
    "compare": _compare_subcommand(),
    "eval": __import__("harness.lm_eval_runner", fromlist=["SUBCOMMAND"]).SUBCOMMAND,
    "geometry": __import__("harness.geometry_cli", fromlist=["SUBCOMMAND"]).SUBCOMMAND,
    "rs-sft": __import__("harness.rs_sft", fromlist=["SUBCOMMAND"]).SUBCOMMAND,
    "prm-calibrate": __import__("harness.prm_calibration", fromlist=["SUBCOMMAND"]).SUBCOMMAND,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-opsd", description="On-policy (self-)distillation for TRL: training, evaluation and data tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
