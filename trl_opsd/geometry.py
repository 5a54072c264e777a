"""Gradient-geometry diagnostics: where on the completion the distillation signal sits.

The per-token divergence ``d_t`` is the distillation loss's weight on each completion position. OPD
with a stronger external teacher spreads it over every step of a solution; OPSD's self-teacher, which
knows only the final answer, concentrates it on a few "pivot" tokens (seed notebook, sections 6 and 8).
For a batch of divergences this module reports:

- a log-spaced histogram: per bucket ``[lo, hi)``, the fraction of tokens and the share of the total
  divergence ``sum_{t in bucket} d_t / sum_t d_t``;
- concentration: max/mean and the share carried by the top 5% of tokens (``divergence_statistics``);
- the top tokens by share of the loss (divergence summed per token id), as strings;
- for GSM8K-like completions, the share on the last equation line, on that line's result (the number
  after its last ``=``) and on the final-answer number of the ``#### N`` line.

:class:`GeometryRecorder` is the trainer hook; ``harness.plots.plot_geometry`` draws OPD against OPSD.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from trl_opsd.metrics import divergence_statistics
from trl_opsd.verify import answer_span

LOG_BUCKET_EDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
REGIONS = ("last_equation_line", "last_equation_result", "final_answer")
_RESULT = re.compile(r"=\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def _bucket_names(edges: Sequence[float]) -> list[str]:
    bounds = ["0", *(f"{edge:.0e}" for edge in edges), "inf"]
    return [f"[{lo},{hi})" for lo, hi in zip(bounds[:-1], bounds[1:])]


def log_bucket_histogram(values: torch.Tensor, edges: Sequence[float] = LOG_BUCKET_EDGES) -> list[dict]:
    """Per bucket ``[edges[i-1], edges[i])`` (plus the two open ends): token fraction and divergence share."""
    values = values.detach().float().flatten()
    index = torch.bucketize(values, torch.tensor(edges, dtype=values.dtype), right=True)
    total = values.sum()
    histogram = []
    for bucket, name in enumerate(_bucket_names(edges)):
        inside = index == bucket
        histogram.append({
            "bucket": name,
            "token_fraction": inside.float().mean().item() if values.numel() else 0.0,
            "divergence_share": (values[inside].sum() / total).item() if total > 0 else 0.0,
        })
    return histogram


def answer_regions(text: str) -> dict[str, list[tuple[int, int]]]:
    """Character spans of the :data:`REGIONS` in a completion (empty lists where the text has none)."""
    regions = {name: [] for name in REGIONS}
    start = 0
    last_line = None
    for line in text.split("\n"):
        if "=" in line and any(char.isdigit() for char in line):
            last_line = (start, start + len(line))
        start += len(line) + 1
    if last_line is not None:
        regions["last_equation_line"].append(last_line)
        results = list(_RESULT.finditer(text, *last_line))
        if results:
            regions["last_equation_result"].append(results[-1].span(1))
    final = answer_span(text, strict=True)
    if final is not None:
        regions["final_answer"].append(final)
    return regions


def token_char_spans(token_ids: Sequence[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, each token's character span in it), by decoding growing prefixes.

    Prefix decoding (not per-token decoding) keeps spans right for tokenizers whose pieces only render
    in context (SentencePiece spaces, byte-level multi-byte characters).
    """
    spans, previous = [], 0
    for end in range(1, len(token_ids) + 1):
        length = max(previous, len(tokenizer.decode(token_ids[:end], skip_special_tokens=True)))
        spans.append((previous, length))
        previous = length
    return tokenizer.decode(token_ids, skip_special_tokens=True), spans


def region_masks(completion_ids: torch.Tensor, mask: torch.Tensor, tokenizer) -> dict[str, torch.Tensor]:
    """Boolean ``[B, T]`` masks of the tokens overlapping each answer region, plus ``gsm8k_like`` rows ``[B]``."""
    masks = {name: torch.zeros_like(mask, dtype=torch.bool) for name in REGIONS}
    gsm8k_like = torch.zeros(mask.shape[0], dtype=torch.bool)
    for row, (ids, keep) in enumerate(zip(completion_ids.tolist(), mask.bool().tolist())):
        positions = [t for t, k in enumerate(keep) if k]
        text, spans = token_char_spans([ids[t] for t in positions], tokenizer)
        regions = answer_regions(text)
        gsm8k_like[row] = bool(regions["last_equation_line"] or regions["final_answer"])
        for name, char_spans in regions.items():
            for position, (start, end) in zip(positions, spans):
                if any(start < hi and end > lo for lo, hi in char_spans):
                    masks[name][row, position] = True
    masks["gsm8k_like"] = gsm8k_like
    return masks


def top_token_shares(
    divergence: torch.Tensor, mask: torch.Tensor, completion_ids: torch.Tensor, tokenizer, k: int = 5
) -> list[dict]:
    """The ``k`` token ids with the largest summed divergence: string, share of the total, occurrences."""
    keep = mask.bool()
    values, ids = divergence.detach().float()[keep], completion_ids[keep]
    total = values.sum()
    if values.numel() == 0 or total <= 0:
        return []
    unique, inverse = ids.unique(return_inverse=True)
    sums = torch.zeros(unique.numel()).index_add_(0, inverse.cpu(), values.cpu())
    counts = torch.zeros(unique.numel()).index_add_(0, inverse.cpu(), torch.ones_like(values).cpu())
    order = sums.argsort(descending=True)[:k]
    return [
        {"token": tokenizer.decode([int(unique[i])]), "share": (sums[i] / total).item(), "count": int(counts[i])}
        for i in order
    ]


@torch.no_grad()
def geometry_statistics(
    divergence: torch.Tensor,
    mask: torch.Tensor,
    completion_ids: torch.Tensor,
    tokenizer,
    top_k: int = 5,
    keep_values: bool = False,
) -> dict:
    """Everything in the module docstring for one batch of per-token divergences ``[B, T]``.

    ``share_<region>`` is the divergence on that region's tokens over the total divergence of ALL
    unmasked tokens (rows without the region count only in the denominator). With ``keep_values`` the
    raw per-token divergences are included (``values``), which ``harness.plots.plot_geometry`` needs.
    """
    keep = mask.bool()
    values = divergence.detach().float()
    flat = values[keep]
    stats = {"num_tokens": int(flat.numel()), **divergence_statistics(values, keep)}
    stats["histogram"] = log_bucket_histogram(flat)
    stats["top_tokens"] = top_token_shares(values, keep, completion_ids, tokenizer, top_k)
    regions = region_masks(completion_ids, keep, tokenizer)
    total = flat.sum()
    for name in REGIONS:
        region_total = values[regions[name].to(values.device) & keep].sum()
        stats[f"share_{name}"] = (region_total / total).item() if total > 0 else 0.0
    stats["gsm8k_like_fraction"] = regions["gsm8k_like"].float().mean().item() if keep.shape[0] else 0.0
    if keep_values:
        stats["values"] = flat.cpu().tolist()
    return stats


def flat_metrics(stats: dict, prefix: str = "geometry/") -> dict[str, float]:
    """The numeric part of :func:`geometry_statistics` as flat log entries (histogram buckets included)."""
    metrics = {f"{prefix}{key}": float(value) for key, value in stats.items() if isinstance(value, (int, float))}
    for bucket in stats["histogram"]:
        metrics[f"{prefix}tokens{bucket['bucket']}"] = bucket["token_fraction"]
        metrics[f"{prefix}share{bucket['bucket']}"] = bucket["divergence_share"]
    return metrics


class GeometryRecorder:
    """Trainer hook: ``recorder(step, divergence, mask, completion_ids)`` returns flat metrics to log and,
    when a ``path`` is given, appends the full record (top tokens as strings) to that JSONL file."""

    def __init__(self, tokenizer, path: str | Path | None = None, top_k: int = 5):
        self.tokenizer, self.top_k = tokenizer, top_k
        self.path = Path(path) if path is not None else None

    def __call__(self, step: int, divergence, mask, completion_ids) -> dict[str, float]:
        stats = geometry_statistics(divergence, mask, completion_ids, self.tokenizer, self.top_k)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **stats}) + "\n")
        return flat_metrics(stats)
