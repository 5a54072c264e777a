"""Scoring throughput of the OpenAI-compatible teacher vs. concurrency; prints a markdown snippet.

    python benchmarks/teacher_throughput.py [--rows 32] [--latency-ms 50] [--repeats 5] [--k 8]
                                            [--server process|in-process]

Measures how well ``OpenAICompatTeacher`` (the real ``openai`` client, one ``/v1/completions`` request per row,
vLLM dialect, top-k log-probs, run by ``RemoteExecutor``'s thread pool) overlaps requests: each run scores
``--rows`` distinct rows with the client's cache off, so every row is a real request, against the loopback
vLLM-wire-format server of ``tests/servers`` with ``--latency-ms`` of injected latency per request. Reported per
concurrency 1, 2, 4, 8: median rows/s over ``--repeats`` (min-max), and the ratio to the ideal
``concurrency x (single-request rate)``; levels are interleaved within each repeat.

The server runs in its own process by default (``LoopbackServerProcess``), as a real vLLM server does, so its
CPU work and its GIL are not the client's; ``--server in-process`` runs it as a thread of this process instead
(the earlier setting: client and server then serialize on one GIL). The server runs with
``cache_completions=True`` and a warm-up pass computes every row's response once, so in the timed runs a request
costs the server only its HTTP handling and the injected latency (same wire format), and the run asserts that no
timed request was computed: the benchmark measures the client's concurrency, not the tiny model's forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from servers import LoopbackServer, LoopbackServerProcess, TinyLM, build_tokenizer  # noqa: E402

from trl_opsd.teachers import OpenAICompatTeacher  # noqa: E402

CONCURRENCY = (1, 2, 4, 8)


def rows(tok: Any, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` distinct rows (identical rows would be sent once and inflate the rate)."""
    digits = [" ".join(str(i)) for i in range(n)]
    prompts = [tok(f"step {d} : tom has {d} apples and buys 3 more . what is the total ?")["input_ids"] for d in digits]
    completions = [tok(f"so {d} + 3 = the total and the answer is {d}", add_special_tokens=False)["input_ids"]
                   for d in digits]
    return prompts, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--server", choices=("process", "in-process"), default="process",
                        help="server in its own process (like a real vLLM server) or a thread of this one")
    args = parser.parse_args()

    tokenizer = build_tokenizer()  # the server's TinyLM builds the same one
    prompts, completions = rows(tokenizer, args.rows)
    assert len({tuple(p + c) for p, c in zip(prompts, completions)}) == args.rows
    results: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
    server_options = {"latency_s": args.latency_ms / 1000, "cache_completions": True}
    load_before = os.getloadavg()[0]
    with (LoopbackServerProcess(**server_options) if args.server == "process"
          else LoopbackServer(TinyLM(), **server_options)) as server:
        teachers = {
            c: OpenAICompatTeacher(server.url + "/v1", server.model_name, student_tokenizer=tokenizer,
                                   max_concurrency=c, check_tokenizer=False, cache=None)
            for c in CONCURRENCY
        }
        teachers[1].score_topk(prompts, completions, args.k)  # warm-up: the server computes every response once
        computed = server.completions_computed
        assert computed == args.rows, computed
        for c, teacher in teachers.items():  # warm-up: thread pool and connections
            teacher.score_topk(prompts[:c], completions[:c], args.k)
        # Levels interleaved within each repeat, so a load change on a shared machine hits all of them alike.
        for _ in range(args.repeats):
            for c, teacher in teachers.items():
                start = time.perf_counter()
                teacher.score_topk(prompts, completions, args.k)
                results[c].append(args.rows / (time.perf_counter() - start))
        assert server.completions_computed == computed, "a timed request was computed, not served precomputed"
        for teacher in teachers.values():
            assert teacher.metrics()["failures"] == 0
            teacher.close()
    load_after = os.getloadavg()[0]

    base = statistics.median(results[1])
    print(f"### Teacher scoring throughput (loopback vLLM server, {args.latency_ms:g} ms injected latency)\n")
    where = "its own process" if args.server == "process" else "a thread of the client's process"
    print(f"`python benchmarks/teacher_throughput.py --rows {args.rows} --latency-ms {args.latency_ms:g} "
          f"--repeats {args.repeats} --k {args.k} --server {args.server}` (server in {where}) on {cpu_name()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {args.rows} rows of "
          f"{len(prompts[0])}+{len(completions[0])} tokens, one request per row, top-{args.k}, client cache off, "
          f"server responses precomputed (`cache_completions=True`); "
          f"load average {load_before:.1f} -> {load_after:.1f}.\n")
    print("| concurrency | rows/s (median) | min-max | ratio to ideal |")
    print("|---:|---:|---:|---:|")
    for concurrency, rates in results.items():
        median = statistics.median(rates)
        ratio = median / (concurrency * base)
        print(f"| {concurrency} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | {ratio:.2f} |")
    speedup = statistics.median(results[CONCURRENCY[-1]]) / base
    print(f"\nConcurrency {CONCURRENCY[-1]} vs 1: {speedup:.2f}x.")


if __name__ == "__main__":
    main()
