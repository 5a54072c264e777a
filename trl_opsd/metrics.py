"""Summaries of the per-token divergence that say how concentrated the distillation signal is."""

from __future__ import annotations

import torch

from .losses import PointwiseClipped


@torch.no_grad()
def divergence_statistics(divergence: torch.Tensor, mask: torch.Tensor, cap: float | None = None) -> dict[str, float]:
    """Mean, p50, p99, max, max/mean, top-5% share of the total, and fraction above ``cap``.

    A max/mean ratio far above 1 and a large top-5% share mean the signal sits on a few "pivot"
    tokens, the regime in which unclipped self-distillation is unstable. ``clipped_fraction`` is the fraction of
    positions above a per-token ``cap`` (the pointwise clip's own figures: :func:`pointwise_clip_statistics`).
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
