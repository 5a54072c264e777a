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
  TRL's generation context already disables checkpointing while generating).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from trl import SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model

from trl_opsd.collator import OPSDCollator
from trl_opsd.config import OPSDConfig
from trl_opsd.losses import (
    clip_per_token,
    per_token_divergence,
    per_token_entropy,
    sampled_token_reverse_kl,
    sparse_topk_divergence,
    token_log_probs,
)
from trl_opsd.metrics import divergence_statistics
from trl_opsd.teachers.base import Teacher
from trl_opsd.teachers.local import (
    AdapterDisabledTeacher,
    LiveTeacher,
    LocalTeacher,
    ModelTeacher,
    check_same_tokenizer,
    completion_logits,
    frozen_copy,
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

    # -- construction ---------------------------------------------------------------------------
    def _prepare_frozen(self, module: nn.Module) -> nn.Module:
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(module, self.accelerator)
        return self.accelerator.prepare_model(module, evaluation_mode=True)

    def _build_teacher(self, teacher_model, teacher_processing_class):
        """(teacher backend, teacher nn.Module or None) for the configured kind of teacher."""
        args = self.args
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

    def _attach_completions(self, batch: dict, source: str) -> dict:
        device = self.accelerator.device
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
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
        batch["completion_source"] = source
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the accumulation window's micro-batches, draw their completions, count generated tokens."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        source = self._completion_source()
        batches = [self._attach_completions(batch, source) for batch in batches]
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
        completions, completion_mask = inputs["completions"], inputs["completion_mask"]
        num_completion = completions.shape[1]
        student_ids = torch.cat([inputs["prompts"], completions], dim=1)
        student_mask = torch.cat([inputs["prompt_attention_mask"], completion_mask], dim=1)
        student_logits = completion_logits(model, student_ids, student_mask, num_completion)
        if not isinstance(self.teacher, LocalTeacher):
            return student_logits, None
        teacher_ids = torch.cat([inputs["teacher_prompts"], completions], dim=1)
        teacher_mask = torch.cat([inputs["teacher_prompt_attention_mask"], completion_mask], dim=1)
        student_module = self.accelerator.unwrap_model(model)
        teacher_logits = self.teacher.completion_logits(student_module, teacher_ids, teacher_mask, num_completion)
        return student_logits, teacher_logits

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

        def unpadded(ids, mask):
            return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

        scores = self.teacher.score_topk(
            unpadded(inputs["teacher_prompts"], inputs["teacher_prompt_attention_mask"]),
            unpadded(inputs["completions"], inputs["completion_mask"]),
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
        if args.divergence == "full":
            divergence = per_token_divergence(student_logits, teacher_logits, self.beta, tau)
        elif args.divergence == "topk":
            if teacher_logits is not None:
                topk_logprobs, topk_ids = torch.log_softmax(teacher_logits / tau, -1).topk(args.teacher_top_k, -1)
            else:
                scores = self._remote_scores(inputs, args.teacher_top_k)
                topk_ids, topk_logprobs = scores.topk_ids, scores.topk_logprobs
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "completion_source" not in inputs:  # evaluation: dataset completions if present, else student samples
            inputs = self._attach_completions(inputs, "dataset" if "completions" in inputs else "student")
        student_logits, teacher_logits = self.completion_views(model, inputs)
        mask = inputs["completion_mask"].bool()
        per_token_loss, divergence = self.distillation_terms(student_logits, teacher_logits, inputs)
        loss = self.token_sum_to_loss(per_token_loss, mask, num_items_in_batch)
        loss = self._check_finite(loss, student_logits, teacher_logits, divergence)
        self._record_metrics(inputs, divergence, mask, student_logits, teacher_logits)
        return (loss, {"logits": student_logits}) if return_outputs else loss

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
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        tau = self.args.loss_temperature
        if divergence is not None:
            for name, value in divergence_statistics(divergence, mask, self.args.kl_clip).items():
                metrics[name].append(value)
        if mask.any():
            metrics["student_entropy"].append(per_token_entropy(student_logits[mask], tau).mean().item())
            if teacher_logits is not None:
                metrics["teacher_entropy"].append(per_token_entropy(teacher_logits[mask], tau).mean().item())
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
