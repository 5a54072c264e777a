"""The accelerate setup a recipe runs under, and the settings without which it would silently run wrong.

Three traps this module exists for (accelerate 1.15, measured here):

- ``accelerate launch --cpu --num_processes 2`` (or ``distributed_type: MULTI_CPU``) starts ONE process
  (accelerate's simple launcher expects mpirun); a 2-rank CPU run needs a multi-process launch
  (``distributed_type: MULTI_GPU`` + ``use_cpu: true``, see ``accelerate_configs/cpu_ddp.yaml``) AND the
  script's ``use_cpu=True``. Without it, two processes start on a machine without GPUs but each builds
  its own single-process state: two independent copies train, and nothing complains.
- DeepSpeed without a GPU: ``use_cpu=True`` makes accelerate drop DeepSpeed silently (plain CPU DDP), and
  without it accelerate finds no backend and reports one process while DeepSpeed's process group has
  two. What works is ``use_cpu=False`` with ``ddp_backend="gloo"``.
- FSDP is only applied on GPUs; on CPU accelerate ignores it.

So the recipe decides these two arguments from the launch environment before the training arguments
are built (they create accelerate's state on construction), and checks the trainer it gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


class LaunchError(RuntimeError):
    """The launch setup cannot run this recipe correctly."""


@dataclass(frozen=True)
class LaunchSetup:
    """How the recipe is (or would be) launched, read from accelerate's environment or a config file."""

    source: str
    distributed: str  # "none" | "ddp" | "deepspeed" | "fsdp"
    num_processes: int
    mixed_precision: str = "no"
    zero_stage: int | None = None
    zero3_init: bool | None = None
    fsdp_version: int | None = None
    cpu_requested: bool = False

    @property
    def shards_parameters(self) -> bool:
        return self.distributed == "fsdp" or (self.distributed == "deepspeed" and self.zero_stage == 3)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def launched_by_accelerate() -> bool:
    """Whether a launcher started this process: torchrun (and accelerate's multi-process launchers) set
    ``LOCAL_RANK``; accelerate's simple launcher, which a one-process ``accelerate launch`` takes, sets no
    rank but always sets ``ACCELERATE_MIXED_PRECISION`` and ``ACCELERATE_DYNAMO_BACKEND``."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ


def from_environment() -> LaunchSetup:
    """The setup ``accelerate launch`` (or torchrun) put in this process's environment."""
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    launched = launched_by_accelerate() or num_processes > 1
    source = "accelerate launch environment" if launched else "single process (not launched by accelerate)"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        zero3_init = _flag("ACCELERATE_DEEPSPEED_ZERO3_INIT")
        return LaunchSetup(source, "deepspeed", num_processes, mixed_precision,
                           zero_stage=int(stage) if stage else None, zero3_init=zero3_init)
    if _flag("ACCELERATE_USE_FSDP"):
        return LaunchSetup(source, "fsdp", num_processes, mixed_precision,
                           fsdp_version=int(os.environ.get("FSDP_VERSION", "1")))
    return LaunchSetup(source, "ddp" if num_processes > 1 else "none", num_processes, mixed_precision,
                       cpu_requested=_flag("ACCELERATE_USE_CPU"))


def from_config_file(path: str | os.PathLike) -> LaunchSetup:
    """The setup an accelerate config file describes (for dry runs outside ``accelerate launch``)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(path).is_file():
        raise LaunchError(f"accelerate_config={str(path)!r} does not exist")
    config = load_config_from_file(str(path))
    kind = str(config.distributed_type).split(".")[-1]
    mixed_precision = str(config.mixed_precision or "no").split(".")[-1].lower()
    source = f"accelerate config {path}"
    num_processes = max(1, int(config.num_processes or 1))
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        stage = ds.get("zero_stage")
        return LaunchSetup(source, "deepspeed", num_processes, mixed_precision,
                           zero_stage=None if stage is None else int(stage), zero3_init=bool(ds.get("zero3_init_flag")))
    if kind == "FSDP":
        return LaunchSetup(source, "fsdp", num_processes, mixed_precision,
                           fsdp_version=int((config.fsdp_config or {}).get("fsdp_version", 1)))
    return LaunchSetup(source, "ddp" if num_processes > 1 else "none", num_processes, mixed_precision,
                       cpu_requested=bool(config.use_cpu))


def required_overrides(setup: LaunchSetup, has_accelerator: bool) -> dict[str, object]:
    """Training arguments this setup needs on this machine, with the reason for each (see module docstring)."""
    if has_accelerator:
        return {}
    if setup.distributed == "fsdp":
        raise LaunchError("FSDP needs GPUs: on CPU accelerate ignores it and would run plain DDP; use cpu_ddp.yaml")
    if setup.distributed == "deepspeed":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": True}


OVERRIDE_REASONS = {
    "use_cpu": "no GPU: set so that ranks join one process group; under DeepSpeed unset, or DeepSpeed is dropped",
    "ddp_backend": "DeepSpeed without a GPU: accelerate finds no backend unless it is named",
}


def check_trainer_matches(setup: LaunchSetup, trainer) -> None:
    """Refuse to train when the trainer's accelerator is not the setup that was launched."""
    state = trainer.accelerator
    if state.num_processes != setup.num_processes:
        raise LaunchError(
            f"{setup.num_processes} processes were launched but the trainer sees {state.num_processes}: the ranks "
            "would train independent copies. On CPU the training arguments need use_cpu=True (DeepSpeed: "
            "ddp_backend='gloo')."
        )
    if (setup.distributed == "deepspeed") != bool(trainer.is_deepspeed_enabled):
        raise LaunchError(f"launched with distributed={setup.distributed!r} but DeepSpeed enabled="
                          f"{trainer.is_deepspeed_enabled} in the trainer")
    if (setup.distributed == "fsdp") != bool(trainer.is_fsdp_enabled):
        raise LaunchError(f"launched with distributed={setup.distributed!r} but FSDP enabled={trainer.is_fsdp_enabled} "
                          "in the trainer")


def describe(setup: LaunchSetup) -> dict[str, object]:
    details: dict[str, object] = {"source": setup.source, "distributed": setup.distributed,
                                  "num_processes": setup.num_processes, "mixed_precision": setup.mixed_precision}
    if setup.distributed == "deepspeed":
        details.update(zero_stage=setup.zero_stage, zero3_init=setup.zero3_init)
    if setup.distributed == "fsdp":
        details["fsdp_version"] = setup.fsdp_version
    return details
