"""The ``trl-opsd`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing `add_arguments(parser)` and `run(args) -> int`, one-line help).
# Modules are imported only when their command runs, so `trl-opsd --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("harness.world.demo", "the whole story offline on CPU: warm start, OPSD/OPD arms, lm-eval, paired comparison"),
    "world": ("harness.world.cli", "the offline arithmetic world's warm-started model (shipped; --rebuild trains it)"),
    "eval": ("harness.lm_eval_runner", "lm-eval's CLI with the opsd_* tasks and the cortex model added"),
    "compare": ("harness.compare", "paired comparison of lm-eval --log_samples runs (Wilson, McNemar, bootstrap)"),
    "geometry": ("harness.world.geometry", "OPD-vs-OPSD per-token divergence geometry on the arithmetic world"),
    "rs-sft": ("harness.world.rs_sft", "rejection-sampling SFT data: sample K, verify and/or PRM-filter, write + report"),
    "prm-calibrate": ("harness.world.prm_calibration", "calibrate PRM judges against the verifier (AUROC, Spearman)"),
    "doctor": ("harness.doctor", "preflight: torch/CUDA, bitsandbytes, DeepSpeed, vLLM, student vs teacher tokenizers"),
}
# name -> (recipe module with `main(argv) -> int`, one-line help). A recipe parses its own arguments
# (TRL's dataclasses and a --config YAML or shipped config name): `trl-opsd opsd --help` lists them.
RECIPES: dict[str, tuple[str, str]] = {
    "opsd": ("harness.recipes.opsd", "train: on-policy self-distillation (the student taught by itself + a hint)"),
    "opd": ("harness.recipes.opd", "train: on-policy distillation from an external teacher (model or server)"),
    "unified": ("harness.recipes.unified", "train: lambda * distillation + alpha * REINFORCE(reward), by preset"),
    "sft": ("harness.recipes.sft", "train: supervised fine-tuning on gold or RS-SFT rows"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (none for the top-level help)."""
    parser = argparse.ArgumentParser(
        prog="trl-opsd", description="On-policy (self-)distillation for TRL: training, evaluation and data tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in RECIPES.items():
        subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in RECIPES:
        from harness.recipes.common import run_cli

        return run_cli(importlib.import_module(RECIPES[argv[0]][0]).main, argv[1:])
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
