"""QLoRA on CPU: the tiny model in 4-bit NF4 through BitsAndBytesConfig, LoRA on top, adapter-disabled self-teacher.

bitsandbytes >= 0.45 runs 4-bit layers on CPU; this is the seed notebook's Mistral-7B setting in miniature.
"""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

REPO = Path(__file__).resolve().parents[1]

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'trl-opsd[quant]')")

from harness.recipes import models, opsd  # noqa: E402
from harness.recipes.common import MANIFEST_NAME  # noqa: E402
from harness.world.arithmetic import generate_problems, problems_to_rows  # noqa: E402
from trl_opsd import OPSDConfig, OPSDTrainer  # noqa: E402
from trl_opsd.teachers.local import AdapterDisabledTeacher, completion_logits  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from harness.world.tiny import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_4bit(path):
    quantization = models.quantization_config(load_in_4bit=True, load_in_8bit=False, dtype="float32")
    return models.load_causal_lm(str(path), dtype="float32", quantization=quantization)


def test_opsd_steps_with_qlora_and_the_adapter_disabled_self_teacher(tiny_checkpoint, tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    model, reference = load_4bit(tiny_checkpoint), load_4bit(tiny_checkpoint)
    assert model.is_loaded_in_4bit
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized.values())
    packed_before = {n: m.weight.detach().clone() for n, m in quantized.items()}

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    args = OPSDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, max_new_tokens=8,
                      learning_rate=5e-2, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      logging_steps=1, gradient_checkpointing=False)
    trainer = OPSDTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(problems_to_rows(generate_problems(8, "train"))),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert isinstance(trainer.teacher, AdapterDisabledTeacher) and trainer.teacher_model is None
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_before and all((p == 0).all() for p in lora_before.values())  # PEFT starts LoRA-B at zero

    result = trainer.train()

    assert torch.isfinite(torch.tensor(result.training_loss))
    lora_after = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)  # the adapters learned
    quantized_after = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
                       for n, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized_after.keys() == packed_before.keys()
    assert all(torch.equal(packed_before[n], quantized_after[n].weight) for n in packed_before)  # 4-bit base frozen

    # The teacher is the initial policy: the trained model with adapters off equals a fresh 4-bit load.
    rows = problems_to_rows(generate_problems(3, "validation"), with_solution=True)
    batch = trainer._attach_completions(trainer.data_collator(rows), "dataset")
    ids = torch.cat([batch["teacher_prompts"], batch["completions"]], 1)
    mask = torch.cat([batch["teacher_prompt_attention_mask"], batch["completion_mask"]], 1)
    width = batch["completions"].shape[1]
    teacher = trainer.teacher.completion_logits(trainer.model, ids, mask, width)
    with torch.no_grad():
        torch.testing.assert_close(teacher, completion_logits(reference, ids, mask, width), atol=1e-5, rtol=1e-5)
        student = completion_logits(trainer.model, ids, mask, width)
    assert (student - teacher).abs().max() > 1e-4


def test_the_opsd_recipe_trains_in_4bit_with_lora_on_cpu_when_asked(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    code = opsd.main([
        "--config", str(REPO / "harness/recipes/configs/opsd_arith_cpu.yaml"), "--model_name_or_path", str(tiny_checkpoint),
        "--load_in_4bit", "true", "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_train_rows", "8", "--max_new_tokens", "8",
        "--output_dir", str(out),
    ])
    assert code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "completed" and manifest["train"]["global_step"] == 2
    plan = manifest["plan"]
    assert plan["student"]["precision"] == "4bit (compute float32)" and plan["student"]["peft"].startswith("LoRA r=4")
    assert "adapters disabled" in plan["teacher"]["what"]
    assert (out / "adapter_model.safetensors").exists()  # PEFT saves the adapter, not the 4-bit base
