"""Warm-start the tiny model on the arithmetic world: mediocre without the hint, strong with it.

OPSD needs exactly this starting point: a student that cannot yet solve most problems alone, and a
self-teacher (the same weights) that solves them when the gold answer is in its prompt. We SFT a
fresh tiny Llama with TRL's ``SFTTrainer`` on worked solutions, half of them under hinted prompts.

The no-hint skill arrives in one sudden jump whose timing depends on the seed, so training stops on
a held-out check (every ``check_every`` steps from ``check_from``) rather than after a fixed count,
and warns loudly when it reaches ``max_steps`` without the jump.

The default world ships with the package (``harness/world/shipped/arithmetic_warm``: weights, tokenizer,
and ``warm_start.json`` with the settings, their cache key, its held-out accuracies and the library
versions it was built with), so a first run builds nothing. Rebuilt and custom worlds are cached on
disk, keyed by every setting that changes the weights.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from harness.generation import generate_texts, score_answers
from harness.world.arithmetic import Problem, generate_problems, hinted_messages
from harness.world.console import StepsToBar
from harness.world.tiny import build_tiny_model, build_tokenizer

logger = logging.getLogger(__name__)

WORLD_VERSION = "4"  # bump when the generator, tokenizer or training code changes the result
WORLD_PREFIX = "arithmetic:"
WORLD_MODELS = ("warm",)
WORLD_MODEL = "arithmetic:warm"  # the warm-started model under default settings
SHIPPED_DIR = Path(__file__).parent / "shipped" / "arithmetic_warm"  # package data: the default world, prebuilt


class WorldModelNameError(ValueError):
    """An ``arithmetic:`` model name that does not parse."""


@dataclass(frozen=True)
class WarmStartSettings:
    """Everything that changes the warm-started weights (and therefore the cache key)."""

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_train_problems: int = 20_000
    hint_fraction: float = 0.75
    batch_size: int = 64
    learning_rate: float = 2e-3
    max_steps: int = 1400
    check_from: int = 300
    check_every: int = 50
    num_check_problems: int = 200
    target_no_hint_accuracy: float = 0.25
    target_hint_accuracy: float = 0.85
    num_eval_problems: int = 500
    version: str = WORLD_VERSION

    def cache_key(self) -> str:
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class WarmStartResult:
    """Where the warm-started checkpoint lives and how good it is on held-out test problems."""

    path: str
    no_hint_accuracy: float
    hint_accuracy: float
    num_eval_problems: int
    steps: int
    reached_target: bool
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    cache_key: str = ""
    built_with: dict = field(default_factory=dict)  # library versions and machine; numerics depend on them

    def load(self):
        """(model, tokenizer) in fp32 on CPU."""
        return load(self.path)


def library_versions() -> dict:
    """The versions that change the warm start's numerics, recorded with every world built."""
    import tokenizers
    import transformers
    import trl

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "tokenizers": tokenizers.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }


def shipped(settings: WarmStartSettings | None = None) -> WarmStartResult | None:
    """The world shipped with the package, if it was built with exactly ``settings`` (default settings)."""
    settings = settings or WarmStartSettings()
    record = SHIPPED_DIR / "warm_start.json"
    if not record.exists():
        return None
    result = WarmStartResult(**{**json.loads(record.read_text()), "path": str(SHIPPED_DIR)})
    return result if result.cache_key == settings.cache_key() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRL_OPSD_CACHE", Path.home() / ".cache" / "trl_opsd"))


# -- the world model's one name, and its one loader -----------------------------------------------------
def is_world_model(name: str) -> bool:
    return name.startswith(WORLD_PREFIX)


def settings_from_name(name: str) -> WarmStartSettings:
    """``arithmetic:warm`` -> the default settings; ``arithmetic:warm?max_steps=3000&seed=1`` overrides fields
    (e.g. a longer-trained, stronger teacher for OPD). :class:`WorldModelNameError` names what is wrong."""
    body = name[len(WORLD_PREFIX):]
    model, _, query = body.partition("?")
    if model not in WORLD_MODELS:
        known = [WORLD_PREFIX + m for m in WORLD_MODELS]
        raise WorldModelNameError(f"unknown arithmetic-world model {name!r}: known are {known}")
    fields = {f.name: f for f in dataclasses.fields(WarmStartSettings)}
    overrides = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in fields or key == "version":
            known = sorted(set(fields) - {"version"})
            raise WorldModelNameError(f"{name!r}: {key!r} is not a WarmStartSettings field ({known})")
        caster = type(fields[key].default)
        try:
            overrides[key] = caster(value)
        except ValueError:
            raise WorldModelNameError(f"{name!r}: {key}={value!r} is not a {caster.__name__}") from None
    return WarmStartSettings(**overrides)


def cache_folder(settings: WarmStartSettings, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of ``settings`` is (or will be) cached."""
    return Path(cache_dir or default_cache_dir()) / "arithmetic" / settings.cache_key()


def world_folder(settings: WarmStartSettings, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of ``settings`` is: the shipped folder for the shipped settings, else the cache."""
    return SHIPPED_DIR if shipped(settings) is not None else cache_folder(settings, cache_dir)


def checkpoint(name_or_path: str) -> str:
    """A loadable folder: a world model name is the shipped world, or warm-started on first use (then cached)
    when its settings differ from the shipped ones; a path is kept."""
    if is_world_model(name_or_path):
        return warm_start(settings_from_name(name_or_path)).path
    return str(name_or_path)


def load(name_or_path: str):
    """(model, tokenizer) in fp32 on CPU, for a checkpoint folder or a world model name."""
    path = checkpoint(name_or_path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def evaluate_hint_gap(model, tokenizer, problems: list[Problem], batch_size: int = 128) -> tuple[list[bool], list[bool]]:
    """Greedy verifier-scored correctness without and with the gold-answer hint, per problem."""
    answers = [problem.answer for problem in problems]
    plain = generate_texts(model, tokenizer, [p.to_row()["messages"] for p in problems], batch_size=batch_size)
    hinted = generate_texts(model, tokenizer, [hinted_messages(p) for p in problems], batch_size=batch_size)
    return score_answers(plain, answers), score_answers(hinted, answers)


def _sft_rows(problems: list[Problem], hint_fraction: float, seed: int) -> list[dict]:
    """Prompt-completion rows; a ``hint_fraction`` of the prompts carry the gold answer."""
    rng = random.Random(seed)
    rows = []
    for problem in problems:
        prompt = hinted_messages(problem) if rng.random() < hint_fraction else problem.to_row()["messages"]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": problem.solution}]})
    return rows


class _StopOnHeldOutSkill(TrainerCallback):
    """Stops training once held-out no-hint and hinted accuracy both reach their targets."""

    def __init__(self, settings: WarmStartSettings, tokenizer, check_problems: list[Problem]):
        self.settings, self.tokenizer, self.check_problems = settings, tokenizer, check_problems
        self.history: list[dict] = []
        self.reached_target = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        s = self.settings
        if state.global_step < s.check_from or state.global_step % s.check_every:
            return control
        plain, hinted = evaluate_hint_gap(model, self.tokenizer, self.check_problems)
        record = {"step": state.global_step, "no_hint": sum(plain) / len(plain), "hint": sum(hinted) / len(hinted)}
        self.history.append(record)
        logger.info("warm start check: %s", record)
        if record["no_hint"] >= s.target_no_hint_accuracy and record["hint"] >= s.target_hint_accuracy:
            self.reached_target = True
            control.should_training_stop = True
        return control


def warm_start(
    settings: WarmStartSettings | None = None, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> WarmStartResult:
    """The warm-started tiny model and its held-out accuracies: the shipped one for its settings, else loaded
    from the cache or trained into it. ``force`` retrains into the cache even when a shipped or cached one exists."""
    settings = settings or WarmStartSettings()
    if not force and (prebuilt := shipped(settings)) is not None:
        return prebuilt
    out_dir = cache_folder(settings, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One build per settings: concurrent callers (test workers, ranks, other jobs) wait for it.
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result_file = out_dir / "warm_start.json"
        if result_file.exists() and not force:
            # The folder it was found in wins over the recorded path: caches get copied and moved.
            return WarmStartResult(**{**json.loads(result_file.read_text()), "path": str(out_dir)})
        return _train_and_evaluate(settings, out_dir)


def _train_and_evaluate(settings: WarmStartSettings, out_dir: Path) -> WarmStartResult:

    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer, settings.hidden_size, settings.num_layers, settings.num_heads, seed=settings.seed
    )
    train = generate_problems(settings.num_train_problems, "train", seed=settings.seed)
    check = generate_problems(settings.num_check_problems, "validation", seed=settings.seed)
    stopper = _StopOnHeldOutSkill(settings, tokenizer, check)
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=20,
        max_steps=settings.max_steps,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        use_cpu=True,
        bf16=False,
        max_length=256,
        dataloader_num_workers=0,
        activation_checkpointing=True,  # SFTConfig's default, named as transformers 5 wants (same numerics)
        disable_tqdm=True,  # the phase bar below counts the steps instead
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_sft_rows(train, settings.hint_fraction, settings.seed)),
        processing_class=tokenizer,
        callbacks=[stopper],
    )
    started = time.perf_counter()
    description = "[world] warm start (stops at the held-out target, at most)"
    logger.warning("building the arithmetic world %s into %s: %d steps at most, evaluated every %d from step %d "
                   "(about 30 minutes on 2 busy cores)", settings.cache_key(), out_dir, settings.max_steps,
                   settings.check_every, settings.check_from)
    with tqdm(total=settings.max_steps, desc=description, unit="step") as bar:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(StepsToBar(bar))
        trainer.train()
    train_seconds = time.perf_counter() - started
    if not stopper.reached_target:
        logger.warning(
            "WARM START DID NOT REACH ITS TARGET: after %d steps the held-out checks were %s. The no-hint skill "
            "arrives in a sudden, seed-dependent jump; raise max_steps or change the seed.",
            trainer.state.global_step,
            stopper.history[-3:],
        )

    test = generate_problems(settings.num_eval_problems, "test", seed=settings.seed)
    plain, hinted = evaluate_hint_gap(model, tokenizer, test)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result = WarmStartResult(
        path=str(out_dir),
        no_hint_accuracy=sum(plain) / len(plain),
        hint_accuracy=sum(hinted) / len(hinted),
        num_eval_problems=len(test),
        steps=trainer.state.global_step,
        reached_target=stopper.reached_target,
        train_seconds=round(train_seconds, 1),
        history=stopper.history,
        settings=dataclasses.asdict(settings),
        cache_key=settings.cache_key(),
        built_with=library_versions(),
    )
    (out_dir / "warm_start.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result
