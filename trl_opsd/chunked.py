"""Memory-bounded per-token losses computed from final hidden states and LM heads, a chunk of positions at a time.

The dense path projects every position to vocabulary logits: for Qwen's V = 151,936 one fp32 ``[2, 1024, V]`` copy
is 1.2 GB, and a generalized JSD keeps several of them (student and teacher logits, both log-softmaxes, the mixture,
the autograd buffers). Here only ``chunk_size`` positions are projected at once::

    forward  (no graph):  per chunk c: z_S = h_S[c] W_S^T + b_S, z_T = h_T[c] W_T^T + b_T  ->  values[c]
    backward (recompute): per chunk c: rebuild z_S (and z_T); g = d values[c] / d z_S;
                          grad h_S[c] = g W_S,  grad W_S += g^T h_S[c],  grad b_S += sum_rows g

so peak memory is O(chunk_size * V) instead of O(N * V), at the price of projecting each chunk twice.

The functions return one value *per position*, and the backward receives one upstream gradient per position. So any
per-position function applied afterwards — :func:`trl_opsd.losses.clip_per_token` (clamp or scale), masking,
:func:`trl_opsd.losses.masked_token_mean` — gets exactly the dense path's gradient with no extra pass: the clip
coefficient reaches the chunk recompute as the upstream gradient of that position. The pointwise clip acts inside a
position (on each vocabulary entry's term), so it is a parameter of the chunk forms themselves (``pointwise_cap``).

Like TRL's ``ChunkedDivergenceFunction`` (``trl.kernels.chunked_divergence``), the dense divergence has a written-out
gradient (so a chunk keeps ~4 ``[chunk, V]`` buffers instead of autograd's ~16). Unlike it, a chunk holds the whole
vocabulary (no online logsumexp over vocabulary tiles), which keeps each form a few lines of plain torch: any beta, the
sparse top-k divergence (whose chunk gradient comes from autograd on :mod:`trl_opsd.losses`' own function) and
sampled-token log-probabilities. Teacher logits never enter a graph: the teacher receives no gradient even when it
shares the student's LM head.

Precision: each chunk's logits are projected in the weights' dtype and upcast to fp32 for the softmaxes; the LM-head
gradient is accumulated in fp32 across chunks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import (
    PointwiseClipped,
    _check_beta,
    _check_cap,
    _check_temperature,
    divergence_terms,
    pointwise_clip,
    sparse_topk_divergence,
    sparse_topk_pointwise_clipped,
)

# Default chunk: as many positions as make one fp32 [chunk, V] buffer about 32 MiB (55 positions at V = 151,936).
# The dense divergence keeps about 7 such buffers in its forward and 4 in its backward.
CHUNK_BUFFER_ELEMENTS = 2**23


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one fp32 ``[chunk, vocab_size]`` buffer holds ``CHUNK_BUFFER_ELEMENTS``."""
    return max(1, CHUNK_BUFFER_ELEMENTS // vocab_size)


class ChunkedOutput(NamedTuple):
    """Per-position results, shaped like the hidden states without their last dimension."""

    values: Tensor  # differentiable w.r.t. the student hidden states, LM-head weight and bias
    student_entropy: Tensor  # nats, at the loss temperature; no gradient
    teacher_entropy: Tensor | None  # nats, at the loss temperature; None when the teacher is not a full distribution
    clip: PointwiseClipped | None = None  # with a pointwise cap: values, unclipped divergence, clipped entries


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight^T + bias`` in the weights' dtype, returned as a fresh fp32 tensor outside any graph."""
    with torch.no_grad():
        logits = F.linear(hidden.to(weight.dtype), weight, bias)
        return logits.float() if logits.dtype != torch.float32 else logits


def _log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """In-place ``log_softmax(logits / temperature)`` over the last dimension (the caller owns ``logits``)."""
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` without a ``[chunk, V]`` product temporary."""
    return torch.einsum("cv,cv->c", a, b)


def _entropy(log_probs: Tensor) -> Tensor:
    return -_rowdot(log_probs.exp(), log_probs)


class _DenseDivergence:
    """Generalized JSD(beta) between the student chunk and the teacher's chunk, with its gradient written out.

    With l_S = log p_S, l_T = log p_T, m = beta p_T + (1 - beta) p_S and student logits x = tau * z, the per-row
    gradients are (the same as ``trl.kernels.chunked_divergence``)::

        beta = 0:  dd/dx = (p_S - p_T) / tau
        beta = 1:  dd/dx = p_S * (l_S - l_T - d) / tau                          d = KL(p_S || p_T)
        else:      dd/dx = (1 - beta) * p_S * (l_S - log m - a) / tau            a = KL(p_S || m)

    With a pointwise cap c, d = sum_v min(t_v, c) over the per-entry terms t_v; with k_v = 1[t_v <= c] (the entries
    whose term passes the clamp's gradient), the same derivation entry by entry gives::

        beta = 0:  dd/dx = (p_S * sum_v k_v p_T(v) - k * p_T) / tau
        beta = 1:  dd/dx = p_S * (k * (r + 1) - sum_v k_v p_S(v) (r_v + 1)) / tau      r = l_S - l_T
        else:      dd/dx = (1 - beta) * p_S * (k * g - sum_v k_v p_S(v) g_v) / tau      g = l_S - log m

    (for 0 < beta < 1 the terms through log m cancel entry by entry: d t_v / dz_j = (1 - beta) p_S(v) (1[v = j] -
    p_S(j)) g_v), which are the unclipped gradients when every k_v is 1.
    """

    def __init__(
        self,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        beta: float,
        temperature: float,
        pointwise_cap: float | None = None,
    ):
        self.teacher_weight, self.teacher_bias = teacher_weight, teacher_bias
        self.beta, self.temperature, self.pointwise_cap = beta, temperature, pointwise_cap

    def _log_probs(self, student_logits: Tensor, teacher_hidden: Tensor) -> tuple[Tensor, Tensor]:
        teacher_logits = _project(teacher_hidden, self.teacher_weight, self.teacher_bias)
        return _log_softmax_(student_logits, self.temperature), _log_softmax_(teacher_logits, self.temperature)

    def _log_mixture(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        log_mixture = student_log_probs + math.log1p(-self.beta)
        return torch.logaddexp(log_mixture, teacher_log_probs + math.log(self.beta), out=log_mixture)

    def forward_chunk(self, student_logits: Tensor, teacher_hidden: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns (divergence, aux for the backward, [student entropy, teacher entropy] (+ [unclipped divergence,
        clipped entries] with a pointwise cap))."""
        student_log_probs, teacher_log_probs = self._log_probs(student_logits, teacher_hidden)
        student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
        entropies = torch.stack(
            [-_rowdot(student_probs, student_log_probs), -_rowdot(teacher_probs, teacher_log_probs)], dim=-1
        )
        if self.pointwise_cap is not None:
            terms = divergence_terms(student_log_probs, teacher_log_probs, self.beta)
            clipped = pointwise_clip(terms, self.pointwise_cap)
            stats = torch.stack([clipped.unclipped, clipped.clipped_entries.to(clipped.unclipped.dtype)], dim=-1)
            return clipped.values, None, torch.cat([entropies, stats], dim=-1)
        if self.beta == 0.0:
            divergence = _rowdot(teacher_probs, teacher_log_probs - student_log_probs)
            return divergence, divergence, entropies
        if self.beta == 1.0:
            divergence = _rowdot(student_probs, student_log_probs - teacher_log_probs)
            return divergence, divergence, entropies
        log_mixture = self._log_mixture(student_log_probs, teacher_log_probs)
        teacher_to_mixture = _rowdot(teacher_probs, teacher_log_probs - log_mixture)
        student_to_mixture = _rowdot(student_probs, student_log_probs - log_mixture)
        divergence = self.beta * teacher_to_mixture + (1.0 - self.beta) * student_to_mixture
        return divergence, student_to_mixture, entropies

    def grad_chunk(self, student_logits: Tensor, teacher_hidden: Tensor, aux: Tensor, grad_values: Tensor) -> Tensor:
        """d(sum_rows grad_values * divergence) / d student_logits, reusing the recomputed buffers in place."""
        student_log_probs, teacher_log_probs = self._log_probs(student_logits, teacher_hidden)
        scale = (grad_values / self.temperature).unsqueeze(-1)
        if self.pointwise_cap is not None:
            return self._pointwise_grad(student_log_probs, teacher_log_probs).mul_(scale)
        if self.beta == 0.0:
            return student_log_probs.exp_().sub_(teacher_log_probs.exp_()).mul_(scale)
        if self.beta == 1.0:
            gap = teacher_log_probs.neg_().add_(student_log_probs).sub_(aux.unsqueeze(-1))
            return student_log_probs.exp_().mul_(gap).mul_(scale)
        log_mixture = self._log_mixture(student_log_probs, teacher_log_probs)
        del teacher_log_probs
        gap = log_mixture.neg_().add_(student_log_probs).sub_(aux.unsqueeze(-1))
        return student_log_probs.exp_().mul_(gap).mul_(scale * (1.0 - self.beta))

    def _pointwise_grad(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """d(sum_v min(t_v, cap)) / dz for the chunk, z = x / tau (see the class docstring)."""
        kept = divergence_terms(student_log_probs, teacher_log_probs, self.beta).le_(self.pointwise_cap)
        student_probs = student_log_probs.exp()
        if self.beta == 0.0:
            kept_teacher = teacher_log_probs.exp_().mul_(kept)
            return student_probs.mul_(kept_teacher.sum(-1, keepdim=True)).sub_(kept_teacher)
        if self.beta == 1.0:
            gap = student_log_probs.sub_(teacher_log_probs).add_(1.0)  # r + 1
            factor = 1.0
        else:
            gap = student_log_probs.sub_(self._log_mixture(student_log_probs, teacher_log_probs))  # g
            factor = 1.0 - self.beta
        kept_gap = gap.mul_(kept)
        baseline = _rowdot(student_probs, kept_gap).unsqueeze(-1)
        return student_probs.mul_(kept_gap.sub_(baseline)).mul_(factor)


class _SparseTopK:
    """:func:`trl_opsd.losses.sparse_topk_divergence` on a chunk; its gradient comes from autograd on the chunk."""

    def __init__(self, beta: float, temperature: float, pointwise_cap: float | None = None):
        self.beta, self.temperature, self.pointwise_cap = beta, temperature, pointwise_cap

    def forward_chunk(self, student_logits: Tensor, ids: Tensor, logprobs: Tensor) -> tuple[Tensor, None, Tensor]:
        """Returns (divergence, None, [student entropy] (+ [unclipped divergence, clipped buckets] with a cap))."""
        if self.pointwise_cap is None:
            values = sparse_topk_divergence(student_logits, ids, logprobs, self.beta, self.temperature)
            return values, None, _entropy(_log_softmax_(student_logits, self.temperature)).unsqueeze(-1)
        clipped = sparse_topk_pointwise_clipped(
            student_logits, ids, logprobs, self.beta, self.pointwise_cap, self.temperature
        )
        entropy = _entropy(_log_softmax_(student_logits, self.temperature))
        stats = [entropy, clipped.unclipped, clipped.clipped_entries.to(entropy.dtype)]
        return clipped.values, None, torch.stack(stats, dim=-1)

    def grad_chunk(self, student_logits: Tensor, ids: Tensor, logprobs: Tensor, aux: None, grad_values: Tensor):
        student_logits.requires_grad_()
        with torch.enable_grad():
            values = sparse_topk_divergence(
                student_logits, ids, logprobs, self.beta, self.temperature, self.pointwise_cap
            )
            return torch.autograd.grad(values, student_logits, grad_values)[0]


class _TokenLogProbs:
    """``log p_S(y)`` of given tokens; d log p_S(y) / dx = (onehot(y) - p_S) / tau."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def forward_chunk(self, student_logits: Tensor, ids: Tensor) -> tuple[Tensor, None, Tensor]:
        log_probs = _log_softmax_(student_logits, self.temperature)
        return log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), None, _entropy(log_probs).unsqueeze(-1)

    def grad_chunk(self, student_logits: Tensor, ids: Tensor, aux: None, grad_values: Tensor) -> Tensor:
        scale = (grad_values / self.temperature).unsqueeze(-1)
        grad = _log_softmax_(student_logits, self.temperature).exp_().mul_(-scale)
        return grad.scatter_add_(-1, ids.unsqueeze(-1), scale)


def _chunk_slices(num_rows: int, chunk_size: int) -> list[slice]:
    # An empty input still gets one (empty) chunk, so outputs keep their shapes and dtypes.
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, max(num_rows, 1), chunk_size)]


class _StudentHeadChunks(torch.autograd.Function):
    """``values[n] = form(h[n] W^T + b, *per_position[n])`` chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, form, chunk_size, hidden, weight, bias, *per_position):
        values, aux, stats = [], [], []
        for rows in _chunk_slices(hidden.size(0), chunk_size):
            chunk = form.forward_chunk(_project(hidden[rows], weight, bias), *(x[rows] for x in per_position))
            for collected, item in zip((values, aux, stats), chunk):
                collected.append(item)
        aux = None if aux[0] is None else torch.cat(aux)
        ctx.form, ctx.chunk_size = form, chunk_size
        ctx.save_for_backward(hidden, weight, bias, aux, *per_position)
        stats = torch.cat(stats)
        ctx.mark_non_differentiable(stats)
        return torch.cat(values), stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, _grad_stats):
        hidden, weight, bias, aux, *per_position = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[2:5]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        # Accumulated over chunks in fp32, so that bf16 heads do not lose small contributions.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        grad_values = grad_values.float()
        for rows in _chunk_slices(hidden.size(0), ctx.chunk_size):
            grad_logits = ctx.form.grad_chunk(
                _project(hidden[rows], weight, bias),
                *(x[rows] for x in per_position),
                aux=None if aux is None else aux[rows],
                grad_values=grad_values[rows],
            )
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            None,
            None,
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            *(None for _ in per_position),
        )


def _resolve_chunk_size(chunk_size: int | None, vocab_size: int) -> int:
    """``chunk_size``, or the default for this vocabulary when None; refuses a non-positive size."""
    chunk_size = default_chunk_size(vocab_size) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    return chunk_size


def _run_chunked(
    form,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    per_position: tuple[Tensor, ...],
    mask: Tensor | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Flatten leading dims, keep only ``mask``-ed positions, run the chunked function, scatter back (zeros)."""
    chunk_size = _resolve_chunk_size(chunk_size, student_weight.size(0))
    leading_shape = student_hidden.shape[:-1]
    num_positions = leading_shape.numel()
    hidden = student_hidden.reshape(num_positions, -1)
    inputs = [x.reshape(num_positions, *x.shape[len(leading_shape) :]) for x in per_position]
    if mask is not None:
        # Padding is never projected: it costs neither memory nor matmuls.
        keep = mask.reshape(num_positions).bool()
        hidden, inputs = hidden[keep], [x[keep] for x in inputs]
    values, stats = _StudentHeadChunks.apply(form, chunk_size, hidden, student_weight, student_bias, *inputs)
    if mask is not None:
        values = values.new_zeros(num_positions).masked_scatter(keep, values)
        stats = stats.new_zeros(num_positions, stats.size(-1)).masked_scatter(keep.unsqueeze(-1), stats)
    return values.reshape(leading_shape), stats.reshape(*leading_shape, stats.size(-1))


def chunked_per_token_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    beta: float,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    pointwise_cap: float | None = None,
) -> ChunkedOutput:
    """:func:`trl_opsd.losses.per_token_divergence` of ``h_S W_S^T + b_S`` and ``h_T W_T^T + b_T``, chunked.

    Args:
        student_hidden: ``[..., H_S]`` final hidden states at the completion positions (after the final norm).
        student_weight: ``[V, H_S]`` student LM head. Gradients flow to it, its bias and ``student_hidden``.
        teacher_hidden: ``[..., H_T]`` teacher hidden states aligned to the same completion positions.
        teacher_weight: ``[V, H_T]`` teacher LM head; never receives a gradient.
        beta, temperature: as in :func:`trl_opsd.losses.per_token_divergence`.
        mask: optional ``[...]``; masked-out positions are not projected and return 0 (and 0 entropies).
        chunk_size: positions projected at once (default :func:`default_chunk_size`).
        pointwise_cap: cap each vocabulary entry's term before the sum, as
            :func:`trl_opsd.losses.per_token_divergence`'s ``pointwise_cap``.

    Returns:
        :class:`ChunkedOutput` with ``values`` = d_t (pointwise-clipped with a cap), both entropies at
        ``temperature``, and with a cap ``clip`` (the unclipped divergence and the number of clipped entries).
    """
    _check_beta(beta)
    _check_temperature(temperature)
    if pointwise_cap is not None:
        _check_cap(pointwise_cap)
    form = _DenseDivergence(teacher_weight.detach(), _detach(teacher_bias), beta, temperature, pointwise_cap)
    values, stats = _run_chunked(
        form, student_hidden, student_weight, student_bias, (teacher_hidden.detach(),), mask, chunk_size
    )
    return ChunkedOutput(values, stats[..., 0], stats[..., 1], _clip_stats(values, stats[..., 2:]))


def chunked_sparse_topk_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    beta: float = 0.0,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    pointwise_cap: float | None = None,
) -> ChunkedOutput:
    """:func:`trl_opsd.losses.sparse_topk_divergence` of ``h_S W_S^T + b_S``, chunked (beta 0: top-k forward KL).

    ``teacher_topk_ids`` / ``teacher_topk_logprobs`` are ``[..., K]`` (negative id = padding). ``teacher_entropy``
    is None: the teacher is known on K tokens only. ``pointwise_cap`` caps each of the K + 1 bucket terms.
    """
    _check_beta(beta)
    _check_temperature(temperature)
    if pointwise_cap is not None:
        _check_cap(pointwise_cap)
    values, stats = _run_chunked(
        _SparseTopK(beta, temperature, pointwise_cap),
        student_hidden,
        student_weight,
        student_bias,
        (teacher_topk_ids, teacher_topk_logprobs.detach()),
        mask,
        chunk_size,
    )
    return ChunkedOutput(values, stats[..., 0], None, _clip_stats(values, stats[..., 1:]))


def _clip_stats(values: Tensor, columns: Tensor) -> PointwiseClipped | None:
    """The pointwise clip's (unclipped divergence, clipped entries) stats columns, or None without a cap."""
    if columns.size(-1) == 0:
        return None
    return PointwiseClipped(values, columns[..., 0], columns[..., 1].round().long())


def chunked_token_log_probs(
    student_hidden: Tensor,
    student_weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
) -> ChunkedOutput:
    """``log softmax((h_S W_S^T + b_S) / temperature)[token_ids]`` per position, chunked.

    The input of :func:`trl_opsd.losses.sampled_token_reverse_kl` (sampled-token OPD) and of a reward term; after
    this gather no vocabulary-sized tensor is left. Ids at masked-out positions are never read (they may be -100).
    ``teacher_entropy`` is None.
    """
    _check_temperature(temperature)
    values, stats = _run_chunked(
        _TokenLogProbs(temperature), student_hidden, student_weight, student_bias, (token_ids,), mask, chunk_size
    )
    return ChunkedOutput(values, stats[..., 0], None)


class TeacherScores(NamedTuple):
    """What the top-k and sampled-token losses need from a dense teacher; fields named like ``TopKScores``'."""

    topk_ids: Tensor | None  # [..., K] long, most likely first; -1 at masked-out positions
    topk_logprobs: Tensor | None  # [..., K] at the temperature; 0 at masked-out positions
    sampled_logprobs: Tensor | None  # [...] log-prob of the given tokens; 0 at masked-out positions
    entropy: Tensor  # [...] nats at the temperature; 0 at masked-out positions


@torch.no_grad()
def chunked_teacher_scores(
    hidden: Tensor,
    weight: Tensor,
    temperature: float = 1.0,
    *,
    top_k: int = 0,
    token_ids: Tensor | None = None,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    bias: Tensor | None = None,
) -> TeacherScores:
    """A dense teacher's top-k log-probs, log-probs of ``token_ids`` and entropy, from ``hidden W^T + b``, chunked.

    The values of ``log_softmax(logits / temperature).topk(top_k)``, :func:`trl_opsd.losses.token_log_probs` and
    :func:`trl_opsd.losses.per_token_entropy` without ever holding more than ``chunk_size`` rows of logits; nothing
    here is differentiable (the teacher is a target). ``top_k=0`` / ``token_ids=None`` skip those fields.
    """
    _check_temperature(temperature)
    chunk_size = _resolve_chunk_size(chunk_size, weight.size(0))
    leading_shape = hidden.shape[:-1]
    num_positions = leading_shape.numel()
    flat_hidden = hidden.reshape(num_positions, -1)
    keep = torch.ones(num_positions, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1)
    rows = keep.bool().nonzero().squeeze(-1)
    entropy = flat_hidden.new_zeros(num_positions, dtype=torch.float32)
    topk_ids = torch.full((num_positions, top_k), -1, dtype=torch.long, device=hidden.device) if top_k else None
    topk_logprobs = entropy.new_zeros(num_positions, top_k) if top_k else None
    sampled_logprobs = entropy.new_zeros(num_positions) if token_ids is not None else None
    for start in range(0, rows.numel(), chunk_size):
        index = rows[start : start + chunk_size]
        log_probs = _log_softmax_(_project(flat_hidden[index], weight, bias), temperature)
        entropy[index] = _entropy(log_probs)
        if top_k:
            topk_logprobs[index], topk_ids[index] = log_probs.topk(top_k, dim=-1)
        if token_ids is not None:
            sampled_logprobs[index] = log_probs.gather(-1, token_ids.reshape(-1)[index].unsqueeze(-1)).squeeze(-1)

    def unflatten(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.reshape(*leading_shape, *tensor.shape[1:])

    return TeacherScores(unflatten(topk_ids), unflatten(topk_logprobs), unflatten(sampled_logprobs), unflatten(entropy))


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()
