"""The unified meta-algorithm: SFT-RS, outcome RL, OPD, OPSD and KD as settings of one objective.

Per sampled (or dataset) completion y of a prompt x, with student p_S and teacher p_T (DESIGN.md,
"Unified objective")::

    loss = lambda * D  +  alpha * R

    D = sum_{i,t} w_i * clip(d_{i,t}) / N_tokens                 distillation term (as in OPSDTrainer)
    R = - sum_i w_i * A_i * mean_t log p_S(y_{i,t}) / N_seq      REINFORCE term on the sampled completion

with ``d_t`` the per-token divergence (generalized JSD(beta), summed over the vocabulary, then clipped),
``lambda = distillation_weight``, ``alpha = reward_weight``, ``w_i`` the sample's weight (0 for samples
rejected by the reward filter, else 1), and N_tokens / N_seq the weighted numbers of completion tokens
/ sequences in the gradient-accumulation window. The advantage is ``A_i = r_i - b_i`` with the
leave-one-out baseline ``b_i = mean_{j != i} r_j`` over the ``num_generations`` samples of the same
prompt (unbiased: b_i does not depend on y_i); with ``num_generations = 1`` there is no baseline
(``A_i = r_i``). ``log p_S`` is taken at the sampling temperature, so R's gradient is the policy
gradient of the sampling policy.

| preset       | alpha | lambda | teacher_kind | sampler | kl_clip | also                     |
|--------------|-------|--------|--------------|---------|---------|--------------------------|
| `sft_rs`     | 0     | 1      | external     | teacher | None    | reward_filter=True       |
| `rl_outcome` | 1     | 0      | none         | student | None    |                          |
| `opd`        | 1     | 1      | external     | student | None    |                          |
| `opsd`       | 1     | 1      | self         | student | None    | (DESIGN.md: 1.0, see below) |
| `kd`         | 0     | 1      | external     | dataset | None    | distillation_loss=hinton |

DESIGN.md's table gives `opsd` a clip of 1.0 (the seed notebook's); the preset leaves the clip off because it did
better without it on the arithmetic world (README, "Status"); pass ``kl_clip=1.0`` for the notebook's setting.

``kd`` replaces D by Hinton's loss on dataset completions, ``hinton_alpha * T^2 * KL(p_T || p_S) +
(1 - hinton_alpha) * CE`` with ``T = loss_temperature`` and the completion token as the CE target.

D is :func:`trl_opsd.objective.token_terms` for ``divergence`` (``full``, ``topk`` or ``sampled``, with an in-process
or a remote teacher), exactly as in ``OPSDTrainer``; this trainer adds R through ``OPSDTrainer.loss_terms``. As there,
``chunked_loss`` (the default) computes D and R's log-probabilities from final hidden states and the LM heads a chunk
of positions at a time, never holding ``[batch, completion, vocab]`` logits; Hinton's loss, and whatever
``OPSDTrainer`` cannot chunk, use the dense logits (said once in an info log).

Why R is not folded into a per-token advantage ``alpha * (r - b) + lambda * (log p_T - log p_S)`` (tinker's framing):
R is normalised per sequence (``mean_t``, then over the window's sequences) and D per token, so one advantage would
change R's weight per token and the presets' measured behaviour. With ``divergence='sampled'`` D already is the
per-token advantage ``log p_T - log p_S`` times ``log p_S``, so sampled-token OPD and remote teachers run here as
they do in ``OPSDTrainer``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trl.experimental.gkd import GKDConfig

from trl_opsd.config import OPSDConfig, _check_choice, as_config, check_finite_floats
from trl_opsd.geometry import GeometryRecorder
from trl_opsd.losses import hinton_kd_loss
from trl_opsd.objective import TokenTerms, dense_entropy, sampled_log_probs, student_entropy, token_terms
from trl_opsd.trainer import OPSDTrainer

TEACHER_KINDS = ("external", "self", "none")
SAMPLERS = ("student", "teacher", "dataset")
DISTILLATION_LOSSES = ("divergence", "hinton")

PRESETS: dict[str, dict] = {
    "sft_rs": dict(reward_weight=0.0, distillation_weight=1.0, teacher_kind="external", sampler="teacher",
                   kl_clip=None, reward_filter=True),
    "rl_outcome": dict(reward_weight=1.0, distillation_weight=0.0, teacher_kind="none", sampler="student",
                       kl_clip=None),
    "opd": dict(reward_weight=1.0, distillation_weight=1.0, teacher_kind="external", sampler="student", kl_clip=None),
    "opsd": dict(reward_weight=1.0, distillation_weight=1.0, teacher_kind="self", sampler="student", kl_clip=None),
    "kd": dict(reward_weight=0.0, distillation_weight=1.0, teacher_kind="external", sampler="dataset", kl_clip=None,
               distillation_loss="hinton"),
}
# What an unset knob means when no preset sets it: plain distillation of the student's own samples.
_BASE_VALUES = dict(reward_weight=0.0, distillation_weight=1.0, sampler="student", distillation_loss="divergence")
# GKD's knobs that the sampler decides: (lmbda = on-policy fraction, seq_kd = sample from the teacher).
_SAMPLER_SOURCES = {"student": (1.0, False), "teacher": (0.0, True), "dataset": (0.0, False)}


def _is_unset(instance, name: str) -> bool:
    """Whether a field still holds its default, i.e. was not given."""
    spec = next(f for f in dataclasses.fields(instance) if f.name == name)
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return getattr(instance, name) == default


@dataclass
class UnifiedConfig(OPSDConfig):
    r"""
    Configuration for [`UnifiedTrainer`]: every [`OPSDConfig`] argument plus the knobs of the unified objective.

    A knob counts as given when it differs from its default (``None`` / ``False`` / ``"auto"``); a `preset` fills
    the knobs that are not given, explicit ones override it, and combinations that contradict each other raise a
    `ValueError` naming the keys (and which of them came from the preset).

    Knobs:
        preset (`str` or `None`): one of `sft_rs`, `rl_outcome`, `opd`, `opsd`, `kd` (see the module docstring).
        reward_weight (`float`): alpha, the weight of the REINFORCE term. Needs `reward_funcs` and the student sampler.
        distillation_weight (`float`): lambda, the weight of the distillation term. Not GKD's `lmbda` (the on-policy
            fraction), which the `sampler` sets.
        teacher_kind (`str` or `None`): `"external"` (the `teacher_model`), `"self"` (the student's frozen/EMA/live
            self with privileged context) or `"none"` (no teacher is built and no teacher forward runs). `None`:
            external when a `teacher_model` is given, else self.
        sampler (`str`): where completions come from every step: `"student"` (on-policy, `lmbda=1`), `"teacher"`
            (`seq_kd=True`, `lmbda=0`) or `"dataset"` (the rows' completions, `lmbda=0`).
        num_generations (`int`, defaults to 1): samples per prompt; `per_device_train_batch_size` counts prompts, so
            a micro-batch holds `per_device_train_batch_size * num_generations` completions.
        reward_filter (`bool`): keep only samples whose reward is at least `reward_acceptance_threshold`; rejected
            samples weigh 0 in both terms and are left out of the token and sequence counts.
        reward_acceptance_threshold (`float`, defaults to 1.0).
        distillation_loss (`str`): `"divergence"` (generalized JSD(`beta`), clipped by `kl_clip`) or `"hinton"`
            (`hinton_alpha * T^2 * KL(p_T || p_S) + (1 - hinton_alpha) * CE`, `T = loss_temperature`).
        hinton_alpha (`float`, defaults to 0.5): weight of Hinton's soft term (0 = pure cross-entropy).
        privileged_from (`str` or `None`, defaults to `"auto"`): as in `OPSDConfig`; `"auto"` gives the self-teacher
            the `answer` column as privileged context and an external teacher the student's own prompt.
        geometry_steps (`int`, defaults to 1): every this many optimizer steps, gradient-geometry diagnostics of the
            first micro-batch (histogram, top tokens, answer-region shares) go to the logs and to
            `<output_dir>/geometry.jsonl`; 0 turns them off.
    """

    preset: str | None = field(default=None, metadata={"help": f"One of {tuple(PRESETS)}."})
    reward_weight: float | None = field(default=None, metadata={"help": "alpha: weight of the REINFORCE term."})
    distillation_weight: float | None = field(default=None, metadata={"help": "lambda: weight of distillation."})
    teacher_kind: str | None = field(default=None, metadata={"help": f"One of {TEACHER_KINDS}."})
    sampler: str | None = field(default=None, metadata={"help": f"One of {SAMPLERS}."})
    num_generations: int = field(default=1, metadata={"help": "Samples per prompt (leave-one-out baseline if > 1)."})
    reward_filter: bool = field(default=False, metadata={"help": "Train only on samples with an accepted reward."})
    reward_acceptance_threshold: float = field(default=1.0)
    distillation_loss: str | None = field(default=None, metadata={"help": f"One of {DISTILLATION_LOSSES}."})
    hinton_alpha: float = field(default=0.5)
    privileged_from: str | None = field(default="auto", metadata={"help": "Column turned into privileged context."})
    geometry_steps: int = field(default=1, metadata={"help": "Log gradient geometry every N steps (0: never)."})

    def __post_init__(self):
        self._sources = {}
        self._apply_preset()
        self._derive_sampler_knobs()
        if self.teacher_kind is not None:
            self.resolve_teacher_kind(self.teacher_kind)
        else:  # left to the trainer (external iff a teacher_model is given), which checks again then
            self._check_consistency()
        super().__post_init__()

    def _apply_preset(self) -> None:
        if self.preset is not None:
            _check_choice("preset", self.preset, tuple(PRESETS))
            for key, value in PRESETS[self.preset].items():
                if _is_unset(self, key):
                    setattr(self, key, value)
                    self._sources[key] = "preset"
        for key, value in _BASE_VALUES.items():
            if _is_unset(self, key):
                setattr(self, key, value)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("distillation_loss", self.distillation_loss, DISTILLATION_LOSSES)
        if self.teacher_kind is not None:
            _check_choice("teacher_kind", self.teacher_kind, TEACHER_KINDS)

    def _derive_sampler_knobs(self) -> None:
        """GKD's ``lmbda`` and ``seq_kd`` follow the sampler; a given value that disagrees is a contradiction."""
        lmbda, seq_kd = _SAMPLER_SOURCES[self.sampler]
        if self.lmbda not in (lmbda, 1.0):  # 1.0 is lmbda's default, i.e. not given
            raise ValueError(f"lmbda={self.lmbda} contradicts {self.describe('sampler')}, which implies lmbda={lmbda}; "
                             "the unified trainer draws every step from one sampler")
        if self.seq_kd and not seq_kd:
            raise ValueError(f"seq_kd=True (sample from the teacher) contradicts {self.describe('sampler')}")
        self.lmbda, self.seq_kd = lmbda, seq_kd

    def resolve_teacher_kind(self, teacher_kind: str) -> None:
        """Set the teacher kind (the trainer calls this when it was left to the `teacher_model`) and re-check."""
        _check_choice("teacher_kind", teacher_kind, TEACHER_KINDS)
        self.teacher_kind = teacher_kind
        if self.privileged_from == "auto":
            self.privileged_from = "answer" if teacher_kind == "self" else None
        self._check_consistency()

    def describe(self, key: str) -> str:
        """``key=value``, saying when the value came from the preset (for error messages)."""
        origin = f" (from preset={self.preset!r})" if self._sources.get(key) == "preset" else ""
        return f"{key}={getattr(self, key)!r}{origin}"

    def _check_consistency(self) -> None:
        check_finite_floats(self)  # NaN passes every comparison below
        alpha, lam, kind, sampler = self.reward_weight, self.distillation_weight, self.teacher_kind, self.sampler
        d = self.describe
        if alpha < 0 or lam < 0:
            raise ValueError(f"{d('reward_weight')} and {d('distillation_weight')} must be non-negative")
        if alpha == 0 and lam == 0:
            raise ValueError(f"{d('reward_weight')} and {d('distillation_weight')} leave nothing to train")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}")
        if not 0.0 <= self.hinton_alpha <= 1.0:
            raise ValueError(f"hinton_alpha must be in [0, 1], got {self.hinton_alpha}")
        if self.geometry_steps < 0:
            raise ValueError(f"geometry_steps must be >= 0, got {self.geometry_steps}")
        if alpha > 0 and sampler != "student":
            raise ValueError(f"{d('reward_weight')} needs sampler='student' (REINFORCE on the policy's own samples), "
                             f"but {d('sampler')}")
        if sampler == "dataset" and self.num_generations > 1:
            raise ValueError(f"num_generations={self.num_generations} with {d('sampler')} would repeat identical rows")
        if self.distillation_loss == "hinton" and self.kl_clip is not None:
            raise ValueError(f"{d('kl_clip')} does not apply to {d('distillation_loss')}")
        if self.distillation_loss == "hinton" and self.divergence != "full":
            raise ValueError(f"{d('distillation_loss')} compares whole distributions: divergence must be 'full', got "
                             f"{self.divergence!r}")
        if kind == "none":
            if lam > 0:
                raise ValueError(f"{d('distillation_weight')} needs a teacher, but {d('teacher_kind')}; set "
                                 "teacher_kind='external' or 'self', or distillation_weight=0")
            if sampler == "teacher":
                raise ValueError(f"{d('sampler')} needs a teacher, but {d('teacher_kind')}")
        elif kind is not None and lam == 0 and sampler != "teacher":
            raise ValueError(f"{d('teacher_kind')} builds a teacher that {d('distillation_weight')} and "
                             f"{d('sampler')} never use; set teacher_kind='none'")


def _prompt_of(row: dict):
    """The row's prompt in its own format, as TRL passes it to reward functions (chat list or string)."""
    if row.get("messages"):
        messages = row["messages"]
        return messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return row["prompt"]


@dataclass
class GroupedRewardCollator:
    """Wraps a collator: each row repeated ``num_generations`` times (consecutively: a group is a block of
    rows), plus what reward functions need: ``reward_prompts`` and the rows' other columns."""

    collator: Callable
    num_generations: int = 1

    def __call__(self, rows: list[dict]) -> dict:
        rows = [row for row in rows for _ in range(self.num_generations)]
        batch = self.collator(rows)
        batch["reward_prompts"] = [_prompt_of(row) for row in rows]
        # TRL's convention: every other column, by name (names our own arguments use are left out)
        columns = {key for row in rows for key in row} - {"prompt", "completion", "prompts", "completions",
                                                          "completion_ids", "trainer_state"}
        batch["reward_columns"] = {key: [row.get(key) for row in rows] for key in sorted(columns)}
        return batch


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``A_i = r_i - mean_{j != i} r_j`` within consecutive groups of ``num_generations``; ``r`` when it is 1."""
    if num_generations == 1:
        return rewards.clone()
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    groups = rewards.view(-1, num_generations)
    baseline = (groups.sum(1, keepdim=True) - groups) / (num_generations - 1)
    return (groups - baseline).view(-1)


class UnifiedTrainer(OPSDTrainer):
    """One trainer for SFT-RS, outcome RL, OPD, OPSD and KD; see the module docstring and ``UnifiedConfig``.

    ``reward_funcs``: callables in ``trl.GRPOTrainer``'s convention (``trl_opsd.rewards``), summed (``None``
    entries skipped) into one reward per completion.
    """

    _tag_names = ["trl", "gkd", "opsd", "unified"]
    _name = "Unified"
    config_class = UnifiedConfig

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args: GKDConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers=(None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config=None,
        formatting_func: Callable | None = None,
        teacher_processing_class=None,
        reward_funcs: Callable | list[Callable] | None = None,
    ):
        args = as_config(args, self.config_class, model, self._name)
        if args.teacher_kind is None:
            args.resolve_teacher_kind("external" if teacher_model is not None else "self")
        if (args.teacher_kind == "external") != (teacher_model is not None):
            raise ValueError(
                f"{args.describe('teacher_kind')} "
                + ("needs a teacher_model" if teacher_model is None else "but a teacher_model was given")
            )
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else (
            [reward_funcs] if reward_funcs is not None else []
        )
        if not self.reward_funcs and (args.reward_weight > 0 or args.reward_filter):
            needs = args.describe("reward_weight") if args.reward_weight > 0 else args.describe("reward_filter")
            raise ValueError(f"{needs} needs reward_funcs (e.g. trl_opsd.rewards.math_answer_reward)")
        super().__init__(
            model, teacher_model, args, data_collator, train_dataset, eval_dataset, processing_class,
            compute_metrics, callbacks, optimizers, preprocess_logits_for_metrics, peft_config, formatting_func,
            teacher_processing_class,
        )
        self.data_collator = GroupedRewardCollator(self.data_collator, args.num_generations)
        self.reward_func_names = [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]
        self._geometry = None
        if args.geometry_steps:
            path = os.path.join(args.output_dir, "geometry.jsonl") if self.is_world_process_zero() else None
            self._geometry = GeometryRecorder(self.processing_class, path)
        self._geometry_recorded_step = -1

    def _build_teacher(self, teacher_model, teacher_processing_class):
        if self.args.teacher_kind == "none":
            return None, None  # no teacher module, so completion_views runs no teacher forward
        return super()._build_teacher(teacher_model, teacher_processing_class)

    # -- rewards ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _rewards(self, batch: dict) -> torch.Tensor:
        """One summed reward per completion, reward functions called in GRPOTrainer's convention."""
        mask = batch["completion_mask"].bool()
        completion_ids = [row[keep].tolist() for row, keep in zip(batch["completions"], mask)]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = batch["reward_prompts"]
        completions = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, texts)
        ]
        per_func = torch.full((len(texts), len(self.reward_funcs)), float("nan"))
        for index, reward_func in enumerate(self.reward_funcs):
            values = reward_func(
                prompts=prompts, completions=completions, completion_ids=completion_ids,
                trainer_state=self.state, **batch["reward_columns"],
            )
            if len(values) != len(texts):
                raise ValueError(f"reward function {self.reward_func_names[index]!r} returned {len(values)} rewards "
                                 f"for {len(texts)} completions")
            per_func[:, index] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        batch["rewards_per_func"] = per_func
        return per_func.nansum(1).to(mask.device)

    def _score(self, batch: dict) -> dict:
        """Attach ``rewards``, ``advantages`` and ``sample_weight`` (0 for samples the reward filter rejects)."""
        size = batch["completions"].shape[0]
        device = batch["completions"].device
        if self.reward_funcs:
            rewards = self._rewards(batch)
            advantages = leave_one_out_advantages(rewards, self.args.num_generations)
        else:
            rewards = advantages = torch.zeros(size, device=device)
        weight = torch.ones(size, device=device)
        if self.args.reward_filter:
            weight = (rewards >= self.args.reward_acceptance_threshold).float()
        batch.update(rewards=rewards, advantages=advantages, sample_weight=weight)
        return batch

    def _window_sum(self, values: list[torch.Tensor]) -> torch.Tensor:
        total = sum(value.sum() for value in values)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Completions as in OPSDTrainer, then rewards per window; rejected samples leave the token count."""
        batches, num_generated = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, num_generated
        batches = [self._score(batch) for batch in batches]
        num_tokens = self._window_sum([b["completion_mask"] * b["sample_weight"][:, None] for b in batches])
        num_sequences = self._window_sum([b["sample_weight"] for b in batches])
        for batch in batches:
            batch["num_sequences_in_window"] = num_sequences
        self._record_reward_metrics(batches, "train")
        return batches, num_tokens

    @torch.no_grad()
    def _record_reward_metrics(self, batches: list[dict], mode: str) -> None:
        if not self.reward_funcs:
            return
        metrics = self._metrics[mode]
        rewards = torch.cat([b["rewards"] for b in batches]).float()
        advantages = torch.cat([b["advantages"] for b in batches]).float()
        per_func = torch.cat([b["rewards_per_func"] for b in batches])
        metrics["reward_mean"].append(rewards.mean().item())
        metrics["reward_std"].append(rewards.std().item() if rewards.numel() > 1 else 0.0)
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(per_func[:, index].nanmean().item())
        metrics["advantage_mean"].append(advantages.mean().item())
        metrics["advantage_std"].append(advantages.std().item() if advantages.numel() > 1 else 0.0)
        metrics["advantage_abs_mean"].append(advantages.abs().mean().item())
        if self.args.reward_filter:
            metrics["accepted_fraction"].append(torch.cat([b["sample_weight"] for b in batches]).mean().item())

    # -- loss ---------------------------------------------------------------------------------------
    def _why_dense_loss(self) -> str | None:
        reason = super()._why_dense_loss()
        if reason is None and self.args.distillation_loss == "hinton" and self.args.distillation_weight > 0:
            reason = "distillation_loss='hinton' is computed from full logits"
        return reason

    def _loss_inputs(self, model, inputs):
        """As in OPSDTrainer, with rewards scored; samples the reward filter rejects leave the mask."""
        if "completion_source" not in inputs and "completions" not in inputs and self.args.sampler == "teacher":
            inputs = self._attach_completions(inputs, "teacher")  # evaluation under the teacher sampler
        inputs, mask = super()._loss_inputs(model, inputs)
        if "advantages" not in inputs:  # evaluation: the micro-batch is its own window
            inputs = self._score(inputs)
            self._record_reward_metrics([inputs], "train" if model.training else "eval")
        return inputs, mask & (inputs["sample_weight"] > 0)[:, None]

    def loss_terms(self, student, teacher, inputs, mask, num_items_in_batch):
        """``lambda * D + alpha * R`` (see the module docstring), and the per-token terms for the metrics."""
        args = self.args
        loss, logged, terms, entropy = 0.0, {}, None, None
        if args.distillation_weight > 0:
            terms = self._distillation_terms(student, teacher, inputs, mask)
            loss = loss + args.distillation_weight * self.window_mean(terms.per_token_loss, mask, num_items_in_batch)
            logged["distillation_term"] = self.window_mean(terms.per_token_loss.detach(), mask, None)
        if args.reward_weight > 0:
            log_probs, entropy = sampled_log_probs(
                student, inputs["completions"], self.temperature, mask, args.loss_chunk_size
            )
            reinforce, logged["reward_term"] = self._reinforce_term(log_probs, inputs, mask)
            loss = loss + args.reward_weight * reinforce
        if terms is None:  # the metrics' entropy is at the loss temperature
            if entropy is None or self.temperature != args.loss_temperature:
                entropy = student_entropy(student, mask, args.loss_temperature, args.loss_chunk_size)
            terms = TokenTerms(None, None, entropy, None)
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in logged.items():
            metrics[name].append(value.item())
        self._record_geometry(inputs, terms.divergence, mask)
        return loss, terms

    def _distillation_terms(self, student, teacher, inputs, mask) -> TokenTerms:
        """D per token: the objective's, or Hinton's micro-batch mean spread over its tokens (so the window
        normalisation is OPSDTrainer's)."""
        args = self.args
        if args.distillation_loss != "hinton":
            return token_terms(self.divergence, student, teacher, inputs["completions"], mask,
                               chunk_size=args.loss_chunk_size)
        labels = inputs["completions"].masked_fill(~mask, -100)
        mean = hinton_kd_loss(student, teacher, labels, args.hinton_alpha, args.loss_temperature)
        tau = args.loss_temperature
        return TokenTerms(mean.expand(mask.shape), None, dense_entropy(student, mask, tau),
                          dense_entropy(teacher, mask, tau))

    def _reinforce_term(self, log_probs, inputs, mask):
        """(R normalised by the window's sequences, R over this micro-batch): ``-A_i * mean_t log p_S(y_t)``."""
        log_probs = torch.where(mask, log_probs, torch.zeros_like(log_probs))
        sequence_mean = log_probs.sum(1) / mask.sum(1).clamp(min=1)
        surrogate = -(inputs["advantages"].to(sequence_mean.dtype) * sequence_mean)[:, None]
        kept = (inputs["sample_weight"] > 0)[:, None]
        term = self.window_mean(surrogate, kept, inputs.get("num_sequences_in_window"))
        return term, self.window_mean(surrogate.detach(), kept, None)

    def _record_geometry(self, inputs, divergence, mask) -> None:
        """Diagnostics of the first micro-batch of every ``geometry_steps``-th optimizer step."""
        step = self.state.global_step
        if (self._geometry is None or divergence is None or not self.model.training or not mask.any()
                or step % self.args.geometry_steps or step == self._geometry_recorded_step):
            return
        self._geometry_recorded_step = step
        for name, value in self._geometry(step, divergence, mask, inputs["completions"]).items():
            self._metrics["train"][name].append(value)
