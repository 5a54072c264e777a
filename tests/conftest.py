"""Shared test fixtures. Everything runs offline, on CPU, in fp32."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from harness.world.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def warm_world():
    """The warm-started arithmetic-world model (trained once, then loaded from the on-disk cache)."""
    from harness.world.warm_start import warm_start

    return warm_start()
