"""Rollout throughput (generated tokens per second) of each rollout backend, next to GKDTrainer's rollout.

    python benchmarks/rollout_speed.py [--repeats 3] [--calls 4] [--batch 8] [--new-tokens 64]
    python benchmarks/rollout_speed.py --device cuda --model qwen2.5-0.5b --batch 16 --new-tokens 256   # on a GPU

The same student (``step_time.py``'s models: by default a tiny-depth Llama, hidden 256, 4 layers, V = 32,000), the
same batches of arithmetic prompts, gradient checkpointing on (as in training), temperature 1, and every rollout
forced to exactly ``--new-tokens`` tokens (``min_new_tokens``). Arms, each sampling through its trainer's own
rollout path:

- ``gkd``: ``GKDTrainer.generate_on_policy_outputs`` with GKD's generation config (which turns the KV cache off under
  gradient checkpointing);
- ``hf``: ``OPSDTrainer`` with ``rollout_backend="hf"`` (dynamic KV cache);
- ``hf_static``: ``rollout_backend="hf_static"``, ``rollout_compile=True`` (static cache, compiled decode step; on
  CPU transformers would not compile by itself);
- ``hf_static_eager``: ``rollout_backend="hf_static"``, ``rollout_compile=False`` (static cache, no compilation);
- ``vllm``: ``rollout_backend="vllm"`` (colocate: the engine in the training process; the weights pushed before
  each call, as in training, and timed with it), where vLLM is installed: run the script with the python of
  ``.ci/vllm_env`` (``VLLM_CPU_KVCACHE_SPACE=1`` on CPU).

Each run is a fresh process. Its first call (compilation included for ``hf_static``) is reported apart as the
one-time cost; the run's value is the median of the next ``--calls`` calls. Runs of the arms are interleaved so that
changes in machine load hit all arms alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# benchmarks/ is on sys.path when run as a script
from step_time import MODELS, _model, measure_arms, model_description

ARMS = ("gkd", "hf", "hf_static", "hf_static_eager", "vllm")
BACKENDS = {"hf": dict(rollout_backend="hf"), "hf_static": dict(rollout_backend="hf_static", rollout_compile=True),
            "hf_static_eager": dict(rollout_backend="hf_static", rollout_compile=False),
            "vllm": dict(rollout_backend="vllm")}


def _trainer(arm: str, args: argparse.Namespace, rows, tokenizer):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_opsd import OPSDConfig, OPSDTrainer

    common = dict(
        output_dir=f"/tmp/rollout_speed_{arm}", per_device_train_batch_size=args.batch, max_new_tokens=args.new_tokens,
        lmbda=1.0, temperature=1.0, gradient_checkpointing=True, seed=args.seed, report_to="none",
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", save_strategy="no", disable_tqdm=True,
    )
    model, teacher = _model(tokenizer, args, args.seed), _model(tokenizer, args, args.seed + 1)
    if arm == "vllm":  # vLLM loads the student from its folder (name_or_path); weights then come from the trainer
        folder = os.path.join(common["output_dir"], "student")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.name_or_path = folder
    if arm == "gkd":
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=GKDConfig(**common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:  # the same external teacher as GKD's (only the rollouts are timed)
        trainer = OPSDTrainer(model=model, teacher_model=teacher,
                              args=OPSDConfig(**common, privileged_from=None, **BACKENDS[arm]),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.generation_config.min_new_tokens = args.new_tokens  # no EOS before max_new_tokens
    trainer.generation_kwargs["min_new_tokens"] = args.new_tokens
    if arm == "vllm":
        trainer.vllm_generation.generation_kwargs["min_tokens"] = args.new_tokens
    return trainer


def _rollout(arm: str, trainer, batch) -> int:
    """Sample one batch through the arm's trainer, the way its training step does; the number of generated tokens."""
    from trl.models.utils import unwrap_model_for_generation

    if arm == "gkd":  # GKDTrainer.training_step's on-policy branch
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         generation_kwargs=trainer.generation_kwargs,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
                                         ) as unwrapped:
            _, mask, _ = trainer.generate_on_policy_outputs(unwrapped, batch, trainer.generation_config)
        return int(mask[:, batch["prompts"].shape[1]:].sum())
    if arm == "vllm":
        trainer.state.global_step += 1  # a new optimizer step: the weights are pushed to vLLM, as in training
    batch = trainer._attach_completions(batch, "student")
    return int(batch["completion_mask"].sum())


def worker(args: argparse.Namespace) -> None:
    import torch

    from harness.world.arithmetic import generate_problems, problems_to_rows
    from harness.world.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    rows = problems_to_rows(generate_problems(args.batch * (args.calls + 1), "train", seed=0), with_solution=True)
    trainer = _trainer(args.worker, args, rows, tokenizer)
    trainer.model.train()  # rollouts happen inside training
    batches = [trainer.data_collator(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]
    seconds, tokens = [], []
    for batch in batches:
        batch = {key: value.to(trainer.accelerator.device) if torch.is_tensor(value) else value
                 for key, value in batch.items()}
        start = time.perf_counter()
        tokens.append(_rollout(args.worker, trainer, batch))
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"arm": args.worker, "first_seconds": seconds[0], "seconds": seconds[1:], "tokens": tokens}))


def measure(arm: str, run: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(args.seed)]
    for name in ("calls", "batch", "new_tokens", "hidden", "layers", "vocab", "model", "device"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__) + "/..")
    if completed.returncode != 0:
        raise RuntimeError(f"{arm} run {run} failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if set(result["tokens"]) != {args.batch * args.new_tokens}:
        raise RuntimeError(f"{arm} generated {result['tokens']} tokens per call, not {args.batch * args.new_tokens}")
    result["median"] = statistics.median(result["seconds"])
    print(f"  {arm} run {run}: first call {result['first_seconds']:.2f} s, then {result['median']:.3f} s/call "
          f"({[round(s, 3) for s in result['seconds']]})", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per arm")
    parser.add_argument("--calls", type=int, default=4, help="timed rollout calls per run (after the first)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--model", choices=["llama-tiny", *MODELS], default="llama-tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                        help="default: every arm, vllm only where it is installed")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.arms is None:
        from trl.import_utils import is_vllm_available

        args.arms = [arm for arm in ARMS if arm != "vllm" or is_vllm_available()]

    runs = measure_arms(args, measure, __file__)
    model = model_description(args)
    print(f"B = {args.batch} prompts, {args.new_tokens} generated tokens each, {model}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, gradient checkpointing on; {args.repeats} runs per arm x "
          f"{args.calls} timed calls.\n")
    print("| arm | generated tokens/s, median (min–max over runs) | ratio to GKD | first call s (one-time cost "
          "included), median |")
    print("|---|---|---|---|")
    generated = args.batch * args.new_tokens
    rates = {arm: [generated / r["median"] for r in arm_runs] for arm, arm_runs in runs.items()}
    for arm, arm_runs in runs.items():
        low, mid, high = min(rates[arm]), statistics.median(rates[arm]), max(rates[arm])
        ratio = f"{mid / statistics.median(rates['gkd']):.2f}" if "gkd" in rates else "n/a"
        first = statistics.median(r["first_seconds"] for r in arm_runs)
        print(f"| {arm} | {mid:,.0f} ({low:,.0f}–{high:,.0f}) | {ratio} | {first:.1f} |")


if __name__ == "__main__":
    main()
