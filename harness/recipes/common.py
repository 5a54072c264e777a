"""What every recipe shares: its script arguments, the launch overrides, data loading, the plan and manifests.

A recipe runs in the same order every time: decide the launch overrides (before the training
arguments exist, because they create accelerate's state), parse the dataclasses from the command line
and ``--config`` YAML (``TrlParser``), resolve a plan (models, data, teacher, losses, accelerate setup,
VRAM decision) without loading weights, print it, and stop there for ``--dry_run``; otherwise load,
check the trainer matches the launch, train, save, and write the run manifest next to the outputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import sys
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback
from trl import ScriptArguments

from harness.recipes import data_sources, launch_env, manifest, memory

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (editable install) or site-packages
CONFIGS = "configs"  # the shipped YAML configs, package data of harness.recipes
MANIFEST_NAME = "run_manifest.json"
DRY_RUN_MANIFEST_NAME = "run_manifest.dry_run.json"
FINGERPRINT_DIR = "rank_fingerprints"


class RecipeError(ValueError):
    """A configuration the recipe refuses, with the config key to change."""


@dataclass
class RecipeArguments(ScriptArguments):
    """Data and run-control arguments shared by every recipe (on top of TRL's ``ScriptArguments``)."""

    dataset_format: str = field(default="auto", metadata={"help": f"One of {data_sources.DATASET_FORMATS}: rows in "
                                "the project's contract, GSM8K question/answer rows, problem/solution rows (the OPSD "
                                "paper's), or detect from the columns."})
    num_train_rows: int | None = field(default=None, metadata={"help": "Use the first N rows (arithmetic: generate N "
                                       f"problems, default {data_sources.DEFAULT_ARITHMETIC_ROWS})."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the arithmetic world's problems."})
    dry_run: bool = field(default=False, metadata={"help": "Print the resolved plan and write it as a manifest; load "
                          "no weights, touch no hub."})
    accelerate_config: str | None = field(default=None, metadata={"help": "Describe this accelerate config in the "
                                          "plan (for dry runs outside `accelerate launch`)."})
    memory_policy: str = field(default="auto", metadata={"help": "'auto': switch to 4-bit + LoRA when the VRAM check "
                               "finds memory tight (the seed notebook's rule); 'as_configured': never switch."})
    assume_gpu_memory_gb: float | None = field(default=None, metadata={"help": "Plan for a GPU with this much memory "
                                               "(GiB) instead of the detected one."})
    rank_fingerprint: bool = field(default=False, metadata={"help": f"Each rank writes {FINGERPRINT_DIR}/rank<i>.json: "
                                   "world size, a hash of its first batch and of its final weights."})

    def __post_init__(self):
        if self.dataset_format not in data_sources.DATASET_FORMATS:
            raise RecipeError(f"dataset_format must be one of {data_sources.DATASET_FORMATS}, "
                              f"got {self.dataset_format!r}")
        if self.memory_policy not in memory.MEMORY_POLICIES:
            raise RecipeError(f"memory_policy must be one of {memory.MEMORY_POLICIES}, got {self.memory_policy!r}")
        if self.num_train_rows is not None and self.num_train_rows < 1:
            raise RecipeError(f"num_train_rows must be positive, got {self.num_train_rows}")
        if self.assume_gpu_memory_gb is not None and self.assume_gpu_memory_gb <= 0:
            raise RecipeError(f"assume_gpu_memory_gb must be positive, got {self.assume_gpu_memory_gb}")


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a recipe's ``main``; a refused configuration prints its reason (no traceback) and exits with 2."""
    try:
        return main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


# -- launch -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """The setup this process was launched under, and the training arguments it forces on this machine."""

    running: launch_env.LaunchSetup
    overrides: dict[str, object]

    def argv(self) -> list[str]:
        return [token for key, value in self.overrides.items() for token in (f"--{key}", str(value))]


def detect_launch() -> Launch:
    running = launch_env.from_environment()
    try:
        overrides = launch_env.required_overrides(running, launch_env.accelerator_available())
    except launch_env.LaunchError as error:
        raise RecipeError(str(error)) from None
    return Launch(running, overrides)


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the YAML configs installed with the package (``opsd_arith_cpu``, ...)."""
    folder = resources.files("harness.recipes") / CONFIGS
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def config_path(value: str) -> str:
    """``--config``'s value as a file: an existing path as given, else a shipped config's name."""
    if Path(value).expanduser().exists():
        return value
    shipped = shipped_configs()
    name = Path(value).name.removesuffix(".yaml")
    if "/" not in value and name in shipped:
        return str(shipped[name])
    raise RecipeError(f"--config {value!r} is neither a file nor a shipped config; shipped are {sorted(shipped)}")


def with_config_paths(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` / ``--config=NAME`` turned into a path (see :func:`config_path`)."""
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--config" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
        elif token.startswith("--config="):
            out[i] = "--config=" + config_path(token.split("=", 1)[1])
    return out


def parse(parser, argv: list[str] | None, launch: Launch) -> tuple:
    """The parser's dataclasses from ``argv`` (default: the command line) plus the launch's forced arguments."""
    argv = with_config_paths(list(sys.argv[1:] if argv is None else argv))
    try:
        parsed = parser.parse_args_and_config(args=argv + launch.argv())
    except ValueError as error:  # a config value refused in __post_init__: a refusal, not a crash
        raise RecipeError(str(error)) from None
    manifest.register_secrets(parsed)  # before any plan is printed: the key behind teacher_api_key_env, URL credentials
    return parsed


def described_setup(script_args: RecipeArguments, launch: Launch) -> launch_env.LaunchSetup:
    if script_args.accelerate_config:
        try:
            return launch_env.from_config_file(script_args.accelerate_config)
        except launch_env.LaunchError as error:
            raise RecipeError(str(error)) from None
    return launch.running


def describe_launch(setup: launch_env.LaunchSetup, launch: Launch, training_args) -> dict[str, object]:
    details = launch_env.describe(setup)
    details["precision"] = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    if launch.overrides:
        details["forced_on_this_machine"] = {
            key: f"{value}  ({launch_env.OVERRIDE_REASONS[key]})" for key, value in launch.overrides.items()
        }
    return details


def describe_optimization(args) -> dict[str, Any]:
    return {
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler_type,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs} epochs",
        "seed": args.seed,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def precision_warnings(training_args, device: str) -> list[str]:
    if device == "cpu" and (training_args.bf16 or training_args.fp16):
        return ["bf16/fp16 on CPU autocasts every op (slow and imprecise): CPU configs should set bf16: false"]
    return []


# -- memory -------------------------------------------------------------------------------------------
def device_memory(script_args: RecipeArguments, training_args) -> tuple[str, float | None]:
    if script_args.assume_gpu_memory_gb is not None:
        return "assumed GPU", script_args.assume_gpu_memory_gb
    if training_args.use_cpu:
        return "cpu", None
    return memory.detect_gpu_memory_gib(training_args.local_process_index)


# -- data ---------------------------------------------------------------------------------------------
@dataclass
class Data:
    source: data_sources.DataSource
    train: Any | None  # datasets.Dataset, None until loaded (hub datasets are not loaded for a dry run)
    fingerprint: str | None

    def describe(self, script_args: RecipeArguments) -> dict[str, object]:
        details: dict[str, object] = {"source": self.source.kind, "name": self.source.name, "split": self.source.split}
        if self.source.kind == data_sources.ARITHMETIC:
            details["seed"] = script_args.dataset_seed
        if self.train is not None:
            details.update(num_rows=len(self.train), columns=self.train.column_names,
                           fingerprint_sha256=self.fingerprint)
        else:
            details["num_rows"] = "resolved when the run loads it (hub datasets are not fetched for a dry run)"
        return details

    def summary(self) -> dict[str, object]:
        """What the manifest records about the rows trained on (``None`` while a hub dataset is not loaded)."""
        return {"fingerprint_sha256": self.fingerprint, "num_rows": None if self.train is None else len(self.train)}


def resolve_data(script_args: RecipeArguments, with_solution: bool, load_remote: bool) -> Data:
    try:
        source = data_sources.resolve_source(script_args.dataset_name, script_args.dataset_train_split)
        if not (source.is_local or load_remote):
            return Data(source, None, None)
        train = data_sources.load_rows(
            source, dataset_config=script_args.dataset_config, num_rows=script_args.num_train_rows,
            seed=script_args.dataset_seed, with_solution=with_solution, dataset_format=script_args.dataset_format,
        )
    except data_sources.DataSourceError as error:
        raise RecipeError(str(error)) from None
    return Data(source, train, data_sources.fingerprint(train))


def loaded(data: Data, script_args: RecipeArguments, with_solution: bool) -> Data:
    """``data`` with its rows: a hub dataset the plan did not fetch is loaded now."""
    return data if data.train is not None else resolve_data(script_args, with_solution, load_remote=True)


# -- plan and manifests -------------------------------------------------------------------------------
def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def print_plan(recipe: str, plan: dict[str, Any], dry_run: bool) -> None:
    if not is_main_process():
        return
    title = f"trl-opsd recipe plan: {recipe}" + (" (dry run: nothing loaded)" if dry_run else "")
    print(f"===== {title} =====\n" + yaml.safe_dump(manifest.scrub(plan), sort_keys=False, width=110).rstrip()
          + "\n" + "=" * (len(title) + 12), flush=True)


def manifest_payload(recipe: str, plan: dict[str, Any], parsed: tuple, status: str, **extra: Any) -> dict[str, Any]:
    """Everything a reader needs to know what ran; secrets are removed when it is written."""
    config = {}
    for arguments in parsed:
        as_dict = arguments.to_dict() if hasattr(arguments, "to_dict") else vars(arguments)
        name = "arguments" if isinstance(arguments, argparse.Namespace) else type(arguments).__name__
        config[name] = dict(as_dict)
    return {
        "recipe": recipe,
        "status": status,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan,
        "resolved_config": config,
        "packages": manifest.package_versions(),
        "git": manifest.git_state(SOURCE_ROOT),
        "runtime": manifest.runtime_info(),
        **extra,
    }


def write_manifest(output_dir: str, name: str, payload: dict[str, Any]) -> Path | None:
    if not is_main_process():
        return None
    return manifest.write_json(Path(output_dir) / name, payload)


def dry_run(recipe: str, plan: dict[str, Any], parsed: tuple, data: Data, output_dir: str) -> int:
    write_manifest(output_dir, DRY_RUN_MANIFEST_NAME,
                   manifest_payload(recipe, plan, parsed, "dry_run", dataset=data.summary()))
    return 0


def train_and_record(recipe: str, trainer, plan: dict[str, Any], parsed: tuple, data: Data, launch: Launch,
                     rank_fingerprint: bool) -> int:
    """Check the trainer is the launched setup, train, save, and keep the manifest up to date around it."""
    try:
        launch_env.check_trainer_matches(launch.running, trainer)
    except launch_env.LaunchError as error:
        raise RecipeError(str(error)) from None
    output_dir = trainer.args.output_dir
    dataset = data.summary()
    write_manifest(output_dir, MANIFEST_NAME, manifest_payload(recipe, plan, parsed, "running", dataset=dataset))
    if rank_fingerprint:
        trainer.add_callback(RankFingerprintCallback(output_dir, launch.running.shards_parameters))
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model(output_dir)
    write_manifest(output_dir, MANIFEST_NAME, manifest_payload(
        recipe, plan, parsed, "completed", dataset=dataset,
        train={"global_step": result.global_step, "metrics": result.metrics}))
    trainer.accelerator.print(f"{recipe}: trained {result.global_step} steps; model and {MANIFEST_NAME} in "
                              f"{output_dir}")
    return 0


# -- rank agreement -----------------------------------------------------------------------------------
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RankFingerprintCallback(TrainerCallback):
    """Each rank records its view of the run, so that a test (or a person) can check the ranks agreed.

    Equal weight hashes with different first batches mean the ranks trained on different data and still
    ended identical: gradients were synchronised. (Under ZeRO-3 / FSDP each rank holds a shard, so
    the hashes differ by design; ``shards_parameters`` says so.)
    """

    def __init__(self, output_dir: str, shards_parameters: bool):
        self.folder = Path(output_dir) / FINGERPRINT_DIR
        self.shards_parameters = shards_parameters

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        first_batch = next(iter(train_dataloader)) if train_dataloader is not None else {}
        record = {
            "process_index": args.process_index,
            "world_size": args.world_size,
            "global_step": state.global_step,
            "shards_parameters": self.shards_parameters,
            "first_batch_sha256": tensor_digest({k: v for k, v in first_batch.items() if torch.is_tensor(v)}),
            "weights_sha256": tensor_digest(dict(model.named_parameters())),
        }
        manifest.write_json(self.folder / f"rank{args.process_index}.json", record)
