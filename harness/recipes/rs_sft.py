"""Rejection-sampling SFT data (seed sections 2.7 / 2.7b) as a recipe: ``trl-opsd rs-sft`` plus a plan and a manifest.

It takes exactly the arguments of ``trl-opsd rs-sft`` (``harness/world/rs_sft.py`` over ``harness/rs_sft.py``:
sample K completions per prompt from the student or a text teacher, keep what the verifier and/or the PRM
judge accept, write ``sft.jsonl`` and a report), adds ``--dry_run``, and writes ``run_manifest.json`` into
``--out`` with the fingerprints of the prompts and of the SFT data it produced. Train on that data with
``trl-opsd sft``:

    python -m harness.recipes.rs_sft --out runs/rs_sft --num-prompts 200 --samples 8 --filter both --dry_run
    python -m harness.recipes.rs_sft --out runs/rs_sft --num-prompts 200 --samples 8 --filter both
    trl-opsd sft --config sft_arith_cpu --dataset_name runs/rs_sft/sft.jsonl
"""

import argparse
import hashlib
import sys
from pathlib import Path

from harness.recipes import common, models
from harness.recipes.common import RecipeError
from harness.rs_sft import check_arguments, load_prompts
from harness.world import rs_sft

SFT_DATA = "sft.jsonl"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.recipes.rs_sft", description="rejection-sampling SFT data: sample K per "
                                     "prompt, verify and/or PRM-filter, write an SFT dataset, a report and a manifest")
    rs_sft.add_arguments(parser)
    parser.add_argument("--dry_run", action="store_true", help="print the plan and write it as a manifest; sample "
                        "nothing, load no weights, start no judge")
    return parser


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_sampler(args: argparse.Namespace) -> dict[str, object]:
    if args.sampler == "teacher":
        if not args.teacher_model:
            raise RecipeError("--sampler teacher needs --teacher-model")
        return {"kind": "text teacher", "model": args.teacher_model, "backend": args.teacher_backend,
                "url": args.teacher_url}
    try:
        spec = models.resolve(args.model, "--model")
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    return {"kind": "student", "model": spec.describe()}


def plan_for(args: argparse.Namespace) -> dict[str, object]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise RecipeError(f"--prompts {args.prompts!r} does not exist")
        prompts = {"source": str(path.resolve()), "num_prompts": len(load_prompts(path)),
                   "fingerprint_sha256": file_sha256(path)}
    else:
        prompts = {"source": "arithmetic", "split": args.prompt_split, "seed": args.prompt_seed,
                   "num_prompts": args.num_prompts}
    return {
        "recipe": "rs_sft",
        "prompts": prompts,
        "sampler": describe_sampler(args),
        "sampling": {"samples_per_prompt": args.samples, "temperature": args.temperature,
                     "max_new_tokens": args.max_new_tokens, "seed": args.seed},
        "filter": {"filter": args.filter, "aggregation": args.aggregation, "tau": args.tau,
                   "max_per_prompt": args.max_per_prompt},
        "judge": {"judge": args.judge, "model": args.judge_model, "url": args.judge_url, "ensemble": args.ensemble},
        "output_dir": args.out,
        "outputs": [SFT_DATA, "samples.jsonl", "report.json", "report.md"],
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        check_arguments(args)
        plan = plan_for(args)
    except ValueError as error:  # flags and the prompts file (named with its line) are refused before any load
        raise RecipeError(str(error)) from None
    common.print_plan("rs_sft", plan, args.dry_run)
    out = Path(args.out)
    if args.dry_run:
        common.write_manifest(str(out), common.DRY_RUN_MANIFEST_NAME,
                              common.manifest_payload("rs_sft", plan, (args,), "dry_run"))
        return 0
    code = rs_sft.run(args)
    outputs = {name: file_sha256(out / name) for name in (SFT_DATA, "report.json") if (out / name).exists()}
    common.write_manifest(str(out), common.MANIFEST_NAME, common.manifest_payload(
        "rs_sft", plan, (args,), "completed" if code == 0 else f"failed (exit {code})", outputs_sha256=outputs))
    return code


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
