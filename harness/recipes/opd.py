"""On-policy distillation (OPD): the student learns from an external teacher on its own rollouts.

The teacher is an in-process model with the student's tokenizer (``teacher_model_name_or_path``,
optionally 4-bit with ``teacher_load_in_4bit``) or an OpenAI-compatible server (``teacher_api_base`` +
``teacher_api_model``, with ``divergence: topk`` or ``sampled``: servers return log-probs, not logits).
By default the teacher sees the student's own prompt (``privileged_from`` is unset here; set it to
give the teacher the answer as well).

    trl-opsd opd --config opd_arith_cpu
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m harness.recipes.opd \\
        --config opd_mistral7b_mixtral_gsm8k
    # a vLLM server as the teacher (top-k forward KL on its top-20 log-probs)
    trl-opsd opd --config opd_arith_cpu --teacher_model_name_or_path "" \\
        --teacher_api_base http://localhost:8000/v1 --teacher_api_model my-teacher --divergence topk
"""

import sys

from trl import get_peft_config

from harness.recipes import common, distill, student
from trl_opsd import OPSDTrainer


def main(argv: list[str] | None = None) -> int:
    launch = common.detect_launch()
    args = distill.parse("opd", argv, launch)
    run = distill.make_plan("opd", args, launch)  # loads nothing
    common.print_plan("opd", run.plan, args.script.dry_run)
    if args.script.dry_run:
        return distill.dry_run("opd", run)

    args, data = run.args, distill.train_data(run)
    model, tokenizer = student.load(run.student, args.training, args.model)
    teacher, teacher_tokenizer = distill.build_teacher(run, tokenizer)
    trainer = OPSDTrainer(model=model, teacher_model=teacher, args=args.training, train_dataset=data.train,
                          processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
                          peft_config=get_peft_config(args.model))
    return common.train_and_record("opd", trainer, run.plan, args.all, data, launch, args.script.rank_fingerprint)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
