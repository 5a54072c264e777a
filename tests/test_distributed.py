"""Two real processes: recipes/opsd.py under CPU DDP and under DeepSpeed ZeRO-2, launched by `accelerate launch`.

Each rank writes its world size, a hash of the first batch it draws and a hash of its final weights
(``--rank_fingerprint``). Ranks that drew different batches yet ended with identical weights, different from
the initial ones, had their gradients synchronised; two independent copies would report world size 1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes.common import FINGERPRINT_DIR, MANIFEST_NAME, tensor_digest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A deterministic, untrained tiny Llama and its tokenizer, saved like any local checkpoint."""
    from harness.tiny_models import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder, tensor_digest(dict(model.named_parameters()))


def launch(accelerate_config: str, checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / accelerate_config),
        str(REPO / "recipes" / "opsd.py"), "--config", str(REPO / "recipes/configs/opsd_arith_cpu.yaml"),
        "--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--rank_fingerprint",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--num_train_rows", "32", "--max_new_tokens", "8",
        "--learning_rate", "1e-2", "--logging_steps", "1",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent, timeout=900)


def check_ranks_agree(done: subprocess.CompletedProcess, out: Path, initial_digest: str) -> dict:
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    records = [json.loads((out / FINGERPRINT_DIR / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 3 for r in records)
    assert records[0]["first_batch_sha256"] != records[1]["first_batch_sha256"]  # each rank its own shard
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"] != initial_digest
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "completed" and manifest["train"]["global_step"] == 3
    return manifest


@pytest.fixture(scope="module")
def ddp_run(tiny_checkpoint, tmp_path_factory):
    checkpoint, initial = tiny_checkpoint
    out = tmp_path_factory.mktemp("ddp") / "out"
    return out, launch("cpu_ddp.yaml", checkpoint, out), initial


def test_two_process_cpu_ddp_run_of_the_opsd_recipe_keeps_ranks_in_sync(ddp_run):
    out, done, initial = ddp_run
    manifest = check_ranks_agree(done, out, initial)
    accelerate = manifest["plan"]["accelerate"]
    assert (accelerate["distributed"], accelerate["num_processes"]) == ("ddp", 2)
    assert "use_cpu" in accelerate["forced_on_this_machine"]


def test_two_process_deepspeed_zero2_cpu_run_agrees_with_ddp(ddp_run, tiny_checkpoint, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'trl-opsd[deepspeed]')")
    checkpoint, initial = tiny_checkpoint
    out = tmp_path / "out"
    # The first DeepSpeed run on a machine JIT-compiles its CPU shared-memory all-reduce op (minutes, then cached).
    manifest = check_ranks_agree(launch("deepspeed_zero2_cpu.yaml", checkpoint, out), out, initial)
    accelerate = manifest["plan"]["accelerate"]
    assert (accelerate["distributed"], accelerate["zero_stage"], accelerate["num_processes"]) == ("deepspeed", 2, 2)
    assert set(accelerate["forced_on_this_machine"]) == {"use_cpu", "ddp_backend"}
    # Same data, same updates: ZeRO-2's sharded optimizer ends where DDP's replicated one does.
    ddp_weights, zero2_weights = (load_file(str(folder / "model.safetensors")) for folder in (ddp_run[0], out))
    assert ddp_weights.keys() <= zero2_weights.keys()  # DeepSpeed's save also writes the tied lm_head
    for name in ddp_weights:
        torch.testing.assert_close(zero2_weights[name], ddp_weights[name])
