"""On-policy self-distillation (OPSD): the student learns from itself, shown privileged context.

The teacher is the student's initial policy (LoRA adapters disabled, or a frozen copy without PEFT),
scoring the student's own rollouts under a prompt that also carries the gold answer (or the row's
``privileged_context`` / ``teacher_messages``).

    # CPU, offline, the arithmetic world (a shipped config by name, or any YAML path)
    trl-opsd opsd --config opsd_arith_cpu
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m harness.recipes.opsd --config opsd_arith_cpu

    # the OPSD paper's settings (Qwen3-1.7B, forward KL, per-token clip 0.05, LoRA self-teacher)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m harness.recipes.opsd \\
        --config opsd_qwen3_1p7b

    # any of them: print the resolved plan and stop (no weights, no hub)
    trl-opsd opsd --config opsd_qwen3_1p7b --dry_run --accelerate_config accelerate_configs/multi_gpu.yaml \\
        --assume_gpu_memory_gb 80
"""

import sys

from trl import get_peft_config

from harness.recipes import common, distill, student
from trl_opsd import OPSDTrainer


def main(argv: list[str] | None = None) -> int:
    launch = common.detect_launch()
    args = distill.parse("opsd", argv, launch)
    run = distill.make_plan("opsd", args, launch)  # loads nothing
    common.print_plan("opsd", run.plan, args.script.dry_run)
    if args.script.dry_run:
        return distill.dry_run("opsd", run)

    args, data = run.args, distill.train_data(run)
    model, tokenizer = student.load(run.student, args.training, args.model)
    trainer = OPSDTrainer(model=model, args=args.training, train_dataset=data.train, processing_class=tokenizer,
                          peft_config=get_peft_config(args.model))
    return common.train_and_record("opsd", trainer, run.plan, args.all, data, launch, args.script.rank_fingerprint)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
