"""Summaries of the per-token divergence that say how concentrated the distillation signal is."""

from __future__ import annotations

import torch


@torch.no_grad()
def divergence_statistics(divergence: torch.Tensor, mask: torch.Tensor, cap: float | None = None) -> dict[str, float]:
    """Mean, p50, p99, max, max/mean, top-5% share of the total, and fraction above ``cap``.

    A max/mean ratio far above 1 and a large top-5% share mean the signal sits on a few "pivot"
    tokens, the regime in which unclipped self-distillation is unstable.
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
