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
  TRL's generation context already disables checkpointing while generating); ``rollout_backend`` picks
  ``generate`` with a dynamic cache, with a static cache and a compiled decode step (``trl_opsd.rollouts``), or vLLM.
- The loss is computed from final hidden states and the LM head a chunk of positions at a time where the models
  allow it (``chunked_loss``), so ``[batch, completion, vocab]`` logits are never held.

One step: the collator lays out each row's student and teacher views; ``get_batch_samples`` draws the window's
completions; ``compute_loss`` gets the student's and teacher's signals (``trl_opsd.forward``; a remote teacher's
scores), turns them into per-token terms (``trl_opsd.objective``) and reduces them over the window's generated tokens.
The teacher is built and checked in ``trl_opsd.teacher_setup``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.import_utils import is_vllm_available
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from trl_opsd.collapse import CollapseGuard
from trl_opsd.collator import OPSDCollator, as_opsd_batch, gkd_sequences, validate_dataset
from trl_opsd.completion_log import CompletionLog, LogFirstAndLastStep, window_records
from trl_opsd.config import OPSDConfig, as_config
from trl_opsd.forward import (
    HeadInputs,
    completion_head_inputs,
    completion_logits,
    completion_positions,
    plain_output_head,
    position_ids_from_mask,
    unpadded_rows,
)
from trl_opsd.metrics import token_metrics
from trl_opsd.objective import Divergence, TokenTerms, token_terms, window_token_mean
from trl_opsd.rollouts import (
    bucket_width,
    drop_stale_input_grad_hooks,
    fixed_shape_prompts,
    generation_config_for,
    check_static_rollouts,
)
from trl_opsd.teacher_setup import build_teacher
from trl_opsd.vllm_rollouts import attach_vllm_completions, vllm_generation
from trl_opsd.teachers.base import TopKScores
from trl_opsd.teachers.routing import TeacherRouter, check_dataset_routes

logger = logging.getLogger(__name__)


class OPSDTrainer(GKDTrainer):
    """On-policy (self-)distillation trainer; see the module docstring and ``OPSDConfig``."""

    _tag_names = ["trl", "gkd", "opsd"]
    _name = "OPSD"
    config_class = OPSDConfig

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
        args = as_config(args, self.config_class, model, self._name)
        if args.rollout_backend == "vllm" and not is_vllm_available():
            raise ImportError(
                "use_vllm=True / rollout_backend='vllm' (OPSDConfig) samples student rollouts with vLLM, which is not "
                "installed: pip install 'trl[vllm]', or set rollout_backend='hf' (or 'hf_static') to sample with "
                "transformers' generate"
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
                max_length=args.max_length or min(processing_class.model_max_length, 1024),  # GKD's collator's
                privileged_from=args.privileged_from,
                answer_context_template=args.answer_context_template,
                teacher_prompt_template=args.teacher_prompt_template,
                privileged_truncation=args.privileged_truncation,
            )
        args.check_trainer_inputs(teacher_model, len(processing_class))
        if isinstance(data_collator, OPSDCollator):
            validate_dataset(data_collator, train_dataset, "train_dataset", args, teacher_model)
            validate_dataset(data_collator, eval_dataset, "eval_dataset", args, teacher_model)

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
        self.generation_config = generation_config_for(args.rollout_backend, self.generation_kwargs,
                                                       args.rollout_compile)
        self.divergence = Divergence.from_config(args)
        self.teacher, self.teacher_model = self._build_teacher(teacher_model, teacher_processing_class)
        if args.rollout_backend == "hf_static":
            zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
            seq_kd_teacher = self.teacher.own_model() if self.seq_kd and self._local_teacher else None
            check_static_rollouts(self.accelerator.unwrap_model(self.model), seq_kd_teacher,
                                  sharded=self.is_fsdp_enabled or zero3)
        check_dataset_routes(self.teacher, train_dataset, "train_dataset")
        self._dense_loss_reason = self._why_dense_loss()
        if args.chunked_loss and self._dense_loss_reason is not None:
            logger.info("chunked_loss: using the dense loss, because %s", self._dense_loss_reason)
        self.vllm_generation = (
            vllm_generation(args, self.model, self.accelerator, self.processing_class)
            if args.rollout_backend == "vllm" else None
        )
        self._vllm_synced_step = -1
        if args.collapse_guard != "off":
            self.add_callback(CollapseGuard(args.collapse_guard, max_completion_length=args.max_new_tokens,
                                            step_metrics=lambda: self._metrics["train"]))
        self._completion_log = None
        if args.log_completions:
            self._completion_log = CompletionLog(args.output_dir, args.num_completions_to_print)
            self.add_callback(LogFirstAndLastStep())

    # -- construction ---------------------------------------------------------------------------
    def _build_teacher(self, teacher_model, teacher_processing_class):
        """(teacher backend, its own placed nn.Module or None) for the configured kind of teacher."""
        fsdp_version = self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None
        setup = build_teacher(
            teacher_model, self.args, student=self.model, processing_class=self.processing_class,
            accelerator=self.accelerator, teacher_processing_class=teacher_processing_class,
            deepspeed=self.is_deepspeed_enabled, fsdp_version=fsdp_version,
        )
        for callback in setup.callbacks:
            self.add_callback(callback)
        return setup.teacher, setup.module

    def _why_dense_loss(self) -> str | None:
        """Why the chunked loss cannot run with this model and teacher (None: it can)."""
        if not self.args.chunked_loss:
            return "chunked_loss=False"
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_fsdp_enabled or zero3:
            return "the LM head is sharded outside the forward (FSDP / DeepSpeed ZeRO-3)"
        teacher_module = None
        if self._local_teacher:
            if not self.teacher.gives_hidden_states:
                return f"the teacher {self.teacher!r} only gives logits"
            teacher_module = self.teacher.own_model()
        modules = [self.model] + ([teacher_module] if teacher_module is not None else [])
        if any(plain_output_head(self.accelerator.unwrap_model(module)) is None for module in modules):
            return "a model has no plain linear LM head (soft-capped logits, an adapter or quantisation on the head)"
        return None

    @property
    def _local_teacher(self) -> bool:
        """Whether the teacher runs in process and gives dense logits (else: remote, or no teacher)."""
        return self.teacher is not None and self.teacher.gives_dense_logits

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
    def _sample(self, generator: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, prompt_limit=None):
        """Sample completions; mask everything after the first EOS (GKD's own masking logic).

        With ``rollout_backend='hf_static'`` the prompts are first brought to fixed shapes (``trl_opsd.rollouts``;
        ``prompt_limit`` caps the width bucket), so the compiled decode step is reused from call to call.
        """
        rows = prompts.shape[0]
        if self.args.rollout_backend == "hf_static":
            prompts, prompt_mask = fixed_shape_prompts(
                prompts, prompt_mask, self.processing_class.pad_token_id,
                width=bucket_width(prompts.shape[1], prompt_limit),
                rows=max(rows, self.args.per_device_train_batch_size),
            )
        sequences, attention_mask, _ = self.generate_on_policy_outputs(
            generator, {"prompts": prompts, "prompt_attention_mask": prompt_mask}, self.generation_config
        )
        width = prompts.shape[1]
        return sequences[:rows, width:], attention_mask[:rows, width:]

    def _vllm_completions(self, batches: list[dict]) -> None:
        """Student rollouts for the whole window from one vLLM call; the weights are pushed once per optimizer step."""
        if self._vllm_synced_step != self.state.global_step:
            self.vllm_generation.sync_weights()
            self._vllm_synced_step = self.state.global_step
        attach_vllm_completions(self.vllm_generation, batches, self.processing_class.pad_token_id)

    def _attach_completions(self, batch: dict, source: str) -> dict:
        """One micro-batch on the device with completions from ``source`` (see :meth:`_attach_window`)."""
        return self._attach_window([batch], source)[0]

    def _attach_window(self, batches: list[dict], source: str) -> list[dict]:
        """The micro-batches of one accumulation window on the device, each with completions from ``source``:
        the student's samples (vLLM draws the whole window in one call), the teacher's (``seq_kd``) or the dataset's.
        """
        device = self.accelerator.device
        batches = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                   for batch in (as_opsd_batch(b, self.processing_class.pad_token_id) for b in batches)]
        if source == "student" and self.args.rollout_backend == "vllm":
            self._vllm_completions(batches)
        else:
            for batch in batches:
                self._generate_completions(batch, source)
        for batch in batches:
            batch["completion_source"] = source
        if self._completion_log is not None:
            self._completion_log.update(gather_object(window_records(self.processing_class, batches)))
        return batches

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._completion_log is not None and self.accelerator.is_main_process and self.model.training:
            self._completion_log.write(self.state.global_step)

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
                    unwrapped, batch["prompts"], batch["prompt_attention_mask"], self.args.max_prompt_length
                )
            # Leaving the context turned gradient checkpointing back on, leaking one hook (see the function).
            drop_stale_input_grad_hooks(self.accelerator.unwrap_model(self.model))
        elif source == "teacher":
            student = self.accelerator.unwrap_model(self.model)
            with self.teacher.generation_model(student) as teacher_generator:
                batch["completions"], batch["completion_mask"] = self._sample(
                    teacher_generator, batch["teacher_prompts"], batch["teacher_prompt_attention_mask"],
                    self.args.max_teacher_prompt_length,
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
    def completion_views(self, model, inputs, student_logits=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student logits, teacher logits) at each completion position, both [B, T, V].

        Student: ``prompts + completions`` with gradient (unless ``student_logits`` are given). Teacher:
        ``teacher_prompts + completions`` without. The same completion tokens, each under its own prompt.
        """
        num_completion = inputs["completions"].shape[1]
        if student_logits is None:
            student_logits = completion_logits(model, *self._sequences(inputs, "student"), num_completion)
        if not self._local_teacher:
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
        if student is not None and self._local_teacher:
            teacher_ids, teacher_mask = self._sequences(inputs, "teacher")
            teacher = self.teacher.completion_head_inputs(
                student_module, teacher_ids, teacher_mask, num_completion, unwrap=self.accelerator.unwrap_model
            )
        if student is None or (self._local_teacher and teacher is None):
            self._dense_loss_reason = "a model's logits are not its LM head applied to its last hidden state"
            logger.info("chunked_loss: using the dense loss from now on, because %s", self._dense_loss_reason)
            return None
        return student, teacher

    def completion_signals(self, model, inputs, dense: bool = False, student_logits=None):
        """(student signal, teacher signal) for :func:`trl_opsd.objective.token_terms`: hidden states and LM heads
        where the chunked loss runs, else logits (always with ``dense``, or given as ``student_logits``); a remote
        teacher's scores either way; None for the teacher when there is none."""
        views = None if dense or student_logits is not None else self.chunked_completion_views(model, inputs)
        student, teacher = views if views is not None else self.completion_views(model, inputs, student_logits)
        if self.teacher is not None and not self._local_teacher:
            teacher = self._remote_scores(inputs)
        return student, teacher

    def _remote_scores(self, inputs) -> TopKScores:
        """Teacher top-k / sampled-token log-probs of the batch's completions, from a remote teacher."""
        scores = self.teacher.score_topk(
            unpadded_rows(inputs["teacher_prompts"], inputs["teacher_prompt_attention_mask"]),
            unpadded_rows(inputs["completions"], inputs["completion_mask"]),
            self.divergence.top_k,  # 0: the sampled tokens' log-probs only
            **({"routes": inputs.get("teacher_routes")} if isinstance(self.teacher, TeacherRouter) else {}),
        )
        return scores.to(inputs["completions"].device).pad_to(inputs["completions"].shape[1])

    def window_mean(self, per_token: torch.Tensor, mask: torch.Tensor, num_in_window) -> torch.Tensor:
        """Sum over ``mask`` / ``num_in_window`` (the window's count on all ranks; None: this micro-batch's)."""
        across_ranks = self.args.average_tokens_across_devices and self.args.world_size > 1
        return window_token_mean(per_token, mask, num_in_window, self.accelerator.num_processes if across_ranks else 1)

    def loss_terms(self, student, teacher, inputs, mask, num_items_in_batch) -> tuple[torch.Tensor, TokenTerms]:
        """(this micro-batch's loss, its per-token terms): the objective's per-token loss over the window's generated
        tokens. The one hook a subclass extends to add terms (``UnifiedTrainer``: its reward term)."""
        terms = token_terms(self.divergence, student, teacher, inputs["completions"], mask,
                            chunk_size=self.args.loss_chunk_size)
        return self.window_mean(terms.per_token_loss, mask, num_items_in_batch), terms

    def _loss_inputs(self, model, inputs) -> tuple[dict, torch.Tensor]:
        """(the micro-batch with completions, the mask of the positions the loss counts)."""
        if "completion_source" not in inputs:  # evaluation: dataset completions if present, else student samples
            inputs = as_opsd_batch(inputs, self.processing_class.pad_token_id)
            inputs = self._attach_completions(inputs, "dataset" if "completions" in inputs else "student")
        return inputs, inputs["completion_mask"].bool()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss; with ``return_outputs``, as GKD: ``(loss, the student's model output)`` over the batch's
        ``prompt + completion`` sequences laid out as GKD's ``input_ids`` (one student forward feeds both)."""
        inputs, mask = self._loss_inputs(model, inputs)
        outputs = self.student_sequence_outputs(model, inputs)[0] if return_outputs else None
        student, teacher = self.completion_signals(
            model, inputs, student_logits=None if outputs is None else completion_positions(outputs.logits, inputs)
        )
        loss, terms = self.loss_terms(student, teacher, inputs, mask, num_items_in_batch)
        if isinstance(student, HeadInputs):  # without logits, a non-finite logit shows up as a non-finite entropy
            checked = (terms.student_entropy, terms.teacher_entropy)
        else:
            checked = (student, teacher if torch.is_tensor(teacher) else None)
        loss = self._check_finite(loss, *checked, terms.divergence)
        self._record_token_metrics(inputs, terms, mask)
        return (loss, outputs) if return_outputs else loss

    def student_sequence_outputs(self, model, inputs) -> tuple[object, dict[str, torch.Tensor]]:
        """(the student's model output, the sequences it ran on): GKD's forward, on GKD's layout of the batch's
        current completions (``input_ids`` / ``attention_mask`` / ``labels``, see ``collator.gkd_sequences``)."""
        sequences = gkd_sequences(inputs, self.processing_class.pad_token_id)
        mask = sequences["attention_mask"]
        outputs = model(input_ids=sequences["input_ids"], attention_mask=mask,
                        position_ids=position_ids_from_mask(mask), use_cache=False)
        return outputs, sequences

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
    def _record_token_metrics(self, inputs, terms: TokenTerms, mask):
        """Log a micro-batch's statistics (see :func:`trl_opsd.metrics.token_metrics`)."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        # The pointwise clip logs its own clipped_fraction (of vocabulary entries), in terms.clip_metrics.
        per_token_cap = None if self.divergence.clip_mode == "pointwise" else self.divergence.clip
        teacher_metrics = self.teacher.metrics() if self.teacher is not None else {}
        for name, value in token_metrics(inputs, terms, mask, per_token_cap, teacher_metrics).items():
            metrics[name].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, logits, labels) as GKD's evaluation step gives them to ``compute_metrics``: the student's logits
        over GKD's ``input_ids`` and GKD's ``labels`` (the completion's ids, -100 elsewhere).

        Logits are returned only when something reads them (``compute_metrics`` or ``preprocess_logits_for_metrics``):
        gathering [batch, sequence, vocab] logits over a whole evaluation set for nothing is what GKD does.
        """
        with torch.no_grad():
            inputs, _ = self._loss_inputs(model, inputs)
            if prediction_loss_only or (self.compute_metrics is None and self.preprocess_logits_for_metrics is None):
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, gkd_sequences(inputs, self.processing_class.pad_token_id)["labels"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Completions were attached in get_batch_samples; skip GKDTrainer.training_step's own sampling.
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)
