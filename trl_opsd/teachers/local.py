"""In-process teachers that return dense logits: an external model, or the student itself (self-teacher).

Every teacher here answers one question: the teacher's logits (or, for the chunked loss, its final hidden
states and LM head) at each completion position of a batch laid out as ``[left-padded teacher prompt |
right-padded completion]``. The self-teachers need the student module (the adapter-disabled view and the
live view are the student's own weights), so it is passed in on every call.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trl_opsd.forward import HeadInputs, completion_head_inputs, completion_logits, plain_output_head
from trl_opsd.teachers.base import Teacher


class LocalTeacher(Teacher):
    """An in-process teacher: dense logits, and a model to generate with (for ``seq_kd``).

    A subclass whose logits are its ``generation_model``'s own forward sets ``gives_hidden_states = True``, and the
    chunked loss then reads that module's final hidden states and LM head instead of its logits.
    """

    capabilities = frozenset({"dense", "generate"})
    gives_dense_logits = True

    def completion_logits(self, student_model, input_ids, attention_mask, completion_len):
        raise NotImplementedError

    def generation_model(self, student_model):
        raise NotImplementedError

    def own_model(self) -> nn.Module | None:
        """The module holding the teacher's own weights (None: it runs on the student's)."""
        return None

    @torch.no_grad()
    def completion_head_inputs(
        self, student_model, input_ids, attention_mask, completion_len, unwrap=lambda module: module
    ) -> HeadInputs | None:
        """:meth:`completion_logits` unprojected: final hidden states and the LM head, without gradient.

        None when the module's logits turn out not to be its head applied to its last hidden state. ``unwrap`` turns
        a prepared (DDP / DeepSpeed) module into the model whose LM head is read.
        """
        if not self.gives_hidden_states:
            raise NotImplementedError(f"{self!r} gives logits only (gives_hidden_states is False)")
        with self.generation_model(student_model) as module:
            head = plain_output_head(unwrap(module))
            return completion_head_inputs(module, head, input_ids, attention_mask, completion_len)


class ModelTeacher(LocalTeacher):
    """A frozen model with its own weights: an external teacher, a frozen copy of the student, or an EMA."""

    gives_hidden_states = True

    def __init__(self, model: nn.Module, name: str = "model"):
        super().__init__(name)
        self.model = model
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def completion_logits(self, student_model, input_ids, attention_mask, completion_len):
        self.model.eval()
        return completion_logits(self.model, input_ids, attention_mask, completion_len)

    def generation_model(self, student_model):
        return contextlib.nullcontext(self.model)

    def own_model(self) -> nn.Module:
        return self.model


class AdapterDisabledTeacher(LocalTeacher):
    """The PEFT student with its adapters switched off: the initial policy, with zero extra weights."""

    gives_hidden_states = True

    def __init__(self):
        super().__init__("self (adapters disabled)")

    @torch.no_grad()
    def completion_logits(self, student_model, input_ids, attention_mask, completion_len):
        with student_model.disable_adapter():
            return completion_logits(student_model, input_ids, attention_mask, completion_len)

    def generation_model(self, student_model):
        @contextlib.contextmanager
        def disabled():
            with student_model.disable_adapter():
                yield student_model

        return disabled()


class LiveTeacher(LocalTeacher):
    """The current student weights under privileged context, without gradient."""

    gives_hidden_states = True

    def __init__(self):
        super().__init__("self (live)")

    @torch.no_grad()
    def completion_logits(self, student_model, input_ids, attention_mask, completion_len):
        return completion_logits(student_model, input_ids, attention_mask, completion_len)

    def generation_model(self, student_model):
        return contextlib.nullcontext(student_model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, gradient-free copy of ``model`` (the frozen initial policy or an EMA seed).

    Instance-level ``forward`` patches are dropped from the copy, so it runs its class's forward on its own
    weights. Trainers patch ``model.forward`` with closures over the *original* model (TRL's SFTTrainer adds
    a fused LM head whose closure calls the original bound ``forward``; accelerate's mixed-precision wrapper
    does the same). ``copy.deepcopy`` copies such closures by reference, so without this the "frozen" copy
    would silently compute with the live student's weights.
    """
    teacher = copy.deepcopy(model)
    for module in teacher.modules():
        if "forward" in vars(module):
            del module.forward
    teacher.requires_grad_(False)
    return teacher.eval()


_TOKENIZER_PROBES = [
    "The final answer is 1,234.50.",
    "Mia has 12 apples.\n#### 14",
    "  leading spaces, tabs\tand unicode: café ∑ 😀",
]


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ``ValueError`` unless both tokenizers give the same ids for the same text.

    Per-token divergences compare distributions over the same vocabulary entries, so the ids must mean the
    same strings: checked on the vocabularies, and on the ids of probe texts, plain and with the special
    tokens that appear in completions (EOS, the chat template's turn markers). Pad, BOS and other settings
    that never reach a scored position are not compared: ``pad_token = eos_token`` on the student and the
    teacher's own pad token on disk is the usual TRL setup, and padded positions are masked out.
    """
    problems = []
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))[:5]
        problems.append(f"vocabularies differ ({len(student_vocab)} vs {len(teacher_vocab)} entries; e.g. {differing})")
    probes = list(_TOKENIZER_PROBES)
    if student.eos_token is not None:
        probes.append(f"The answer is 4.{student.eos_token}")
    if student.chat_template is not None:
        chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
        probes.append(student.apply_chat_template(chat, tokenize=False))
    for text in probes:
        s_ids = student(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"]
        if s_ids != t_ids:
            problems.append(f"{text!r} encodes to {s_ids[:8]}... vs {t_ids[:8]}...")
    if problems:
        raise ValueError(
            "the teacher's tokenizer is not the student's, so per-token divergences are undefined: "
            + "; ".join(problems)
        )
