"""Summaries of the per-token divergence that say how concentrated the distillation signal is."""

from __future__ import annotations

import torch

from .losses import PointwiseClipped


@torch.no_grad()
def divergence_statistics(divergence: torch.Tensor, mask: torch.Tensor, cap: float | None = None) -> dict[str, float]:
    """Mean, p50, p99, max, max/mean, top-5% share of the total, and what a per-token ``cap`` clips.

    A max/mean ratio far above 1 and a large top-5% share mean the signal sits on a few "pivot"
    tokens, the regime in which unclipped self-distillation is unstable. ``clipped_fraction`` is the fraction of
    positions above a per-token ``cap`` and ``clipped_mass_share`` the share of the divergence above it
    (``sum max(d - cap, 0) / sum d``, what ``clamp`` and ``scale`` take out of the loss's value); the pointwise clip's
    own figures: :func:`pointwise_clip_statistics`.
    """
    values = divergence.detach()[mask.bool()].float()
    if values.numel() == 0:
        return {}
    mean = values.mean()
    top = values.sort(descending=True).values
    top_count = max(1, int(round(0.05 * values.numel())))
    total = values.sum()
    stats = {
        "kl_mean": mean.item(),
        "kl_p50": values.quantile(0.5).item(),
        "kl_p99": values.quantile(0.99).item(),
        "kl_max": top[0].item(),
        "kl_max_over_mean": (top[0] / mean).item() if mean > 0 else 0.0,
        "kl_top5pct_share": (top[:top_count].sum() / total).item() if total > 0 else 0.0,
    }
    if cap is not None:
        stats["clipped_fraction"] = (values > cap).float().mean().item()
        stats["clipped_mass_share"] = ((values - cap).clamp(min=0).sum() / total).item() if total > 0 else 0.0
    return stats


@torch.no_grad()
def pointwise_clip_statistics(
    clip: PointwiseClipped, mask: torch.Tensor, entries_per_position: int
) -> dict[str, float]:
    """What a pointwise clip removed: the fraction of (position, entry) terms above the cap, the mean clipped mass per
    position (``sum_v max(term_v - cap, 0)``) and that mass as a share of the unclipped divergence.

    ``entries_per_position``: the vocabulary size (dense) or K + 1 (top-k buckets).
    """
    mask = mask.bool()
    if not mask.any():
        return {}
    clipped_mass = clip.clipped_mass[mask].float()
    unclipped_total = clip.unclipped[mask].float().sum()
    return {
        "clipped_fraction": (clip.clipped_entries[mask].sum() / (mask.sum() * entries_per_position)).item(),
        "clipped_mass": clipped_mass.mean().item(),
        "clipped_mass_share": (clipped_mass.sum() / unclipped_total).item() if unclipped_total > 0 else 0.0,
    }


@torch.no_grad()
def token_metrics(inputs: dict, terms, mask: torch.Tensor, per_token_cap: float | None,
                  teacher_metrics: dict[str, float]) -> dict[str, float]:
    """A micro-batch's logged statistics: the divergence's (``terms``: ``trl_opsd.objective.TokenTerms``) and the
    entropies' at the unmasked positions, completion lengths, where completions came from, prompt truncations, the
    share of rows with privileged context, and the teacher's own counters (``teacher_<name>``)."""
    metrics = {}
    if terms.divergence is not None:
        metrics.update(divergence_statistics(terms.divergence, mask, per_token_cap))
    metrics.update(terms.clip_metrics or {})
    if mask.any():
        metrics["student_entropy"] = terms.student_entropy[mask].mean().item()
        if terms.teacher_entropy is not None:
            metrics["teacher_entropy"] = terms.teacher_entropy[mask].mean().item()
    metrics["completion_length"] = mask.sum(1).float().mean().item()
    metrics["on_policy_fraction"] = float(inputs.get("completion_source") == "student")
    metrics["truncated_prompts"] = float(inputs["num_truncated_prompts"].sum())
    metrics["truncated_teacher_prompts"] = float(inputs["num_truncated_teacher_prompts"].sum())
    metrics.update({f"teacher_{name}": float(value) for name, value in teacher_metrics.items()})
    metrics["privileged_rows_fraction"] = float(inputs["num_privileged_rows"].sum()) / max(1, inputs["prompts"].shape[0])
    return metrics
