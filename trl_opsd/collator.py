"""Student and teacher views of each row, tokenised and padded so completions line up.

A row (see the dataset contract in the README) becomes a student prompt, a teacher prompt (the same
chat plus privileged context) and, when the row has one, an off-policy completion. Prompts are
LEFT-padded and completions RIGHT-padded, so completion token ``t`` sits at column ``P + t`` of the
concatenated sequence for every row, whatever the prompt lengths: that is how teacher and student
log-probabilities are aligned by completion position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from trl_opsd.prompts import DEFAULT_ANSWER_CONTEXT_TEMPLATE, DEFAULT_TEACHER_PROMPT_TEMPLATE, insert_privileged_context


class RowError(ValueError):
    """A dataset row that cannot be used; the message names the row index and the field."""


@dataclass
class RowViews:
    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    completion_ids: list[int] | None
    has_privileged_context: bool
    teacher_prompt_truncated: bool


def _is_chat(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


@dataclass
class OPSDCollator:
    """Builds ``prompts``, ``teacher_prompts`` and (off-policy) ``completions`` tensors from raw rows."""

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int | None = 512
    max_teacher_prompt_length: int | None = 512
    max_completion_length: int | None = None
    privileged_from: str | None = "answer"
    answer_context_template: str = DEFAULT_ANSWER_CONTEXT_TEMPLATE
    teacher_prompt_template: str = DEFAULT_TEACHER_PROMPT_TEMPLATE
    privileged_truncation: str = "error"

    def __post_init__(self):
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before training")

    # -- one row -------------------------------------------------------------------------------
    def _split_row(self, row: dict, index: int):
        """(student prompt, completion or None) in the row's own format (chat list or plain string)."""
        if "messages" in row and row["messages"] is not None:
            messages = row["messages"]
            if not _is_chat(messages) or not messages:
                raise RowError(f"row {index}: field 'messages' must be a non-empty list of {{role, content}} dicts")
            if messages[-1]["role"] == "assistant":
                if len(messages) == 1:
                    raise RowError(f"row {index}: field 'messages' holds only an assistant turn and no prompt")
                return messages[:-1], messages[-1]["content"]
            return messages, None
        if "prompt" in row and row["prompt"] is not None:
            prompt, completion = row["prompt"], row.get("completion")
            if _is_chat(completion):
                completion = completion[-1]["content"] if completion else None
            if not prompt:
                raise RowError(f"row {index}: field 'prompt' is empty")
            return prompt, completion
        raise RowError(f"row {index}: has neither 'messages' nor 'prompt' (fields present: {sorted(row)})")

    def _teacher_prompt(self, row: dict, prompt, index: int):
        """(teacher prompt in the prompt's format, whether it carries privileged context)."""
        teacher_messages = row.get("teacher_messages")
        if teacher_messages:
            if not _is_chat(teacher_messages):
                raise RowError(f"row {index}: field 'teacher_messages' must be a list of {{role, content}} dicts")
            if teacher_messages[-1]["role"] == "assistant":
                teacher_messages = teacher_messages[:-1]
            return teacher_messages, True
        context = row.get("privileged_context")
        if not context and self.privileged_from and row.get(self.privileged_from) not in (None, ""):
            context = self.answer_context_template.format(**{self.privileged_from: row[self.privileged_from]})
        if not context:
            return prompt, False
        if _is_chat(prompt):
            try:
                return insert_privileged_context(prompt, context, self.teacher_prompt_template), True
            except ValueError as error:
                raise RowError(f"row {index}: field 'messages': {error}") from None
        return self.teacher_prompt_template.format(prompt=prompt, privileged_context=context), True

    def _encode_prompt(self, prompt) -> list[int]:
        if _is_chat(prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        else:
            text = prompt
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_completion(self, prompt, completion: str, prompt_ids: list[int], index: int) -> list[int]:
        if _is_chat(prompt):
            chat = list(prompt) + [{"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False)
            full = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if full[: len(prompt_ids)] != prompt_ids:
                raise RowError(f"row {index}: the chat template does not render the prompt as a prefix of the chat")
            ids = full[len(prompt_ids) :]
            # The template may add text after the end-of-turn token (a newline); the model stops at EOS.
            if self.tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(self.tokenizer.eos_token_id) + 1]
        else:
            ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        if not ids:
            raise RowError(f"row {index}: the completion is empty after tokenisation")
        return ids[: self.max_completion_length] if self.max_completion_length else ids

    def row_views(self, row: dict, index: int) -> RowViews:
        """Tokenised views of one row; raises ``RowError`` naming ``index`` and the field at fault."""
        prompt, completion = self._split_row(row, index)
        teacher_prompt, privileged = self._teacher_prompt(row, prompt, index)
        prompt_ids = self._encode_prompt(prompt)
        teacher_ids = self._encode_prompt(teacher_prompt)
        if self.max_prompt_length and len(prompt_ids) > self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length :]
        truncated = bool(self.max_teacher_prompt_length and len(teacher_ids) > self.max_teacher_prompt_length)
        if truncated:
            if self.privileged_truncation == "error":
                raise RowError(
                    f"row {index}: the teacher prompt has {len(teacher_ids)} tokens, over max_teacher_prompt_length="
                    f"{self.max_teacher_prompt_length}; its privileged context would be cut. Raise the limit or set "
                    "privileged_truncation='truncate_left' to keep the end of the prompt (the context) and count it."
                )
            teacher_ids = teacher_ids[-self.max_teacher_prompt_length :]
        completion_ids = self._encode_completion(prompt, completion, prompt_ids, index) if completion else None
        return RowViews(prompt_ids, teacher_ids, completion_ids, privileged, truncated)

    # -- a batch -------------------------------------------------------------------------------
    def _pad(self, sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            if side == "left":
                ids[i, width - len(seq) :], mask[i, width - len(seq) :] = torch.tensor(seq), 1
            else:
                ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        return ids, mask

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        views = [self.row_views(row, index) for index, row in enumerate(rows)]
        batch = {}
        batch["prompts"], batch["prompt_attention_mask"] = self._pad([v.prompt_ids for v in views], "left")
        batch["teacher_prompts"], batch["teacher_prompt_attention_mask"] = self._pad(
            [v.teacher_prompt_ids for v in views], "left"
        )
        if all(v.completion_ids for v in views):
            batch["completions"], batch["completion_mask"] = self._pad([v.completion_ids for v in views], "right")
        batch["num_truncated_teacher_prompts"] = torch.tensor(sum(v.teacher_prompt_truncated for v in views))
        batch["num_privileged_rows"] = torch.tensor(sum(v.has_privileged_context for v in views))
        routes = [row.get("teacher") for row in rows]
        if any(route is not None for route in routes):  # multi-teacher rows: which teacher scores each
            batch["teacher_routes"] = routes
        return batch
