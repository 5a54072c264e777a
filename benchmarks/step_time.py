"""Wall time of an on-policy training step with gradient checkpointing on: OPSDTrainer vs TRL's GKDTrainer.

    python benchmarks/step_time.py [--repeats 5] [--steps 4] [--batch 8] [--new-tokens 64]
    python benchmarks/step_time.py --device cuda --model qwen2.5-0.5b --batch 16 --new-tokens 256   # on a GPU

Both trainers get the same randomly initialised student and teacher (by default a tiny-depth Llama: hidden 256,
4 layers, V = 32,000; ``--model qwen2.5-0.5b`` / ``qwen2.5-1.5b`` build those models' exact architectures, which
cost what the pretrained models cost per token, since the hub is out of reach here), the same rows, seed, batch
and sampling temperature, ``lmbda = 1`` (every step samples from the student), an explicit teacher model, no
privileged context, and ``gradient_checkpointing = True``. Every rollout is forced to exactly ``--new-tokens``
tokens (``min_new_tokens = max_new_tokens`` suppresses EOS), and the worker checks it, so both generate the same
number of tokens. Arms:

- ``gkd``: ``trl.experimental.gkd.GKDTrainer`` (which turns the KV cache off under gradient checkpointing and
  projects every position of prompt and completion to the vocabulary, for student and teacher);
- ``ours``: ``OPSDTrainer`` with its defaults (KV cache on while sampling, chunked loss from hidden states);
- ``ours_dense``: ``OPSDTrainer`` with ``chunked_loss=False`` (logits of the completion positions only);
- ``ours_static``: ``OPSDTrainer`` with ``rollout_backend="hf_static"``, ``rollout_compile=True`` (static KV cache,
  compiled decode step, compiled during the warm-up step; ``benchmarks/rollout_speed.py`` times rollouts alone).

A step's time is the wall time between consecutive ``on_step_end`` events, so it covers the rollout (drawn before
``on_step_begin``), forward, backward and optimizer update; the rollout's own time is reported too. Each run is a
fresh process: one warm-up step, then ``--steps`` timed steps whose median is the run's value; runs of the arms are
interleaved so that changes in machine load hit all arms alike. Peak memory is the rise above the loaded models:
of the resident set on CPU (``VmHWM``, reset at ``on_train_begin``, with glibc told to ``mmap`` allocations of 64 KiB
or more so that freed tensors leave at once), of ``torch.cuda.max_memory_allocated`` on CUDA. CPU runs are fp32;
CUDA runs load both models in bf16 and train with ``bf16=True``.
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

ARMS = ("gkd", "ours", "ours_dense", "ours_static")
DEFAULT_ARMS = ("gkd", "ours", "ours_dense")
# Architectures of public checkpoints (their config.json), built with random weights: same shapes, same cost.
QWEN2_5 = dict(vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=True)
MODELS = {
    "qwen2.5-0.5b": dict(QWEN2_5, hidden_size=896, intermediate_size=4_864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(QWEN2_5, hidden_size=1_536, intermediate_size=8_960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
}


# --------------------------------------------------------------------------------------------------------------------
# worker: one training run in a fresh process


def _model(tokenizer, args: argparse.Namespace, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if args.model == "llama-tiny":
        config_class, model_class = LlamaConfig, LlamaForCausalLM
        shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=1024, tie_word_embeddings=True)
    else:
        config_class, model_class, shape = Qwen2Config, Qwen2ForCausalLM, MODELS[args.model]
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):  # initialise where the model will run: random init of 0.5B+ on CPU takes long
        model = model_class(config_class(**shape, **special)).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _trainer(arm: str, args: argparse.Namespace):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from harness.world.arithmetic import generate_problems, problems_to_rows
    from harness.world.tiny import build_tokenizer
    from trl_opsd import OPSDConfig, OPSDTrainer

    tokenizer = build_tokenizer()
    # Rows keep their gold solution as a trailing assistant turn: GKD's collator needs one (lmbda = 1 never uses it).
    rows = problems_to_rows(generate_problems(args.batch * (args.steps + 1), "train", seed=0), with_solution=True)
    common = dict(
        output_dir=f"/tmp/step_time_{arm}", per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
        max_new_tokens=args.new_tokens, lmbda=1.0, beta=0.5, temperature=1.0, learning_rate=1e-5,
        gradient_checkpointing=True, seed=args.seed, report_to="none", use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True,
    )
    trainer_class, config = (
        (GKDTrainer, GKDConfig(**common)) if arm == "gkd"
        else (OPSDTrainer, OPSDConfig(**common, privileged_from=None, chunked_loss=arm != "ours_dense",
                                      **(dict(rollout_backend="hf_static", rollout_compile=True)
                                         if arm == "ours_static" else {})))
    )
    trainer = trainer_class(
        model=_model(tokenizer, args, args.seed), teacher_model=_model(tokenizer, args, args.seed + 1), args=config,
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
    cuda = args.device == "cuda"

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
                baseline["bytes"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                baseline["bytes"] = proc_status_bytes("VmRSS")
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # reset VmHWM to the current resident set
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
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
        "peak_bytes": (torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")) - baseline["bytes"],
        "rollout_seconds": rollouts["seconds"][1:],  # one rollout per step (no accumulation); warm-up dropped
        "prompt_tokens": statistics.mean(rollouts["prompt_tokens"]),
        "generated_tokens": sorted(set(rollouts["generated_tokens"])),
        "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------------------------------------------------
# orchestration


def measure(arm: str, run: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(args.seed)]
    for name in ("steps", "batch", "new_tokens", "hidden", "layers", "vocab", "model", "device"):
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


def measure_arms(args, measure, script: str) -> dict[str, list]:
    """``{arm: [measure(arm, run, args) for each repeat]}``, arms interleaved within each repeat so that load drifts
    hit every arm alike; prints the command (``script``'s) and the machine with its load average before and after."""
    load_before = os.getloadavg()
    runs = {arm: [] for arm in args.arms}
    for run in range(args.repeats):
        for arm in args.arms:
            runs[arm].append(measure(arm, run, args))
    load_after = os.getloadavg()
    command = " ".join(["python", f"benchmarks/{os.path.basename(script)}", *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    print(f"Machine: {machine_description(args.device)}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after.\n")
    return runs


def model_description(args) -> str:
    if args.model == "llama-tiny":
        return f"Llama hidden {args.hidden}, {args.layers} layers, V = {args.vocab:,}"
    return f"{args.model} architecture, random weights"


def machine_description(device: str) -> str:
    import torch
    import transformers
    import trl

    if device == "cuda":
        where = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    else:
        threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
        where = f"CPU {cpu_name()}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={threads}"
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
            f"Python {platform.python_version()}")


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
    parser.add_argument("--model", choices=["llama-tiny", *MODELS], default="llama-tiny",
                        help="architecture (random weights); --hidden/--layers/--vocab apply to llama-tiny only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    runs = measure_arms(args, measure, __file__)
    model = model_description(args)
    print(f"B = {args.batch} prompts, {args.new_tokens} generated tokens each, {model}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}; {args.repeats} runs per arm x {args.steps} timed steps.\n")
    print("| arm | seconds per step, median (min–max over runs) | ratio to GKD | of which rollout, median | "
          "completion tokens/s | rollout tokens/s | peak MiB above the models, median | prompt tokens per row, mean |")
    print("|---|---|---|---|---|---|---|---|")
    medians = {arm: statistics.median(r["seconds"] for r in arm_runs) for arm, arm_runs in runs.items()}
    for arm, arm_runs in runs.items():
        ratio = f"{medians[arm] / medians['gkd']:.2f}" if "gkd" in medians else "n/a"
        peak = statistics.median(r["peak_bytes"] for r in arm_runs) / 2**20
        rollout = statistics.median(r["rollout"] for r in arm_runs)
        prompt = statistics.mean(r["prompt_tokens"] for r in arm_runs)
        tokens_per_s = args.batch * args.new_tokens / medians[arm]
        rollout_tokens_per_s = args.batch * args.new_tokens / rollout
        print(f"| {arm} | {_spread([r['seconds'] for r in arm_runs])} | {ratio} | {rollout:.2f} | "
              f"{tokens_per_s:,.0f} | {rollout_tokens_per_s:,.0f} | {peak:,.0f} | {prompt:.1f} |")


if __name__ == "__main__":
    main()
