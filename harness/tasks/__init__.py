"""lm-eval tasks of this project, shipped as package data under the ``opsd_`` prefix.

``lm_eval --include_path "$(python -m harness.tasks)" --tasks opsd_arith ...`` finds them; ``trl-opsd eval``
adds the include path itself. The YAMLs sit in this folder, their hooks in :mod:`harness.tasks.utils`.
"""

from __future__ import annotations

from pathlib import Path

TASK_NAMES = ("opsd_arith", "opsd_gsm8k", "opsd_gsm8k_cot")


def include_path() -> str:
    """Absolute path of the folder holding the task YAMLs (lm-eval's ``--include_path``)."""
    return str(Path(__file__).resolve().parent)


def task_yaml(name: str) -> Path:
    """The YAML file defining task ``name`` (lm-eval also accepts this path in place of the name)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; this project's tasks are {', '.join(TASK_NAMES)}")
    return Path(include_path()) / f"{name}.yaml"
