"""Rollouts with ``transformers``' ``generate``: the dynamic-cache path (``"hf"``) and the static-cache one
(``"hf_static"``), which preallocates the KV cache and compiles the decode step.

A compiled decode step only pays off when its shapes repeat, so ``"hf_static"`` feeds ``generate`` fixed shapes:
prompts are left-padded to a width bucket (a power of two, capped at the prompt limit) and the batch is filled up to
the configured micro-batch size with copies of its first row, whose completions are dropped. The static cache is then
``bucket + max_new_tokens`` long; ``generate`` keeps the longest cache it has seen, so after the largest bucket has
been met every call reuses the same compiled graph. The prefill runs uncompiled (``generate``'s own choice).

``transformers`` compiles the decode step by itself on CUDA / XPU / TPU / Neuron, never on CPU; ``rollout_compile``
makes that explicit (``None``: transformers' choice, ``True``: compile on any device, CPU included, ``False``: static
cache without compiling).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CompileConfig, GenerationConfig

SMALLEST_BUCKET = 16


def generation_config_for(backend: str, generation_kwargs: dict, compile_decode: bool | None) -> GenerationConfig:
    """The ``GenerationConfig`` of ``transformers`` rollouts for ``backend`` (``"hf"`` or ``"hf_static"``)."""
    if backend != "hf_static":
        return GenerationConfig(**generation_kwargs)
    compile_kwargs = {}
    if compile_decode is False:
        compile_kwargs["disable_compile"] = True
    elif compile_decode is True:
        compile_kwargs["compile_config"] = decode_compile_config(everywhere=True)
    return GenerationConfig(**generation_kwargs, cache_implementation="static", **compile_kwargs)


def decode_compile_config(everywhere: bool) -> CompileConfig:
    """``torch.compile`` settings for the decode step. ``everywhere``: also on CPU, where ``generate`` would not
    compile by itself; CUDA graphs (``reduce-overhead``, transformers' default) exist on CUDA only."""
    config = CompileConfig(mode="default" if not torch.cuda.is_available() else "reduce-overhead")
    config._compile_all_devices = everywhere  # transformers' documented switch for compiling off-accelerator
    return config


def check_static_rollouts(student: nn.Module, seq_kd_teacher: nn.Module | None, sharded: bool) -> None:
    """Refuse ``rollout_backend='hf_static'`` where it cannot run: parameters gathered per call (``sharded``: FSDP,
    DeepSpeed ZeRO-3), which a compiled decode step cannot hold, or a model without static-cache support (the
    student, and the teacher's own weights when ``seq_kd`` samples from it)."""
    if sharded:
        raise ValueError(
            "rollout_backend='hf_static' does not run under FSDP or DeepSpeed ZeRO-3 (the parameters are gathered "
            "for each generate call): set rollout_backend='hf' or 'vllm', or train with DDP / ZeRO-1/2"
        )
    require_static_cache(student, "student")
    if seq_kd_teacher is not None:
        require_static_cache(seq_kd_teacher, "teacher (seq_kd samples from it)")


def require_static_cache(model: nn.Module, where: str) -> None:
    """Raise unless ``model`` (``where``: which model, for the message) can generate with a static KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the transformers model
    # transformers 5 marks the architectures whose forward runs with a static cache under torch.compile this way
    # (transformers 4 called it `_supports_static_cache`).
    supported = getattr(base, "_can_compile_fullgraph", False) or getattr(base, "_supports_static_cache", False)
    if not supported:
        raise ValueError(
            f"rollout_backend='hf_static' needs a model that generates with a static KV cache, and the {where} "
            f"({type(base).__name__}) does not declare it (_can_compile_fullgraph is False): set "
            "rollout_backend='hf' (dynamic cache) or 'vllm'"
        )


def bucket_width(width: int, limit: int | None) -> int:
    """The padded prompt width for a batch ``width`` tokens wide: the next power of two (at least
    ``SMALLEST_BUCKET``), capped at ``limit`` (the prompt limit) when that is wider than ``width``."""
    bucket = max(SMALLEST_BUCKET, 1 << (width - 1).bit_length())
    return min(bucket, limit) if limit is not None and limit >= width else bucket


def fixed_shape_prompts(prompts: torch.Tensor, prompt_mask: torch.Tensor, pad_token_id: int, width: int,
                        rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` and ``prompt_mask`` left-padded to ``width`` columns and filled up to ``rows`` rows with copies of
    the first row (never an all-padding row: its attention would be empty)."""
    extra_columns = width - prompts.shape[1]
    if extra_columns > 0:
        prompts = torch.cat([prompts.new_full((prompts.shape[0], extra_columns), pad_token_id), prompts], dim=1)
        prompt_mask = torch.cat([prompt_mask.new_zeros((prompt_mask.shape[0], extra_columns)), prompt_mask], dim=1)
    extra_rows = rows - prompts.shape[0]
    if extra_rows > 0:
        prompts = torch.cat([prompts, prompts[:1].expand(extra_rows, -1)], dim=0)
        prompt_mask = torch.cat([prompt_mask, prompt_mask[:1].expand(extra_rows, -1)], dim=0)
    return prompts, prompt_mask


def drop_stale_input_grad_hooks(model: nn.Module) -> int:
    """Remove the input-embedding hooks that earlier ``gradient_checkpointing_enable`` calls left behind; the number
    removed.

    TRL turns gradient checkpointing off for each rollout and back on after it; every ``enable`` registers a new
    ``make_inputs_require_grads`` hook on the input embeddings without removing the previous one (only PEFT models
    remove it on ``disable``). Besides growing without bound, the hook count is part of a compiled decode step's
    guards, so every training step would recompile it. The hooks ``model`` still holds handles to are kept.
    """
    modules = [module for module in model.modules() if hasattr(module, "_require_grads_hooks")]
    kept = {handle.id for module in modules for handle in module._require_grads_hooks}
    removed = 0
    for module in model.modules():
        hooks = getattr(module, "_forward_hooks", None)
        if not hooks:
            continue
        for hook_id in [hook_id for hook_id, hook in hooks.items()
                        if getattr(hook, "__name__", "") == "make_inputs_require_grads" and hook_id not in kept]:
            del hooks[hook_id]
            removed += 1
    return removed
