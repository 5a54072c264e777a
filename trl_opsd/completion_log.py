"""``log_completions``: a sample of what the student wrote (and what its teacher saw), kept as training goes.

TRL's convention (``GRPOConfig`` / ``DistillationConfig``): with ``log_completions`` the trainer keeps the
latest generation window's prompts and completions and, at every logging step, prints
``num_completions_to_print`` of them (all when ``None``) and writes them to a file in ``output_dir``. We do
the same, and also log at the first and the last step, so that a change of phrasing that no metric shows
(the answers' wording, format compliance) can be read off before/after. Each record carries the teacher's
prompt when it differs from the student's (the privileged context), and where the completion came from.

Console: TRL's ``print_prompt_completions_sample`` (a rich table) when ``rich`` is installed, plain text
otherwise. File: ``<output_dir>/completions.jsonl``, one JSON object per completion, with its ``step``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.utils import is_rich_available

COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class CompletionRecord:
    prompt: str
    completion: str
    teacher_prompt: str | None  # None: the teacher saw the student's prompt
    source: str  # "student" | "teacher" | "dataset"


def _texts(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Each row's tokens under ``mask`` (padding dropped), decoded without special tokens as TRL logs them."""
    return [tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]


def window_records(tokenizer, batches: list[dict]) -> list[CompletionRecord]:
    """The records of one accumulation window's micro-batches (prompts left-padded, completions right-padded)."""
    records = []
    for batch in batches:
        prompts = _texts(tokenizer, batch["prompts"], batch["prompt_attention_mask"])
        teacher = _texts(tokenizer, batch["teacher_prompts"], batch["teacher_prompt_attention_mask"])
        completions = _texts(tokenizer, batch["completions"], batch["completion_mask"])
        source = batch.get("completion_source", "student")
        records += [CompletionRecord(p, c, None if t == p else t, source)
                    for p, c, t in zip(prompts, completions, teacher)]
    return records


class CompletionLog:
    """The latest window's records, printed and appended to ``completions.jsonl`` once per logging step."""

    def __init__(self, output_dir: str, num_to_print: int | None):
        self.path = os.path.join(output_dir, COMPLETIONS_FILE)
        self.num_to_print = num_to_print
        self.records: list[CompletionRecord] = []
        self.written_step: int | None = None

    def update(self, records: list[CompletionRecord]) -> None:
        self.records = records  # only the latest window: what the current weights produce

    def write(self, step: int) -> None:
        """Print and append the current records for ``step`` (once per step; nothing before the first window)."""
        if not self.records or self.written_step == step:
            return
        self.written_step = step
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps({"step": step, **record.__dict__}, ensure_ascii=False) + "\n")
        shown = self.records[: self.num_to_print]  # None: all, as TRL
        if is_rich_available():
            from trl.trainer.utils import print_prompt_completions_sample

            extra = {"source": [r.source for r in shown]}
            if any(r.teacher_prompt is not None for r in shown):
                extra["teacher prompt"] = [r.teacher_prompt or "(the student's)" for r in shown]
            print_prompt_completions_sample([r.prompt for r in shown], [r.completion for r in shown], {}, None, step,
                                            extra=extra)
        else:
            print(render_plain(shown, step, len(self.records)), flush=True)


def render_plain(records: list[CompletionRecord], step: int, total: int) -> str:
    """The console text without rich: one block per record."""
    lines = [f"=== completions at step {step} ({len(records)} of {total}) ==="]
    for index, record in enumerate(records):
        lines.append(f"--- [{index}] {record.source} completion")
        lines.append(f"prompt:     {record.prompt!r}")
        if record.teacher_prompt is not None:
            lines.append(f"teacher:    {record.teacher_prompt!r}")
        lines.append(f"completion: {record.completion!r}")
    return "\n".join(lines)


class LogFirstAndLastStep(TrainerCallback):
    """Make the first and the last optimizer step logging steps, so the sample is written there too."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 or state.global_step >= state.max_steps:
            control.should_log = True
        return control
