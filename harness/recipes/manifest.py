"""Run manifests: what ran, with which code, packages and data; never a secret.

Secrets are kept out twice over: any field whose name has a secret-like word in it (``hub_token``,
``api_key``, ``*_secret``, ``password``, ...) is dropped wherever it appears, and every string goes through
:func:`trl_opsd.redaction.redact`, the project's one redaction layer (registered secret values, raw, quoted
or cut to 8+ characters; secret-named environment variables; URL credentials). Before scrubbing, the
secrets the payload and the command line point at are registered: the value of the variable named by
``teacher_api_key_env`` (any secret-named ``*_env`` field or flag), the contents of a ``*_file``, a
secret-named value itself, credentials inside any URL. Names are split into words, so ``max_new_tokens``
(a count) is kept while ``hub_token`` is dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from trl_opsd import redaction
from trl_opsd.redaction import is_secret_name

# Distributions whose versions decide a run's behaviour (import names differ for some).
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed", "vllm",
            "trl-opsd")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return value
    return str(value)


def _tree(value: Any) -> Any:
    """``value`` as nested dicts, lists and scalars (dataclasses and enums converted)."""
    value = _jsonable(value)
    if isinstance(value, dict):
        return {str(k): _tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_tree(item) for item in value]
    return value


def register_secrets(value: Any) -> None:
    """Register with the redaction layer every secret ``value`` (a config, parsed arguments, a payload) and
    the process's command line point at; call it before printing anything derived from them."""
    redaction.register_config(_tree(value))
    register_argv_secrets(sys.argv)


def register_argv_secrets(argv: list[str]) -> None:
    """Secrets named on a command line: ``--teacher_api_key_env VAR`` (the variable's value), ``--x_file F``,
    ``--hub_token T``, URLs with credentials."""
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            value = inline if eq else following
            if value is not None:
                redaction.register_config({name: value})
        else:
            redaction.register_config(arg)


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """A JSON-ready copy of ``value`` without secret-named fields and with secrets redacted (``secrets``: values
    redacted besides those of the redaction layer; the secrets ``value`` points at are registered first)."""
    tree = _tree(value)
    register_secrets(tree)
    return _scrub(tree, list(secrets or ()))


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items() if not is_secret_name(k)}
    if isinstance(value, list):
        return [_scrub(item, secrets) for item in value]
    if isinstance(value, str):
        return redaction.redact(value, secrets)
    return value


def scrub_argv(argv: list[str], secrets: list[str] | None = None) -> list[str]:
    """The command line without secret-named flags (and their values) and with secrets redacted."""
    register_argv_secrets(argv)
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        if arg.startswith("--") and is_secret_name(arg[2:].split("=", 1)[0]):
            skip_value = "=" not in arg
            continue
        kept.append(redaction.redact(arg, secrets or ()))
    return kept


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import torch

        versions["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return versions


def git_state(repo_root: Path) -> dict[str, Any]:
    """Commit and dirtiness of the checkout the recipe runs from (``None`` values when there is none)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status) or commit is None}


def runtime_info() -> dict[str, Any]:
    return {"argv": scrub_argv(sys.argv), "platform": platform.platform(), "executable": sys.executable}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Scrub and write ``payload`` atomically (a reader never sees half a manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(scrub(payload), indent=2, sort_keys=False, default=str) + "\n")
    temporary.replace(path)
    return path
