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

For lm-eval's ``hf`` model, two defaults change after lm-eval has parsed the command line (so ``--config``
files and every spelling of the options count), each announced on stderr:

- ``pretrained=<run dir>`` naming an adapter-only run (``adapter_config.json``, no full weights: what a
  LoRA recipe saves) becomes ``pretrained=<its base model>,peft=<run dir>``, with the run's tokenizer.
- No ``--batch_size``: ``16`` on CPU, ``auto`` on a GPU, instead of lm-eval's 1. lm-eval's ``auto`` probes
  with a forward pass over ``max_batch_size`` (64) rows of the model's maximum length and halves only on
  an out-of-memory *exception*; on CPU that probe is slow and an over-large batch is killed by the
  operating system rather than raising, so CPU gets a fixed size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from harness.tasks import TASK_NAMES, include_path, task_yaml

CPU_BATCH_SIZE = 16
# What `save_pretrained` writes for a full model; a run folder with none of them holds only an adapter.
FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


class EvalSetupError(ValueError):
    """``trl-opsd eval`` cannot turn the given model arguments into a model lm-eval can load."""


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


# --------------------------------------------------------------------------------------------
# defaults for lm-eval's hf model (applied to lm-eval's parsed namespace)
# --------------------------------------------------------------------------------------------


def is_adapter_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter and no full model weights."""
    folder = Path(folder).expanduser()
    return (folder / "adapter_config.json").is_file() and not any((folder / f).exists() for f in FULL_WEIGHT_FILES)


def adapter_base(run_dir: str | Path) -> str:
    """The base model of adapter run ``run_dir``, as a local folder or a hub id already in the local cache."""
    config_file = Path(run_dir).expanduser() / "adapter_config.json"
    base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise EvalSetupError(f"{config_file}: no 'base_model_name_or_path'; pass the base yourself: "
                             f"--model_args pretrained=<base model>,peft={run_dir}")
    if Path(base).expanduser().is_dir():
        return base
    from huggingface_hub import try_to_load_from_cache

    if "/" in base and isinstance(try_to_load_from_cache(base, "config.json"), str):
        return base
    raise EvalSetupError(
        f"{run_dir} is a LoRA/PEFT adapter run whose base model {base!r} (adapter_config.json "
        "'base_model_name_or_path') is neither a local folder nor in the Hugging Face cache. Download it "
        f"(huggingface-cli download {base}) or pass its path: --model_args pretrained=<base path>,peft={run_dir}"
    )


def _config_value(namespace: argparse.Namespace, key: str):
    """``key`` as lm-eval will see it: the command line's value, else the ``--config`` YAML's."""
    value = getattr(namespace, key, None)
    if value or value == 0:
        return value
    config_path = getattr(namespace, "config", None)
    return _config_file(["--config", config_path]).get(key) if config_path else None


def apply_hf_defaults(namespace: argparse.Namespace, has_gpu: bool) -> list[str]:
    """Set the adapter and batch-size defaults (module doc) on lm-eval's parsed ``run`` namespace; notes."""
    if getattr(namespace, "command", None) != "run" or (_config_value(namespace, "model") or "hf") != "hf":
        return []
    notes = []
    model_args = _config_value(namespace, "model_args") or {}
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    pretrained = model_args.get("pretrained")
    if isinstance(pretrained, str) and not model_args.get("peft") and is_adapter_run(pretrained):
        base = adapter_base(pretrained)
        tokenizer = model_args.get("tokenizer") or (
            pretrained if (Path(pretrained).expanduser() / "tokenizer_config.json").is_file() else base)
        namespace.model_args = {**model_args, "pretrained": base, "peft": pretrained, "tokenizer": tokenizer}
        notes.append(f"trl-opsd eval: {pretrained} holds a LoRA/PEFT adapter and no full weights: evaluating "
                     f"pretrained={base},peft={pretrained} (tokenizer={tokenizer}).")
    if _config_value(namespace, "batch_size") is None:
        namespace.batch_size = "auto" if has_gpu else str(CPU_BATCH_SIZE)
        notes.append(f"trl-opsd eval: --batch_size {namespace.batch_size} ({'GPU' if has_gpu else 'CPU'} default "
                     "of trl-opsd eval; lm-eval's own is 1). Pass --batch_size N to choose.")
    return notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs="*", metavar="LM_EVAL_ARG", help="arguments for lm-eval's CLI")
    # Every argument after `eval` is lm-eval's. With no prefix character argparse reads them all as
    # positionals instead of rejecting --model etc. as unknown options (NUL cannot occur in argv).
    parser.prefix_chars = "\0"


def run(args: argparse.Namespace) -> int:
    """Run lm-eval's CLI entry point in this process; its exit status."""
    import torch
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import harness.cortex_lm  # noqa: F401  (registers --model cortex)

    argv, notes = lm_eval_argv(args.lm_eval_args)
    for note in notes:
        print(note, file=sys.stderr)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:  # lm_eval.__main__.cli_evaluate, with our defaults set between parsing and running
        setup_logging()
        parser = HarnessCLI()
        namespace = parser.parse_args()
        for note in apply_hf_defaults(namespace, has_gpu=torch.cuda.is_available()):
            print(note, file=sys.stderr)
        parser.execute(namespace)
    except EvalSetupError as error:
        print(f"trl-opsd eval: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0
