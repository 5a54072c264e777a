"""What OPSD, OPD and the unified recipe share: their arguments, the plan, and the teacher.

``harness.recipes.opsd``, ``opd`` and ``unified`` each read parse -> plan -> load -> trainer -> train; they
differ in who teaches: the student's own initial policy seeing privileged context (``self``), a teacher
model or OpenAI-compatible server (``external``), or, for the unified objective, whatever its
``teacher_kind`` / ``preset`` says (including ``none``: reward only).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser

from harness.recipes import common, launch_env, memory, models, student
from harness.recipes.common import RecipeArguments, RecipeError
from harness.remote_teachers import remote_teacher
from trl_opsd import OPSDConfig
from trl_opsd.collator import OPSDCollator, validate_dataset
from trl_opsd.objective import Divergence
from trl_opsd.rewards import math_answer_reward
from trl_opsd.teacher_setup import check_fsdp_version, check_self_teacher
from trl_opsd.unified import UnifiedConfig

API_SERVERS = ("vllm", "openai")
REWARD_FUNCTIONS = {"math_answer": math_answer_reward}
RECIPES = ("opsd", "opd", "unified")
TEACHER_CACHE_FILE = "teacher_cache.sqlite"


def teacher_cache_file(cache_dir: str | None) -> str | None:
    """The SQLite file of ``teacher_api_cache_dir``: a folder (as its name says) holds it; a ``.sqlite`` path is it."""
    if cache_dir is None or cache_dir.endswith(".sqlite"):
        return cache_dir
    return os.path.join(cache_dir, TEACHER_CACHE_FILE)


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
    teacher_api_cache_dir: str | None = field(default=None, metadata={"help": "Folder for the teacher's response cache "
                                              f"({TEACHER_CACHE_FILE} inside it); a path ending in .sqlite is the "
                                              "cache file itself."})

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


    def replace(self, model: ModelConfig, teacher: TeacherArguments | None) -> Parsed:
        """The same arguments with new model / teacher arguments (the VRAM decision's), in ``all`` too."""
        swap = {id(self.model): model, id(self.teacher): teacher}
        return dataclasses.replace(self, model=model, teacher=teacher,
                                   all=tuple(swap.get(id(a), a) for a in self.all))


def parse(recipe: str, argv: list[str] | None, launch: common.Launch) -> Parsed:
    """The recipe's arguments from ``argv`` (default: the command line) and its ``--config`` YAML."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    parsed = common.parse(make_parser(recipe), argv, launch)
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
    if use_peft and mode != "ema":  # EMA with PEFT is refused by trainer_refusals
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
                          "teacher_api_model (an OpenAI-compatible server); for a self-teacher use trl-opsd opsd")
    try:
        spec = models.resolve(training_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    return TeacherChoice("external", "external", f"in-process model {spec.name}", spec)


# -- refusals (before anything loads) ------------------------------------------------------------------
def trainer_refusals(setup: launch_env.LaunchSetup, teacher: TeacherChoice, training_args: OPSDConfig,
                     use_peft: bool) -> None:
    """Refuse, at plan time, what OPSDTrainer would refuse at construction (through ``trl_opsd.teacher_setup`` and
    ``trl_opsd.objective``'s own checks), plus the placements no GPU run has exercised yet.

    Under FSDP2 the trainer shards a teacher with its own weights through TRL's ``prepare_fsdp``, but no GPU run has
    exercised that path yet, so the recipes still route such teachers to PEFT or DeepSpeed.
    """
    fsdp = setup.distributed == "fsdp"
    try:
        if fsdp:
            check_fsdp_version(setup.fsdp_version)
        if teacher.kind == "self":
            check_self_teacher(training_args.self_teacher, peft=use_peft, fsdp=fsdp)
        if teacher.kind == "api" and not Divergence.from_config(training_args).teacher_requirement().remote_ok:
            raise ValueError(
                f"divergence={training_args.divergence!r} needs the teacher's dense logits, which a server does not "
                "return: set divergence to 'topk' (top-k log-probs + tail bucket) or 'sampled' (sampled-token "
                "reverse KL)"
            )
    except ValueError as error:
        raise RecipeError(str(error)) from None
    if fsdp and teacher.footprint in ("copy", "external"):
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
    unified = describe_unified(args, reward) if isinstance(args, UnifiedConfig) else {}
    return {
        **unified,
        **Divergence.from_config(args).describe(),
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
    args: Parsed  # the arguments the run uses: the VRAM decision applied


def make_plan(recipe: str, args: Parsed, launch: common.Launch) -> Resolved:
    """The plan, and the arguments with the VRAM decision applied (new objects: ``args`` is not changed);
    loads no weights."""
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
                          "teacher_api_base, or use trl-opsd opd (harness/recipes/opd.py; unified: teacher_kind "
                          "external) for an external teacher")
    external = external_teacher(training_args, teacher_args) if teacher_kind == "external" else None

    def teacher_for(use_peft: bool) -> TeacherChoice:
        if teacher_kind == "none":
            return NO_TEACHER
        return external or self_teacher(training_args, use_peft)

    student_parameters, parameters_source = models.count_parameters(student_spec, training_args.trust_remote_code)
    teacher_parameters = None
    if external is not None and external.spec is not None:
        teacher_parameters, _ = models.count_parameters(external.spec, training_args.trust_remote_code)
    teacher_4bit = bool(teacher_args and teacher_args.teacher_load_in_4bit)

    def footprint(candidate: ModelConfig, switched: bool) -> memory.TrainingFootprint | None:
        if student_parameters is None:
            return None
        teacher_in_4bit = teacher_4bit or (switched and external is not None)  # a switch quantizes the teacher too
        return memory.TrainingFootprint(
            student_parameters=student_parameters,
            student=student.precision_of(candidate.dtype, candidate.load_in_4bit, candidate.load_in_8bit),
            use_peft=candidate.use_peft, teacher=teacher_for(candidate.use_peft).footprint,
            teacher_parameters=teacher_parameters,
            teacher_precision=student.precision_of(teacher_dtype(training_args, candidate), teacher_in_4bit, False),
            num_processes=setup.num_processes, zero_stage=setup.zero_stage, fsdp=setup.distributed == "fsdp",
        )

    already_quantized = model_args.load_in_4bit and model_args.use_peft and (external is None or teacher_4bit
                                                                             or external.kind == "api")
    cannot_switch = training_args.self_teacher == "ema" and teacher_kind == "self"
    device, device_gib = common.device_memory(script_args, training_args)
    decision, model_args = memory.plan(model_args, footprint, device, device_gib, script_args.memory_policy,
                                       can_switch=not (already_quantized or cannot_switch))
    if decision.switch_to_4bit_lora and external is not None and external.kind == "external":
        teacher_args = dataclasses.replace(teacher_args, teacher_load_in_4bit=True)
    args = args.replace(model=model_args, teacher=teacher_args)

    teacher = teacher_for(model_args.use_peft)
    trainer_refusals(setup, teacher, training_args, model_args.use_peft)
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
    resolved = Resolved(plan, student_spec, teacher, data, args)
    check_inputs(resolved, args, validate_rows=script_args.dry_run)  # the trainer validates rows of a real run
    return resolved


# -- input checks (before anything loads or is written) ----------------------------------------------
def check_inputs(resolved: Resolved, args: Parsed, validate_rows: bool) -> None:
    """Refuse an unset API-key variable and, with ``validate_rows``, any row the trainer would refuse, so a dry
    run fails where the real run would; the plan says how far the rows were checked."""
    env = args.teacher.teacher_api_key_env if args.teacher is not None else None
    if env and not os.environ.get(env):
        raise RecipeError(f"teacher_api_key_env={env!r} names an environment variable that is not set (or is empty); "
                          "export it before the run")
    if not validate_rows:
        return
    if resolved.data.train is None:
        resolved.plan["data"]["rows_checked"] = "no: hub datasets are not fetched for a dry run"
        return
    tokenizer = _tokenizer_without_weights(resolved.student, args)
    if tokenizer is None:
        resolved.plan["data"]["rows_checked"] = "no: the student's tokenizer is not available offline"
        return
    training = args.training
    privileged_from = training.privileged_from
    if privileged_from == "auto":  # the unified config's: resolved by teacher_kind_of already, except for "none"
        privileged_from = "answer" if resolved.teacher.kind == "self" else None
    try:
        collator = OPSDCollator(
            tokenizer=tokenizer, max_prompt_length=training.max_prompt_length,
            max_teacher_prompt_length=training.max_teacher_prompt_length,
            max_length=training.max_length or min(tokenizer.model_max_length, 1024), privileged_from=privileged_from,
            answer_context_template=training.answer_context_template,
            teacher_prompt_template=training.teacher_prompt_template,
            privileged_truncation=training.privileged_truncation,
        )
        external = resolved.teacher if resolved.teacher.kind in ("external", "api") else None
        training.check_trainer_inputs(external, len(tokenizer))
        validate_dataset(collator, resolved.data.train, "train_dataset", training, external)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    resolved.plan["data"]["rows_checked"] = f"all {len(resolved.data.train)} rows built with the student's tokenizer"


def _tokenizer_without_weights(spec: models.ModelSpec, args: Parsed):
    """The student's tokenizer (no weights), or None where it cannot be had offline."""
    if spec.kind == "arithmetic" and not spec.ready:
        from harness.world.tiny import build_tokenizer

        return build_tokenizer()  # what harness.world.warm_start saves with the world model
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path or spec.name, revision=args.model.model_revision,
                                                  trust_remote_code=args.training.trust_remote_code)
    except (OSError, ValueError):
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as student.load does
    return tokenizer


def dry_run(recipe: str, run: Resolved) -> int:
    return common.dry_run(recipe, run.plan, run.args.all, run.data, run.args.training.output_dir)


def train_data(run: Resolved) -> common.Data:
    """The run's rows (on-policy runs need no gold solution, off-policy ones do)."""
    return common.loaded(run.data, run.args.script, with_solution=run.args.training.lmbda < 1.0)


# -- the teacher --------------------------------------------------------------------------------------
def build_teacher(run: Resolved, tokenizer):
    """(the trainer's ``teacher_model``, its tokenizer or None) for the planned teacher; ``(None, None)`` for a
    self-teacher (the trainer makes it from the student) or none. ``tokenizer`` is the student's."""
    teacher, teacher_args, training_args, model_args = run.teacher, run.args.teacher, run.args.training, run.args.model
    if teacher.kind in ("self", "none"):
        return None, None
    if teacher.kind == "api":
        return remote_teacher(teacher_args.teacher_api_base, teacher_args.teacher_api_model,
                              teacher_args.teacher_api_server, api_key_env=teacher_args.teacher_api_key_env,
                              cache=teacher_cache_file(teacher_args.teacher_api_cache_dir), student_tokenizer=tokenizer), None
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
