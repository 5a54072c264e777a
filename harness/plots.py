"""Figures of per-token divergence geometry (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def _concentration_curve(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """(fraction of tokens, share of the divergence they carry), tokens sorted by divergence, largest first."""
    ordered = sorted(values, reverse=True)
    total = sum(ordered) or 1.0
    xs, ys, running = [0.0], [0.0], 0.0
    for rank, value in enumerate(ordered, start=1):
        running += value
        xs.append(rank / len(ordered))
        ys.append(running / total)
    return xs, ys


def plot_geometry(opd_stats: dict, opsd_stats: dict, path: str | Path, labels: tuple[str, str] = ("OPD", "OPSD")):
    """Side-by-side PNG: each method's histogram of log10 d_t, and both concentration curves.

    Both stats must come from ``trl_opsd.geometry.geometry_statistics`` with ``keep_values=True``. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6  # d_t >= 0; exact zeros (and fp32 rounding below zero) are drawn at the floor
    series = [[math.log10(max(v, floor)) for v in stats["values"]] for stats in (opd_stats, opsd_stats)]
    low = min(min(s, default=0.0) for s in series)
    high = max(max(s, default=0.0) for s in series)
    bins = torch.linspace(low, high + 1e-9, 41).tolist()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, stats, logs, label, colour in zip(axes[:2], (opd_stats, opsd_stats), series, labels, ("C0", "C3")):
        axis.hist(logs, bins=bins, color=colour, alpha=0.8)
        axis.set_title(
            f"{label}: max/mean {stats['kl_max_over_mean']:.0f}, top 5% {stats['kl_top5pct_share']:.0%}, "
            f"last result {stats['share_last_equation_result']:.0%}",
            fontsize=10,
        )
        axis.set_xlabel("log10 per-token divergence d_t")
        axis.set_ylabel("tokens")
    for stats, label, colour in zip((opd_stats, opsd_stats), labels, ("C0", "C3")):
        axes[2].plot(*_concentration_curve(stats["values"]), color=colour, label=label)
    axes[2].plot([0, 1], [0, 1], color="grey", linestyle=":", label="uniform")
    axes[2].set_xlabel("fraction of tokens (largest d_t first)")
    axes[2].set_ylabel("share of total divergence")
    axes[2].set_title("concentration", fontsize=10)
    axes[2].legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


TRAINING_CURVE_KEYS = ("loss", "kl_mean", "entropy", "completion_length", "clipped_fraction")


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path, keys: Sequence[str] = TRAINING_CURVE_KEYS):
    """One panel per logged quantity in ``keys`` (those no run logged are left out), one line per run.

    ``histories`` maps a run name to its trainer's ``state.log_history``. Returns (path, the keys drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [key for key in keys if any(key in row for rows in histories.values() for row in rows)]
    figure, axes = plt.subplots(1, max(1, len(drawn)), figsize=(4.2 * max(1, len(drawn)), 3.4), squeeze=False)
    for axis, key in zip(axes[0], drawn):
        for name, rows in histories.items():
            points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=name)
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
    if drawn:
        axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path, drawn
