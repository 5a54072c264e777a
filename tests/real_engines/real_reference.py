"""In-process references for the real-server tests: the served model's own fp32 log-softmax and greedy text."""

from __future__ import annotations

from functools import cache

import torch

from harness.world.arithmetic import generate_problems


@cache
def load_model(model_dir: str):
    """(model, tokenizer) as the student side loads them: fp32, CPU, eval mode."""
    from harness.world.warm_start import load

    model, tokenizer = load(model_dir)
    return model.eval(), tokenizer


def chats(n: int, split: str = "validation") -> list[list[dict]]:
    return [p.to_row()["messages"] for p in generate_problems(n, split)]


def prompt_ids(tokenizer, chat: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def scoring_batch(model, tokenizer, n: int = 6, max_new_tokens: int = 24) -> tuple[list[list[int]], list[list[int]]]:
    """Chat prompts of the world's problems and completions sampled from the model (temperature 1, fixed seed):
    what OPD scores, including unlikely tokens."""
    prompts = [prompt_ids(tokenizer, chat) for chat in chats(n)]
    completions = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
                if ids[-1] == tokenizer.eos_token_id:
                    break
            completions.append(ids[len(prompt):])
    return prompts, completions


@torch.no_grad()
def completion_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), V]: the log-softmax that predicts each completion token."""
    logits = model(torch.tensor([prompt + completion])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) + len(completion) - 1]


def assert_topk_equal(scores, model, prompts, completions, k: int, atol: float = 1e-4) -> None:
    """The teacher's top-k and sampled-token log-probs equal the model's own, row by row.

    Ids must agree except where neighbouring log-probs are within ``atol`` (a near tie may order either way
    between two fp32 kernels); there the values still must agree.
    """
    assert scores.topk_ids.shape == (len(prompts), max(map(len, completions)), k)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        t = len(completion)
        dist = completion_logprobs(model, prompt, completion)
        assert scores.mask[b, :t].all() and not scores.mask[b, t:].any()
        sampled = dist.gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(scores.sampled_logprobs[b, :t], sampled, atol=atol, rtol=0)
        if not k:
            continue
        top = dist.topk(k)
        torch.testing.assert_close(scores.topk_logprobs[b, :t], top.values, atol=atol, rtol=0)
        # the model's log-prob of each id the server named must be the value the server gave it
        torch.testing.assert_close(dist.gather(1, scores.topk_ids[b, :t]), scores.topk_logprobs[b, :t], atol=atol,
                                   rtol=0)
        differ = scores.topk_ids[b, :t] != top.indices
        gaps = (top.values[:, :-1] - top.values[:, 1:]).abs()
        near_tie = torch.zeros_like(differ)
        near_tie[:, :-1] |= gaps < atol
        near_tie[:, 1:] |= gaps < atol
        assert not (differ & ~near_tie).any(), f"row {b}: top-{k} ids differ away from near ties"


def greedy_texts(model, tokenizer, chats_: list[list[dict]], max_new_tokens: int) -> list[str]:
    from harness.generation import generate_texts

    return generate_texts(model, tokenizer, chats_, max_new_tokens=max_new_tokens, batch_size=1)
