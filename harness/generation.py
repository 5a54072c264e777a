"""Batched chat generation with a local transformers model, and verifier-scored accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harness.verifiers import is_correct


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict]],
    max_new_tokens: int = 48,
    batch_size: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """The assistant reply to each chat (greedy when ``temperature == 0``), special tokens removed.

    Prompts are left-padded so every row's completion starts at the same column; the KV cache is on.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    texts: list[str] = []
    try:
        batches = range(0, len(chats), batch_size)
        for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
            prompts = [
                tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                for chat in chats[start : start + batch_size]
            ]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = encoded.to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            completions = output[:, encoded["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(completions, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        if seed is not None:
            torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return texts


def score_answers(completions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Verifier verdict (exact final-answer match) for each completion."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [is_correct(text, gold) for text, gold in zip(completions, answers)]
