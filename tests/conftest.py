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
    """The warm-started arithmetic-world model shipped with the package: tests never build one (only
    test_world's rebuild test does, into a temporary cache)."""
    from harness.world.warm_start import SHIPPED_DIR, shipped

    world = shipped()
    assert world is not None, (
        f"{SHIPPED_DIR} is missing or was built with other settings than WarmStartSettings(): rebuild it with "
        "`trl-opsd world --rebuild` and copy the checkpoint folder there")
    return world
