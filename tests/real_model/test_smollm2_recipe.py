"""The OPSD recipe on a real pretrained chat model, launched as a user launches it (LoRA, adapter-disabled teacher)."""

import ast
import json
import math
import re
import sys

import pytest
from safetensors.torch import load_file

from harness.recipes.common import DRY_RUN_MANIFEST_NAME, MANIFEST_NAME
from real_model.conftest import CPU_SINGLE, GSM8K_MINI, LORA_CONFIG, console_script, run_command

LOGGED = re.compile(r"\{'loss': [^}]*\}")  # the Trainer's console log line of each logging step


def logged_steps(stdout: str) -> list[dict[str, float]]:
    return [{key: float(value) for key, value in ast.literal_eval(line).items()} for line in LOGGED.findall(stdout)]


@pytest.mark.slow
def test_lora_opsd_run_trains_the_adapter_with_finite_metrics(lora_run, smollm2):
    out, done = lora_run
    assert "opsd: trained 3 steps" in done.stdout
    assert "adapters disabled" in done.stdout  # the plan names the self-teacher the trainer uses

    steps = logged_steps(done.stdout)
    assert len(steps) == 3, done.stdout[-3000:]
    for step in steps:
        assert all(math.isfinite(value) for value in step.values()), step
        assert step["kl_mean"] > 0 and step["privileged_rows_fraction"] == 1.0  # the teacher saw the answer
        assert 0 < step["completion_length"] <= 16

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "completed" and manifest["train"]["global_step"] == 3
    assert math.isfinite(manifest["train"]["metrics"]["train_loss"])

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == str(smollm2)
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 30  # q, k, v, o in each of the 30 layers
    assert all(tensor.abs().max() > 0 for tensor in lora_b)  # B starts at zero: every adapter got a gradient
    assert not (out / "model.safetensors").exists()  # an adapter run: the base weights are not copied


def test_dry_run_plans_the_lora_run_without_loading_weights(smollm2, tmp_path):
    """The plan needs the model's config and tokenizer only: a folder without the weights file must plan."""
    no_weights = tmp_path / "smollm2_without_weights"
    no_weights.mkdir()
    for entry in smollm2.iterdir():
        if not entry.name.endswith(".safetensors"):
            (no_weights / entry.name).symlink_to(entry)
    out = tmp_path / "run"
    done = run_command([
        console_script("trl-opsd"), "opsd", "--config", LORA_CONFIG, "--model_name_or_path", no_weights,
        "--dataset_name", GSM8K_MINI, "--output_dir", out, "--dry_run",
        "--accelerate_config", CPU_SINGLE,
    ], cwd=tmp_path, timeout=600)
    assert "trl-opsd recipe plan: opsd (dry run: nothing loaded)" in done.stdout
    assert str(no_weights) in done.stdout and "adapters disabled" in done.stdout
    plan = json.loads((out / DRY_RUN_MANIFEST_NAME).read_text())
    assert plan["status"] == "dry_run" and plan["dataset"]["num_rows"] == 20
    assert sorted(p.name for p in out.iterdir()) == [DRY_RUN_MANIFEST_NAME]  # no adapter, no run manifest
