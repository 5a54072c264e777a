"""Speed of harness.stats at GSM8K scale; prints a markdown snippet for BENCHMARKS.md.

    python benchmarks/stats_speed.py [--repeats 15]

Measured (median over repeats, with min and max):

- ``paired_bootstrap``: 10,000 resamples, n = 1,319 paired 0/1 outcomes (GSM8K test size);
  also ``bootstrap_mean`` on 1,319 continuous values, which takes the index-matrix path;
- ``pass_at_k``: 1,319 problems x 16 samples, k in 1, 4, 8 (the estimator alone), and
  ``pass_at_k_mean`` (estimator + 10,000-resample bootstrap CI).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from harness import stats

N_DOCS = 1319
N_SAMPLES = 16
N_RESAMPLES = 10_000
KS = (1, 4, 8)


def timed(fn, repeats: int) -> np.ndarray:
    """Wall-clock seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    a = rng.random(N_DOCS) < 0.55
    b = np.where(rng.random(N_DOCS) < 0.2, ~a, a)
    scores = rng.normal(size=N_DOCS)
    n = np.full(N_DOCS, N_SAMPLES)
    c = rng.binomial(N_SAMPLES, rng.beta(1.0, 1.5, N_DOCS))

    size = f"n = {N_DOCS}, {N_RESAMPLES:,} resamples"
    grid = f"{N_DOCS} problems x {N_SAMPLES} samples"
    cases = [
        (f"`paired_bootstrap`, 0/1 outcomes, {size}", lambda: stats.paired_bootstrap(a, b, N_RESAMPLES)),
        (f"`bootstrap_mean`, continuous values, {size}", lambda: stats.bootstrap_mean(scores, N_RESAMPLES)),
    ]
    for k in KS:
        cases.append((f"`pass_at_k`, {grid}, k = {k}", lambda k=k: stats.pass_at_k(n, c, k)))
    for k in KS:
        label = f"`pass_at_k_mean` (+ {N_RESAMPLES:,}-resample CI), {grid}, k = {k}"
        cases.append((label, lambda k=k: stats.pass_at_k_mean(n, c, k, N_RESAMPLES)))

    print(f"harness.stats speed: numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, median of {args.repeats} runs after a warm-up\n")
    print("| operation | median | min | max |")
    print("|---|---|---|---|")
    for label, fn in cases:
        t = timed(fn, args.repeats) * 1e3
        print(f"| {label} | {np.median(t):.2f} ms | {t.min():.2f} ms | {t.max():.2f} ms |")


if __name__ == "__main__":
    main()
