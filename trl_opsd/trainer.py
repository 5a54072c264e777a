"""``OPSDTrainer``: GKD with privileged-context self-teachers, per-token clipping and honest bookkeeping.

Drop-in for ``trl.experimental.gkd.GKDTrainer``: the same constructor, the same config fields with the
same meanings. What changes (and why):

- ``teacher_model=None`` means a *self*-teacher: the frozen initial policy (adapters disabled under
  PEFT, a frozen copy otherwise), an EMA, or the live weights. It sees privileged context the student
  does not (``teacher_messages``, ``privileged_context``, or the ``answer`` column).
- Student and teacher are scored on the SAME completion tokens under their OWN prompts, aligned by
  completion position (left-padded prompts, right-padded completions).
- Rollouts for a whole optimizer step are drawn in ``get_batch_samples``, before any update, so the
  loss is normalised by the number of *generated* tokens in the accumulation window (GKD divides by
  the dataset's label count), and one on-policy coin per step is drawn from a seed shared by all ranks
  (GKD draws ``random.random()`` per rank and micro-batch).
- Generation keeps the KV cache on (GKD turns it off whenever gradient checkpointing is on, ~20x slower;
  TRL's generation context already disables checkpointing while generating), or runs in vLLM (``use_vllm``).
- The loss is computed from final hidden states and the LM head a chunk of positions at a time where the models
  allow it (``chunked_loss``), so ``[batch, completion, vocab]`` logits are never held.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from trl import SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.import_utils import is_vllm_available
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp, unwrap_model_for_generation
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model, pad

from trl_opsd.chunked import (
    chunked_per_token_divergence,
    chunked_sparse_topk_divergence,
    chunked_teacher_scores,
    chunked_token_log_probs,
)
from trl_opsd.collapse import CollapseGuard
from trl_opsd.collator import OPSDCollator
from trl_opsd.config import OPSDConfig
from trl_opsd.losses import (
    PointwiseClipped,
    clip_per_token,
    per_token_divergence,
    per_token_entropy,
    pointwise_clipped_divergence,
    sampled_token_reverse_kl,
    sparse_topk_divergence,
    sparse_topk_pointwise_clipped,
    token_log_probs,
)
from trl_opsd.metrics import divergence_statistics, pointwise_clip_statistics
from trl_opsd.teachers.base import Teacher
from trl_opsd.teachers.local import (
    AdapterDisabledTeacher,
    LiveTeacher,
    LocalTeacher,
    ModelTeacher,
    check_same_tokenizer,
    completion_logits,
    frozen_copy,
    position_ids_from_mask,
)

logger = logging.getLogger(__name__)


def as_opsd_config(args: GKDConfig | None, model_name: str = "opsd") -> OPSDConfig:
    """``args`` as an ``OPSDConfig``: a plain ``GKDConfig`` keeps all its values and gets our defaults."""
    if args is None:
        return OPSDConfig(output_dir=f"{model_name.split('/')[-1]}-OPSD")
    if isinstance(args, OPSDConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return OPSDConfig(**values)


class HeadInputs(NamedTuple):
    """What the chunked loss takes instead of logits: final hidden states and the LM head that projects them."""

    hidden: torch.Tensor  # [B, T, H]: position t's projection predicts completion token t
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None


class ChunkedTerms(NamedTuple):
    """Per-position outputs of the chunked loss, all [B, T] and 0 at masked-out positions."""

    per_token_loss: torch.Tensor  # to reduce
    divergence: torch.Tensor  # to log
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor | None  # None for remote teachers


# Teachers whose logits are their module's own forward (the module comes from ``generation_model``).
CHUNKABLE_TEACHERS = (ModelTeacher, AdapterDisabledTeacher, LiveTeacher)


def plain_output_head(module: nn.Module) -> nn.Linear | None:
    """The LM head if, as far as the config tells, logits are just ``head(last hidden state)``; else None.

    None for soft-capped logits and for heads that are not a plain ``nn.Linear`` (a PEFT adapter on the head, a
    quantised head), whose ``weight`` alone does not give the logits.
    """
    config = getattr(module, "config", None)
    if config is None or getattr(config.get_text_config(), "final_logit_softcapping", None) is not None:
        return None
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head if type(head) is nn.Linear else None


@torch.no_grad()
def _head_reproduces_logits(head: nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``head(hidden)`` equals the model's own ``logits``: catches logit scales the config hides."""
    recomputed = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    logits = logits.float()
    # A few ulps of the head's dtype relative to the largest logit: matmuls of other shapes round differently.
    largest = logits.abs().nan_to_num(nan=0.0, posinf=0.0).max().clamp(min=1.0)
    tolerance = 8 * torch.finfo(head.weight.dtype).eps * largest.item()
    return bool(torch.isclose(recomputed, logits, rtol=0.0, atol=tolerance, equal_nan=True).all())


def completion_head_inputs(
    model: nn.Module, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int
) -> HeadInputs | None:
    """The final hidden states predicting each of the last ``completion_len`` tokens, unprojected.

    Runs the model's own forward (so DDP, PEFT and gradient checkpointing see a normal call) with only the last
    position projected; that one logit row checks the head. None when the model's logits are not ``head(hidden)``.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=1,
        output_hidden_states=True,
        use_cache=False,
    )
    final_hidden = outputs.hidden_states[-1].to(head.weight.device)
    if not _head_reproduces_logits(head, final_hidden[:, -1], outputs.logits[:, -1]):
        return None
    return HeadInputs(final_hidden[:, -completion_len - 1 : -1], head.weight, head.bias)


def _unpadded_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


class _EMATeacherCallback(SyncRefModelCallback):
    """After every optimizer step: teacher <- decay * teacher + (1 - decay) * student."""

    def __init__(self, teacher_model: nn.Module, decay: float, accelerator):
        super().__init__(ref_model=teacher_model, accelerator=accelerator)
        self.decay = decay

    def on_step_end(self, args, state, control, **kwargs):
        model = self.accelerator.unwrap_model(kwargs["model"])
        self.sync_target_model(model, self.ref_model, 1.0 - self.decay)


class OPSDTrainer(GKDTrainer):
    """On-policy (self-)distillation trainer; see the module docstring and ``OPSDConfig``."""

    _tag_names = ["trl", "gkd", "opsd"]
    _name = "OPSD"

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: GKDConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers=(None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config=None,
        formatting_func: Callable | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        args = as_opsd_config(args, model if isinstance(model, str) else "opsd")
        if args.use_vllm and not is_vllm_available():
            raise ImportError(
                "use_vllm=True (OPSDConfig.use_vllm) samples student rollouts with vLLM, which is not installed: "
                "pip install 'trl[vllm]', or set use_vllm=False to sample with transformers' generate"
            )
        # Raw rows (messages, answer, teacher_messages, ...) must reach the collator untouched.
        args.remove_unused_columns = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("processing_class (the student's tokenizer) is required when model is not a path")
            processing_class = AutoTokenizer.from_pretrained(model)
        if data_collator is None:
            data_collator = OPSDCollator(
                tokenizer=processing_class,
                max_prompt_length=args.max_prompt_length,
                max_teacher_prompt_length=args.max_teacher_prompt_length,
                max_completion_length=args.max_new_tokens,
                privileged_from=args.privileged_from,
                answer_context_template=args.answer_context_template,
                teacher_prompt_template=args.teacher_prompt_template,
                privileged_truncation=args.privileged_truncation,
            )
        if isinstance(data_collator, OPSDCollator):
            _validate_rows(data_collator, train_dataset, "train_dataset")

        # GKDTrainer.__init__ insists on a teacher model and turns the KV cache off under gradient
        # checkpointing, so we run SFTTrainer's constructor (GKD's parent) and set GKD's attributes here.
        SFTTrainer.__init__(
            self,
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        # Our loss is already normalised over the accumulation window (see get_batch_samples).
        self.loss_is_scaled_for_ga = True
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd
        self.generation_kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
            "use_cache": True,
            "pad_token_id": processing_class.pad_token_id,
            "eos_token_id": self.model.generation_config.eos_token_id or processing_class.eos_token_id,
        }
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        self.teacher, self.teacher_model = self._build_teacher(teacher_model, teacher_processing_class)
        self._dense_loss_reason = self._why_dense_loss()
        if args.chunked_loss and self._dense_loss_reason is not None:
            logger.info("chunked_loss: using the dense loss, because %s", self._dense_loss_reason)
        self.vllm_generation = self._build_vllm_generation() if args.use_vllm else None
        self._vllm_synced_step = -1
        if args.collapse_guard != "off":
            self.add_callback(CollapseGuard(args.collapse_guard, max_completion_length=args.max_new_tokens))

    # -- construction ---------------------------------------------------------------------------
    def _prepare_frozen(self, module: nn.Module) -> nn.Module:
        """Place (and shard) a frozen teacher module the way TRL's trainers place their reference models.

        Under FSDP, ``accelerator.prepare_model(module, evaluation_mode=True)`` neither wraps the module (evaluation
        mode skips wrapping) nor moves it (device placement is off under FSDP): it would stay on the CPU while the
        student runs sharded on the GPUs. TRL's ``prepare_fsdp`` shards it with the student's FSDP settings instead.
        """
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(module, self.accelerator)
        if self.is_fsdp_enabled:
            meta = next((name for name, p in module.named_parameters() if p.is_meta), None)
            if meta is not None:
                raise ValueError(
                    f"under FSDP the teacher's parameter {meta!r} is on the meta device on process "
                    f"{self.accelerator.process_index}: with fsdp_cpu_ram_efficient_loading: true, transformers loads "
                    "weights on the first process only and FSDP broadcasts them into the student, never into a "
                    "separate teacher (or a frozen copy of the student made before that). Set "
                    "fsdp_cpu_ram_efficient_loading: false in the accelerate config, or use_peft: true (the "
                    "adapter-disabled self-teacher has no weights of its own)"
                )
            return prepare_fsdp(module, self.accelerator)
        return self.accelerator.prepare_model(module, evaluation_mode=True)

    def _check_fsdp_support(self) -> None:
        """Refuse, at construction, the FSDP setups that would fail (or hang) at the first rollout or step."""
        if not self.is_fsdp_enabled:
            return
        version = self.accelerator.state.fsdp_plugin.fsdp_version
        if version != 2:
            raise ValueError(
                f"FSDP{version} cannot run OPSDTrainer: rollouts are sampled from (and a self-teacher runs on) "
                "accelerator.unwrap_model(model), outside the root FSDP1 unit, whose flat parameters (embeddings, "
                "lm_head) stay sharded there; TRL's unwrap_model_for_generation gathers only DeepSpeed ZeRO-3 "
                "parameters. Set fsdp_version: 2 (accelerate_configs/fsdp.yaml) or use DeepSpeed"
            )

    def _check_ema_under_fsdp(self) -> None:
        if self.is_fsdp_enabled:
            raise ValueError(
                "self_teacher='ema' (OPSDConfig.self_teacher) is not supported under FSDP: the EMA update "
                "(TRL's SyncRefModelCallback) gathers parameters for DeepSpeed ZeRO-3 only, and the student's and "
                "teacher's FSDP shards are not synchronised here. Use self_teacher='frozen' or 'live', an external "
                "teacher_model, or launch the EMA teacher with DeepSpeed (accelerate_configs/deepspeed_zero2.yaml / "
                "deepspeed_zero3.yaml)"
            )

    def _build_teacher(self, teacher_model, teacher_processing_class):
        """(teacher backend, teacher nn.Module or None) for the configured kind of teacher."""
        args = self.args
        self._check_fsdp_support()
        if isinstance(teacher_model, Teacher) and not isinstance(teacher_model, LocalTeacher):
            return self._check_remote_teacher(teacher_model), None
        if teacher_model is None:
            if is_peft_model(self.model):
                if args.self_teacher == "ema":
                    raise ValueError(
                        "self_teacher='ema' is not supported with PEFT; use 'frozen' (adapters disabled, no extra "
                        "weights) or 'live'"
                    )
                return (AdapterDisabledTeacher() if args.self_teacher == "frozen" else LiveTeacher()), None
            if args.self_teacher == "live":
                return LiveTeacher(), None
            if args.self_teacher == "ema":
                self._check_ema_under_fsdp()
            teacher = self._prepare_frozen(frozen_copy(self.model))
            if args.self_teacher == "ema":
                self.add_callback(_EMATeacherCallback(teacher, args.teacher_ema_decay, self.accelerator))
            return ModelTeacher(teacher, name=f"self ({args.self_teacher})"), teacher

        if isinstance(teacher_model, str):
            init_kwargs = dict(args.teacher_model_init_kwargs or {})
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            if isinstance(init_kwargs.get("dtype"), str) and init_kwargs["dtype"] != "auto":
                init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
            if teacher_processing_class is None:
                teacher_processing_class = AutoTokenizer.from_pretrained(teacher_model)
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **init_kwargs)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError("teacher_model_init_kwargs was given but teacher_model is already instantiated")
        if teacher_processing_class is not None:
            check_same_tokenizer(self.processing_class, teacher_processing_class)
        student_vocab = self.model.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's vocab_size is {student_vocab} but the teacher's is {teacher_vocab}; dense "
                "per-token divergences need a shared vocabulary"
            )
        teacher_model = self._prepare_frozen(teacher_model)
        return ModelTeacher(teacher_model, name="external"), teacher_model

    def _why_dense_loss(self) -> str | None:
        """Why the chunked loss cannot run with this model and teacher (None: it can)."""
        if not self.args.chunked_loss:
            return "chunked_loss=False"
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_fsdp_enabled or zero3:
            return "the LM head is sharded outside the forward (FSDP / DeepSpeed ZeRO-3)"
        if isinstance(self.teacher, LocalTeacher) and not isinstance(self.teacher, CHUNKABLE_TEACHERS):
            return f"the teacher {self.teacher!r} only gives logits"
        modules = [self.model] + ([self.teacher.model] if isinstance(self.teacher, ModelTeacher) else [])
        if any(plain_output_head(self.accelerator.unwrap_model(module)) is None for module in modules):
            return "a model has no plain linear LM head (soft-capped logits, an adapter or quantisation on the head)"
        return None

    def _build_vllm_generation(self):
        """TRL's vLLM backend (the one ``DistillationTrainer`` uses) for student rollouts, from the ``vllm_*`` knobs."""
        from trl.generation.vllm_generation import VLLMGeneration

        args = self.args
        return VLLMGeneration(
            model=self.model,
            accelerator=self.accelerator,
            processing_class=self.processing_class,
            mode=args.vllm_mode,
            server_base_url=args.vllm_server_base_url,
            server_host=args.vllm_server_host,
            server_port=args.vllm_server_port,
            group_port=args.vllm_group_port,
            server_timeout=args.vllm_server_timeout,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=args.vllm_max_model_length,
            # One call per accumulation window (see get_batch_samples), gathered across the tensor-parallel group.
            max_num_seqs=(args.per_device_train_batch_size * args.gradient_accumulation_steps
                          * args.vllm_tensor_parallel_size),
            enable_sleep_mode=args.vllm_enable_sleep_mode,
            model_impl=args.vllm_model_impl,
            trust_remote_code=args.trust_remote_code,
            # The same sampler as the transformers path: the policy itself at `temperature`, no truncation.
            temperature=args.temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_completion_length=args.max_new_tokens,
            logprobs=None,
        )

    def _check_remote_teacher(self, teacher: Teacher) -> Teacher:
        """Fail now, not at step 1, if a remote teacher cannot give what the configured loss needs."""
        args = self.args
        if args.divergence == "full":
            raise ValueError(
                f"divergence='full' needs the teacher's dense logits, but {teacher!r} is a remote teacher; set "
                "divergence='topk' (top-k log-probs + tail bucket) or divergence='sampled' (sampled-token reverse KL)"
            )
        teacher.require("topk" if args.divergence == "topk" else "sampled",
                        top_k=args.teacher_top_k if args.divergence == "topk" else None)
        if args.loss_temperature != 1.0:
            raise ValueError("remote teachers return log-probs at temperature 1.0; set loss_temperature=1.0")
        if args.seq_kd and args.lmbda < 1.0:
            raise ValueError(
                "seq_kd samples from an in-process teacher; with a remote teacher generate the data offline "
                "(`trl-opsd rs-sft`) and train on it as dataset completions"
            )
        return teacher

    # -- rollouts -----------------------------------------------------------------------------
    def _completion_source(self) -> str:
        """'student' (on-policy), 'teacher' (seq_kd) or 'dataset', one decision per optimizer step.

        The coin is seeded by (seed, global step), so every rank draws the same value without talking.
        """
        coin = random.Random(f"opsd-{self.args.seed}-{self.state.global_step}").random()
        if coin < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "dataset"

    @torch.no_grad()
    def _sample(self, generator: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor):
        """Sample completions; mask everything after the first EOS (GKD's own masking logic)."""
        sequences, attention_mask, _ = self.generate_on_policy_outputs(
            generator, {"prompts": prompts, "prompt_attention_mask": prompt_mask}, self.generation_config
        )
        width = prompts.shape[1]
        return sequences[:, width:], attention_mask[:, width:]

    def _vllm_completions(self, batches: list[dict]) -> None:
        """Student rollouts for ``batches`` from one vLLM call, laid out like ``_sample``'s in each batch.

        One call for a whole accumulation window, as TRL's trainers do, so vLLM batches every prompt of the
        optimizer step together; the student's weights are pushed to vLLM once per optimizer step.
        """
        if self._vllm_synced_step != self.state.global_step:
            self.vllm_generation.sync_weights()
            self._vllm_synced_step = self.state.global_step
        prompts = [row for b in batches for row in _unpadded_rows(b["prompts"], b["prompt_attention_mask"])]
        _, completion_ids, _, _ = self.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)
        start = 0
        for batch in batches:
            size = batch["prompts"].shape[0]
            device = batch["prompts"].device
            rows = [torch.tensor(ids, dtype=torch.long, device=device) for ids in completion_ids[start:start + size]]
            start += size
            batch["completions"] = pad(rows, padding_value=self.processing_class.pad_token_id, padding_side="right")
            # vLLM stops at the first EOS and returns it, so every returned token counts (GKD's mask keeps the EOS).
            batch["completion_mask"] = pad([torch.ones_like(row) for row in rows], padding_value=0,
                                           padding_side="right")

    def _attach_completions(self, batch: dict, source: str) -> dict:
        """One micro-batch on the device with completions from ``source`` (see :meth:`_attach_window`)."""
        return self._attach_window([batch], source)[0]

    def _attach_window(self, batches: list[dict], source: str) -> list[dict]:
        """The micro-batches of one accumulation window on the device, each with completions from ``source``:
        the student's samples (vLLM draws the whole window in one call), the teacher's (``seq_kd``) or the dataset's.
        """
        device = self.accelerator.device
        batches = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                   for batch in batches]
        if source == "student" and self.vllm_generation is not None:
            self._vllm_completions(batches)
        else:
            for batch in batches:
                self._generate_completions(batch, source)
        for batch in batches:
            batch["completion_source"] = source
        return batches

    def _generate_completions(self, batch: dict, source: str) -> None:
        """Sample ``batch``'s completions with ``transformers`` (student or teacher), or check the dataset's."""
        if source == "student":
            with unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped:
                batch["completions"], batch["completion_mask"] = self._sample(
                    unwrapped, batch["prompts"], batch["prompt_attention_mask"]
                )
        elif source == "teacher":
            student = self.accelerator.unwrap_model(self.model)
            with self.teacher.generation_model(student) as teacher_generator:
                batch["completions"], batch["completion_mask"] = self._sample(
                    teacher_generator, batch["teacher_prompts"], batch["teacher_prompt_attention_mask"]
                )
        elif "completions" not in batch:
            raise ValueError(
                "this step trains on dataset completions (lmbda < 1 and seq_kd=False) but the batch has none: give "
                "rows a trailing assistant turn (or a 'completion'), or set lmbda=1.0 for fully on-policy training"
            )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the accumulation window's micro-batches, draw their completions, count generated tokens."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        batches = self._attach_window(batches, self._completion_source())
        num_generated = sum(batch["completion_mask"].sum() for batch in batches)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_generated = self.accelerator.gather(num_generated.reshape(1)).sum()
        return batches, num_generated

    # -- loss -----------------------------------------------------------------------------------
    def completion_views(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student logits, teacher logits) at each completion position, both [B, T, V].

        Student: ``prompts + completions`` with gradient. Teacher: ``teacher_prompts + completions``
        without. The same completion tokens, each under its own prompt.
        """
        num_completion = inputs["completions"].shape[1]
        student_logits = completion_logits(model, *self._sequences(inputs, "student"), num_completion)
        if not isinstance(self.teacher, LocalTeacher):
            return student_logits, None
        student_module = self.accelerator.unwrap_model(model)
        teacher_ids, teacher_mask = self._sequences(inputs, "teacher")
        teacher_logits = self.teacher.completion_logits(student_module, teacher_ids, teacher_mask, num_completion)
        return student_logits, teacher_logits

    @staticmethod
    def _sequences(inputs, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of ``prompt + completion`` for the ``"student"`` or ``"teacher"`` view."""
        prefix = "teacher_" if view == "teacher" else ""
        ids = torch.cat([inputs[f"{prefix}prompts"], inputs["completions"]], dim=1)
        mask = torch.cat([inputs[f"{prefix}prompt_attention_mask"], inputs["completion_mask"]], dim=1)
        return ids, mask

    def chunked_completion_views(self, model, inputs) -> tuple[HeadInputs, HeadInputs | None] | None:
        """:meth:`completion_views` without the projection: (student, teacher) hidden states and LM heads.

        The student's carry the gradient; the teacher's (None for a remote teacher) are computed without. None when
        the dense path must run instead (see ``chunked_loss``).
        """
        if self._dense_loss_reason is not None:
            return None
        num_completion = inputs["completions"].shape[1]
        student_module = self.accelerator.unwrap_model(model)
        student_head = plain_output_head(student_module)
        student = completion_head_inputs(model, student_head, *self._sequences(inputs, "student"), num_completion)
        teacher = None
        if student is not None and isinstance(self.teacher, LocalTeacher):
            # The module the teacher runs as: its own model, or the student with adapters off / as it is now.
            with torch.no_grad(), self.teacher.generation_model(student_module) as teacher_module:
                teacher_head = plain_output_head(self.accelerator.unwrap_model(teacher_module))
                teacher_ids, teacher_mask = self._sequences(inputs, "teacher")
                teacher = completion_head_inputs(
                    teacher_module, teacher_head, teacher_ids, teacher_mask, num_completion
                )
        if student is None or (isinstance(self.teacher, LocalTeacher) and teacher is None):
            self._dense_loss_reason = "a model's logits are not its LM head applied to its last hidden state"
            logger.info("chunked_loss: using the dense loss from now on, because %s", self._dense_loss_reason)
            return None
        return student, teacher

    def token_sum_to_loss(self, per_token: torch.Tensor, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Sum over unmasked completion tokens / generated tokens in the accumulation window (all ranks)."""
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
        loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        return loss

    def _remote_scores(self, inputs, k: int):
        """Teacher top-k / sampled-token log-probs of the batch's completions, from a remote teacher."""
        scores = self.teacher.score_topk(
            _unpadded_rows(inputs["teacher_prompts"], inputs["teacher_prompt_attention_mask"]),
            _unpadded_rows(inputs["completions"], inputs["completion_mask"]),
            k,
        )
        return scores.to(inputs["completions"].device).pad_to(inputs["completions"].shape[1])

    def distillation_terms(self, student_logits, teacher_logits, inputs):
        """(per-token loss to reduce, per-token divergence to log), both [B, T], for ``args.divergence``.

        - ``full``: generalized JSD(beta) over the vocabulary, then the per-token clip.
        - ``topk``: the same on the teacher's top-k plus a tail bucket (dense teachers: their own top-k).
        - ``sampled``: the policy-gradient surrogate of reverse KL on the sampled token; the logged value
          is the estimate ``log p_S(y) - log p_T(y)``, not the surrogate.
        """
        args, tau = self.args, self.args.loss_temperature
        pointwise_cap = self._pointwise_cap()
        if args.divergence == "full" and pointwise_cap is not None:
            clip = pointwise_clipped_divergence(student_logits, teacher_logits, self.beta, pointwise_cap, tau)
            self._record_pointwise_clip(clip, inputs, student_logits.size(-1))
            return clip.values, clip.unclipped
        if args.divergence == "full":
            divergence = per_token_divergence(student_logits, teacher_logits, self.beta, tau)
        elif args.divergence == "topk":
            if teacher_logits is not None:
                topk_logprobs, topk_ids = torch.log_softmax(teacher_logits / tau, -1).topk(args.teacher_top_k, -1)
            else:
                scores = self._remote_scores(inputs, args.teacher_top_k)
                topk_ids, topk_logprobs = scores.topk_ids, scores.topk_logprobs
            if pointwise_cap is not None:
                clip = sparse_topk_pointwise_clipped(
                    student_logits, topk_ids, topk_logprobs, self.beta, pointwise_cap, tau
                )
                self._record_pointwise_clip(clip, inputs, topk_ids.size(-1) + 1)
                return clip.values, clip.unclipped
            divergence = sparse_topk_divergence(student_logits, topk_ids, topk_logprobs, self.beta, tau)
        else:
            completions = inputs["completions"]
            student_logprobs = token_log_probs(student_logits, completions, tau)
            if teacher_logits is not None:
                teacher_logprobs = token_log_probs(teacher_logits, completions, tau)
            else:
                teacher_logprobs = self._remote_scores(inputs, 0).sampled_logprobs
            terms = sampled_token_reverse_kl(student_logprobs, teacher_logprobs, ratio_cap=args.sampled_ratio_cap)
            return terms.surrogate, terms.kl_estimate
        return clip_per_token(divergence, args.kl_clip, args.kl_clip_mode), divergence

    def chunked_distillation_terms(self, student: HeadInputs, teacher: HeadInputs | None, inputs, mask) -> ChunkedTerms:
        """:meth:`distillation_terms` from hidden states, a chunk of positions at a time: the same values and
        gradients (clipping acts per position, after the chunks), plus both entropies for the metrics."""
        args, tau = self.args, self.args.loss_temperature
        student_side = {"mask": mask, "chunk_size": args.loss_chunk_size, "student_bias": student.bias,
                        "pointwise_cap": self._pointwise_cap()}
        if args.divergence == "full":
            out = chunked_per_token_divergence(
                student.hidden, student.weight, teacher.hidden, teacher.weight, self.beta, tau,
                teacher_bias=teacher.bias, **student_side,
            )
            per_token_loss, divergence = self._chunked_clip(out, inputs, student.weight.size(0))
            return ChunkedTerms(per_token_loss, divergence, out.student_entropy, out.teacher_entropy)
        scores, teacher_entropy = self._teacher_token_scores(teacher, inputs, mask)
        if args.divergence == "topk":
            out = chunked_sparse_topk_divergence(
                student.hidden, student.weight, scores.topk_ids, scores.topk_logprobs, self.beta, tau, **student_side
            )
            per_token_loss, divergence = self._chunked_clip(out, inputs, scores.topk_ids.size(-1) + 1)
            return ChunkedTerms(per_token_loss, divergence, out.student_entropy, teacher_entropy)
        student_side.pop("pointwise_cap")  # refused with divergence="sampled" (OPSDConfig)
        out = chunked_token_log_probs(student.hidden, student.weight, inputs["completions"], tau, **student_side)
        terms = sampled_token_reverse_kl(out.values, scores.sampled_logprobs, ratio_cap=args.sampled_ratio_cap)
        return ChunkedTerms(terms.surrogate, terms.kl_estimate, out.student_entropy, teacher_entropy)

    def _pointwise_cap(self) -> float | None:
        """The cap of ``kl_clip_mode="pointwise"`` (each vocabulary entry's term, before the sum), else None."""
        return self.args.kl_clip if self.args.kl_clip_mode == "pointwise" else None

    def _chunked_clip(self, out, inputs, entries_per_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss, divergence to log) from a chunked output: the pointwise clip happened inside the chunks,
        the per-token clips (clamp, scale) act here."""
        if out.clip is not None:
            self._record_pointwise_clip(out.clip, inputs, entries_per_position)
            return out.values, out.clip.unclipped
        return clip_per_token(out.values, self.args.kl_clip, self.args.kl_clip_mode), out.values

    @torch.no_grad()
    def _record_pointwise_clip(self, clip: PointwiseClipped, inputs, entries_per_position: int) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in pointwise_clip_statistics(clip, inputs["completion_mask"], entries_per_position).items():
            metrics[name].append(value)

    def _teacher_token_scores(self, teacher: HeadInputs | None, inputs, mask):
        """(top-k / sampled-token scores, teacher entropy or None) for ``divergence`` topk or sampled."""
        k = self.args.teacher_top_k if self.args.divergence == "topk" else 0
        if teacher is None:
            return self._remote_scores(inputs, k), None
        scores = chunked_teacher_scores(
            teacher.hidden, teacher.weight, self.args.loss_temperature, top_k=k,
            token_ids=None if k else inputs["completions"], mask=mask, chunk_size=self.args.loss_chunk_size,
            bias=teacher.bias,
        )
        return scores, scores.entropy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "completion_source" not in inputs:  # evaluation: dataset completions if present, else student samples
            inputs = self._attach_completions(inputs, "dataset" if "completions" in inputs else "student")
        mask = inputs["completion_mask"].bool()
        views = None if return_outputs else self.chunked_completion_views(model, inputs)  # return_outputs: logits
        if views is not None:
            return self._chunked_loss(views, inputs, mask, num_items_in_batch)
        student_logits, teacher_logits = self.completion_views(model, inputs)
        per_token_loss, divergence = self.distillation_terms(student_logits, teacher_logits, inputs)
        loss = self.token_sum_to_loss(per_token_loss, mask, num_items_in_batch)
        loss = self._check_finite(loss, student_logits, teacher_logits, divergence)
        self._record_metrics(inputs, divergence, mask, student_logits, teacher_logits)
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def _chunked_loss(self, views, inputs, mask, num_items_in_batch):
        terms = self.chunked_distillation_terms(*views, inputs, mask)
        loss = self.token_sum_to_loss(terms.per_token_loss, mask, num_items_in_batch)
        # Without logits, a non-finite logit shows up as a non-finite entropy at its position.
        loss = self._check_finite(loss, terms.student_entropy, terms.teacher_entropy, terms.divergence)
        teacher_entropy = terms.teacher_entropy[mask] if terms.teacher_entropy is not None else None
        self._record_token_metrics(inputs, terms.divergence, mask, terms.student_entropy[mask], teacher_entropy)
        return loss

    def _check_finite(self, loss, student_logits, teacher_logits, divergence):
        if torch.isfinite(loss):
            return loss
        culprits = [
            name
            for name, tensor in (("student logits", student_logits), ("teacher logits", teacher_logits),
                                 ("per-token divergence", divergence))
            if tensor is not None and not torch.isfinite(tensor).all()
        ] or ["the reduction (divergence finite, sum overflowed)"]
        message = f"non-finite loss at step {self.state.global_step}: {', '.join(culprits)} not finite"
        if self.args.nonfinite_loss == "raise":
            raise FloatingPointError(message + " (set nonfinite_loss='skip' to skip such steps)")
        logger.warning("%s; skipping this micro-batch", message)
        self._metrics["train"]["skipped_nonfinite_steps"].append(1.0)
        return student_logits.new_zeros((), requires_grad=True)

    @torch.no_grad()
    def _record_metrics(self, inputs, divergence, mask, student_logits, teacher_logits):
        tau = self.args.loss_temperature
        student_entropy = per_token_entropy(student_logits[mask], tau)
        teacher_entropy = per_token_entropy(teacher_logits[mask], tau) if teacher_logits is not None else None
        self._record_token_metrics(inputs, divergence, mask, student_entropy, teacher_entropy)

    @torch.no_grad()
    def _record_token_metrics(self, inputs, divergence, mask, student_entropy, teacher_entropy):
        """Log a micro-batch's statistics; the entropies are those at the unmasked positions, [N]."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if divergence is not None:
            # The pointwise clip logs its own clipped_fraction (of vocabulary entries): _record_pointwise_clip.
            per_token_cap = None if self._pointwise_cap() is not None else self.args.kl_clip
            for name, value in divergence_statistics(divergence, mask, per_token_cap).items():
                metrics[name].append(value)
        if mask.any():
            metrics["student_entropy"].append(student_entropy.mean().item())
            if teacher_entropy is not None:
                metrics["teacher_entropy"].append(teacher_entropy.mean().item())
        metrics["completion_length"].append(mask.sum(1).float().mean().item())
        metrics["on_policy_fraction"].append(float(inputs.get("completion_source") == "student"))
        metrics["truncated_teacher_prompts"].append(float(inputs["num_truncated_teacher_prompts"].sum()))
        for name, value in self.teacher.metrics().items() if self.teacher is not None else ():
            metrics[f"teacher_{name}"].append(float(value))
        metrics["privileged_rows_fraction"].append(
            float(inputs["num_privileged_rows"].sum()) / max(1, inputs["prompts"].shape[0])
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the distillation loss only (there are no labels to predict)."""
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Completions were attached in get_batch_samples; skip GKDTrainer.training_step's own sampling.
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)


def _validate_rows(collator: OPSDCollator, dataset, name: str) -> None:
    """Build every row's views once before training, so a bad row fails now with its index and field."""
    if dataset is None or isinstance(dataset, IterableDataset):
        return
    for index in range(len(dataset)):
        try:
            collator.row_views(dataset[index], index)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
