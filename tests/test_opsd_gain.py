"""OPSD on the warm-started arithmetic world raises held-out no-hint accuracy (paired, exact McNemar).

Measured 2026-11-22 on world v4 (start 65/300 = 21.7% on these problems): the default (reverse KL, no clip),
150 steps, batch 64, lr 1e-3 linear decay -> 100/300 = 33.3% (52 up / 17 down, exact McNemar p = 3e-5).
"""

import pytest

from harness.stats import mcnemar_test, wilson_interval
from harness.world.arithmetic import generate_problems
from harness.world.arms import Arm, no_hint_correctness, train_arm


@pytest.mark.slow
def test_default_opsd_beats_the_warm_start_on_paired_held_out_problems(warm_world, tmp_path):
    problems = generate_problems(300, "test")
    start = no_hint_correctness(warm_world.path, problems)
    # The trainer's defaults plus the world's batch/length settings: no overrides of the loss.
    path, history = train_arm(Arm("opsd_default"), warm_world.path, tmp_path, max_steps=150)
    after = no_hint_correctness(path, problems)

    test = mcnemar_test(start, after)
    low, high = wilson_interval(sum(after), len(after))
    message = (
        f"no-hint accuracy {sum(start) / len(start):.1%} -> {sum(after) / len(after):.1%} "
        f"(95% CI {low:.1%}-{high:.1%}) on {len(problems)} paired problems; discordant {test.b01} up / "
        f"{test.b10} down, exact McNemar p = {test.pvalue:.2g}"
    )
    print(message)
    assert sum(after) > sum(start) and test.pvalue < 0.05, message
    logged = [row for row in history if "kl_max_over_mean" in row]
    assert logged and all(row["on_policy_fraction"] == 1.0 for row in logged)
