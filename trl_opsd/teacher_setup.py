"""Building the teacher, and the checks that refuse a teacher setup before any step runs.

Public so a recipe can run the same checks without a trainer (a dry run):

- :func:`check_remote_teacher`: a teacher behind a server can give what the loss reads (``Divergence.check_teacher``).
- :func:`check_fsdp_version`, :func:`check_self_teacher`: the FSDP / EMA / PEFT setups that would fail later.
- :func:`check_same_vocab`: dense per-token divergences need one vocabulary.
- :func:`build_teacher`: the self / external / remote teacher for ``OPSDConfig`` and a ``teacher_model`` argument.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import is_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback

from trl_opsd.objective import Divergence
from trl_opsd.teachers.base import Teacher
from trl_opsd.teachers.local import (
    AdapterDisabledTeacher,
    LiveTeacher,
    ModelTeacher,
    check_same_tokenizer,
    frozen_copy,
)


class TeacherSetup(NamedTuple):
    """What :func:`build_teacher` returns."""

    teacher: Teacher | None
    module: nn.Module | None = None  # the teacher's own placed weights; None when it runs on the student's
    callbacks: tuple = ()  # trainer callbacks the teacher needs (the EMA update)


class EMATeacherCallback(SyncRefModelCallback):
    """After every optimizer step: teacher <- decay * teacher + (1 - decay) * student."""

    def __init__(self, teacher_model: nn.Module, decay: float, accelerator):
        super().__init__(ref_model=teacher_model, accelerator=accelerator)
        self.decay = decay

    def on_step_end(self, args, state, control, **kwargs):
        model = self.accelerator.unwrap_model(kwargs["model"])
        self.sync_target_model(model, self.ref_model, 1.0 - self.decay)


# -- checks ---------------------------------------------------------------------------------------------------
def check_remote_teacher(teacher: Teacher, args) -> Teacher:
    """Fail now, not at step 1, if a teacher behind a server cannot give what ``args``' loss reads."""
    Divergence.from_config(args).check_teacher(teacher)
    if args.seq_kd and args.lmbda < 1.0:
        raise ValueError(
            "seq_kd samples from an in-process teacher; with a remote teacher generate the data offline "
            "(`trl-opsd rs-sft`) and train on it as dataset completions"
        )
    return teacher


def check_fsdp_version(fsdp_version: int | None) -> None:
    """Refuse FSDP1 (``fsdp_version``; None: not FSDP), which would fail (or hang) at the first rollout or step."""
    if fsdp_version is not None and fsdp_version != 2:
        raise ValueError(
            f"FSDP{fsdp_version} cannot run OPSDTrainer: rollouts are sampled from (and a self-teacher runs on) "
            "accelerator.unwrap_model(model), outside the root FSDP1 unit, whose flat parameters (embeddings, "
            "lm_head) stay sharded there; TRL's unwrap_model_for_generation gathers only DeepSpeed ZeRO-3 "
            "parameters. Set fsdp_version: 2 (accelerate_configs/fsdp.yaml) or use DeepSpeed"
        )


def check_self_teacher(self_teacher: str, *, peft: bool, fsdp: bool) -> None:
    """Refuse the self-teacher modes (``OPSDConfig.self_teacher``) that PEFT or FSDP cannot run."""
    if self_teacher != "ema":
        return
    if peft:
        raise ValueError(
            "self_teacher='ema' is not supported with PEFT; use 'frozen' (adapters disabled, no extra weights) or "
            "'live'"
        )
    if fsdp:
        raise ValueError(
            "self_teacher='ema' (OPSDConfig.self_teacher) is not supported under FSDP: the EMA update "
            "(TRL's SyncRefModelCallback) gathers parameters for DeepSpeed ZeRO-3 only, and the student's and "
            "teacher's FSDP shards are not synchronised here. Use self_teacher='frozen' or 'live', an external "
            "teacher_model, or launch the EMA teacher with DeepSpeed (accelerate_configs/deepspeed_zero2.yaml / "
            "deepspeed_zero3.yaml)"
        )


def check_same_vocab(student: nn.Module, teacher: nn.Module) -> None:
    """Raise unless both models' configs declare the same vocabulary size."""
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher.config.get_text_config().vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the student's vocab_size is {student_vocab} but the teacher's is {teacher_vocab}; dense "
            "per-token divergences need a shared vocabulary"
        )


# -- construction ---------------------------------------------------------------------------------------------
def prepare_frozen(module: nn.Module, accelerator, *, deepspeed: bool, fsdp: bool) -> nn.Module:
    """Place (and shard) a frozen teacher module the way TRL's trainers place their reference models.

    Under FSDP, ``accelerator.prepare_model(module, evaluation_mode=True)`` neither wraps the module (evaluation
    mode skips wrapping) nor moves it (device placement is off under FSDP): it would stay on the CPU while the
    student runs sharded on the GPUs. TRL's ``prepare_fsdp`` shards it with the student's FSDP settings instead.
    """
    if deepspeed:
        return prepare_deepspeed(module, accelerator)
    if fsdp:
        meta = next((name for name, p in module.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"under FSDP the teacher's parameter {meta!r} is on the meta device on process "
                f"{accelerator.process_index}: with fsdp_cpu_ram_efficient_loading: true, transformers loads "
                "weights on the first process only and FSDP broadcasts them into the student, never into a "
                "separate teacher (or a frozen copy of the student made before that). Set "
                "fsdp_cpu_ram_efficient_loading: false in the accelerate config, or use_peft: true (the "
                "adapter-disabled self-teacher has no weights of its own)"
            )
        return prepare_fsdp(module, accelerator)
    return accelerator.prepare_model(module, evaluation_mode=True)


def load_teacher_model(name_or_path: str, args, teacher_processing_class=None):
    """(teacher model, its tokenizer) from a path, with ``args.teacher_model_init_kwargs``."""
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if isinstance(init_kwargs.get("dtype"), str) and init_kwargs["dtype"] != "auto":
        init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
    if teacher_processing_class is None:
        teacher_processing_class = AutoTokenizer.from_pretrained(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **init_kwargs), teacher_processing_class


def build_teacher(
    teacher_model: nn.Module | str | Teacher | None,
    args,
    *,
    student: nn.Module,
    processing_class,
    accelerator,
    teacher_processing_class=None,
    deepspeed: bool = False,
    fsdp_version: int | None = None,
) -> TeacherSetup:
    """The teacher ``args`` (an ``OPSDConfig``) and ``teacher_model`` describe, checked and placed.

    ``teacher_model``: None (the self-teacher ``args.self_teacher``), a path or a model (an external teacher, whose
    tokenizer and vocabulary must be the student's), or a :class:`Teacher` (remote: checked against the loss).
    ``fsdp_version`` is None when not running under FSDP.
    """
    fsdp = fsdp_version is not None
    check_fsdp_version(fsdp_version)
    if isinstance(teacher_model, Teacher) and not teacher_model.gives_dense_logits:
        return TeacherSetup(check_remote_teacher(teacher_model, args))
    place = lambda module: prepare_frozen(module, accelerator, deepspeed=deepspeed, fsdp=fsdp)  # noqa: E731
    if teacher_model is None:
        peft = is_peft_model(student)
        check_self_teacher(args.self_teacher, peft=peft, fsdp=fsdp)
        if peft:
            return TeacherSetup(AdapterDisabledTeacher() if args.self_teacher == "frozen" else LiveTeacher())
        if args.self_teacher == "live":
            return TeacherSetup(LiveTeacher())
        module = place(frozen_copy(student))
        callbacks = ()
        if args.self_teacher == "ema":
            callbacks = (EMATeacherCallback(module, args.teacher_ema_decay, accelerator),)
        return TeacherSetup(ModelTeacher(module, name=f"self ({args.self_teacher})"), module, callbacks)

    if isinstance(teacher_model, str):
        teacher_model, teacher_processing_class = load_teacher_model(teacher_model, args, teacher_processing_class)
    elif args.teacher_model_init_kwargs is not None:
        raise ValueError("teacher_model_init_kwargs was given but teacher_model is already instantiated")
    if teacher_processing_class is not None:
        check_same_tokenizer(processing_class, teacher_processing_class)
    check_same_vocab(student, teacher_model)
    module = place(teacher_model)
    return TeacherSetup(ModelTeacher(module, name="external"), module)
