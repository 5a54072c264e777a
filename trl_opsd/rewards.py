"""Reward functions in TRL's ``reward_funcs`` style.

A reward function is called as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` with
one entry per sampled completion, where ``columns`` are the dataset's other columns (``answer``, ...)
repeated to match, plus ``trainer_state``, exactly as ``trl.GRPOTrainer`` calls them. It returns one
float per completion (``None`` where the reward does not apply). Completions are strings for plain
prompts and ``[{"role": "assistant", "content": text}]`` for chat prompts.
"""

from __future__ import annotations

from trl_opsd.verify import is_correct


def completion_text(completion) -> str:
    """The text of a completion given as a string or as a chat (its last message's content)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def math_answer_reward(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when a completion's final answer equals the gold ``answer`` as a number, else 0.0; ``None`` for rows
    without a gold answer (the reward does not apply, as TRL's ``accuracy_reward`` skips unparseable gold).

    Exact final-answer match through :func:`trl_opsd.verify.is_correct` (``#### N``, "The answer is
    N", ``\\boxed{N}``, else the last number; commas, dollar signs and trailing periods ignored). A gold
    answer that is not a number raises: that is a data error, not a row the reward skips.
    """
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} gold answers")
    return [
        None if gold is None else float(is_correct(completion_text(completion), gold))
        for completion, gold in zip(completions, answer)
    ]
