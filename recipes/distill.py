"""The flow OPSD, OPD and the unified recipe share: one ``OPSDTrainer`` (or ``UnifiedTrainer``).

``recipes/opsd.py``, ``recipes/opd.py`` and ``recipes/unified.py`` are thin front ends over :func:`run`;
they differ in who teaches: the student's own initial policy seeing privileged context (``self``), a
teacher model or OpenAI-compatible server (``external``), or, for the unified objective, whatever its
``teacher_kind`` / ``preset`` says (including ``none``: reward only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from recipes import common, launch_env, memory, models, student
from recipes.common import RecipeArguments, RecipeError
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.rewards import math_answer_reward
from trl_opsd.unified import UnifiedConfig, UnifiedTrainer

API_SERVERS = ("vllm", "openai")
REWARD_FUNCTIONS = {"math_answer": math_answer_reward}
RECIPES = ("opsd", "opd", "unified")


@dataclass
class TeacherArguments:
    """Where OPD's teacher comes from, beyond GKD's ``teacher_model_name_or_path`` / ``teacher_model_init_kwargs``."""

    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the in-process teacher in 4-bit NF4 "
                                       "(the seed notebook's Mixtral-8x7B)."})
    teacher_api_base: str | None = field(default=None, metadata={"help": "Base URL of an OpenAI-compatible server "
                                         "(e.g. vLLM's http://host:8000/v1) to use as the teacher instead of a model."})
    teacher_api_model: str | None = field(default=None, metadata={"help": "Model name served at teacher_api_base."})
    teacher_api_server: str = field(default="vllm", metadata={"help": f"One of {API_SERVERS}: the server's dialect "
                                    "(vLLM: top-k up to 20; OpenAI legacy completions: up to 5)."})
    teacher_api_key_env: str | None = field(default=None, metadata={"help": "Name of the environment variable that "
                                            "holds the server's API key (the key itself is never stored)."})
    teacher_api_cache_dir: str | None = field(default=None, metadata={"help": "Cache teacher responses here."})

    def __post_init__(self):
        if self.teacher_api_server not in API_SERVERS:
            raise RecipeError(f"teacher_api_server must be one of {API_SERVERS}, got {self.teacher_api_server!r}")
        if (self.teacher_api_base is None) != (self.teacher_api_model is None):
            raise RecipeError("teacher_api_base and teacher_api_model go together: set both or neither")


@dataclass
class RewardArguments:
    """The unified objective's reward term (alpha > 0, or reward_filter)."""

    reward_funcs: list[str] = field(default_factory=lambda: ["math_answer"], metadata={
        "help": f"Reward functions, summed: {sorted(REWARD_FUNCTIONS)} (math_answer: 1 when the final answer "
                "equals the row's 'answer')."})

    def __post_init__(self):
        unknown = sorted(set(self.reward_funcs) - set(REWARD_FUNCTIONS))
        if unknown:
            raise RecipeError(f"reward_funcs: unknown {unknown}; known are {sorted(REWARD_FUNCTIONS)}")


@dataclass(frozen=True)
class TeacherChoice:
    kind: str  # "self" | "external" | "api" | "none"
    footprint: str  # memory.TrainingFootprint.teacher
    description: str
    spec: models.ModelSpec | None = None


NO_TEACHER = TeacherChoice("none", "none", "none: the reward term alone trains the student")


def make_parser(recipe: str) -> TrlParser:
    if recipe == "opsd":
        return TrlParser((RecipeArguments, OPSDConfig, ModelConfig))
    if recipe == "unified":
        return TrlParser((RecipeArguments, TeacherArguments, RewardArguments, UnifiedConfig, ModelConfig))
    parser = TrlParser((RecipeArguments, TeacherArguments, OPSDConfig, ModelConfig))
    # OPD's teacher sees the student's prompt unless privileged context is asked for (YAML / CLI win).
    parser.set_defaults(privileged_from=None)
    return parser


@dataclass
class Parsed:
    """The recipe's dataclasses by role (``teacher`` / ``reward`` are ``None`` where the recipe has none)."""

    script: RecipeArguments
    teacher: TeacherArguments | None
    reward: RewardArguments | None
    training: OPSDConfig
    model: ModelConfig
    all: tuple


def unpack(recipe: str, parsed: tuple) -> Parsed:
    if recipe == "opsd":
        script, training, model = parsed
        return Parsed(script, None, None, training, model, parsed)
    if recipe == "unified":
        return Parsed(*parsed, all=parsed)
    script, teacher, training, model = parsed
    return Parsed(script, teacher, None, training, model, parsed)


def teacher_kind_of(recipe: str, args: Parsed) -> str:
    """"self", "external" or "none"; for the unified recipe its config decides (and is told the answer)."""
    if recipe != "unified":
        return "self" if recipe == "opsd" else "external"
    kind = args.training.teacher_kind
    if kind is None:
        given = args.training.teacher_model_name_or_path or args.teacher.teacher_api_base
        kind = "external" if given else "self"
    try:
        args.training.resolve_teacher_kind(kind)  # re-checks the (alpha, lambda, teacher, sampler) combination
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return kind


# -- teacher ------------------------------------------------------------------------------------------
def self_teacher(training_args: OPSDConfig, use_peft: bool) -> TeacherChoice:
    mode = training_args.self_teacher
    if mode == "live":
        return TeacherChoice("self", "student_view", "self: the live student weights, without gradient")
    if use_peft:
        if mode == "ema":
            raise RecipeError("self_teacher='ema' needs its own weights and cannot be combined with use_peft (or a "
                              "memory-tight switch to 4-bit + LoRA): use self_teacher 'frozen' or 'live'")
        return TeacherChoice("self", "student_view", "self: the student with its LoRA adapters disabled = the "
                             "initial policy (no extra weights)")
    if mode == "ema":
        return TeacherChoice("self", "copy", f"self: EMA of the student (decay {training_args.teacher_ema_decay})")
    return TeacherChoice("self", "copy", "self: frozen copy of the initial policy")


def external_teacher(training_args: OPSDConfig, teacher_args: TeacherArguments) -> TeacherChoice:
    if teacher_args.teacher_api_base:
        if training_args.teacher_model_name_or_path:
            raise RecipeError("set teacher_model_name_or_path (an in-process teacher) or teacher_api_base (a server), "
                              "not both")
        return TeacherChoice("api", "none", f"OpenAI-compatible server ({teacher_args.teacher_api_server}) "
                             f"{teacher_args.teacher_api_base}, model {teacher_args.teacher_api_model}")
    if not training_args.teacher_model_name_or_path:
        raise RecipeError("OPD needs a teacher: set teacher_model_name_or_path (a model) or teacher_api_base + "
                          "teacher_api_model (an OpenAI-compatible server); for a self-teacher use recipes/opsd.py")
    try:
        spec = models.resolve(training_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    return TeacherChoice("external", "external", f"in-process model {spec.name}", spec)


def check_teacher_under_launch(setup: launch_env.LaunchSetup, teacher: TeacherChoice) -> None:
    """Refuse the launch setups under which OPSDTrainer would place or shard the teacher wrongly, or which
    have never been run.

    Under FSDP2 the trainer shards a teacher with its own weights through TRL's ``prepare_fsdp`` (and refuses
    FSDP1, EMA teachers and meta-device teachers itself), but no GPU run has exercised that path yet, so the
    recipes still route such teachers to PEFT or DeepSpeed.
    """
    if setup.distributed == "fsdp":
        if setup.fsdp_version != 2:
            raise RecipeError(
                "FSDP1 cannot run on-policy distillation here: the trainer samples rollouts from (and runs the "
                "self-teacher on) accelerator.unwrap_model(model), outside the root FSDP unit, whose parameters "
                "(embeddings, lm_head) stay sharded there. Use fsdp_version: 2 (accelerate_configs/fsdp.yaml) or "
                "DeepSpeed (accelerate_configs/deepspeed_zero2.yaml / deepspeed_zero3.yaml)"
            )
        if teacher.footprint in ("copy", "external"):
            raise RecipeError(
                f"FSDP with a teacher that has its own weights ({teacher.description}) has not been run on GPUs yet "
                "(the trainer shards it with TRL's prepare_fsdp, which needs fsdp_cpu_ram_efficient_loading: false). "
                "Set use_peft: true (the self-teacher is then the adapter-disabled student: no extra weights), or "
                "launch with DeepSpeed (accelerate_configs/deepspeed_zero2.yaml or deepspeed_zero3.yaml)"
            )
    if setup.distributed == "deepspeed" and setup.zero_stage == 3 and setup.zero3_init and teacher.footprint == "copy":
        raise RecipeError(
            "ZeRO-3 with zero3_init_flag: true loads the student already partitioned, and the trainer's frozen copy "
            "(copy.deepcopy) would clone empty shards. Set zero3_init_flag: false (accelerate_configs/"
            "deepspeed_zero3.yaml does) or use_peft: true"
        )


def check_api_teacher_loss(training_args: OPSDConfig, teacher: TeacherChoice) -> None:
    if teacher.kind == "api" and training_args.divergence == "full":
        raise RecipeError("divergence='full' needs the teacher's dense logits, which a server does not return: set "
                          "divergence to 'topk' (top-k log-probs + tail bucket) or 'sampled' (sampled-token reverse "
                          "KL)")


# -- plan ---------------------------------------------------------------------------------------------
def describe_unified(args: UnifiedConfig, reward: RewardArguments) -> dict[str, Any]:
    """The unified objective's knobs: loss = lambda * D + alpha * R (trl_opsd/unified.py)."""
    return {
        "objective": "lambda * distillation + alpha * REINFORCE(reward)",
        "preset": args.preset,
        "alpha_reward_weight": args.reward_weight,
        "lambda_distillation_weight": args.distillation_weight,
        "sampler": args.sampler,
        "num_generations": args.num_generations,
        "reward_funcs": reward.reward_funcs if (args.reward_weight > 0 or args.reward_filter) else "none",
        "reward_filter": args.reward_filter,
        "distillation_loss": args.distillation_loss + (f" (hinton_alpha {args.hinton_alpha}, T = loss_temperature)"
                                                       if args.distillation_loss == "hinton" else ""),
    }


def describe_loss(args: OPSDConfig, reward: RewardArguments | None = None) -> dict[str, Any]:
    if args.divergence == "sampled":
        divergence = ("sampled-token reverse KL: advantage log p_T(y) - log p_S(y) on the sampled token "
                      f"(importance ratio capped at {args.sampled_ratio_cap}); logged value is the KL estimate")
    else:
        name = {0.0: "forward KL  KL(p_T || p_S)", 1.0: "reverse KL  KL(p_S || p_T)"}.get(
            float(args.beta), f"generalized JSD(beta={args.beta})")
        scope = "the vocabulary"
        if args.divergence == "topk":
            scope = f"the teacher's top-{args.teacher_top_k} + a tail bucket"
        divergence = f"{name}, summed over {scope}  [beta={args.beta}]"
    clip = "none"
    if args.kl_clip is not None:
        where = "on each vocabulary entry's term, before the sum" if args.kl_clip_mode == "pointwise" else (
            "per token, after the vocabulary sum")
        clip = f"{args.kl_clip_mode} at {args.kl_clip} {where}"
    unified = describe_unified(args, reward) if isinstance(args, UnifiedConfig) else {}
    return {
        **unified,
        "divergence": divergence,
        "clip": clip,
        "loss_temperature": args.loss_temperature,
        "reduction": "sum over generated tokens / generated tokens in the accumulation window",
        "on_policy_fraction_lmbda": args.lmbda,
        "seq_kd": args.seq_kd,
        "rollouts": f"temperature {args.temperature}, up to {args.max_new_tokens} new tokens",
    }


def describe_privileged_context(args: OPSDConfig) -> str:
    rows = "rows' teacher_messages / privileged_context"
    if args.privileged_from is None:
        return f"only {rows}; otherwise the teacher sees the student's own prompt"
    return (f"{rows}, else column {args.privileged_from!r} through answer_context_template "
            f"{args.answer_context_template!r}, added with teacher_prompt_template {args.teacher_prompt_template!r}")


def teacher_dtype(training_args: OPSDConfig, model_args: ModelConfig) -> str | None:
    """The in-process teacher's dtype: its own ``teacher_model_init_kwargs`` first, else the student's."""
    return (training_args.teacher_model_init_kwargs or {}).get("dtype", model_args.dtype)


@dataclass
class Resolved:
    """Everything the plan says, kept for the run that follows it."""

    plan: dict[str, Any]
    student: models.ModelSpec
    teacher: TeacherChoice
    data: common.Data


def resolve(recipe: str, args: Parsed, launch: common.Launch) -> Resolved:
    """The plan, with the VRAM decision applied to the model / teacher arguments; loads no weights."""
    script_args, teacher_args, training_args, model_args = args.script, args.teacher, args.training, args.model
    setup = common.described_setup(script_args, launch)
    try:
        student_spec = models.resolve(model_args.model_name_or_path)
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    teacher_kind = teacher_kind_of(recipe, args)
    if teacher_kind != "external" and (training_args.teacher_model_name_or_path or
                                       (teacher_args and teacher_args.teacher_api_base)):
        raise RecipeError(f"this run's teacher is {teacher_kind!r}: remove teacher_model_name_or_path / "
                          "teacher_api_base, or use recipes/opd.py (unified: teacher_kind external) for an external "
                          "teacher")
    external = external_teacher(training_args, teacher_args) if teacher_kind == "external" else None

    def teacher_for(use_peft: bool) -> TeacherChoice:
        if teacher_kind == "none":
            return NO_TEACHER
        return external or self_teacher(training_args, use_peft)

    student_parameters, parameters_source = models.count_parameters(student_spec, training_args.trust_remote_code)
    teacher_parameters = None
    if external is not None and external.spec is not None:
        teacher_parameters, _ = models.count_parameters(external.spec, training_args.trust_remote_code)

    def footprint(load_in_4bit: bool, use_peft: bool, teacher_4bit: bool) -> memory.TrainingFootprint | None:
        if student_parameters is None:
            return None
        return memory.TrainingFootprint(
            student_parameters=student_parameters,
            student=student.precision_of(model_args.dtype, load_in_4bit, model_args.load_in_8bit and not load_in_4bit),
            use_peft=use_peft, teacher=teacher_for(use_peft).footprint, teacher_parameters=teacher_parameters,
            teacher_precision=student.precision_of(teacher_dtype(training_args, model_args), teacher_4bit, False),
            num_processes=setup.num_processes, zero_stage=setup.zero_stage, fsdp=setup.distributed == "fsdp",
        )

    teacher_4bit = bool(teacher_args and teacher_args.teacher_load_in_4bit)
    already_quantized = model_args.load_in_4bit and model_args.use_peft and (external is None or teacher_4bit
                                                                             or external.kind == "api")
    cannot_switch = training_args.self_teacher == "ema" and teacher_kind == "self"
    device, device_gib = common.device_memory(script_args, training_args)
    decision = memory.decide(
        footprint(model_args.load_in_4bit, model_args.use_peft, teacher_4bit),
        None if already_quantized or cannot_switch else footprint(True, True, external is not None),
        device, device_gib, script_args.memory_policy,
    )
    if decision.switch_to_4bit_lora:
        model_args.load_in_4bit, model_args.load_in_8bit, model_args.use_peft = True, False, True
        if teacher_args is not None and external is not None and external.kind == "external":
            teacher_args.teacher_load_in_4bit = True

    teacher = teacher_for(model_args.use_peft)
    check_teacher_under_launch(setup, teacher)
    check_api_teacher_loss(training_args, teacher)
    data = common.resolve_data(script_args, with_solution=training_args.lmbda < 1.0,
                               load_remote=not script_args.dry_run)

    teacher_plan: dict[str, Any] = {"kind": teacher.kind, "what": teacher.description,
                                    "privileged_context": describe_privileged_context(training_args)}
    if teacher.spec is not None:
        precision = student.precision_of(teacher_dtype(training_args, model_args), teacher_args.teacher_load_in_4bit,
                                         False)
        teacher_plan["model"] = {**teacher.spec.describe(), "parameters": teacher_parameters,
                                 "precision": precision.describe()}
    plan = {
        "recipe": recipe,
        "student": student.describe(student_spec, student_parameters, parameters_source, model_args),
        "teacher": teacher_plan,
        "data": data.describe(script_args),
        "loss": describe_loss(training_args, args.reward),
        "optimization": common.describe_optimization(training_args),
        "accelerate": common.describe_launch(setup, launch, training_args),
        "memory": decision.describe(),
        "output_dir": training_args.output_dir,
        "warnings": common.precision_warnings(training_args, device),
    }
    return Resolved(plan, student_spec, teacher, data)


# -- run ----------------------------------------------------------------------------------------------
def build_teacher(resolved: Resolved, teacher_args: TeacherArguments | None, training_args: OPSDConfig,
                  model_args: ModelConfig, tokenizer):
    """(teacher for the trainer's ``teacher_model``, its tokenizer or None); ``(None, None)`` for self / none."""
    teacher = resolved.teacher
    if teacher.kind in ("self", "none"):
        return None, None
    if teacher.kind == "api":
        from trl_opsd.teachers.openai_compat import OpenAICompatTeacher

        return OpenAICompatTeacher(
            teacher_args.teacher_api_base, teacher_args.teacher_api_model, student_tokenizer=tokenizer,
            server=teacher_args.teacher_api_server, api_key_env=teacher_args.teacher_api_key_env,
            cache=teacher_args.teacher_api_cache_dir,
        ), None
    path = models.materialize(teacher.spec)
    init_kwargs = dict(training_args.teacher_model_init_kwargs or {})
    dtype = init_kwargs.pop("dtype", model_args.dtype)
    quantization = models.quantization_config(teacher_args.teacher_load_in_4bit, False, dtype,
                                              model_args.bnb_4bit_quant_type, model_args.use_bnb_nested_quant)
    model = models.load_causal_lm(path, dtype=dtype, quantization=quantization,
                                  trust_remote_code=training_args.trust_remote_code,
                                  attn_implementation=model_args.attn_implementation, extra=init_kwargs)
    training_args.teacher_model_init_kwargs = None  # consumed here: the trainer gets an instance
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)


def run(recipe: str, argv: list[str] | None = None) -> int:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    launch = common.detect_launch()
    args = unpack(recipe, common.parse(make_parser(recipe), argv, launch))
    resolved = resolve(recipe, args, launch)
    common.print_plan(recipe, resolved.plan, args.script.dry_run)
    if args.script.dry_run:
        return common.dry_run(recipe, resolved.plan, args.all, resolved.data, args.training.output_dir)

    if resolved.data.train is None:
        resolved.data = common.resolve_data(args.script, args.training.lmbda < 1.0, load_remote=True)
    model, tokenizer = student.load(resolved.student, args.training, args.model)
    teacher, teacher_tokenizer = build_teacher(resolved, args.teacher, args.training, args.model, tokenizer)
    trainer_kwargs = dict(
        model=model, teacher_model=teacher, args=args.training, train_dataset=resolved.data.train,
        processing_class=tokenizer, peft_config=get_peft_config(args.model), teacher_processing_class=teacher_tokenizer,
    )
    if recipe == "unified":
        rewards = [REWARD_FUNCTIONS[name] for name in args.reward.reward_funcs]
        trainer = UnifiedTrainer(**trainer_kwargs, reward_funcs=rewards)
    else:
        trainer = OPSDTrainer(**trainer_kwargs)
    return common.train_and_record(recipe, trainer, resolved.plan, args.all, resolved.data, launch,
                                   args.script.rank_fingerprint)
