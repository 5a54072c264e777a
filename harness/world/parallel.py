"""Run independent CPU jobs side by side, each with its share of the cores.

Two training processes that each use every core run far slower than one (their OpenMP threads fight
for the same cores; BENCHMARKS.md), so every worker process gets ``cores // workers`` threads. Tiny
models barely speed up with more threads, so several one-thread workers beat one many-thread run.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def plan_workers(num_jobs: int, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, threads per worker) for ``num_jobs`` independent jobs on ``cores`` cores."""
    cores = cores or os.cpu_count() or 1
    workers = max(1, min(num_jobs, cores))
    return workers, max(1, cores // workers)


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def process_pool(num_jobs: int) -> ProcessPoolExecutor:
    """A pool of fresh (spawned) Python processes sized by :func:`plan_workers`."""
    workers, threads = plan_workers(num_jobs)
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_threads, initargs=(threads,)
    )

