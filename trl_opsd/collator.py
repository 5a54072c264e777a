"""Student and teacher views of each row, tokenised and padded so completions line up.

A row (see the dataset contract in the README) becomes a student prompt, a teacher prompt (the same
chat plus privileged context) and, when the row has one, an off-policy completion. Prompts are
LEFT-padded and completions RIGHT-padded, so completion token ``t`` sits at column ``P + t`` of the
concatenated sequence for every row, whatever the prompt lengths: that is how teacher and student
log-probabilities are aligned by completion position.

Lengths follow GKD's ``DataCollatorForChatML``: ``max_length`` bounds prompt + dataset completion, the
completion is kept whole and the prompt loses its oldest tokens (counted in ``num_truncated_prompts``).
Teacher prompts are cut the same way (to ``max_teacher_prompt_length`` when set), except that cutting into
the privileged context (the tail the student's prompt does not share) is refused unless
``privileged_truncation="truncate_left"``.
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
    prompt_truncated: bool


def _is_chat(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


@dataclass
class OPSDCollator:
    """Builds ``prompts``, ``teacher_prompts`` and (off-policy) ``completions`` tensors from raw rows.

    ``max_length`` (GKD's, default 1024 as GKD's collator) bounds prompt + dataset completion;
    ``max_prompt_length`` (None: no limit of its own) adds a bound on student prompts;
    ``max_teacher_prompt_length`` (None: ``max_length``'s) replaces it for teacher prompts.
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int | None = None
    max_teacher_prompt_length: int | None = None
    max_length: int | None = 1024
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
        return ids

    def _prompt_room(self, completion_ids: list[int] | None, index: int) -> int | None:
        """Tokens left for a prompt by ``max_length`` (GKD's limit on prompt + dataset completion); None: no limit.

        As GKD's ``DataCollatorForChatML``, the completion is kept whole and the prompt loses its oldest tokens;
        a completion that leaves no room for any prompt token is refused (GKD refuses it too).
        """
        if not self.max_length:
            return None
        room = self.max_length - len(completion_ids or ())
        if room < 1:
            raise RowError(
                f"row {index}: the completion has {len(completion_ids)} tokens, which leaves no room for the prompt "
                f"within max_length={self.max_length} (prompt + completion); raise max_length"
            )
        return room

    def _cut_teacher_prompt(self, teacher_ids, student_ids, privileged: bool, limit, index: int):
        """(teacher prompt ids kept, whether they were cut): left-truncated to ``limit`` like the student's prompt.

        The privileged part is the tail the student's prompt does not share. Cutting into it changes what the
        teacher knows, so under ``privileged_truncation="error"`` that raises; ``"truncate_left"`` cuts anyway.
        """
        if not limit or len(teacher_ids) <= limit:
            return teacher_ids, False
        shared = 0
        for teacher_id, student_id in zip(teacher_ids, student_ids):
            if teacher_id != student_id:
                break
            shared += 1
        privileged_tokens = len(teacher_ids) - shared
        if privileged and privileged_tokens > limit and self.privileged_truncation == "error":
            raise RowError(
                f"row {index}: the teacher prompt has {len(teacher_ids)} tokens, over {self._limit_name(limit)}; "
                f"keeping its last {limit} tokens would cut the privileged context "
                f"(the last {privileged_tokens} tokens, which the student's prompt does not have). Raise the limit, "
                "shorten the context, or set privileged_truncation='truncate_left' to cut it anyway (counted in "
                "the truncated_teacher_prompts metric)"
            )
        return teacher_ids[-limit:], True

    def _limit_name(self, limit: int) -> str:
        if self.max_teacher_prompt_length:
            return f"max_teacher_prompt_length={self.max_teacher_prompt_length}"
        return f"max_length={self.max_length} minus the completion ({limit} tokens)"

    def row_views(self, row: dict, index: int) -> RowViews:
        """Tokenised views of one row; raises ``RowError`` naming ``index`` and the field at fault."""
        check_row(row, index, self.privileged_from)
        prompt, completion = self._split_row(row, index)
        teacher_prompt, privileged = self._teacher_prompt(row, prompt, index)
        prompt_ids = self._encode_prompt(prompt)
        teacher_ids = self._encode_prompt(teacher_prompt)
        completion_ids = self._encode_completion(prompt, completion, prompt_ids, index) if completion else None
        room = self._prompt_room(completion_ids, index)
        student_limit = min((n for n in (self.max_prompt_length, room) if n), default=None)
        # An explicit teacher limit wins over max_length: a teacher prompt may hold a whole reference solution.
        teacher_limit = self.max_teacher_prompt_length or room
        teacher_ids, teacher_truncated = self._cut_teacher_prompt(teacher_ids, prompt_ids, privileged, teacher_limit,
                                                                  index)
        prompt_truncated = bool(student_limit and len(prompt_ids) > student_limit)
        if prompt_truncated:
            prompt_ids = prompt_ids[-student_limit:]
        return RowViews(prompt_ids, teacher_ids, completion_ids, privileged, teacher_truncated, prompt_truncated)

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
            batch.update(gkd_sequences(batch, self.tokenizer.pad_token_id))
        batch["num_truncated_prompts"] = torch.tensor(sum(v.prompt_truncated for v in views))
        batch["num_truncated_teacher_prompts"] = torch.tensor(sum(v.teacher_prompt_truncated for v in views))
        batch["num_privileged_rows"] = torch.tensor(sum(v.has_privileged_context for v in views))
        routes = [row.get("teacher") for row in rows]
        if any(route is not None for route in routes):  # multi-teacher rows: which teacher scores each
            batch["teacher_routes"] = routes
        return batch


def gkd_sequences(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The student's ``prompt + completion`` as GKD's collator lays it out: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 outside the completion), each row's sequence left-padded as a whole, so every row ends at the
    last column. For code written against GKD's batches; OPSD's own keys keep completions aligned instead."""
    rows, labels = [], []
    for prompt, prompt_mask, completion, completion_mask in zip(
        batch["prompts"], batch["prompt_attention_mask"], batch["completions"], batch["completion_mask"]
    ):
        prompt, completion = prompt[prompt_mask.bool()], completion[completion_mask.bool()]
        rows.append(torch.cat([prompt, completion]))
        labels.append(torch.cat([torch.full_like(prompt, -100), completion]))
    width = max(len(row) for row in rows)
    sequences = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for index, (row, label) in enumerate(zip(rows, labels)):
        sequences["input_ids"][index, width - len(row) :] = row
        sequences["attention_mask"][index, width - len(row) :] = 1
        sequences["labels"][index, width - len(row) :] = label
    return {key: value.to(batch["prompts"].device) for key, value in sequences.items()}


def views_from_gkd_batch(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """OPSD's batch layout from the output of GKD's ``DataCollatorForChatML`` (``input_ids``, ``labels``, ``prompts``).

    Each row's completion is its labelled tokens (``labels != -100``), trained as a dataset completion; the teacher
    sees the student's prompt, as in GKD (such batches carry no privileged context).
    """
    completions = []
    for index, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
        if not (labels != -100).any():
            raise RowError(f"row {index} of the batch has no labelled (completion) token in 'labels'")
        completions.append(ids[labels != -100].tolist())
    views = {"prompts": batch["prompts"], "prompt_attention_mask": batch["prompt_attention_mask"]}
    views["teacher_prompts"], views["teacher_prompt_attention_mask"] = views["prompts"], views["prompt_attention_mask"]
    width = max(len(c) for c in completions)
    views["completions"] = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    views["completion_mask"] = torch.zeros((len(completions), width), dtype=torch.long)
    for row, completion in enumerate(completions):
        views["completions"][row, : len(completion)] = torch.tensor(completion)
        views["completion_mask"][row, : len(completion)] = 1
    views = {key: value.to(batch["prompts"].device) for key, value in views.items()}
    views.update({key: batch[key] for key in ("input_ids", "attention_mask", "labels")})
    for name in ("num_truncated_prompts", "num_truncated_teacher_prompts", "num_privileged_rows"):
        views[name] = torch.tensor(0)
    return views


def as_opsd_batch(batch: dict, pad_token_id: int) -> dict:
    """``batch`` in OPSD's layout: :class:`OPSDCollator`'s as it is; GKD's ``DataCollatorForChatML`` output
    (``input_ids``, ``labels``, ``prompts``) as dataset completions under the student's prompt, as GKD trains them."""
    if "teacher_prompts" in batch:
        return batch
    if {"input_ids", "labels", "prompts", "prompt_attention_mask"} <= set(batch):
        return views_from_gkd_batch(batch, pad_token_id)
    raise ValueError(
        f"the data collator's batch has keys {sorted(batch)}: neither OPSDCollator's (prompts, teacher_prompts, "
        "completions, ...) nor GKD's DataCollatorForChatML's (input_ids, attention_mask, labels, prompts, "
        "prompt_attention_mask). Pass data_collator=None (OPSDCollator) or GKD's DataCollatorForChatML"
    )
