"""The VRAM check at start: keep the configured precision, or fall back to 4-bit + LoRA when memory is tight.

The seed notebook's rule ("auto-detects VRAM and falls back to 4-bit + LoRA when memory is tight"),
with the estimate written down so that the plan can show it:

- weights: parameters x bytes per parameter (fp32 4, bf16/fp16 2, 4-bit NF4 ~0.55 with its constants);
- full fine-tuning adds gradients and AdamW's two moments in the weights' dtype (3 x weights); LoRA adds
  about 1% trainable parameters with the same overhead in fp32;
- the teacher's weights: nothing for a PEFT self-teacher (adapters disabled) or the live student, a
  second copy of the student for a frozen copy or EMA, the teacher's own size for an external teacher;
- ZeRO-2 divides gradients and optimizer state by the number of processes, ZeRO-3 / FSDP everything;
- 20% on top for activations and the KV cache of rollouts, plus 1 GiB of CUDA context.

It is an estimate for a decision, not a promise: the plan prints it next to the device's memory.
On CPU there is no check and no switch: 4-bit only when ``load_in_4bit`` is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from trl import ModelConfig

GIB = 1024**3
BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "4bit": 0.55, "8bit": 1.1}
LORA_TRAINABLE_FRACTION = 0.01
ACTIVATION_MARGIN = 1.2
CUDA_CONTEXT_GIB = 1.0
MEMORY_POLICIES = ("auto", "as_configured")


@dataclass(frozen=True)
class Precision:
    """How one model is held: its dtype, and whether it is quantized (``"4bit"`` / ``"8bit"``) or not."""

    dtype: str = "bfloat16"
    quantization: str | None = None

    @property
    def bytes_per_parameter(self) -> float:
        return BYTES_PER_PARAMETER[self.quantization or self.dtype]

    def describe(self) -> str:
        return f"{self.quantization} (compute {self.dtype})" if self.quantization else self.dtype


@dataclass(frozen=True)
class TrainingFootprint:
    """What the estimate needs to know about a run."""

    student_parameters: int
    student: Precision
    use_peft: bool
    teacher: str  # "none" | "student_view" | "copy" | "external"
    teacher_parameters: int | None = None
    teacher_precision: Precision | None = None
    num_processes: int = 1
    zero_stage: int | None = None
    fsdp: bool = False

    def estimate_gib(self) -> float:
        shards = max(1, self.num_processes)
        shard_weights = self.fsdp or self.zero_stage == 3
        shard_state = shard_weights or self.zero_stage == 2
        weights = self.student_parameters * self.student.bytes_per_parameter
        if self.use_peft:
            state = self.student_parameters * LORA_TRAINABLE_FRACTION * 4.0 * 4
        else:
            state = 3 * weights
        teacher = 0.0
        if self.teacher == "copy":
            teacher = weights
        elif self.teacher == "external" and self.teacher_parameters:
            teacher = self.teacher_parameters * (self.teacher_precision or self.student).bytes_per_parameter
        if shard_weights:
            weights, teacher = weights / shards, teacher / shards
        if shard_state:
            state = state / shards
        return (weights + state + teacher) * ACTIVATION_MARGIN / GIB + CUDA_CONTEXT_GIB


@dataclass(frozen=True)
class MemoryDecision:
    device: str
    device_memory_gib: float | None
    configured_gib: float | None
    chosen_gib: float | None
    switch_to_4bit_lora: bool
    reason: str
    fits: bool | None

    def describe(self) -> dict[str, object]:
        return {
            "device": self.device,
            "device_memory_gib": None if self.device_memory_gib is None else round(self.device_memory_gib, 1),
            "estimate_as_configured_gib": None if self.configured_gib is None else round(self.configured_gib, 1),
            "estimate_chosen_gib": None if self.chosen_gib is None else round(self.chosen_gib, 1),
            "decision": "4-bit + LoRA" if self.switch_to_4bit_lora else "as configured",
            "reason": self.reason,
        }


def detect_gpu_memory_gib(local_rank: int = 0) -> tuple[str, float | None]:
    """(device description, total memory in GiB) of this process's GPU, or ("cpu", None)."""
    if not torch.cuda.is_available():
        return "cpu", None
    index = local_rank % torch.cuda.device_count()
    properties = torch.cuda.get_device_properties(index)
    return f"cuda:{index} ({properties.name})", properties.total_memory / GIB


def decide(
    configured: TrainingFootprint | None,
    quantized_lora: TrainingFootprint | None,
    device: str,
    device_memory_gib: float | None,
    policy: str = "auto",
) -> MemoryDecision:
    """Keep the configuration if it fits; otherwise (policy ``auto``) switch to 4-bit + LoRA.

    ``configured`` is ``None`` when the student's size is unknown; ``quantized_lora`` is ``None`` when the
    configuration already is 4-bit + LoRA.
    """
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"memory_policy must be one of {MEMORY_POLICIES}, got {policy!r}")
    if device_memory_gib is None:
        return MemoryDecision(device, None, None, None, False,
                              "no GPU: no VRAM check; CPU runs use 4-bit only when load_in_4bit is set", None)
    if configured is None:
        return MemoryDecision(device, device_memory_gib, None, None, False,
                              "the student's parameter count is unknown, so the configuration is kept as is", None)
    need = configured.estimate_gib()
    if need <= device_memory_gib:
        return MemoryDecision(device, device_memory_gib, need, need, False,
                              f"fits: ~{need:.1f} GiB needed of {device_memory_gib:.1f} GiB", True)
    if quantized_lora is None or policy == "as_configured":
        why = "already 4-bit + LoRA" if quantized_lora is None else "memory_policy=as_configured"
        return MemoryDecision(device, device_memory_gib, need, need, False,
                              f"TIGHT: ~{need:.1f} GiB needed of {device_memory_gib:.1f} GiB ({why}); expect "
                              "out-of-memory errors, or lower the batch size / max_new_tokens", False)
    fallback = quantized_lora.estimate_gib()
    fits = fallback <= device_memory_gib
    verdict = "fits" if fits else "may still not fit"
    return MemoryDecision(
        device, device_memory_gib, need, fallback, True,
        f"tight: as configured ~{need:.1f} GiB of {device_memory_gib:.1f} GiB; 4-bit + LoRA ~{fallback:.1f} GiB "
        f"({verdict})",
        fits,
    )


def plan(
    model_args: ModelConfig,
    footprint: Callable[[ModelConfig, bool], TrainingFootprint | None],
    device: str,
    device_memory_gib: float | None,
    policy: str = "auto",
    can_switch: bool = True,
) -> tuple[MemoryDecision, ModelConfig]:
    """The VRAM decision and the student arguments it implies: ``model_args`` itself when the run is kept as
    configured, else a new copy switched to 4-bit + LoRA (``model_args`` is never changed).

    ``footprint(model_args, switched)`` estimates a run with those arguments (``None``: size unknown);
    ``can_switch`` is False when no switch is possible (already 4-bit + LoRA, or an EMA self-teacher).
    """
    switched = dataclasses.replace(model_args, load_in_4bit=True, load_in_8bit=False, use_peft=True)
    decision = decide(footprint(model_args, False), footprint(switched, True) if can_switch else None, device,
                      device_memory_gib, policy)
    return decision, switched if decision.switch_to_4bit_lora else model_args
