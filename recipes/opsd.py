"""On-policy self-distillation (OPSD): the student learns from itself, shown privileged context.

The teacher is the student's initial policy (LoRA adapters disabled, or a frozen copy without PEFT),
scoring the student's own rollouts under a prompt that also carries the gold answer (or the row's
``privileged_context`` / ``teacher_messages``).

    # CPU, offline, the arithmetic world
    python recipes/opsd.py --config recipes/configs/opsd_arith_cpu.yaml
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/opsd.py \
        --config recipes/configs/opsd_arith_cpu.yaml

    # the OPSD paper's settings (Qwen3-1.7B, forward KL, per-token clip 0.05, LoRA self-teacher)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/opsd.py \
        --config recipes/configs/opsd_qwen3_1p7b.yaml

    # any of them: print the resolved plan and stop (no weights, no hub)
    python recipes/opsd.py --config recipes/configs/opsd_qwen3_1p7b.yaml --dry_run \
        --accelerate_config accelerate_configs/multi_gpu.yaml --assume_gpu_memory_gb 80
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import common, distill  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return distill.run("opsd", argv)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
