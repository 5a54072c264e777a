"""``OPSDConfig``: GKD's configuration plus the knobs of on-policy self-distillation.

Every GKD argument keeps its meaning (``lmbda`` is the on-policy fraction, ``beta`` the generalized
JSD interpolation, ``temperature`` the sampling temperature, ``seq_kd`` sequence-level KD). Only the
defaults of ``lmbda`` (1.0: OPSD is on-policy), ``temperature`` (1.0: sample from the policy
itself) and ``beta`` (1.0: reverse KL, the best of the divergences measured on the arithmetic world;
see the README's Status) differ. All new knobs are validated in ``__post_init__`` so a bad value fails before any
model is loaded: NaN and infinity included, in every float field (``check_finite_floats``), and templates
against their placeholders. ``check_trainer_inputs`` adds what needs the trainer's teacher and tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl.experimental.gkd import GKDConfig

from trl_opsd.prompts import DEFAULT_ANSWER_CONTEXT_TEMPLATE, DEFAULT_TEACHER_PROMPT_TEMPLATE, check_templates

SELF_TEACHER_MODES = ("frozen", "ema", "live")
CLIP_MODES = ("clamp", "scale", "pointwise")
COLLAPSE_GUARD_MODES = ("off", "warn", "stop")
DIVERGENCES = ("full", "topk", "sampled")
TRUNCATION_POLICIES = ("error", "truncate_left")
NONFINITE_POLICIES = ("raise", "skip")
VLLM_MODES = ("colocate", "server")
ROLLOUT_BACKENDS = ("hf", "hf_static", "vllm")
VLLM_MODEL_IMPLS = ("vllm", "transformers")


@dataclass
class OPSDConfig(GKDConfig):
    r"""
    Configuration for [`OPSDTrainer`]. Inherits every [`~trl.experimental.gkd.GKDConfig`] argument.

    Teacher:
        self_teacher (`str`, defaults to `"frozen"`): what plays the teacher when no `teacher_model` is
            given. `"frozen"`: the initial policy (with PEFT, the base model with adapters disabled, no
            extra weights; otherwise a frozen copy). `"ema"`: an exponential moving average of the
            student. `"live"`: the current student weights, without gradient. With a `teacher_model` it must stay
            at its default: another value is refused rather than ignored.
        teacher_ema_decay (`float`, defaults to `0.99`): EMA decay for `self_teacher="ema"`.

    Privileged context (what only the teacher sees):
        privileged_from (`str` or `None`, defaults to `"answer"`): dataset column turned into privileged
            context (through `answer_context_template`) for rows that carry neither
            `teacher_messages` nor `privileged_context`. `None` disables it.
        answer_context_template (`str`): formats that column, e.g. `"The final answer is {answer}."`.
        teacher_prompt_template (`str`): rewrites the last user turn for the teacher;
            `{prompt}` is its content and `{privileged_context}` the hint.
        max_prompt_length (`int` or `None`, defaults to `None`): student prompts longer than this lose their oldest
            tokens. `None`: only GKD's `max_length` bounds them (prompt + dataset completion, prompt cut first).
        max_teacher_prompt_length (`int` or `None`, defaults to `None` = `max_prompt_length`): the same for
            teacher prompts; `None` there: bounded like the student's by `max_length` minus the dataset completion.
        privileged_truncation (`str`, defaults to `"error"`): a teacher prompt over its limit loses its oldest tokens
            either way (counted in the `truncated_teacher_prompts` metric); when that would cut into the
            privileged context itself, `"error"` raises and `"truncate_left"` cuts anyway.

    Loss:
        divergence (`str`, defaults to `"full"`): `"full"`: generalized JSD(`beta`) over the whole
            vocabulary (needs a dense teacher); `"topk"`: forward KL on the teacher's top-k plus a tail
            bucket (API teachers); `"sampled"`: sampled-token reverse KL, the Thinking Machines OPD
            estimator (needs only the teacher's log-prob of each sampled token).
        teacher_top_k (`int`, defaults to `20`): k for `divergence="topk"`.
        loss_temperature (`float`, defaults to `1.0`): both distributions are `softmax(logits / loss_temperature)`
            in the loss. GKD ignores its `temperature` in the loss (it always uses 1.0); so do we by default,
            and this knob makes the choice explicit instead of silent.
        kl_clip (`float` or `None`, defaults to `None`): the cap of `kl_clip_mode`.
        kl_clip_mode (`str`, defaults to `"clamp"`): where the cap acts. Per token, after the vocabulary sum:
            `"clamp"`: `min(d_t, c)`, no gradient above the cap (the seed notebook's `kl.clamp(max=c)`);
            `"scale"`: `d_t * min(1, c / stopgrad(d_t))`, value capped and gradient direction kept. Per vocabulary
            entry, before the sum: `"pointwise"`: `sum_v min(term_v, c)`, the reference OPSD code's
            `--jsd_token_clip` (`jsd.clamp(max=c)` on the `[B, T, V]` terms). Entry terms can be negative and
            are kept, so a position's value can be negative; entries above the cap give no gradient. With
            `divergence="topk"` each of the k + 1 bucket terms is capped (the tail bucket as one term).
        sampled_ratio_cap (`float`, defaults to `2.0`): cap on the importance ratio of the sampled-token loss.
        collapse_guard (`str`, defaults to `"warn"`): watch every step's metrics for the signs that precede a
            collapse (`trl_opsd.collapse.CollapseGuard`): `"warn"` logs a warning with the evidence, `"stop"` also
            stops training and names the last healthy checkpoint, `"off"` does neither.
        nonfinite_loss (`str`, defaults to `"raise"`): a non-finite loss stops training with a message naming
            the step and the statistic (`"raise"`), or the step contributes no gradient (`"skip"`).
        chunked_loss (`bool`, defaults to `True`): compute the loss from final hidden states and the LM head a chunk
            of completion positions at a time (`trl_opsd.chunked`), never holding `[batch, completion, vocab]`
            logits; same values and gradients. Used where it applies: an in-process teacher (frozen copy, EMA,
            live, adapters disabled, external model) or a remote one (student side only), whose logits are a plain
            linear head on the last hidden state. Otherwise (logit soft-capping or scaling, a PEFT adapter on the
            head, a quantised head, FSDP / DeepSpeed ZeRO-3, a custom teacher) the dense loss runs, with one info log.
        loss_chunk_size (`int` or `None`, defaults to `None`): completion positions projected at once by the
            chunked loss; `None` sizes one fp32 `[chunk, vocab]` buffer at 32 MiB. Smaller saves memory, larger
            is faster.

    Rollouts:
        rollout_backend (`str` or `None`, defaults to `None` = `"vllm"` if `use_vllm` else `"hf"`): what samples the
            student's on-policy completions. `"hf"`: `transformers`' `generate` with a dynamic KV cache. `"hf_static"`:
            `generate` with a static KV cache (`cache_implementation="static"`) and a compiled decode step, prompts
            padded to width buckets and the batch to `per_device_train_batch_size` so the compiled graph is reused
            (`trl_opsd.rollouts`); teacher rollouts (`seq_kd`) use it too. `"vllm"`: TRL's `VLLMGeneration` (below).
            TRL's trainers expose `use_vllm` plus a pass-through `cache_implementation` with compilation disabled;
            static cache and compilation only pay off together, hence one knob.
        rollout_compile (`bool` or `None`, defaults to `None`): `"hf_static"` only. `None`: compile the decode step
            where `transformers` does by itself (CUDA, XPU, TPU, Neuron; not CPU). `True`: on any device, CPU
            included (a one-time compilation per shape). `False`: static cache without compiling.

    Student rollouts with vLLM (TRL's `VLLMGeneration`, the knobs of TRL's `DistillationConfig`):
        use_vllm (`bool`, defaults to `False`): TRL's name for `rollout_backend="vllm"`; either sets the other.
            Needs `pip install 'trl[vllm]'`. Teacher rollouts (`seq_kd`) stay in `transformers`.
        vllm_mode (`str`, defaults to `"colocate"`): `"colocate"`: a vLLM engine in the training process, sharing
            its GPUs; `"server"`: a separate `trl vllm-serve` process that receives the weights every step.
        vllm_model_impl (`str`, defaults to `"vllm"`): `"vllm"` or `"transformers"` model implementation.
        vllm_enable_sleep_mode (`bool`, defaults to `False`): colocate: offload vLLM's weights and cache during
            the optimizer step.
        vllm_server_base_url (`str` or `None`, defaults to `None`): server URL; overrides host and port.
        vllm_server_host (`str`, defaults to `"0.0.0.0"`), vllm_server_port (`int`, defaults to `8000`): the
            server's address.
        vllm_server_timeout (`float`, defaults to `240.0`): seconds to wait for the server to come up.
        vllm_group_port (`int`, defaults to `51216`): port of the weight-update (NCCL) group.
        vllm_gpu_memory_utilization (`float`, defaults to `0.3`): colocate: GPU memory fraction for vLLM.
        vllm_max_model_length (`int` or `None`, defaults to `None`): colocate: context length (prompt +
            completion); `None` reads it from the model config.
        vllm_tensor_parallel_size (`int`, defaults to `1`): colocate: tensor-parallel ranks per engine.

    Logging:
        log_completions (`bool`, defaults to `False`): TRL's knob (`GRPOConfig`, `DistillationConfig`): print a
            sample of the latest window's prompts and completions (with the teacher's prompt where it differs) at
            every logging step, and at the first and last step, and append them to `<output_dir>/completions.jsonl`.
        num_completions_to_print (`int` or `None`, defaults to `None`): how many to print (`None`: all); the file
            gets all.
    """

    lmbda: float = field(default=1.0, metadata={"help": "Fraction of steps trained on the student's own samples."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of on-policy rollouts."})
    beta: float = field(default=1.0, metadata={"help": "0: forward KL, 1: reverse KL, between: generalized JSD."})

    self_teacher: str = field(default="frozen", metadata={"help": f"One of {SELF_TEACHER_MODES}."})
    teacher_ema_decay: float = field(default=0.99, metadata={"help": "EMA decay for self_teacher='ema'."})

    privileged_from: str | None = field(default="answer", metadata={"help": "Column turned into privileged context."})
    answer_context_template: str = field(default=DEFAULT_ANSWER_CONTEXT_TEMPLATE)
    teacher_prompt_template: str = field(default=DEFAULT_TEACHER_PROMPT_TEMPLATE)
    max_prompt_length: int | None = field(default=None)
    max_teacher_prompt_length: int | None = field(default=None)
    privileged_truncation: str = field(default="error", metadata={"help": f"One of {TRUNCATION_POLICIES}."})

    divergence: str = field(default="full", metadata={"help": f"One of {DIVERGENCES}."})
    teacher_top_k: int = field(default=20)
    loss_temperature: float = field(default=1.0)
    kl_clip: float | None = field(default=None, metadata={"help": "Per-token divergence cap (None: no clipping)."})
    kl_clip_mode: str = field(default="clamp", metadata={"help": f"One of {CLIP_MODES}."})
    sampled_ratio_cap: float = field(default=2.0)
    collapse_guard: str = field(default="warn", metadata={"help": f"One of {COLLAPSE_GUARD_MODES}."})
    nonfinite_loss: str = field(default="raise", metadata={"help": f"One of {NONFINITE_POLICIES}."})
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss from hidden states + LM head in chunks of positions (no full logits), "
                          "where the model and teacher allow it; the dense loss otherwise."},
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the chunked loss (None: a 32 MiB fp32 buffer)."}
    )

    rollout_backend: str | None = field(
        default=None, metadata={"help": f"One of {ROLLOUT_BACKENDS} (None: 'vllm' if use_vllm else 'hf')."}
    )
    rollout_compile: bool | None = field(
        default=None,
        metadata={"help": "hf_static: compile the decode step (None: where transformers does, i.e. not on CPU)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Alias of rollout_backend='vllm' (TRL's name)."})
    vllm_mode: str = field(default="colocate", metadata={"help": f"One of {VLLM_MODES}."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM model implementation: vllm or transformers."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Colocate: offload vLLM during updates."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Server mode: base URL of the server."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the server."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Server mode: seconds to wait for it."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: port of the weight-update group."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Colocate: GPU memory fraction."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "Colocate: max prompt + completion."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate: tensor-parallel size."})

    log_completions: bool = field(
        default=False,
        metadata={"help": "Log a sample of (prompt, completion, teacher prompt) at the first, the last and every "
                          "logging step: printed (a rich table if rich is installed) and in output_dir/completions.jsonl."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Completions printed per log (None: all); the file gets all."}
    )

    def __post_init__(self):
        check_finite_floats(self)  # before GKD's range checks, which NaN passes (every comparison is False)
        super().__post_init__()
        self.check_opsd_fields()

    def check_opsd_fields(self) -> None:
        """Validate the knobs OPSD adds to ``GKDConfig`` (also run when a ``GKDConfig`` is adopted in place)."""
        _check_choice("self_teacher", self.self_teacher, SELF_TEACHER_MODES)
        _check_choice("kl_clip_mode", self.kl_clip_mode, CLIP_MODES)
        _check_choice("collapse_guard", self.collapse_guard, COLLAPSE_GUARD_MODES)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("privileged_truncation", self.privileged_truncation, TRUNCATION_POLICIES)
        _check_choice("nonfinite_loss", self.nonfinite_loss, NONFINITE_POLICIES)
        _check_choice("vllm_mode", self.vllm_mode, VLLM_MODES)
        self._resolve_rollout_backend()
        _check_choice("vllm_model_impl", self.vllm_model_impl, VLLM_MODEL_IMPLS)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 < self.teacher_ema_decay < 1.0:
            raise ValueError(f"teacher_ema_decay must be in (0, 1), got {self.teacher_ema_decay}")
        if self.temperature <= 0:
            raise ValueError(f"temperature (the sampling temperature of rollouts) must be > 0, got "
                             f"{self.temperature}; rollouts sample from softmax(logits / temperature)")
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"vllm_server_timeout must be a positive number of seconds, got "
                             f"{self.vllm_server_timeout}")
        if self.kl_clip is not None and self.kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive or None, got {self.kl_clip}")
        if self.loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be positive, got {self.loss_temperature}")
        if self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be at least 1, got {self.teacher_top_k}")
        if self.sampled_ratio_cap < 1:
            raise ValueError(f"sampled_ratio_cap must be at least 1, got {self.sampled_ratio_cap}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        for name in ("max_prompt_length", "max_teacher_prompt_length", "loss_chunk_size", "vllm_max_model_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens or None, got {value}")
        if self.num_completions_to_print is not None and self.num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be at least 1 or None (all), got "
                             f"{self.num_completions_to_print}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be at least 1, got {self.vllm_tensor_parallel_size}")
        # UnifiedConfig's "auto" resolves to the answer column (self-teacher) or to None.
        column = "answer" if self.privileged_from == "auto" else self.privileged_from
        check_templates(self.teacher_prompt_template, self.answer_context_template, column)
        if self.divergence == "sampled" and self.kl_clip is not None:
            raise ValueError(
                "kl_clip is not defined for divergence='sampled': its per-token value is a policy-gradient surrogate, "
                "not a divergence; use sampled_ratio_cap, or divergence='full'/'topk' with kl_clip"
            )
        if self.max_teacher_prompt_length is None:
            self.max_teacher_prompt_length = self.max_prompt_length

    def _resolve_rollout_backend(self) -> None:
        """The one place ``use_vllm`` (TRL's name) and ``rollout_backend`` are reconciled; both agree afterwards."""
        if self.rollout_backend is None:
            self.rollout_backend = "vllm" if self.use_vllm else "hf"
        _check_choice("rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS)
        if self.use_vllm and self.rollout_backend != "vllm":
            raise ValueError(
                f"use_vllm=True asks for vLLM rollouts but rollout_backend={self.rollout_backend!r}: set one of them "
                "(use_vllm=True is the same as rollout_backend='vllm')"
            )
        self.use_vllm = self.rollout_backend == "vllm"
        if self.rollout_compile is not None and self.rollout_backend != "hf_static":
            raise ValueError(
                f"rollout_compile={self.rollout_compile} only applies to rollout_backend='hf_static', got "
                f"rollout_backend={self.rollout_backend!r}: drop rollout_compile or set rollout_backend='hf_static'"
            )

    def check_trainer_inputs(self, teacher_model, vocab_size: int) -> None:
        """What the config alone cannot check: its fit with the trainer's teacher and tokenizer (before any load)."""
        if teacher_model is not None and self.self_teacher != "frozen":
            raise ValueError(
                f"self_teacher={self.self_teacher!r} chooses a self-teacher, but a teacher_model was given, which "
                "would be used instead and the setting ignored: drop teacher_model for a self-teacher, or leave "
                "self_teacher at its default ('frozen') with an external teacher"
            )
        if self.divergence == "topk" and self.teacher_top_k > vocab_size:
            raise ValueError(f"teacher_top_k={self.teacher_top_k} is above the tokenizer's vocabulary "
                             f"({vocab_size} tokens); set teacher_top_k <= {vocab_size}")


def check_finite_floats(config) -> None:
    """Refuse NaN and infinity in every float field: range checks pass NaN, and no knob means anything at inf."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{spec.name}={value} is not a finite number; give a finite value"
                             + (" (or None to turn it off)" if spec.default is None else ""))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def as_config(args: GKDConfig | None, config_class: type, model, name: str):
    """``args`` as a ``config_class``: a plain ``GKDConfig`` (or a parent config) keeps all its values and gets the
    class's defaults for the rest (given to ``OPSDTrainer``, the same object: see :func:`adopt_gkd_config`); ``None``
    gets the defaults, with ``output_dir`` ``<model name>-<name>`` (``model``: the trainer's, a path or a module)."""
    if args is None:
        model_name = model if isinstance(model, str) else name.lower()
        return config_class(output_dir=f"{model_name.split('/')[-1]}-{name}")
    if isinstance(args, config_class):
        return args
    if config_class is OPSDConfig:
        return adopt_gkd_config(args)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return config_class(**values)


def adopt_gkd_config(args: GKDConfig) -> OPSDConfig:
    """``args`` itself, made an ``OPSDConfig``: all its values kept, OPSD's own knobs at their defaults, validated.

    GKD's trainer reads the user's own config (``trainer.args is args``: later edits count); so does ours.
    """
    for knob in dataclasses.fields(OPSDConfig):
        if not hasattr(args, knob.name):
            default = knob.default_factory() if knob.default is dataclasses.MISSING else knob.default
            setattr(args, knob.name, default)
    args.__class__ = OPSDConfig
    if args.max_teacher_prompt_length is None:
        args.max_teacher_prompt_length = args.max_prompt_length
    args.check_opsd_fields()
    return args
