"""Student rollouts with vLLM: TRL's ``VLLMGeneration`` configured from ``OPSDConfig``'s ``vllm_*`` knobs."""

from __future__ import annotations


def vllm_generation(args, model, accelerator, processing_class):
    """TRL's vLLM backend (the one ``DistillationTrainer`` uses) for student rollouts, from ``args``' ``vllm_*`` knobs
    (an ``OPSDConfig``)."""
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
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
