"""Run manifests: what ran, with which code, packages and data; never a secret.

Secrets are kept out twice over: any field whose name has a secret-like word in it (``hub_token``,
``api_key``, ``*_secret``, ``password``, ...) is dropped wherever it appears, and any string that contains
the value of a secret-named environment variable has that value replaced by ``<redacted>`` (a key
pasted into an innocent field, a URL with credentials in it). Names are split into words, so
``max_new_tokens`` (a count) is kept while ``hub_token`` is dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = frozenset(
    {"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwords", "passwd", "pat",
     "credential", "credentials", "auth", "authorization"}
)
# Distributions whose versions decide a run's behaviour (import names differ for some).
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed", "vllm",
            "trl-opsd")


def is_secret_name(name: str) -> bool:
    """True when a field or variable name contains a secret-like word (snake_case, kebab-case or camelCase)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    return any(word in SECRET_WORDS for word in re.findall(r"[a-z0-9]+", spaced.lower()))


def environment_secrets() -> list[str]:
    """Values of secret-named environment variables (long enough to be worth redacting)."""
    return [value for name, value in os.environ.items() if is_secret_name(name) and len(value.strip()) >= 4]


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


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """A JSON-ready copy of ``value`` without secret-named fields and with secret values redacted."""
    secrets = environment_secrets() if secrets is None else secrets
    value = _jsonable(value)
    if isinstance(value, dict):
        return {str(k): scrub(v, secrets) for k, v in value.items() if not is_secret_name(str(k))}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def scrub_argv(argv: list[str], secrets: list[str] | None = None) -> list[str]:
    """The command line without secret-named flags (and their values) and with secret values redacted."""
    secrets = environment_secrets() if secrets is None else secrets
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        if arg.startswith("--") and is_secret_name(arg[2:].split("=", 1)[0]):
            skip_value = "=" not in arg
            continue
        kept.append(scrub(arg, secrets))
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
