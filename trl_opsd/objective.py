"""The distillation objective: per-token terms from a student signal, a teacher signal and one :class:`Divergence`.

This is the one place where ``OPSDConfig.divergence`` is interpreted. :meth:`Divergence.from_config` reads the loss
knobs once; :func:`token_terms` turns

- the student's signal: its logits ``[B, T, V]``, or its final hidden states and LM head (:class:`HeadInputs`, the
  chunked loss, which never holds ``[B, T, V]`` logits), and
- the teacher's signal: dense logits, hidden states and LM head, or a remote teacher's :class:`TopKScores`
  (top-k log-probs, or only the sampled tokens' log-probs)

into :class:`TokenTerms`: the per-token loss to reduce, the divergence to log and both entropies. Dense and chunked
give the same values and gradients (the chunked functions in :mod:`trl_opsd.chunked` mirror :mod:`trl_opsd.losses`).
The reduction is :func:`trl_opsd.losses.masked_token_mean` (see :func:`window_token_mean`).

:meth:`Divergence.teacher_requirement` says what a teacher must provide for the configured divergence, and
:meth:`Divergence.check_teacher` refuses, at construction, a teacher that cannot provide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from trl_opsd.chunked import (
    chunked_per_token_divergence,
    chunked_sparse_topk_divergence,
    chunked_teacher_scores,
    chunked_token_log_probs,
)
from trl_opsd.forward import HeadInputs
from trl_opsd.losses import (
    PointwiseClipped,
    clip_per_token,
    masked_token_mean,
    per_token_divergence,
    per_token_entropy,
    pointwise_clipped_divergence,
    sampled_token_reverse_kl,
    sparse_topk_divergence,
    sparse_topk_pointwise_clipped,
    token_log_probs,
)
from trl_opsd.metrics import pointwise_clip_statistics
from trl_opsd.teachers.base import Teacher, TopKScores
from trl_opsd.teachers.routing import BlendedScores

StudentSignal = Tensor | HeadInputs  # logits [B, T, V], or final hidden states + LM head
TeacherSignal = Tensor | HeadInputs | TopKScores | BlendedScores | None  # None: no teacher


class TeacherRequirement(NamedTuple):
    """What a teacher must provide for a divergence: a ``trl_opsd.teachers.base`` capability and its ``top_k``.

    ``"dense"``: full-vocabulary logits (an in-process teacher); ``"topk"``: the teacher's ``top_k`` most likely tokens
    and their log-probs per position; ``"sampled"``: the log-prob of each completion token. An in-process teacher
    provides all three.
    """

    capability: str
    top_k: int | None

    @property
    def remote_ok(self) -> bool:
        """Whether a teacher behind a server (which returns log-probs, never logits) can provide it."""
        return self.capability != "dense"


@dataclass(frozen=True)
class Divergence:
    """The per-token distillation loss: which divergence, at which temperature, clipped how.

    - ``kind="full"``: generalized JSD(``beta``) over the whole vocabulary, then the per-token clip (``clamp``,
      ``scale``); with ``clip_mode="pointwise"`` each vocabulary entry's term is capped before the sum instead.
    - ``kind="topk"``: the same on the teacher's ``top_k`` tokens plus a tail bucket (a dense teacher: its own top-k);
      ``pointwise`` caps each of the ``top_k + 1`` bucket terms.
    - ``kind="sampled"``: the policy-gradient surrogate of reverse KL on the sampled token, importance ratio capped
      at ``ratio_cap``; the logged value is the estimate ``log p_S(y) - log p_T(y)``, not the surrogate.
    """

    kind: str = "full"
    beta: float = 1.0
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    top_k: int = 0  # the teacher's k for kind "topk"; 0 otherwise (what Teacher.score_topk takes for sampled tokens)
    clip: float | None = None  # the cap of clip_mode (kinds "full" and "topk")
    clip_mode: str = "clamp"  # "clamp" / "scale": per token, after the vocabulary sum; "pointwise": per entry, before
    ratio_cap: float | None = 2.0  # kind "sampled"

    @property
    def pointwise_cap(self) -> float | None:
        """The cap on each vocabulary entry's term (``clip_mode="pointwise"``), else None."""
        return self.clip if self.clip_mode == "pointwise" else None

    def clip_per_token(self, values: Tensor) -> Tensor:
        """The per-token clip (``clamp``, ``scale``) of summed values; the pointwise clip acted before the sum."""
        return values if self.pointwise_cap is not None else clip_per_token(values, self.clip, self.clip_mode)

    @classmethod
    def from_config(cls, args) -> Divergence:
        """The divergence an ``OPSDConfig`` (or ``UnifiedConfig``) describes, read once."""
        return cls(
            kind=args.divergence,
            beta=args.beta,
            temperature=args.loss_temperature,
            top_k=args.teacher_top_k if args.divergence == "topk" else 0,
            clip=args.kl_clip,
            clip_mode=args.kl_clip_mode,
            ratio_cap=args.sampled_ratio_cap,
        )

    def teacher_requirement(self) -> TeacherRequirement:
        """What the teacher must provide: dense logits (``full``), top-k log-probs, or sampled-token log-probs."""
        if self.kind == "full":
            return TeacherRequirement("dense", None)
        if self.kind == "topk":
            return TeacherRequirement("topk", self.top_k)
        return TeacherRequirement("sampled", None)

    def check_teacher(self, teacher: Teacher) -> None:
        """Raise ``ValueError`` unless ``teacher`` can provide what this divergence reads (an in-process teacher
        with dense logits provides everything)."""
        if teacher.gives_dense_logits:
            return
        requirement = self.teacher_requirement()
        if not requirement.remote_ok:
            raise ValueError(
                f"divergence='full' needs the teacher's dense logits, but {teacher!r} is a remote teacher; set "
                "divergence='topk' (top-k log-probs + tail bucket) or divergence='sampled' (sampled-token reverse KL)"
            )
        teacher.require(requirement.capability, top_k=requirement.top_k)
        if self.temperature != 1.0:
            raise ValueError("remote teachers return log-probs at temperature 1.0; set loss_temperature=1.0")

    def describe(self) -> dict[str, str | float]:
        """The divergence and its clip in words (for a recipe's dry run)."""
        if self.kind == "sampled":
            divergence = ("sampled-token reverse KL: advantage log p_T(y) - log p_S(y) on the sampled token "
                          f"(importance ratio capped at {self.ratio_cap}); logged value is the KL estimate")
        else:
            name = {0.0: "forward KL  KL(p_T || p_S)", 1.0: "reverse KL  KL(p_S || p_T)"}.get(
                float(self.beta), f"generalized JSD(beta={self.beta})")
            scope = f"the teacher's top-{self.top_k} + a tail bucket" if self.kind == "topk" else "the vocabulary"
            divergence = f"{name}, summed over {scope}  [beta={self.beta}]"
        clip = "none"
        if self.clip is not None:
            where = "on each vocabulary entry's term, before the sum" if self.pointwise_cap is not None else (
                "per token, after the vocabulary sum")
            clip = f"{self.clip_mode} at {self.clip} {where}"
        return {"divergence": divergence, "clip": clip, "loss_temperature": self.temperature}


class TokenTerms(NamedTuple):
    """Per-position outputs of the objective, all ``[B, T]`` and 0 at masked-out positions."""

    per_token_loss: Tensor | None  # to reduce (None: no distillation term)
    divergence: Tensor | None  # to log (None: no divergence was computed)
    student_entropy: Tensor  # nats at the loss temperature, no gradient
    teacher_entropy: Tensor | None  # None when the teacher is not a full distribution (remote, or no teacher)
    clip_metrics: dict[str, float] | None = None  # the pointwise clip's clipped_fraction / clipped_mass(_share)


def _clip_metrics(clip: PointwiseClipped | None, mask: Tensor, entries_per_position: int) -> dict[str, float] | None:
    return None if clip is None else pointwise_clip_statistics(clip, mask, entries_per_position)


def token_terms(
    divergence: Divergence,
    student: StudentSignal,
    teacher: TeacherSignal,
    completions: Tensor,
    mask: Tensor,
    *,
    chunk_size: int | None = None,
) -> TokenTerms:
    """The distillation terms of one micro-batch for ``divergence``.

    ``student`` and ``teacher`` are both logits (dense path) or both :class:`HeadInputs` (chunked path), except that a
    remote teacher's :class:`TopKScores` pairs with either. ``completions`` are the scored token ids, ``mask`` the
    positions that count. A :class:`~trl_opsd.teachers.routing.TeacherBlend`'s scores give ``sum_i w_i * terms_i``.
    """
    if isinstance(teacher, BlendedScores):
        parts = [token_terms(divergence, student, part.scores, completions, mask, chunk_size=chunk_size)
                 for part in teacher]
        return _weighted_terms(parts, [part.weight for part in teacher])
    if isinstance(student, HeadInputs):
        return _chunked_terms(divergence, student, teacher, completions, mask, chunk_size)
    return _dense_terms(divergence, student, teacher, completions, mask)


def _weighted_terms(parts: list[TokenTerms], weights: list[float]) -> TokenTerms:
    """``sum_i w_i * parts_i`` for the loss, the logged divergence and the clip metrics (the student's entropy is
    the same in every part)."""
    def weighted(values):
        return sum(w * v for w, v in zip(weights, values))

    clip_metrics = None
    if parts[0].clip_metrics:
        clip_metrics = {key: weighted(p.clip_metrics[key] for p in parts) for key in parts[0].clip_metrics}
    return TokenTerms(weighted(p.per_token_loss for p in parts), weighted(p.divergence for p in parts),
                      parts[0].student_entropy, None, clip_metrics)


def _dense_terms(d: Divergence, student_logits: Tensor, teacher, completions: Tensor, mask: Tensor) -> TokenTerms:
    tau = d.temperature
    remote = isinstance(teacher, TopKScores)
    clip_metrics = None
    if d.kind == "full":
        if d.pointwise_cap is not None:
            clip = pointwise_clipped_divergence(student_logits, teacher, d.beta, d.pointwise_cap, tau)
            loss, values = clip.values, clip.unclipped
            clip_metrics = _clip_metrics(clip, mask, student_logits.size(-1))
        else:
            values = per_token_divergence(student_logits, teacher, d.beta, tau)
            loss = d.clip_per_token(values)
    elif d.kind == "topk":
        if remote:
            topk_ids, topk_logprobs = teacher.topk_ids, teacher.topk_logprobs
        else:
            topk_logprobs, topk_ids = torch.log_softmax(teacher / tau, -1).topk(d.top_k, -1)
        if d.pointwise_cap is not None:
            clip = sparse_topk_pointwise_clipped(student_logits, topk_ids, topk_logprobs, d.beta, d.pointwise_cap, tau)
            loss, values = clip.values, clip.unclipped
            clip_metrics = _clip_metrics(clip, mask, topk_ids.size(-1) + 1)
        else:
            values = sparse_topk_divergence(student_logits, topk_ids, topk_logprobs, d.beta, tau)
            loss = d.clip_per_token(values)
    else:
        student_logprobs = token_log_probs(student_logits, completions, tau)
        teacher_logprobs = teacher.sampled_logprobs if remote else token_log_probs(teacher, completions, tau)
        sampled = sampled_token_reverse_kl(student_logprobs, teacher_logprobs, ratio_cap=d.ratio_cap)
        loss, values = sampled.surrogate, sampled.kl_estimate
    teacher_entropy = None if remote else dense_entropy(teacher, mask, tau)
    return TokenTerms(loss, values, dense_entropy(student_logits, mask, tau), teacher_entropy, clip_metrics)


def _chunked_terms(
    d: Divergence, student: HeadInputs, teacher, completions: Tensor, mask: Tensor, chunk_size: int | None
) -> TokenTerms:
    tau = d.temperature
    student_side = {"mask": mask, "chunk_size": chunk_size, "student_bias": student.bias}
    if d.kind == "full":
        out = chunked_per_token_divergence(
            student.hidden, student.weight, teacher.hidden, teacher.weight, d.beta, tau,
            teacher_bias=teacher.bias, pointwise_cap=d.pointwise_cap, **student_side,
        )
        return _chunked_divergence_terms(d, out, out.teacher_entropy, mask, student.weight.size(0))
    scores, teacher_entropy = _teacher_scores(d, teacher, completions, mask, chunk_size)
    if d.kind == "topk":
        out = chunked_sparse_topk_divergence(
            student.hidden, student.weight, scores.topk_ids, scores.topk_logprobs, d.beta, tau,
            pointwise_cap=d.pointwise_cap, **student_side,
        )
        return _chunked_divergence_terms(d, out, teacher_entropy, mask, scores.topk_ids.size(-1) + 1)
    out = chunked_token_log_probs(student.hidden, student.weight, completions, tau, **student_side)
    sampled = sampled_token_reverse_kl(out.values, scores.sampled_logprobs, ratio_cap=d.ratio_cap)
    return TokenTerms(sampled.surrogate, sampled.kl_estimate, out.student_entropy, teacher_entropy)


def _chunked_divergence_terms(d: Divergence, out, teacher_entropy, mask: Tensor, entries: int) -> TokenTerms:
    """A chunked divergence's terms: with a pointwise cap the chunks returned the clipped values (and the unclipped
    divergence to log); otherwise the per-token clip acts here."""
    if out.clip is not None:
        return TokenTerms(out.values, out.clip.unclipped, out.student_entropy, teacher_entropy,
                          _clip_metrics(out.clip, mask, entries))
    return TokenTerms(d.clip_per_token(out.values), out.values, out.student_entropy, teacher_entropy)


def _teacher_scores(d: Divergence, teacher, completions: Tensor, mask: Tensor, chunk_size: int | None):
    """(top-k / sampled-token scores, teacher entropy or None): a remote teacher's as given, a dense one's chunked."""
    if isinstance(teacher, TopKScores):
        return teacher, None
    scores = chunked_teacher_scores(
        teacher.hidden, teacher.weight, d.temperature, top_k=d.top_k, token_ids=None if d.top_k else completions,
        mask=mask, chunk_size=chunk_size, bias=teacher.bias,
    )
    return scores, scores.entropy


@torch.no_grad()
def dense_entropy(logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Per-position entropy of ``softmax(logits / temperature)``, ``[B, T]``, computed at the unmasked positions only
    (0 elsewhere)."""
    values = per_token_entropy(logits[mask], temperature)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def student_entropy(student: StudentSignal, mask: Tensor, temperature: float, chunk_size: int | None = None) -> Tensor:
    """The student's per-position entropy, ``[B, T]``, when no distillation term computed it."""
    if isinstance(student, HeadInputs):
        return chunked_teacher_scores(
            student.hidden, student.weight, temperature, mask=mask, chunk_size=chunk_size, bias=student.bias
        ).entropy
    return dense_entropy(student, mask, temperature)


def sampled_log_probs(
    student: StudentSignal, completions: Tensor, temperature: float, mask: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """(``log p_S(y_t)`` at ``temperature`` with gradient, the student's entropy at ``temperature`` or None), both
    ``[B, T]``: the input of a policy-gradient (reward) term."""
    if isinstance(student, HeadInputs):
        out = chunked_token_log_probs(
            student.hidden, student.weight, completions, temperature, mask=mask, chunk_size=chunk_size,
            student_bias=student.bias,
        )
        return out.values, out.student_entropy
    return token_log_probs(student, completions, temperature), None


def window_token_mean(
    per_token: Tensor, mask: Tensor, num_in_window: int | Tensor | None, num_processes: int = 1
) -> Tensor:
    """:func:`masked_token_mean` over the accumulation window: ``sum_{mask} per_token / num_in_window``.

    ``num_in_window`` counts the window's tokens (or sequences) on all ranks; DDP then averages gradients over the
    ``num_processes`` ranks, so the loss is multiplied back by it. ``None`` (evaluation, a single micro-batch) is the
    micro-batch's own mean.
    """
    loss = masked_token_mean(per_token, mask, num_in_window)
    if num_in_window is not None and num_processes > 1:
        loss = loss * num_processes
    return loss
