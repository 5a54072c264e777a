"""`trl-opsd eval` (lm-eval with the project's opsd_gsm8k task) on the base model and on the LoRA run, then
`trl-opsd compare` of the two: a few documents of a GSM8K-format file, short generations, the batch size
`trl-opsd eval` picks by itself on CPU, and the LoRA run named by its folder alone (it holds only the adapter)."""

import json
from pathlib import Path

import pytest

from real_model.conftest import GSM8K_MINI, console_script, run_command

LIMIT = 6


def evaluate(tmp_path: Path, name: str, model_args: str) -> Path:
    out = tmp_path / name
    run_command([
        console_script("trl-opsd"), "eval", "--model", "hf", "--model_args", f"{model_args},dtype=float32",
        "--tasks", "opsd_gsm8k", "--metadata", json.dumps({"data_file": str(GSM8K_MINI)}),
        "--apply_chat_template", "--log_samples", "--limit", str(LIMIT),
        "--gen_kwargs", "max_gen_toks=32", "--output_path", out,
    ], cwd=tmp_path, timeout=1200)
    return out


def only(folder: Path, pattern: str) -> Path:
    found = list(folder.rglob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.fixture(scope="module")
def evals(smollm2, lora_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smollm2_eval")
    run, _ = lora_run
    return tmp_path, evaluate(tmp_path, "base", f"pretrained={smollm2}"), evaluate(tmp_path, "lora", f"pretrained={run}")


@pytest.mark.slow
def test_eval_and_compare_base_and_lora_run(evals, lora_run, smollm2):
    tmp_path, base, lora = evals
    for folder in (base, lora):
        results = json.loads(only(folder, "results_*.json").read_text())
        scores = results["results"]["opsd_gsm8k"]
        assert 0.0 <= scores["exact_match,none"] <= 1.0
        assert 0 < scores["num_output_tokens,none"] <= 32
        samples = [json.loads(line) for line in only(folder, "samples_opsd_gsm8k_*.jsonl").read_text().splitlines()]
        assert len(samples) == LIMIT and all(s["resps"][0][0].strip() for s in samples)  # a non-empty answer each
        assert str(results["config"]["batch_size"]) == "16"  # trl-opsd eval's CPU default, not lm-eval's 1
    lora_args = json.loads(only(lora, "results_*.json").read_text())["config"]["model_args"]
    assert (lora_args["pretrained"], lora_args["peft"]) == (str(smollm2), str(lora_run[0]))  # base + adapter

    report = tmp_path / "report.json"
    done = run_command([console_script("trl-opsd"), "compare", base, lora, "--names", "base,lora",
                        "--json", report, "--markdown", tmp_path / "report.md"], cwd=tmp_path, timeout=600)
    assert "base" in done.stdout and "lora" in done.stdout and (tmp_path / "report.md").is_file()
    section = json.loads(report.read_text())["sections"][0]
    assert (section["task"], section["n"]) == ("opsd_gsm8k", LIMIT)  # every document paired across the two runs
    assert [run["run"] for run in section["runs"]] == ["base", "lora"] and len(section["gaps"]) == 1
