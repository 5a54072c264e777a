"""Peak memory of the distillation loss (forward + backward); prints a markdown section for BENCHMARKS.md.

    python benchmarks/loss_memory.py [--repeats 3] [--betas 0 0.5] [--scaled-seq-len 256 --scaled-betas 0 0.5 1]

Three implementations of the same per-token generalized JSD, from the same random final hidden states and LM heads
(B = 2, T = 1,024, hidden 1,024, V = 151,936 by default; student hidden states and LM head receive gradients):

- ``ours``: :func:`trl_opsd.chunked.chunked_per_token_divergence` (chunks of positions, written-out gradient);
- ``gkd_dense``: project both models to full ``[B, T, V]`` logits (teacher under ``no_grad``), then TRL's
  ``GKDTrainer.generalized_jsd_loss``, as ``GKDTrainer.compute_loss`` does;
- ``trl_chunked``: ``trl.trainer.distillation_trainer._chunked_divergence_loss``, the chunked divergence of TRL's
  ``DistillationTrainer`` (token and vocabulary tiles).

Every run is a fresh subprocess. Peak memory is measured above the inputs (hidden states and both LM heads already
allocated), so it includes the fp32 ``[V, H]`` LM-head gradient that all three produce. On CUDA it is
``torch.cuda.max_memory_allocated``, after one unmeasured pass (kernel selection, Triton compilation); on CPU it is
the kernel's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc told to serve every
allocation of 64 KiB or more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set
at once and the peak is the peak of live tensors rather than of allocator caches. A CPU run that would not fit in
``--memory-limit-gib`` (an address-space limit) is reported as such instead of being allowed to push the machine into
swap or the OOM killer; on CUDA an out-of-memory error is reported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# benchmarks/ is on sys.path when run as a script
from machine import cpu_name
from process_memory import MMAP_THRESHOLD_BYTES, proc_status_bytes

METHODS = ("ours", "gkd_dense", "trl_chunked")


# --------------------------------------------------------------------------------------------------------------------
# worker: one measurement in a fresh process


def _limit_address_space(extra_bytes: int) -> None:
    import resource

    limit = proc_status_bytes("VmSize") + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _loss_fn(method: str, inputs: dict, beta: float, chunk_size: int | None):
    import torch
    import torch.nn.functional as F

    if method == "ours":
        from trl_opsd.chunked import chunked_per_token_divergence
        from trl_opsd.losses import masked_token_mean

        def run():
            out = chunked_per_token_divergence(
                inputs["student_hidden"],
                inputs["student_weight"],
                inputs["teacher_hidden"],
                inputs["teacher_weight"],
                beta,
                mask=inputs["mask"],
                chunk_size=chunk_size,
            )
            return masked_token_mean(out.values, inputs["mask"])

    elif method == "gkd_dense":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer

        def run():
            with torch.no_grad():
                teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
            student_logits = F.linear(inputs["student_hidden"], inputs["student_weight"])
            return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=inputs["labels"], beta=beta)

    elif method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run():
            loss, _entropy_sum, _n_valid = _chunked_divergence_loss(
                inputs["student_hidden"],
                inputs["teacher_hidden"],
                inputs["student_weight"],
                inputs["teacher_weight"],
                inputs["mask"],
                beta,
            )
            return loss

    else:
        raise ValueError(method)
    return run


def worker(args: argparse.Namespace) -> None:
    import gc

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batch, length, hidden, vocab = args.batch, args.seq_len, args.hidden, args.vocab

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    # Logits of order 1 (weights scaled by hidden^-1/2); the teacher's head is the student's plus noise, so the two
    # distributions are related but differ, as in distillation.
    student_weight = randn(vocab, hidden).mul_(hidden**-0.5)
    teacher_weight = randn(vocab, hidden).mul_(0.5 * hidden**-0.5).add_(student_weight)
    inputs = {
        "student_hidden": randn(batch, length, hidden).requires_grad_(),
        "student_weight": student_weight.requires_grad_(),
        "teacher_hidden": randn(batch, length, hidden),
        "teacher_weight": teacher_weight,
        "mask": torch.ones(batch, length, dtype=torch.bool, device=device),
        "labels": torch.zeros(batch, length, dtype=torch.long, device=device),
    }
    run = _loss_fn(args.worker, inputs, args.beta, args.chunk_size)

    result = {"method": args.worker}
    try:
        if cuda:  # one unmeasured pass first: kernel selection and Triton compilation are not the loss's cost
            run().backward()
            for tensor in inputs.values():
                tensor.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            gc.collect()
            _limit_address_space(int(args.memory_limit_gib * 2**30))
            baseline = proc_status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current resident set
        start = time.perf_counter()
        loss = run()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
    except (MemoryError, RuntimeError) as error:  # CPU allocation past the address-space limit, or CUDA OOM
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result["error"] = "out of memory" + ("" if cuda else f" within {args.memory_limit_gib:g} GiB")
    else:
        result["seconds"] = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")
        result["peak_bytes"] = peak - baseline
        result["loss"] = loss.item()
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------------
# orchestration


def measure(method: str, beta: float, seq_len: int, repeat: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--beta",
        str(beta),
        "--seq-len",
        str(seq_len),
        "--batch",
        str(args.batch),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--seed",
        str(repeat),
        "--memory-limit-gib",
        str(args.memory_limit_gib),
    ]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES), TRL_EXPERIMENTAL_SILENCE="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"method": method, "error": f"worker failed (exit {completed.returncode}): {completed.stderr[-300:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    low, mid, high = min(values) / scale, statistics.median(values) / scale, max(values) / scale
    return f"{mid:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


def machine_description() -> str:
    import torch
    import trl

    if torch.cuda.is_available():
        where = torch.cuda.get_device_name(0)
    else:
        where = f"CPU {cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}, trl {trl.__version__}, Python {platform.python_version()}"


def report_size(seq_len: int, betas: list[float], args: argparse.Namespace) -> None:
    n_positions = args.batch * seq_len
    logits_gib = n_positions * args.vocab * 4 / 2**30
    grad_gib = args.vocab * args.hidden * 4 / 2**30
    print(
        f"\n### B = {args.batch}, T = {seq_len:,}, hidden = {args.hidden:,}, V = {args.vocab:,} "
        f"(one fp32 [B, T, V] logits tensor = {logits_gib:.2f} GiB; the LM-head gradient = {grad_gib:.2f} GiB)\n"
    )
    print("| beta | method | peak MiB, median (min–max) | ratio to GKD dense | ratio to TRL chunked | "
          "seconds, median (min–max) | loss |")
    print("|---|---|---|---|---|---|---|")
    for beta in betas:
        runs = {method: [measure(method, beta, seq_len, r, args) for r in range(args.repeats)] for method in METHODS}
        medians = {
            method: statistics.median(run["peak_bytes"] for run in method_runs)
            for method, method_runs in runs.items()
            if all("peak_bytes" in run for run in method_runs)
        }
        for method in METHODS:
            method_runs = runs[method]
            failures = [run["error"] for run in method_runs if "error" in run]
            if failures:
                print(f"| {beta:g} | {method} | {failures[0]} | | | | |")
                continue
            peaks = [run["peak_bytes"] for run in method_runs]
            ratios = [
                f"{medians[method] / medians[other]:.2f}" if other in medians else "n/a"
                for other in ("gkd_dense", "trl_chunked")
            ]
            print(
                f"| {beta:g} | {method} | {_spread(peaks, 2**20)} | {ratios[0]} | {ratios[1]} | "
                f"{_spread([run['seconds'] for run in method_runs], digits=1)} | "
                f"{statistics.median(run['loss'] for run in method_runs):.6f} |"
            )
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--scaled-seq-len", type=int, default=256, help="also run this shorter length (0: skip)")
    parser.add_argument("--scaled-betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk for ours (default: auto)")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="per-run cap; a run past it is reported")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print("## Loss peak memory: forward + backward of the per-token divergence\n")
    command = " ".join(["python", f"benchmarks/{os.path.basename(__file__)}", *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    print(f"Machine: {machine_description()}.\n")
    print(
        f"Each cell: {args.repeats} runs, each in a fresh process with its own random inputs (seed = run index). "
        "Peak = memory above the already-allocated inputs, including the fp32 LM-head gradient all three produce. "
        "Losses agree across methods (same inputs, same seed), which checks that they compute the same thing. "
        "Seconds are wall time of forward + backward on this machine, shared with other work: indicative only."
    )
    report_size(args.seq_len, args.betas, args)
    if args.scaled_seq_len:
        report_size(args.scaled_seq_len, args.scaled_betas, args)


if __name__ == "__main__":
    main()
