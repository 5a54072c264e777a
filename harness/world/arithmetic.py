"""The offline arithmetic world: a seeded stand-in for GSM8K that tests, the demo and benchmarks share.

Each problem is a short story about one person's stock of objects that changes in 1 to ``MAX_STEPS``
steps (add, take away, multiply). The worked solution has one equation line per step and ends with
GSM8K's ``#### N`` line, e.g.::

    Mia has 12 apples. She buys 7 more apples. She gives away 5 apples. How many apples does Mia have now?
    12+7=19
    19-5=14
    #### 14

Splits never overlap: a problem belongs to train, validation or test by a hash of its question
text, so the split of a problem does not depend on how many problems were asked for.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from trl_opsd.prompts import DEFAULT_ANSWER_CONTEXT_TEMPLATE, insert_privileged_context

MAX_STEPS = 3
SPLITS = ("train", "validation", "test")
# Share of the question-hash space each split owns (out of 100).
_SPLIT_RANGES = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}

_PEOPLE = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Ben", "He"), ("Lily", "She"), ("Sam", "He"),
           ("Zoe", "She"), ("Max", "He"), ("Eva", "She"), ("Leo", "He")]
_OBJECTS = ["apples", "books", "coins", "cards", "pens", "eggs", "shells", "stamps", "marbles", "stickers"]
_ADD_VERBS = ["buys {n} more {obj}", "finds {n} more {obj}", "gets {n} more {obj}", "is given {n} more {obj}"]
_SUB_VERBS = ["gives away {n} {obj}", "loses {n} {obj}", "sells {n} {obj}", "uses {n} {obj}"]
_MUL_VERBS = ["then has {n} times as many {obj}"]


@dataclass(frozen=True)
class Problem:
    """One word problem with its worked solution (GSM8K format) and difficulty (number of steps)."""

    question: str
    solution: str
    answer: str
    difficulty: int

    @property
    def uid(self) -> str:
        return hashlib.sha1(self.question.encode()).hexdigest()[:12]

    def to_row(self, with_solution: bool = False) -> dict:
        """A row in the project's dataset contract (``messages`` + ``answer``)."""
        messages = [{"role": "user", "content": self.question}]
        if with_solution:
            messages.append({"role": "assistant", "content": self.solution})
        return {"id": self.uid, "messages": messages, "answer": self.answer, "difficulty": self.difficulty}


def _random_problem(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    steps = rng.randint(1, MAX_STEPS)
    total = rng.randint(2, 30)
    sentences = [f"{name} has {total} {obj}."]
    lines = []
    for _ in range(steps):
        # Operand sizes (with the warm start's hint fraction) are tuned so a tiny model learns both
        # skills, arithmetic and copying the hinted answer: with 10-99 operands it learned to copy but
        # not to compute; with half the prompts hinted it learned to compute but not to copy.
        ops = ["+", "-"] + (["*"] if total <= 12 else [])
        op = rng.choice(ops if total > 1 else ["+", "*"])
        if op == "+":
            n, verbs = rng.randint(1, 20), _ADD_VERBS
            new_total = total + n
        elif op == "-":
            n, verbs = rng.randint(1, total - 1), _SUB_VERBS
            new_total = total - n
        else:
            n, verbs = rng.randint(2, 4), _MUL_VERBS
            new_total = total * n
        sentences.append(f"{pronoun} " + rng.choice(verbs).format(n=n, obj=obj) + ".")
        lines.append(f"{total}{op}{n}={new_total}")
        total = new_total
    sentences.append(f"How many {obj} does {name} have now?")
    lines.append(f"#### {total}")
    return Problem(question=" ".join(sentences), solution="\n".join(lines), answer=str(total), difficulty=steps)


def split_of(problem: Problem) -> str:
    """The split a problem belongs to, decided by a hash of its question text."""
    bucket = int(hashlib.sha256(problem.question.encode()).hexdigest(), 16) % 100
    return next(name for name, owned in _SPLIT_RANGES.items() if bucket in owned)


def generate_problems(n: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """``n`` distinct problems of ``split``, the same ones for the same (split, seed) every time."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"arithmetic-world/{seed}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split} problems (the world is too small)")
        problem = _random_problem(rng)
        if problem.question in seen or split_of(problem) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def hinted_messages(problem: Problem, template: str | None = None) -> list[dict]:
    """The student's chat with the gold answer added as privileged context (the teacher's view)."""
    context = DEFAULT_ANSWER_CONTEXT_TEMPLATE.format(answer=problem.answer)
    kwargs = {} if template is None else {"template": template}
    return insert_privileged_context(problem.to_row()["messages"], context, **kwargs)


def problems_to_rows(problems: list[Problem], with_solution: bool = False) -> list[dict]:
    return [problem.to_row(with_solution=with_solution) for problem in problems]


# -- the opsd_arith lm-eval task's data file (harness/tasks/data/arith_test.jsonl) --------------------------
TASK_NUM_PROBLEMS = 500
TASK_SEED = 0


def task_rows() -> list[dict]:
    """The rows of the ``opsd_arith`` task's data file, recomputed from the generator."""
    problems = generate_problems(TASK_NUM_PROBLEMS, split="test", seed=TASK_SEED)
    return [
        {"id": p.uid, "question": p.question, "solution": p.solution, "answer": p.answer, "difficulty": p.difficulty}
        for p in problems
    ]


def task_jsonl() -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in task_rows())


def write_task_data(path: Path | None = None) -> None:
    """Regenerate the bundled file (after a deliberate change to the arithmetic world)."""
    from harness.tasks.utils import ARITH_DATA

    path = path or ARITH_DATA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(task_jsonl(), encoding="utf-8")
