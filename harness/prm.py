"""Process reward model (PRM) judge: deterministic step segmentation, a strict step-by-step verdict
from any text-generating teacher, and a persistent hash-keyed cache of the verdicts (seed section 2.6).

Segmentation happens before the judge sees anything (:func:`split_steps`): the judge receives a fixed
list of ``(step_id, step_text)`` and must return exactly one value per step, so ``min`` / ``mean`` /
``last`` aggregation is stable across runs and models.

Reply format (strict). The judge's reply must be one JSON object and nothing else::

    {"steps": [1, 0, 1]}

with exactly one value per step, in step order: the integer 0 or 1, or (``probabilities=True``) a number
in [0, 1], the probability that the step is correct. The only tolerance is surrounding whitespace and one
Markdown code fence around the object. A reply that does not parse is answered with a corrective turn
(the reply and what was wrong with it) at most ``max_retries`` times; a sample still unusable after that
counts as failed, and a rollout with no usable sample scores 0 under every aggregation (reported in
:meth:`PRMJudge.metrics` and the calibration / RS-SFT reports).

Two caches, two jobs:

- the **judge cache** (``cache=``, SQLite) maps ``sha256(judge model, rubric, question, steps, reply
  format, ensemble size and temperature, max_tokens)`` to the parsed per-step values of every sample. It
  stores values, not aggregated scores, so switching between ``min`` / ``mean`` / ``last`` / ``product``
  costs no call at all, and editing the rubric changes the key (a fresh judgement). It is what makes a
  second run of a finished job free even without any teacher-level cache.
- the **teacher cache** (the teacher's own ``cache=``) stores raw HTTP responses per request. It also
  holds the corrective retry turns, so it helps when a run dies between a request and the judge-cache
  write; it never holds aggregated scores.

Ensembles: ``samples=n`` asks for ``n`` replies at ``temperature`` and takes the majority vote per step
(a tie counts as 0, the conservative side). With probabilities, a step's score is its mean probability over
the replies (what the aggregations use) and its verdict the majority of ``p >= 0.5``. The seed's decision
rule suggests ``samples=3, temperature=0.5`` for judges with AUROC in 0.70-0.85.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from harness.remote_teachers import add_text_teacher_arguments, remote_teacher, remote_teacher_from_args
from trl_opsd.teachers import ResponseCache, Teacher
from trl_opsd.teachers.cache import cache_key

AGGREGATIONS = ("min", "mean", "last", "product")
REPLY_FORMAT = "json-steps/v1"  # part of the cache key: changing the prompt or reply format invalidates

DEFAULT_RUBRIC = (
    "You are a strict grader of step-by-step solutions to math word problems. You are given a question and "
    "a solution split into numbered steps. Judge each step on its own: a step is correct when its arithmetic "
    "is right, it uses only numbers given in the question or established by earlier steps, and it moves "
    "toward answering the question. A step that builds on an earlier mistake is incorrect. A final-answer "
    "line (#### N) is correct only if N answers the question."
)

# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------

_ANNOTATION = re.compile(r"<<[^<>\n]*>>")  # GSM8K calculator annotations, e.g. <<2*3=6>>
_MARKER = re.compile(r"^(?:step\s*\d+\s*[:.)]|\d{1,3}[.)]|[-*\u2022])(?=\s|$)", re.IGNORECASE)
_BARE_MARKER = re.compile(r"^(?:step\s*\d+\s*[:.)]?|\d{1,3}[.)]|[-*\u2022])$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "approx", "cf", "fig"})
_PLACEHOLDER = "\x00{}\x00"


def split_steps(text: str) -> list[str]:
    """Split a rollout into reasoning steps, deterministically.

    1. Lines: every line break ends a step (equation-per-line solutions give one step per line), except
       that a line starting with a lowercase letter continues a previous line that has no closing
       punctuation, no ``=`` and no ``####`` (hard-wrapped prose). Blank lines always end a step.
    2. Numbered steps and bullets (``1.``, ``2)``, ``Step 3:``, ``-``) start a step; a marker alone on
       its line is joined to the step after it.
    3. Sentences: within a step, after ``.``, ``!`` or ``?`` followed by whitespace and a character that is
       not a lowercase letter, except after a bare list marker or a common abbreviation. Numbers
       (``3.5``, ``1,000``), calculator annotations (``<<2*3=6>>``) and a ``#### N`` final-answer line are
       never split; ``####`` always starts its own step.

    Whitespace inside a step is collapsed to single spaces. Empty text gives no steps.
    """
    units = _line_units(text.replace("\r\n", "\n").replace("\r", "\n"))
    steps: list[str] = []
    for unit in units:
        steps.extend(_sentences(unit))
    return _merge_bare_markers(steps)


def _line_units(text: str) -> list[str]:
    units: list[str] = []
    joinable = False  # may the next line continue the last unit?
    for raw in text.split("\n"):
        line = " ".join(raw.split())
        if not line:
            joinable = False
            continue
        for piece in _split_answer_marker(line):
            if joinable and piece[0].islower() and not _MARKER.match(piece):
                units[-1] = f"{units[-1]} {piece}"
            else:
                units.append(piece)
            last = units[-1]
            joinable = last[-1] not in ".!?:;" and "=" not in last and "####" not in last
    return units


def _split_answer_marker(line: str) -> list[str]:
    """``"so 14 #### 14"`` -> ``["so 14", "#### 14"]``: the final-answer marker starts its own step."""
    head, sep, tail = line.partition("####")
    if not sep:
        return [line]
    return [part for part in (head.strip(), f"#### {tail.strip()}".strip()) if part]


def _sentences(unit: str) -> list[str]:
    if unit.startswith("####"):
        return [unit]
    annotations = _ANNOTATION.findall(unit)
    masked = unit
    for i, annotation in enumerate(annotations):  # masked so their '.' and '=' never split anything
        masked = masked.replace(annotation, _PLACEHOLDER.format(i), 1)
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(masked):
        end = match.end()
        if end >= len(masked) or masked[end].islower():
            continue
        candidate = masked[start:end].strip()  # the piece so far, closing punctuation included
        last_word = candidate.split()[-1].lower().rstrip(".") if candidate else ""
        if _BARE_MARKER.match(candidate) or last_word in _ABBREVIATIONS:
            continue
        pieces.append(masked[start:end].strip())
        start = end
    pieces.append(masked[start:].strip())
    restored = []
    for piece in filter(None, pieces):
        for i, annotation in enumerate(annotations):
            piece = piece.replace(_PLACEHOLDER.format(i), annotation)
        restored.append(piece)
    return restored


def _merge_bare_markers(steps: list[str]) -> list[str]:
    merged: list[str] = []
    carry = ""
    for step in steps:
        if _BARE_MARKER.match(step):
            carry = f"{carry} {step}".strip()
            continue
        merged.append(f"{carry} {step}".strip() if carry else step)
        carry = ""
    if carry:
        merged.append(carry)
    return merged


# --------------------------------------------------------------------------------------------
# the judge's prompt and reply
# --------------------------------------------------------------------------------------------


class ReplyFormatError(ValueError):
    """A judge reply that is not exactly the required JSON object."""


def judge_messages(rubric: str, question: str, steps: Sequence[str], probabilities: bool = False) -> list[dict]:
    """The chat sent to the judge: the rubric as system prompt, the question and numbered steps as user turn."""
    lines = "\n".join(f"[{i}] {' '.join(step.split())}" for i, step in enumerate(steps, 1))
    meaning = (
        "the probability (a number from 0 to 1) that the step is correct"
        if probabilities
        else "1 if the step is correct and 0 if it is not"
    )
    example = ", ".join(f"v{i}" for i in range(1, len(steps) + 1))
    user = (
        f"Question:\n{question.strip()}\n\nSteps:\n{lines}\n\n"
        f"Judge every step. Reply with only this JSON object and nothing else:\n"
        f'{{"steps": [{example}]}}\n'
        f"with exactly {len(steps)} values in step order; each value is {meaning}."
    )
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def parse_judge_messages(messages: Sequence[dict]) -> tuple[str, list[str], bool]:
    """Inverse of :func:`judge_messages` (used by the stub judge server): ``(question, steps, probabilities)``
    from the first user turn of a judge chat."""
    user = next(m["content"] for m in messages if m.get("role") == "user")
    head, sep, rest = user.partition("\n\nSteps:\n")
    if not sep or not head.startswith("Question:\n"):
        raise ValueError("not a PRM judge prompt")
    question = head[len("Question:\n"):]
    block = rest.split("\n\n", 1)[0]
    steps = [re.sub(r"^\[\d+\] ", "", line) for line in block.split("\n") if line]
    return question, steps, "the probability" in rest


_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


def parse_reply(text: str, num_steps: int, probabilities: bool = False) -> list[float]:
    """The per-step values of a judge reply, or :class:`ReplyFormatError` saying what is wrong."""
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        raise ReplyFormatError("the reply is not a JSON object") from None
    if not isinstance(obj, dict) or set(obj) != {"steps"}:
        raise ReplyFormatError('the reply must be a JSON object with the single key "steps"')
    values = obj["steps"]
    if not isinstance(values, list):
        raise ReplyFormatError('"steps" must be a list')
    if len(values) != num_steps:
        raise ReplyFormatError(f'"steps" holds {len(values)} values but there are {num_steps} steps')
    for i, value in enumerate(values, 1):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if probabilities:
            if not numeric or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ReplyFormatError(f"value {i} ({value!r}) is not a probability in [0, 1]")
        elif not (numeric and value in (0, 1) and float(value).is_integer()):
            raise ReplyFormatError(f"value {i} ({value!r}) is not 0 or 1")
    return [float(v) for v in values]


def correction_turns(reply: str, reason: str, num_steps: int) -> list[dict]:
    """The turns appended to the chat when a reply does not parse (a new request, so no cache returns the
    same bad reply)."""
    return [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": (
            f"That reply could not be used: {reason}. Reply with only the JSON object "
            f'{{"steps": [...]}} holding exactly {num_steps} values, one per step, in order.'
        )},
    ]


# --------------------------------------------------------------------------------------------
# verdicts and aggregation
# --------------------------------------------------------------------------------------------


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """``min``, ``mean``, ``last`` or ``product`` of per-step scores (0.0 for no steps).

    With 0/1 verdicts ``product`` equals ``min``; it differs when the judge gives probabilities."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if not step_scores:
        return 0.0
    if how == "min":
        return float(min(step_scores))
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    if how == "last":
        return float(step_scores[-1])
    return float(math.prod(step_scores))


@dataclass(frozen=True)
class JudgeResult:
    """The judge's verdict on one rollout.

    ``samples`` holds every usable reply's per-step values; ``failed_samples`` counts replies that never
    parsed. ``verdicts`` is the per-step majority vote (ties -> 0); ``probabilities`` the per-step mean
    when the judge gave probabilities. A result with no usable sample (or no steps) scores 0.
    """

    steps: tuple[str, ...]
    samples: tuple[tuple[float, ...], ...]
    failed_samples: int = 0
    probabilistic: bool = False
    from_cache: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def verdicts(self) -> tuple[int, ...] | None:
        if not self.ok:
            return None
        n = len(self.samples)
        return tuple(int(sum(s[i] >= 0.5 for s in self.samples) * 2 > n) for i in range(len(self.steps)))

    @property
    def probabilities(self) -> tuple[float, ...] | None:
        if not (self.ok and self.probabilistic):
            return None
        return tuple(sum(s[i] for s in self.samples) / len(self.samples) for i in range(len(self.steps)))

    @property
    def step_scores(self) -> tuple[float, ...]:
        """Probabilities when the judge gives them, else the 0/1 majority verdicts; empty when not ok."""
        if not self.ok:
            return ()
        return self.probabilities if self.probabilistic else tuple(float(v) for v in self.verdicts)

    def score(self, aggregation: str = "min") -> float:
        return aggregate(self.step_scores, aggregation) if self.ok else 0.0

    def scores(self, aggregations: Sequence[str] = ("min", "mean", "last")) -> dict[str, float]:
        return {how: self.score(how) for how in aggregations}


# --------------------------------------------------------------------------------------------
# the judge
# --------------------------------------------------------------------------------------------


class PRMJudge:
    """Step-by-step judge over any teacher that can ``generate`` (OpenAI-compatible, Cortex, a router).

    ``judge(question, steps)`` returns a :class:`JudgeResult`; ``judge_many`` does a batch with the
    teacher's concurrency. ``steps`` are the segmented steps (use :func:`split_steps`); ``score`` segments
    for you. ``cache`` is a path or :class:`ResponseCache` for the judge cache (module docstring).
    ``judge_model`` names the judge in the cache key; by default the teacher's ``model`` (or its name).
    """

    def __init__(
        self,
        teacher: Teacher,
        rubric: str = DEFAULT_RUBRIC,
        *,
        cache: ResponseCache | str | os.PathLike | None = None,
        samples: int = 1,
        temperature: float = 0.0,
        probabilities: bool = False,
        max_retries: int = 2,
        max_tokens: int = 256,
        judge_model: str | None = None,
    ) -> None:
        teacher.require("generate")
        if samples < 1 or max_retries < 0 or max_tokens < 1:
            raise ValueError("samples and max_tokens must be >= 1 and max_retries >= 0")
        if not rubric.strip():
            raise ValueError("the rubric is empty")
        self.teacher = teacher
        self.rubric = rubric
        self.cache = ResponseCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.samples = samples
        self.temperature = temperature
        self.probabilities = probabilities
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.judge_model = judge_model or getattr(teacher, "model", None) or teacher.name
        self._counts = {"judged": 0, "cache_hits": 0, "requests": 0, "retries": 0, "failed_samples": 0,
                        "unjudged": 0}

    def __repr__(self) -> str:
        return (
            f"PRMJudge(model={self.judge_model!r}, samples={self.samples}, temperature={self.temperature}, "
            f"probabilities={self.probabilities})"
        )

    def describe(self) -> dict[str, Any]:
        """What identifies this judge's verdicts (for reports and job fingerprints); no secrets."""
        return {"model": self.judge_model, "rubric_sha256": cache_key(self.rubric)[:16], "samples": self.samples,
                "temperature": self.temperature, "probabilities": self.probabilities, "format": REPLY_FORMAT}

    def metrics(self) -> dict[str, int]:
        """``requests``: chats sent to the teacher (its own cache may still answer some without HTTP);
        ``cache_hits``: rollouts answered by the judge cache; ``unjudged``: rollouts with no usable reply."""
        return dict(self._counts)

    def key(self, question: str, steps: Sequence[str]) -> str:
        return cache_key({
            "kind": "prm-judge", "format": REPLY_FORMAT, "judge_model": self.judge_model, "rubric": self.rubric,
            "question": question, "steps": [[i, s] for i, s in enumerate(steps, 1)], "samples": self.samples,
            "temperature": self.temperature, "probabilities": self.probabilities, "max_tokens": self.max_tokens,
        })

    def score(self, question: str, text: str, aggregation: str = "min") -> float:
        return self.judge(question, split_steps(text)).score(aggregation)

    def judge(self, question: str, steps: Sequence[str]) -> JudgeResult:
        return self.judge_many([(question, steps)])[0]

    def judge_many(
        self, items: Sequence[tuple[str, Sequence[str]]], *, progress: bool = False, chunk_size: int = 64
    ) -> list[JudgeResult]:
        """Judge ``(question, steps)`` pairs; cached ones cost nothing, identical ones are asked once."""
        results: list[JudgeResult | None] = [None] * len(items)
        missing: dict[str, list[int]] = {}
        for i, (question, steps) in enumerate(items):
            steps = tuple(steps)
            if not steps:
                results[i] = JudgeResult((), (), 0, self.probabilities)
                continue
            key = self.key(question, steps)
            stored = self.cache.get(key) if self.cache is not None and key not in missing else None
            if stored is not None:
                self._counts["cache_hits"] += 1
                results[i] = self._result(steps, stored, from_cache=True)
            else:
                missing.setdefault(key, []).append(i)
        keys = list(missing)
        chunks = range(0, len(keys), chunk_size)
        for start in tqdm(chunks, desc="judge", unit="chunk", disable=not progress or not keys, leave=False):
            batch = keys[start:start + chunk_size]
            firsts = [missing[k][0] for k in batch]
            stored_values = self._ask([(items[i][0], tuple(items[i][1])) for i in firsts])
            for key, value in zip(batch, stored_values):
                if self.cache is not None:
                    self.cache.put(key, value)
                for i in missing[key]:
                    results[i] = self._result(tuple(items[i][1]), value, from_cache=False)
        self._counts["judged"] += len(items)
        return results  # type: ignore[return-value]

    def _result(self, steps: tuple[str, ...], stored: dict, *, from_cache: bool) -> JudgeResult:
        result = JudgeResult(steps, tuple(tuple(s) for s in stored["samples"]), int(stored["failed"]),
                             self.probabilities, from_cache=from_cache)
        if not result.ok:
            self._counts["unjudged"] += 1
        return result

    def _ask(self, items: Sequence[tuple[str, tuple[str, ...]]]) -> list[dict]:
        """Ask the teacher about uncached rollouts: ``samples`` replies each, each retried on its own with a
        corrective turn until it parses or ``max_retries`` is spent. Returns the judge-cache values."""
        chats = [judge_messages(self.rubric, q, steps, self.probabilities) for q, steps in items]
        generations = self._generate(chats, n=self.samples)
        # pending: (item index, the chat that produced this reply, the reply)
        pending = [(g.chat_index, chats[g.chat_index], g.text) for g in generations]
        parsed: list[list[list[float]]] = [[] for _ in items]
        failed = [0] * len(items)
        for attempt in range(self.max_retries + 1):
            retry = []
            for item, chat, reply in pending:
                num_steps = len(items[item][1])
                try:
                    parsed[item].append(parse_reply(reply, num_steps, self.probabilities))
                except ReplyFormatError as err:
                    if attempt == self.max_retries:
                        failed[item] += 1
                    else:
                        retry.append((item, chat + correction_turns(reply, str(err), num_steps)))
            if not retry:
                break
            self._counts["retries"] += len(retry)
            replies = self._generate([chat for _, chat in retry], n=1)
            pending = [(item, chat, g.text) for (item, chat), g in zip(retry, replies)]
        self._counts["failed_samples"] += sum(failed)
        return [{"samples": values, "failed": f} for values, f in zip(parsed, failed)]

    def _generate(self, chats: list[list[dict]], n: int):
        self._counts["requests"] += len(chats) * n
        return self.teacher.generate(chats, max_tokens=self.max_tokens, temperature=self.temperature, n=n)


# --------------------------------------------------------------------------------------------
# command-line plumbing shared by `trl-opsd rs-sft` and `trl-opsd prm-calibrate`
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StubJudge:
    """A judge served on loopback for ``--judge stub``: its model name, and a context manager that serves it
    and yields its base URL (without ``/v1``). The arithmetic world's is ``harness.world.stub_judge.STUB_JUDGE``."""

    model: str
    serve: Callable[[], contextlib.AbstractContextManager[str]]


def add_judge_arguments(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    parser.add_argument("--judge", choices=("none", "stub", "remote"), default="stub",
                        help="PRM judge: 'stub' serves the verifier-backed arithmetic stub "
                        "(harness/world/stub_judge.py) on loopback and talks to it over the chat-completions wire; "
                        "'remote' uses --judge-url")
    parser.add_argument("--judge-model", action="append" if several_models else "store", default=None,
                        help="judge model name" + (" (repeat to calibrate several)" if several_models else ""))
    add_text_teacher_arguments(parser, "judge", "PRM judge")
    parser.add_argument("--rubric-file", default=None, help="judge rubric (default: the built-in PRM rubric)")
    parser.add_argument("--judge-cache", default=None,
                        help="judge cache of per-step verdicts (SQLite; default: judge_cache.sqlite in --out)")
    parser.add_argument("--ensemble", type=int, default=1, help="judge calls per rollout, majority vote per step")
    parser.add_argument("--ensemble-temperature", type=float, default=0.5,
                        help="judge temperature when --ensemble > 1 (single calls use 0)")
    parser.add_argument("--probabilities", action="store_true",
                        help="ask the judge for per-step probabilities (enables the 'product' aggregation)")


@contextlib.contextmanager
def judges_from_args(args: argparse.Namespace, default_db: str | os.PathLike,
                     stub_judge: StubJudge | None = None) -> Iterator[dict[str, PRMJudge]]:
    """``{judge model: PRMJudge}`` from the ``add_judge_arguments`` flags (empty for ``--judge none``);
    ``stub_judge`` is served for the duration of the block under ``--judge stub``."""
    rubric = open(args.rubric_file).read() if args.rubric_file else DEFAULT_RUBRIC
    db = args.judge_cache or default_db
    models = args.judge_model if isinstance(args.judge_model, list) else [args.judge_model]
    temperature = args.ensemble_temperature if args.ensemble > 1 else 0.0
    settings = dict(rubric=rubric, cache=db, samples=args.ensemble, temperature=temperature,
                    probabilities=args.probabilities)
    with contextlib.ExitStack() as stack:
        if args.judge == "none":
            yield {}
            return
        if args.judge == "stub":
            if stub_judge is None:
                raise SystemExit("--judge stub: this command has no stub judge; use --judge remote or --judge none")
            url = stack.enter_context(stub_judge.serve())
            teacher = remote_teacher(f"{url}/v1", stub_judge.model, "openai", max_concurrency=args.judge_concurrency)
            stack.callback(teacher.close)
            yield {stub_judge.model: PRMJudge(teacher, **settings)}
            return
        if not models or models == [None]:
            raise SystemExit("--judge remote needs --judge-model")
        judges = {}
        for model in models:
            teacher = remote_teacher_from_args(args, "judge", model)
            stack.callback(teacher.close)
            judges[model] = PRMJudge(teacher, **settings)
        yield judges
