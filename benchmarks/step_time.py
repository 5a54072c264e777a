"""Wall time of an on-policy training step with gradient checkpointing on: OPSDTrainer vs TRL's GKDTrainer.

    python benchmarks/step_time.py [--repeats 5] [--steps 4] [--batch 8] [--new-tokens 64]

Both trainers get the same random tiny-depth Llama student and teacher (hidden 256, 4 layers, V = 32,000 by
default), the same rows, seed, batch and sampling temperature, ``lmbda = 1`` (every step samples from the student),
an explicit teacher model, no privileged context, and ``gradient_checkpointing = True``. Every rollout is forced to
exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens`` suppresses EOS), and the worker checks it, so
both generate the same number of tokens. Arms:

- ``gkd``: ``trl.experimental.gkd.GKDTrainer`` (which turns the KV cache off under gradient checkpointing and
  projects every position of prompt and completion to the vocabulary, for student and teacher);
- ``ours``: ``OPSDTrainer`` with its defaults (KV cache on while sampling, chunked loss from hidden states);
- ``ours_dense``: ``OPSDTrainer`` with ``chunked_loss=False`` (logits of the completion positions only).

A step's time is the wall time between consecutive ``on_step_end`` events, so it covers the rollout (drawn before
``on_step_begin``), forward, backward and optimizer update; the rollout's own time is reported too. Each run is a
fresh process: one warm-up step, then ``--steps`` timed steps whose median is the run's value; runs of the arms are
interleaved so that changes in machine load hit all arms alike. Peak memory is the rise of the resident set
(``VmHWM``, reset at ``on_train_begin``) above the loaded models, with glibc told to ``mmap`` allocations of 64 KiB
or more so that freed tensors leave at once.
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

from process_memory import MMAP_THRESHOLD_BYTES, proc_status_bytes  # benchmarks/ is on sys.path when run as a script

ARMS = ("gkd", "ours", "ours_dense")


# --------------------------------------------------------------------------------------------------------------------
# worker: one training run in a fresh process


def _llama(tokenizer, args: argparse.Namespace, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _trainer(arm: str, args: argparse.Namespace):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from harness.arithmetic import generate_problems, problems_to_rows
    from harness.tiny_models import build_tokenizer
    from trl_opsd import OPSDConfig, OPSDTrainer

    tokenizer = build_tokenizer()
    # Rows keep their gold solution as a trailing assistant turn: GKD's collator needs one (lmbda = 1 never uses it).
    rows = problems_to_rows(generate_problems(args.batch * (args.steps + 1), "train", seed=0), with_solution=True)
    common = dict(
        output_dir=f"/tmp/step_time_{arm}", per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
        max_new_tokens=args.new_tokens, lmbda=1.0, beta=0.5, temperature=1.0, learning_rate=1e-5,
        gradient_checkpointing=True, seed=args.seed, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=10_000, disable_tqdm=True,
    )
    trainer_class, config = (
        (GKDTrainer, GKDConfig(**common)) if arm == "gkd"
        else (OPSDTrainer, OPSDConfig(**common, privileged_from=None, chunked_loss=arm == "ours"))
    )
    trainer = trainer_class(
        model=_llama(tokenizer, args, args.seed), teacher_model=_llama(tokenizer, args, args.seed + 1), args=config,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )
    # Fixed-length rollouts: no EOS before max_new_tokens, in both trainers' sampling configs.
    trainer.generation_config.min_new_tokens = args.new_tokens
    trainer.generation_kwargs["min_new_tokens"] = args.new_tokens
    return trainer


def _record_rollouts(rollouts: dict[str, list]) -> None:
    """Time every rollout and count its prompt and generated tokens (both trainers sample through this GKD method)."""
    from trl.experimental.gkd import GKDTrainer

    sample = GKDTrainer.generate_on_policy_outputs

    def recording(model, inputs, generation_config):
        start = time.perf_counter()
        sequences, attention_mask, labels = sample(model, inputs, generation_config)
        rollouts["seconds"].append(time.perf_counter() - start)
        rollouts["prompt_tokens"].extend(inputs["prompt_attention_mask"].sum(1).tolist())
        rollouts["generated_tokens"].extend(attention_mask[:, inputs["prompts"].shape[1]:].sum(1).tolist())
        return sequences, attention_mask, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(recording)


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    step_ends, baseline = [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            baseline["rss"] = proc_status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current resident set
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    rollouts = {"seconds": [], "prompt_tokens": [], "generated_tokens": []}
    _record_rollouts(rollouts)
    trainer = _trainer(args.worker, args)
    trainer.add_callback(Clock())
    trainer.train()
    step_seconds = [end - start for start, end in zip(step_ends, step_ends[1:])][1:]  # drop the warm-up step
    print(json.dumps({
        "arm": args.worker,
        "step_seconds": step_seconds,
        "peak_bytes": proc_status_bytes("VmHWM") - baseline["rss"],
        "rollout_seconds": rollouts["seconds"][1:],  # one rollout per step (no accumulation); warm-up dropped
        "prompt_tokens": statistics.mean(rollouts["prompt_tokens"]),
        "generated_tokens": sorted(set(rollouts["generated_tokens"])),
        "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------------------------------------------------
# orchestration


def measure(arm: str, run: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(args.seed)]
    for name in ("steps", "batch", "new_tokens", "hidden", "layers", "vocab"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES), TRL_EXPERIMENTAL_SILENCE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__) + "/..")
    if completed.returncode != 0:
        raise RuntimeError(f"{arm} run {run} failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["generated_tokens"] != [args.new_tokens]:
        raise RuntimeError(f"{arm} generated {result['generated_tokens']} tokens, not {args.new_tokens}")
    result["seconds"] = statistics.median(result["step_seconds"])
    result["rollout"] = statistics.median(result["rollout_seconds"])
    print(f"  {arm} run {run}: {result['seconds']:.2f} s/step (steps {[round(s, 2) for s in result['step_seconds']]})",
          file=sys.stderr, flush=True)
    return result


def machine_description() -> str:
    import torch
    import trl

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (f"CPU {model}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={threads}; torch {torch.__version__}, "
            f"trl {trl.__version__}, Python {platform.python_version()}")


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    low, mid, high = min(values) / scale, statistics.median(values) / scale, max(values) / scale
    return f"{mid:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process runs per arm")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    load_before = os.getloadavg()
    runs = {arm: [] for arm in args.arms}
    for run in range(args.repeats):
        for arm in args.arms:
            runs[arm].append(measure(arm, run, args))
    load_after = os.getloadavg()

    command = " ".join(["python", f"benchmarks/{os.path.basename(__file__)}", *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    print(f"Machine: {machine_description()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n")
    print(f"B = {args.batch} prompts, {args.new_tokens} generated tokens each, Llama hidden {args.hidden}, "
          f"{args.layers} layers, V = {args.vocab:,}; {args.repeats} runs per arm x {args.steps} timed steps.\n")
    print("| arm | seconds per step, median (min–max over runs) | ratio to GKD | of which rollout, median | "
          "peak MiB above the models, median | prompt tokens per row, mean |")
    print("|---|---|---|---|---|---|")
    medians = {arm: statistics.median(r["seconds"] for r in arm_runs) for arm, arm_runs in runs.items()}
    for arm, arm_runs in runs.items():
        ratio = f"{medians[arm] / medians['gkd']:.2f}" if "gkd" in medians else "n/a"
        peak = statistics.median(r["peak_bytes"] for r in arm_runs) / 2**20
        rollout = statistics.median(r["rollout"] for r in arm_runs)
        prompt = statistics.mean(r["prompt_tokens"] for r in arm_runs)
        print(f"| {arm} | {_spread([r['seconds'] for r in arm_runs])} | {ratio} | {rollout:.2f} | {peak:,.0f} | "
              f"{prompt:.1f} |")


if __name__ == "__main__":
    main()
