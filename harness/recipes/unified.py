"""The unified meta-algorithm (seed notebook, section 9): loss = lambda * distillation + alpha * REINFORCE(reward).

One recipe for SFT-RS, outcome RL, OPD, OPSD and Hinton KD: pick a ``preset`` (``sft_rs``, ``rl_outcome``,
``opd``, ``opsd``, ``kd``; see ``trl_opsd/unified.py``) or set ``reward_weight`` (alpha),
``distillation_weight`` (lambda), ``teacher_kind`` and ``sampler`` yourself. GKD's ``lmbda`` (the on-policy
fraction) follows from the sampler. The reward is ``reward_funcs`` (default ``math_answer``: 1 when the final
answer matches the row's ``answer``).

    trl-opsd unified --config unified_opsd_arith_cpu
    trl-opsd unified --config unified_opsd_arith_cpu --preset rl_outcome --kl_clip null
"""

import sys

from trl import get_peft_config

from harness.recipes import common, distill, student
from trl_opsd.unified import UnifiedTrainer


def main(argv: list[str] | None = None) -> int:
    launch = common.detect_launch()
    args = distill.parse("unified", argv, launch)
    run = distill.make_plan("unified", args, launch)  # loads nothing
    common.print_plan("unified", run.plan, args.script.dry_run)
    if args.script.dry_run:
        return distill.dry_run("unified", run)

    args, data = run.args, distill.train_data(run)
    model, tokenizer = student.load(run.student, args.training, args.model)
    teacher, teacher_tokenizer = distill.build_teacher(run, tokenizer)  # (None, None) for self / none
    rewards = [distill.REWARD_FUNCTIONS[name] for name in args.reward.reward_funcs]
    trainer = UnifiedTrainer(model=model, teacher_model=teacher, args=args.training, train_dataset=data.train,
                             processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
                             peft_config=get_peft_config(args.model), reward_funcs=rewards)
    return common.train_and_record("unified", trainer, run.plan, args.all, data, launch,
                                   args.script.rank_fingerprint)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
