"""``trl-opsd eval ...``: lm-eval's own CLI, run in this process with this project's tasks and models added.

Every argument is passed to lm-eval unchanged (``trl-opsd eval --help`` shows lm-eval's help), with two
additions: ``--include_path`` pointing at :mod:`harness.tasks` (the ``opsd_*`` tasks), and the ``cortex``
model type (:mod:`harness.cortex_lm`), registered by importing it before lm-eval parses ``--model``. The
stock ``lm_eval`` command cannot see ``--model cortex``: lm-eval 0.4.13 has no plugin discovery for models,
and it builds the model before it imports any task hook.

lm-eval takes a single ``--include_path`` (``lm_eval/_cli/run.py`` declares it ``type=str``; a second one
replaces the first). When you pass your own, it is kept, and each ``opsd_*`` name in ``--tasks`` is
replaced by the path of its YAML file, which lm-eval loads directly; a note on stderr says so. Groups of
your own that list ``opsd_*`` tasks cannot be resolved that way: copy our YAMLs into your folder instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from harness.tasks import TASK_NAMES, include_path, task_yaml

def _option_name(token: str, name: str) -> bool:
    """Whether ``token`` (before any ``=``) spells option ``name``, including the unambiguous prefixes
    argparse accepts (``--include``, ``--task``)."""
    head = token.partition("=")[0]
    return head.startswith("--") and len(head) >= 5 and name.startswith(head)


def _last_value(args: Sequence[str], name: str) -> str | None:
    """The value of the last ``name X`` / ``name=X`` in ``args``."""
    value = None
    for i, token in enumerate(args):
        if _option_name(token, name):
            head, eq, tail = token.partition("=")
            value = tail if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _yaml_task_list(tasks: str) -> str:
    """A comma-separated task list with each ``opsd_*`` name replaced by its YAML file."""
    return ",".join(str(task_yaml(t)) if t in TASK_NAMES else t for t in tasks.split(","))


def _rewrite_tasks(args: list[str]) -> list[str]:
    """``args`` with the values of ``--tasks``/``-t`` (space- or comma-separated) run through
    :func:`_yaml_task_list`."""
    out, in_tasks = [], False
    for token in args:
        if in_tasks and not token.startswith("-"):
            out.append(_yaml_task_list(token))
            continue
        in_tasks = False
        head, eq, tail = token.partition("=")
        if head == "-t" or _option_name(head, "--tasks"):
            if eq:
                out.append(f"{head}={_yaml_task_list(tail)}")
                continue
            in_tasks = True
        out.append(token)
    return out


def _config_file(args: Sequence[str]) -> dict:
    """The ``--config``/``-C`` YAML, whose ``include_path`` and ``tasks`` lm-eval uses unless the
    command line overrides them."""
    path = None
    for i, token in enumerate(args):
        head, eq, tail = token.partition("=")
        if head == "-C" or _option_name(head, "--config"):
            path = tail if eq else (args[i + 1] if i + 1 < len(args) else None)
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def lm_eval_argv(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """lm-eval's command line for ``trl-opsd eval ARGS`` and notes for the user (see the module doc)."""
    args = list(args)
    if not args:
        return ["run", "--help"], []
    config = _config_file(args)
    ours = include_path()
    cli_path = _last_value(args, "--include_path")
    user_path = cli_path if cli_path is not None else config.get("include_path")
    if user_path is None or Path(user_path).expanduser().resolve() == Path(ours):
        return (args if cli_path is not None else [*args, "--include_path", ours]), []
    if any(t == "-t" or t.startswith("-t=") or _option_name(t, "--tasks") for t in args):
        rewritten = _rewrite_tasks(args)
    else:
        config_tasks = config.get("tasks") or []
        config_tasks = ",".join(config_tasks) if isinstance(config_tasks, list) else str(config_tasks)
        rewritten = args + (["--tasks", _yaml_task_list(config_tasks)] if config_tasks else [])
    note = (
        f"trl-opsd eval: lm-eval takes a single --include_path; yours ({user_path}) is kept and the opsd_* "
        f"tasks in --tasks are passed as their YAML files in {ours}."
    )
    return rewritten, [note]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs="*", metavar="LM_EVAL_ARG", help="arguments for lm-eval's CLI")
    # Every argument after `eval` is lm-eval's. With no prefix character argparse reads them all as
    # positionals instead of rejecting --model etc. as unknown options (NUL cannot occur in argv).
    parser.prefix_chars = "\0"


def run(args: argparse.Namespace) -> int:
    """Run lm-eval's CLI entry point in this process; its exit status."""
    import harness.cortex_lm  # noqa: F401  (registers --model cortex)
    from lm_eval.__main__ import cli_evaluate

    argv, notes = lm_eval_argv(args.lm_eval_args)
    for note in notes:
        print(note, file=sys.stderr)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0
