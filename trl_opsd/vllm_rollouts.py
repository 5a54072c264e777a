"""Student rollouts with vLLM: TRL's ``VLLMGeneration`` configured from ``OPSDConfig``'s ``vllm_*`` knobs."""

from __future__ import annotations

from functools import partial
from unittest.mock import patch

import torch
from trl.trainer.utils import pad

from trl_opsd.forward import unpadded_rows


def _colocated_on_cpu(mode: str) -> bool:
    if mode != "colocate":
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:  # TRL's constructor reports the missing vLLM
        return False
    return current_platform.is_cpu()


def _repack_tied_lm_head(worker) -> None:
    """Re-pack a vLLM worker's LM head that shares its weight with the input embedding.

    The reload updates the shared weight and re-packs the embedding, but the head's oneDNN handle still holds the
    old embedding, so the logits would come from the previous step's head."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    if head is not None and any(module is not head and getattr(module, "weight", None) is head.weight
                                for module in model.modules()):
        head.quant_method.process_weights_after_loading(head)


def _cpu_vllm_generation_class(base):
    """``base`` (TRL's ``VLLMGeneration``) for a colocated engine on CPU: a weight sync that vLLM's CPU backend accepts,
    and the student's dtype.

    TRL pushes each parameter through the model's ``load_weights``, which fails on CPU
    (``AttributeError: 'Parameter' object has no attribute 'weight_loader'``): vLLM's CPU linear layers repack their
    weights for oneDNN after loading and leave empty parameters behind. vLLM's in-place reload (the worker's
    ``reload_weights``) restores the checkpoint layout, loads, and repacks (a tied LM head excepted, re-packed after).

    The engine also runs in the student's dtype: TRL builds it with vLLM's ``dtype="auto"``, which casts a float32
    checkpoint to bfloat16, so fp32 CPU training would sample from a bfloat16 copy of the policy."""

    class CPUVLLMGeneration(base):
        def _init_vllm(self):
            import trl.generation.vllm_generation as trl_vllm

            with patch.object(trl_vllm, "LLM", partial(trl_vllm.LLM, dtype=self.model.dtype)):
                super()._init_vllm()

        def sync_weights(self):
            # In-process engine (external_launcher): the generator reaches the worker as is, and parameters are
            # gathered one at a time as vLLM loads them.
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=self._iter_named_params(),
                                                                  is_checkpoint_format=True))
            self.llm.collective_rpc(_repack_tied_lm_head)
            self.llm.reset_prefix_cache()

    return CPUVLLMGeneration


def vllm_generation(args, model, accelerator, processing_class):
    """TRL's vLLM backend (the one ``DistillationTrainer`` uses) for student rollouts, from ``args``' ``vllm_*`` knobs
    (an ``OPSDConfig``)."""
    from trl.generation.vllm_generation import VLLMGeneration

    backend = _cpu_vllm_generation_class(VLLMGeneration) if _colocated_on_cpu(args.vllm_mode) else VLLMGeneration
    return backend(
        model=model,
        accelerator=accelerator,
        processing_class=processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        # One call per accumulation window (see OPSDTrainer.get_batch_samples), gathered across the tensor-parallel
        # group.
        max_num_seqs=(args.per_device_train_batch_size * args.gradient_accumulation_steps
                      * args.vllm_tensor_parallel_size),
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        # The same sampler as the transformers path: the policy itself at `temperature`, no truncation.
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_completion_length=args.max_new_tokens,
        logprobs=None,
    )


def attach_vllm_completions(vllm_generation, batches: list[dict], pad_token_id: int) -> None:
    """Fill each batch's ``completions`` / ``completion_mask`` (right-padded, as ``OPSDTrainer._sample`` lays them
    out) from ONE ``vllm_generation.generate`` call over every prompt of the window, as TRL's trainers do, so vLLM
    batches all prompts of the optimizer step together."""
    prompts = [row for b in batches for row in unpadded_rows(b["prompts"], b["prompt_attention_mask"])]
    _, completion_ids, _, _ = vllm_generation.generate(prompts=prompts, images=None, num_generations=1)
    start = 0
    for batch in batches:
        size = batch["prompts"].shape[0]
        device = batch["prompts"].device
        rows = [torch.tensor(ids, dtype=torch.long, device=device) for ids in completion_ids[start:start + size]]
        start += size
        batch["completions"] = pad(rows, padding_value=pad_token_id, padding_side="right")
        # vLLM stops at the first EOS and returns it, so every returned token counts (GKD's mask keeps the EOS).
        batch["completion_mask"] = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="right")
