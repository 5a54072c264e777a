"""The trained model of every recipe: how the plan describes it and how it is loaded.

``ModelConfig`` carries its options (dtype, 4-/8-bit, LoRA); the VRAM decision may have switched them
to 4-bit + LoRA before anything here runs.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer
from trl import ModelConfig

from harness.recipes import memory, models


def precision_of(dtype: str | None, load_in_4bit: bool, load_in_8bit: bool) -> memory.Precision:
    """``dtype`` "auto"/None is planned as bf16 (what current checkpoints hold)."""
    base = "bfloat16" if dtype in (None, "auto") else dtype
    return memory.Precision(base, "4bit" if load_in_4bit else "8bit" if load_in_8bit else None)


def describe_peft(model_args: ModelConfig) -> str:
    if not model_args.use_peft:
        return "none (full fine-tuning)"
    targets = model_args.lora_target_modules or "PEFT's default for the architecture"
    return (f"LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}, "
            f"targets={targets}")


def describe(spec: models.ModelSpec, parameters: int | None, parameters_source: str,
             model_args: ModelConfig) -> dict[str, Any]:
    return {
        **spec.describe(),
        "parameters": parameters,
        "parameters_source": parameters_source,
        "precision": precision_of(model_args.dtype, model_args.load_in_4bit, model_args.load_in_8bit).describe(),
        "peft": describe_peft(model_args),
    }


def load(spec: models.ModelSpec, training_args, model_args: ModelConfig):
    """(model, tokenizer); quantized models land on this process's device."""
    path = models.materialize(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # TRL's convention; EOS stays inside completion masks
    quantization = models.quantization_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.dtype,
                                              model_args.bnb_4bit_quant_type, model_args.use_bnb_nested_quant,
                                              model_args.bnb_4bit_quant_storage)
    model = models.load_causal_lm(path, dtype=model_args.dtype, quantization=quantization,
                                  revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                                  attn_implementation=model_args.attn_implementation,
                                  extra=training_args.model_init_kwargs)
    training_args.model_init_kwargs = None  # consumed here: the trainer gets an instance
    return model, tokenizer
