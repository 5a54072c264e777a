"""On-policy distillation (OPD): the student learns from an external teacher on its own rollouts.

The teacher is an in-process model with the student's tokenizer (``teacher_model_name_or_path``,
optionally 4-bit with ``teacher_load_in_4bit``) or an OpenAI-compatible server (``teacher_api_base`` +
``teacher_api_model``, with ``divergence: topk`` or ``sampled``: servers return log-probs, not logits).
By default the teacher sees the student's own prompt (``privileged_from`` is unset here; set it to
give the teacher the answer as well).

    python recipes/opd.py --config recipes/configs/opd_arith_cpu.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/opd.py \
        --config recipes/configs/opd_mistral7b_mixtral_gsm8k.yaml
    # a vLLM server as the teacher (top-k forward KL on its top-20 log-probs)
    python recipes/opd.py --config recipes/configs/opd_arith_cpu.yaml --teacher_model_name_or_path "" \
        --teacher_api_base http://localhost:8000/v1 --teacher_api_model my-teacher --divergence topk
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import common, distill  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return distill.run("opd", argv)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
