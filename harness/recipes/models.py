"""Which model a name means, how big it is (without loading weights), and how to load it.

A model name is a local folder, a hub id, or a model of the offline arithmetic world:
``arithmetic:warm`` is the cached warm-started checkpoint (``harness.world.warm_start``), built on first use
(minutes, on the main process first); ``arithmetic:warm?max_steps=3000&target_no_hint_accuracy=0.6``
overrides fields of ``WarmStartSettings`` (e.g. a longer-trained, stronger teacher for OPD).

Sizes come from the model's ``config.json`` (a local folder or the local hub cache, never the network),
instantiated on the meta device; when there is none, from the name (``7B``, ``8x7B``, ``1.7B``), marked
as an estimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from harness.world import warm_start as world
from harness.world.warm_start import WarmStartSettings

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(ValueError):
    """A model name that cannot be resolved."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "arithmetic" | "local" | "hub"
    path: str | None  # where the weights are (or will be, for a world model not built yet)
    ready: bool  # the weights exist locally
    world_settings: WarmStartSettings | None = None

    def describe(self) -> dict[str, object]:
        details: dict[str, object] = {"name": self.name, "kind": self.kind, "path": self.path, "ready": self.ready}
        if self.world_settings is not None and not self.ready:
            details["note"] = "built on first use by harness.world.warm_start (minutes on CPU), then cached"
        return details


def resolve(name: str | None, what: str = "model_name_or_path") -> ModelSpec:
    """Classify ``name`` without loading or downloading anything."""
    if not name:
        raise ModelSpecError(f"{what} is required")
    if world.is_world_model(name):
        try:
            settings = world.settings_from_name(name)
        except world.WorldModelNameError as error:
            raise ModelSpecError(str(error)) from None
        folder = world.world_folder(settings)  # the shipped world, or the cache
        return ModelSpec(name, "arithmetic", str(folder), (folder / "warm_start.json").exists(), settings)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"{what}={name!r} is a local path without a config.json")
        return ModelSpec(name, "local", str(path.resolve()), True)
    if name.startswith((".", "/", "~")):
        raise ModelSpecError(f"{what}={name!r} looks like a local path but does not exist")
    return ModelSpec(name, "hub", None, False)


def materialize(spec: ModelSpec) -> str:
    """A loadable path for ``spec``: builds a world model if needed (the main process first, the others wait)."""
    if spec.world_settings is None:
        return spec.path or spec.name
    from accelerate import PartialState

    with PartialState().main_process_first():
        return world.warm_start(spec.world_settings).path


def _local_config(spec: ModelSpec, trust_remote_code: bool):
    source = spec.path if spec.ready and spec.path else spec.name
    if spec.kind == "arithmetic" and not spec.ready:
        return None
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


_MOE_SIZE = re.compile(r"(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def count_parameters(spec: ModelSpec, trust_remote_code: bool = False) -> tuple[int | None, str]:
    """(number of parameters, how it was obtained) without loading weights or touching the network."""
    config = _local_config(spec, trust_remote_code)
    if config is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters()), "config.json (meta-device model)"
    stem = spec.name.rsplit("/", 1)[-1]
    moe = _MOE_SIZE.search(stem)
    if moe:
        experts, size = int(moe.group(1)), float(moe.group(2))
        return int(experts * size * 1e9), "estimated from the name (experts x size: an upper bound)"
    size = _SIZE.search(stem)
    if size:
        scale = 1e9 if size.group(2).lower() == "b" else 1e6
        return int(float(size.group(1)) * scale), "estimated from the name"
    if spec.kind == "arithmetic":
        return None, "not built yet (a tiny model: well under a million parameters)"
    return None, "unknown (no local config.json and no size in the name)"


def torch_dtype(name: str | None):
    """``ModelConfig.dtype`` as ``from_pretrained`` takes it (``"auto"`` and ``None`` pass through)."""
    if name in (None, "auto"):
        return name
    if name not in TORCH_DTYPES:
        raise ModelSpecError(f"dtype must be one of {sorted(TORCH_DTYPES)} or 'auto', got {name!r}")
    return TORCH_DTYPES[name]


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: str | None, quant_type: str = "nf4",
                        double_quant: bool = False, quant_storage: str | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings as TRL's ``get_quantization_config`` builds them, or ``None``."""
    if load_in_4bit and load_in_8bit:
        raise ModelSpecError("load_in_4bit and load_in_8bit are exclusive")
    if load_in_4bit:
        compute = torch_dtype(dtype) if dtype not in (None, "auto") else torch.bfloat16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=quant_storage)
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_causal_lm(path: str, *, dtype: str | None, quantization: BitsAndBytesConfig | None = None,
                   revision: str = "main", trust_remote_code: bool = False, attn_implementation: str | None = None,
                   extra: dict | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with quantized weights placed on this process's device."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype))
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(extra or {})
    if quantization is not None:
        from accelerate import PartialState

        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": str(PartialState().device)}  # bitsandbytes quantizes on the target device
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
