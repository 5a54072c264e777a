"""Student and teacher views of each row, tokenised and padded so completions line up.

A row (see the dataset contract in the README) becomes a student prompt, a teacher prompt (the same
chat plus privileged context) and, when the row has one, an off-policy completion. Prompts are
LEFT-padded and completions RIGHT-padded, so completion token ``t`` sits at column ``P + t`` of the
concatenated sequence for every row, whatever the prompt lengths: that is how teacher and student
log-probabilities are aligned by completion position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from trl_opsd.prompts import (
    DEFAULT_ANSWER_CONTEXT_TEMPLATE,
    DEFAULT_TEACHER_PROMPT_TEMPLATE,
    check_templates,
    insert_privileged_context,
)

CHAT_ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A dataset row that cannot be used; the message names the row index and the field."""


# -- row validation: every shape the views below cannot use, refused by row and field ------------------
def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_chat(value, index: int, field: str) -> None:
    """``value`` is a non-empty list of ``{role, content}`` turns with known roles and text content."""
    if not isinstance(value, list) or not value:
        raise RowError(f"row {index}: field {field!r} must be a non-empty list of {{role, content}} dicts, got "
                       f"{_shown(value)}")
    for turn_index, turn in enumerate(value):
        where = f"row {index}: field {field!r}, turn {turn_index}"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be a {{role, content}} dict, got {_shown(turn)}")
        role = turn.get("role")
        if role not in CHAT_ROLES:
            raise RowError(f"{where}: role {role!r} is not one of {CHAT_ROLES}")
        if not isinstance(turn.get("content"), str):
            problem = "has no 'content'" if turn.get("content") is None else f"has content {_shown(turn['content'])}"
            raise RowError(f"{where} ({role}) {problem}; every turn needs its text as a string")


def _check_prompt_chat(value, index: int, field: str) -> None:
    """A chat usable as a prompt: valid turns and a user turn before any trailing assistant turn."""
    _check_chat(value, index, field)
    prompt = value[:-1] if value[-1]["role"] == "assistant" else value
    if not any(turn["role"] == "user" for turn in prompt):
        roles = [turn["role"] for turn in value]
        where = " before its completion" if len(prompt) < len(value) else ""
        raise RowError(f"row {index}: field {field!r} has no user turn{where} (roles: {roles}); a prompt needs one")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_row(row, index: int, privileged_from: str | None) -> None:
    """Refuse a row whose fields the views cannot use, naming ``index`` and the field (no tokenizer needed)."""
    if not isinstance(row, dict):
        raise RowError(f"row {index} must be a dict of fields, got {_shown(row)}")
    if row.get("messages") is not None:
        _check_prompt_chat(row["messages"], index, "messages")
    elif row.get("prompt") is not None:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            _check_prompt_chat(prompt, index, "prompt")
        elif not isinstance(prompt, str):
            raise RowError(f"row {index}: field 'prompt' must be text or a chat, got {_shown(prompt)}")
        elif not prompt.strip():
            raise RowError(f"row {index}: field 'prompt' is empty")
        completion = row.get("completion")
        if isinstance(completion, list):
            _check_chat(completion, index, "completion")
        elif completion is not None and not isinstance(completion, str):
            raise RowError(f"row {index}: field 'completion' must be text or a chat, got {_shown(completion)}")
    else:
        raise RowError(f"row {index}: has neither 'messages' nor 'prompt' (fields present: {sorted(row)})")
    if row.get("teacher_messages") is not None:
        if row["teacher_messages"] == []:
            raise RowError(f"row {index}: field 'teacher_messages' is an empty list; give the teacher's chat, or "
                           "None to build it from the prompt and the privileged context")
        _check_prompt_chat(row["teacher_messages"], index, "teacher_messages")
        return
    context = row.get("privileged_context")
    if context is not None and not isinstance(context, str):
        raise RowError(f"row {index}: field 'privileged_context' must be text, got {_shown(context)}")
    if not _is_missing(context) or not privileged_from:
        return
    value = row.get(privileged_from)
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(f"row {index}: field {privileged_from!r} (privileged_from) is {value}; the teacher would be "
                       f"told it. Fix or drop the row")
    if value is not None and not isinstance(value, (str, int, float)):
        raise RowError(f"row {index}: field {privileged_from!r} (privileged_from) must be text or a number, got "
                       f"{_shown(value)}")


def _has_completion(row: dict) -> bool:
    if row.get("messages") is not None:
        return row["messages"][-1]["role"] == "assistant"
    completion = row.get("completion")
    return bool(completion[-1]["content"] if isinstance(completion, list) and completion else completion)


def validate_dataset(collator: OPSDCollator, dataset, name: str, args=None, teacher_model=None) -> None:
    """Build every row's views once before anything loads, so a bad row fails now with dataset, row and field.

    With the trainer's ``args`` and ``teacher_model`` it also refuses what only the whole dataset shows: dataset
    steps (``lmbda < 1`` without ``seq_kd``) with a row that has no completion; a self-teacher that no row gives any
    privileged context (it would equal the student: loss 0); a ``privileged_from`` column that no row has or some
    row leaves empty. Iterable datasets are checked as they stream, batch by batch.
    """
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            validate_dataset(collator, part, f"{name}[{key!r}]", args, teacher_model)
        return
    rows = [dataset[index] for index in range(len(dataset))]
    try:
        for index, row in enumerate(rows):
            check_row(row, index, collator.privileged_from)
        if args is not None:
            _check_dataset(rows, collator.privileged_from, args, teacher_model)
    except RowError as error:
        raise RowError(f"{name}: {error}") from None
    for index, row in enumerate(rows):
        try:
            collator.row_views(row, index)
        except RowError as error:
            raise RowError(f"{name}: {error}") from None
        except Exception as error:  # the chat template or the tokenizer: name the row and what it rendered
            fields = [key for key in ("messages", "prompt", "completion", "teacher_messages", "privileged_context",
                                      collator.privileged_from) if key and row.get(key) is not None]
            raise RowError(f"{name}: row {index}: rendering fields {fields} failed with {type(error).__name__}: "
                           f"{error}") from None


def _check_dataset(rows: list[dict], privileged_from: str | None, args, teacher_model) -> None:
    if args.lmbda < 1.0 and not args.seq_kd:
        missing = next((index for index, row in enumerate(rows) if not _has_completion(row)), None)
        if missing is not None:
            raise RowError(
                f"row {missing}: has no completion (a trailing assistant turn in 'messages', or 'completion'), but "
                f"lmbda={args.lmbda} < 1 with seq_kd=False trains some steps on dataset completions; give every "
                "row one, or set lmbda=1.0 (fully on-policy)"
            )
    columns = sorted({key for row in rows for key in row if row[key] is not None})
    needing = [index for index, row in enumerate(rows)
               if row.get("teacher_messages") is None and _is_missing(row.get("privileged_context"))]
    filled = {index for index in needing if privileged_from and not _is_missing(rows[index].get(privileged_from))}
    if privileged_from and needing:
        if filled and len(filled) < len(needing):
            empty = next(index for index in needing if index not in filled)
            raise RowError(
                f"row {empty}: field {privileged_from!r} (privileged_from) is {rows[empty].get(privileged_from)!r} "
                f"while other rows have it, and the row has no teacher_messages or privileged_context: its teacher "
                "would see no privileged context. Fill it, or drop the row"
            )
        if not filled and privileged_from != "answer":  # a column named on purpose that no row has: a typo
            raise RowError(f"privileged_from={privileged_from!r} names a column that no row has; the rows have "
                           f"{columns}")
    has_context = len(needing) < len(rows) or bool(filled)
    self_teacher = teacher_model is None and getattr(args, "teacher_kind", "self") in (None, "self")
    if self_teacher and not has_context:
        raise RowError(
            f"no row gives the self-teacher privileged context (teacher_messages, privileged_context, or the "
            f"privileged_from={privileged_from!r} column), so it would see exactly the student's prompt and the "
            f"loss would be 0; the rows have {columns}. Set privileged_from to a column that holds the hint, or "
            "give a teacher_model"
        )


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
        check_templates(self.teacher_prompt_template, self.answer_context_template, self.privileged_from)
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
        check_row(row, index, self.privileged_from)
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
        return batch
