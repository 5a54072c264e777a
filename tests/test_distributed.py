"""Two real processes: harness.recipes.opsd under CPU DDP and under DeepSpeed ZeRO-2, launched by `accelerate launch`.

FSDP is not run here: accelerate 1.15 applies FSDP only to GPU processes (with use_cpu it is plain CPU DDP, without
it the state is not distributed at all), so the FSDP teacher placement is unit-tested at the end of this file.

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

from harness.recipes.common import FINGERPRINT_DIR, MANIFEST_NAME, tensor_digest


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A deterministic, untrained tiny Llama and its tokenizer, saved like any local checkpoint."""
    from harness.world.tiny import build_tiny_model, build_tokenizer

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
        "-m", "harness.recipes.opsd", "--config", str(REPO / "harness/recipes/configs/opsd_arith_cpu.yaml"),
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


@pytest.mark.slow
def test_two_process_cpu_ddp_run_of_the_opsd_recipe_keeps_ranks_in_sync(ddp_run):
    out, done, initial = ddp_run
    manifest = check_ranks_agree(done, out, initial)
    accelerate = manifest["plan"]["accelerate"]
    assert (accelerate["distributed"], accelerate["num_processes"]) == ("ddp", 2)
    assert "use_cpu" in accelerate["forced_on_this_machine"]


@pytest.mark.slow
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


# -- FSDP: the trainer's teacher placement and refusals (single process; the FSDP flags are forced) -------------
def _fsdp_trainer(tiny_tokenizer, tmp_path, monkeypatch, fsdp_version=2, **config):
    from datasets import Dataset

    from harness.world.arithmetic import generate_problems, problems_to_rows
    from harness.world.tiny import build_tiny_model
    from trl_opsd import OPSDConfig, OPSDTrainer

    args = OPSDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, max_new_tokens=4,
                      report_to="none", use_cpu=True, bf16=False, save_strategy="no", **config)
    rows = problems_to_rows(generate_problems(4, "train", seed=0))
    trainer = OPSDTrainer(model=build_tiny_model(tiny_tokenizer, seed=0), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    trainer.is_fsdp_enabled = True
    plugin = type("Plugin", (), {"fsdp_version": fsdp_version})()
    from accelerate.state import AcceleratorState

    monkeypatch.setitem(AcceleratorState._shared_state, "fsdp_plugin", plugin)  # the state's attributes live here
    return trainer


@pytest.fixture
def tiny_tokenizer_for_fsdp():
    from harness.world.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("teacher_kind", ["frozen_copy", "external"])
def test_fsdp_places_a_frozen_teacher_with_trls_prepare_fsdp(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch,
                                                             teacher_kind):
    import trl_opsd.teacher_setup as setup_module
    from harness.world.tiny import build_tiny_model
    from trl_opsd.teachers.local import ModelTeacher

    trainer = _fsdp_trainer(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch)
    prepared = []
    monkeypatch.setattr(setup_module, "prepare_fsdp",
                        lambda module, accelerator: prepared.append((module, accelerator)) or module.eval())
    monkeypatch.setattr(trainer.accelerator, "prepare_model",
                        lambda *a, **k: pytest.fail("prepare_model(evaluation_mode=True) leaves it unplaced"))
    teacher_model = build_tiny_model(tiny_tokenizer_for_fsdp, seed=1) if teacher_kind == "external" else None
    backend, module = trainer._build_teacher(teacher_model, None)
    assert isinstance(backend, ModelTeacher) and backend.model is module
    assert [(m, a) for m, a in prepared] == [(module, trainer.accelerator)]
    assert module is not trainer.model and not any(p.requires_grad for p in module.parameters())


def test_fsdp_refuses_a_teacher_left_on_the_meta_device(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch):
    trainer = _fsdp_trainer(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch)
    with torch.device("meta"):
        from harness.world.tiny import build_tiny_model

        teacher = build_tiny_model(tiny_tokenizer_for_fsdp, seed=1)
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
        trainer._build_teacher(teacher, None)


def test_fsdp_refuses_the_ema_self_teacher_and_fsdp1(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch):
    trainer = _fsdp_trainer(tiny_tokenizer_for_fsdp, tmp_path / "ema", monkeypatch, self_teacher="ema")
    with pytest.raises(ValueError, match=r"self_teacher='ema' \(OPSDConfig.self_teacher\) is not supported under FSDP"):
        trainer._build_teacher(None, None)
    trainer = _fsdp_trainer(tiny_tokenizer_for_fsdp, tmp_path / "v1", monkeypatch, fsdp_version=1)
    with pytest.raises(ValueError, match="FSDP1 cannot run OPSDTrainer.*fsdp_version: 2"):
        trainer._build_teacher(None, None)


def test_fsdp_keeps_the_weightless_self_teachers(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch):
    from trl_opsd.teachers.local import LiveTeacher

    trainer = _fsdp_trainer(tiny_tokenizer_for_fsdp, tmp_path, monkeypatch, self_teacher="live")
    backend, module = trainer._build_teacher(None, None)
    assert isinstance(backend, LiveTeacher) and module is None
