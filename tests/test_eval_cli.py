"""``trl-opsd eval``'s defaults for lm-eval's hf model: adapter-only runs and the batch size.

The end-to-end test evaluates a LoRA adapter saved over the shipped arithmetic-world model, named the way
the README names a run (``pretrained=<run dir>``), and checks lm-eval loaded base + adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from lm_eval._cli import HarnessCLI
from peft import LoraConfig, get_peft_model

from harness import cli
from harness.lm_eval_runner import CPU_BATCH_SIZE, EvalSetupError, apply_hf_defaults, is_adapter_run


def parsed(argv: list[str], monkeypatch):
    """lm-eval's namespace for ``lm-eval ARGV`` (what ``trl-opsd eval`` adjusts before running it)."""
    monkeypatch.setattr(sys, "argv", ["lm-eval", *argv])
    return HarnessCLI().parse_args()


def save_adapter(warm_world, run_dir: Path) -> Path:
    """A LoRA run folder as the recipes leave it: adapter weights + tokenizer, no full weights. The adapter
    is not the identity (init_lora_weights=False), so base alone and base + adapter generate differently."""
    model, tokenizer = warm_world.load()
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    return run_dir


def test_batch_size_defaults_to_a_fixed_size_on_cpu_auto_on_gpu_and_keeps_the_users(monkeypatch, tmp_path):
    namespace = parsed(["--model", "hf", "--model_args", "pretrained=gpt2", "--tasks", "opsd_arith"], monkeypatch)
    [note] = apply_hf_defaults(namespace, has_gpu=False)
    assert namespace.batch_size == str(CPU_BATCH_SIZE) and "lm-eval's own is 1" in note
    namespace = parsed(["--model_args", "pretrained=gpt2", "--tasks", "opsd_arith"], monkeypatch)  # hf by default
    apply_hf_defaults(namespace, has_gpu=True)
    assert namespace.batch_size == "auto"
    namespace = parsed(["--model_args", "pretrained=gpt2", "-b", "3", "--tasks", "opsd_arith"], monkeypatch)
    assert apply_hf_defaults(namespace, has_gpu=False) == [] and namespace.batch_size == "3"
    config = tmp_path / "eval.yaml"
    config.write_text("model: hf\nbatch_size: 5\nmodel_args: pretrained=gpt2\ntasks: [opsd_arith]\n")
    namespace = parsed(["--config", str(config)], monkeypatch)
    assert apply_hf_defaults(namespace, has_gpu=False) == [] and not getattr(namespace, "batch_size", None)
    namespace = parsed(["--model", "local-chat-completions", "--model_args", "model=m", "--tasks", "opsd_arith"],
                       monkeypatch)
    assert apply_hf_defaults(namespace, has_gpu=False) == [] and not getattr(namespace, "batch_size", None)


def test_an_adapter_run_is_evaluated_as_base_plus_peft(warm_world, tmp_path, monkeypatch):
    run_dir = save_adapter(warm_world, tmp_path / "lora_run")
    assert is_adapter_run(run_dir) and not is_adapter_run(warm_world.path)
    namespace = parsed(["--model_args", f"pretrained={run_dir}", "dtype=float32", "--tasks", "opsd_arith"],
                       monkeypatch)
    notes = apply_hf_defaults(namespace, has_gpu=False)
    assert namespace.model_args == {"pretrained": warm_world.path, "peft": str(run_dir), "tokenizer": str(run_dir),
                                    "dtype": "float32"}
    assert "LoRA/PEFT adapter" in notes[0] and f"pretrained={warm_world.path},peft={run_dir}" in notes[0]
    # A full-weights folder and an explicit peft= are left alone.
    namespace = parsed(["--model_args", f"pretrained={warm_world.path},peft={run_dir}", "--tasks", "x"], monkeypatch)
    apply_hf_defaults(namespace, has_gpu=False)
    assert namespace.model_args == {"pretrained": warm_world.path, "peft": str(run_dir)}


def test_an_adapter_whose_base_is_not_local_is_refused_with_what_to_pass(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "lora_run"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "no-such-org/no-such-model",
                                                             "peft_type": "LORA"}))
    namespace = parsed(["--model_args", f"pretrained={run_dir}", "--tasks", "opsd_arith"], monkeypatch)
    with pytest.raises(EvalSetupError, match="neither a local folder nor in the Hugging Face cache"):
        apply_hf_defaults(namespace, has_gpu=False)
    status = cli.main(["eval", "--model", "hf", "--model_args", f"pretrained={run_dir}", "--tasks", "opsd_arith"])
    assert status == 2
    assert f"--model_args pretrained=<base path>,peft={run_dir}" in capsys.readouterr().err


def test_trl_opsd_eval_loads_a_lora_run_by_itself(warm_world, tmp_path, capsys):
    """The README's command on a LoRA run folder: lm-eval gets base + adapter and the CPU batch size, and the
    responses are the adapted model's (they differ from the base model's on the same documents)."""
    run_dir = save_adapter(warm_world, tmp_path / "lora_run")
    outputs = {}
    for name, model_args in {"lora": f"pretrained={run_dir},dtype=float32",
                             "base": f"pretrained={warm_world.path},dtype=float32"}.items():
        out = tmp_path / name
        status = cli.main(["eval", "--model", "hf", "--model_args", model_args, "--tasks", "opsd_arith",
                           "--apply_chat_template", "--log_samples", "--output_path", str(out), "--limit", "4",
                           "--device", "cpu"])
        assert status == 0
        [results] = out.rglob("results_*.json")
        outputs[name] = (json.loads(results.read_text()),
                         [json.loads(line) for line in next(out.rglob("samples_opsd_arith_*.jsonl")).open()])
    err = capsys.readouterr().err
    assert "holds a LoRA/PEFT adapter" in err and f"--batch_size {CPU_BATCH_SIZE}" in err
    results, samples = outputs["lora"]
    assert results["config"]["model_args"]["peft"] == str(run_dir)
    assert results["config"]["model_args"]["pretrained"] == warm_world.path
    assert results["config"]["batch_size"] == str(CPU_BATCH_SIZE)
    lora_responses = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    base_responses = [s["resps"][0][0] for s in sorted(outputs["base"][1], key=lambda s: s["doc_id"])]
    assert len(lora_responses) == 4 and lora_responses != base_responses
