"""The unified meta-algorithm (seed notebook, section 9): loss = lambda * distillation + alpha * REINFORCE(reward).

One recipe for SFT-RS, outcome RL, OPD, OPSD and Hinton KD: pick a ``preset`` (``sft_rs``, ``rl_outcome``,
``opd``, ``opsd``, ``kd``; see ``trl_opsd/unified.py``) or set ``reward_weight`` (alpha),
``distillation_weight`` (lambda), ``teacher_kind`` and ``sampler`` yourself. GKD's ``lmbda`` (the on-policy
fraction) follows from the sampler. The reward is ``reward_funcs`` (default ``math_answer``: 1 when the final
answer matches the row's ``answer``).

    python recipes/unified.py --config recipes/configs/unified_opsd_arith_cpu.yaml
    python recipes/unified.py --config recipes/configs/unified_opsd_arith_cpu.yaml --preset rl_outcome --kl_clip null
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import common, distill  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return distill.run("unified", argv)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
