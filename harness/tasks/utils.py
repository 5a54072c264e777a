"""Hooks of the ``opsd_*`` lm-eval tasks: their data, their scoring, and the task class that logs token counts.

Every document, whatever its source, has the same fields: ``question``, ``solution`` (the gold worked
solution), ``answer`` (the gold final number, normalised) and ``difficulty`` (reasoning steps in the gold
solution, see :func:`solution_steps`). Scoring uses the project's verifier, so lm-eval reports the same
correctness that training and ``trl-opsd compare`` use.

Data:

- ``opsd_arith``: the arithmetic world's test split, shipped as ``data/arith_test.jsonl`` (written by
  ``harness.world.arithmetic.write_task_data``; a test keeps the file equal to the generator's output).
- ``opsd_gsm8k*``: a local file named with ``--metadata data_file=/abs/path.jsonl`` (JSONL or parquet;
  GSM8K's own ``question``/``answer`` rows or the training format's ``messages``/``answer`` rows, see
  :func:`gsm8k_doc`), else ``openai/gsm8k`` (config ``main``, split ``test``)
  from the hub. lm-eval 0.4.13 calls a task's ``custom_dataset`` with the run's metadata merged with the
  model arguments (``TaskConfig.custom_dataset(**metadata, **dataset_kwargs)``), so the loaders take
  ``**_run_metadata`` and read only their own key. A relative ``data_file`` is refused: it would resolve
  against whatever directory lm-eval happens to be launched from.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from datasets import Dataset, DatasetDict
from lm_eval.api.task import ConfigurableTask

from harness.compare import TOKENS_FIELD
from harness.verifiers import is_correct, normalize_number

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
ARITH_DATA = DATA_DIR / "arith_test.jsonl"
GSM8K_HUB = ("openai/gsm8k", "main", "test")

DOC_FIELDS = ("question", "solution", "answer", "difficulty")

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------


def solution_steps(solution: str) -> int:
    """Reasoning steps of a GSM8K-style solution: its ``<<a*b=c>>`` calculator annotations when it has
    any, otherwise its non-empty lines before the ``#### N`` line (the arithmetic world writes one
    equation per line and no annotations)."""
    annotations = len(_CALCULATOR.findall(solution))
    if annotations:
        return annotations
    reasoning = solution.split("####", 1)[0]
    return sum(1 for line in reasoning.splitlines() if line.strip())


def load_arith(**_run_metadata) -> DatasetDict:
    """``custom_dataset`` of ``opsd_arith``: the bundled test problems (no metadata is read)."""
    rows = [json.loads(line) for line in ARITH_DATA.read_text(encoding="utf-8").splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def _training_question(row: dict, where: str) -> str:
    """The user turn of a training-contract row (``messages``, or ``prompt`` as messages or text)."""
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    turns = prompt if isinstance(prompt, list) else []
    users = [t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"]
    if len(users) != 1 or not isinstance(users[0], str) or not users[0].strip():
        field = "messages" if "messages" in row else "prompt"
        raise ValueError(f"{where}: field {field!r} must hold exactly one user turn with text (the question); "
                         f"got {len(users)} user turns")
    return users[0]


def _training_solution(row: dict) -> str:
    """The worked solution a row with a plain-number answer carries, if any: its ``solution`` field, else
    its assistant turn (the recipes' ``with_solution`` rows)."""
    if isinstance(row.get("solution"), str):
        return row["solution"]
    turns = row.get("messages") if isinstance(row.get("messages"), list) else []
    replies = [t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "assistant"]
    return replies[-1] if replies and isinstance(replies[-1], str) else ""


def gsm8k_doc(row: dict, where: str) -> dict:
    """One row as a task document. Two row formats are read, so one file serves training and evaluation:

    - GSM8K's: ``question`` + ``answer`` (the worked solution, ending in a ``#### N`` line);
    - the training contract's (:mod:`harness.recipes.data_sources`): ``messages`` (or ``prompt``) with one
      user turn + ``answer`` (the final number, as a string or a number), optionally the worked solution
      (a ``solution`` field or an assistant turn) and a ``difficulty``. Without a solution or ``difficulty`` field the document's
      difficulty is 0 (unknown), and ``trl-opsd compare``'s difficulty buckets say nothing.
    """
    contract = "question" not in row and ("messages" in row or "prompt" in row)
    question = _training_question(row, where) if contract else row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' is missing or not a non-empty string (or give the training "
                         "format's 'messages' with one user turn)")
    value = row.get("answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"{where}: field 'answer' is missing or not a non-empty string or number")
    final = _FINAL_LINE.findall(value) if isinstance(value, str) else []
    if final:  # GSM8K: the worked solution, final line "#### N"
        solution, answer = value, normalize_number(final[-1])
    else:  # the training contract: the final number itself
        solution, answer = _training_solution(row), normalize_number(str(value))
        if answer is None:
            raise ValueError(f"{where}: field 'answer' has no final '#### <number>' line (GSM8K format) and is not "
                             f"a plain number (training format): ...{str(value)[-60:]!r}")
    if answer is None:
        raise ValueError(f"{where}: field 'answer' ends in a '####' line without a number")
    difficulty = row.get("difficulty")
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        difficulty = solution_steps(solution) if solution else 0
    return {"question": question, "solution": solution, "answer": answer, "difficulty": difficulty}


def resolve_data_file(data_file: str, task: str) -> Path:
    """An existing absolute path; relative paths are refused rather than resolved against the cwd."""
    path = Path(data_file).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"{task}: data_file {data_file!r} is a relative path; it would resolve against the directory lm-eval "
            f"was launched from ({Path.cwd()}). Pass an absolute path, e.g. "
            f"--metadata data_file=\"$(realpath {data_file})\""
        )
    if not path.is_file():
        raise FileNotFoundError(f"{task}: data_file {str(path)!r} does not exist or is not a file")
    return path


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs from a JSONL or parquet file, ``where`` naming the file and line/row."""
    if path.suffix == ".parquet":
        return [(f"{path} row {i}", row) for i, row in enumerate(Dataset.from_parquet(str(path)))]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object with 'question' (or 'messages') and "
                                 "'answer'")
            rows.append((f"{path}:{number}", row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_gsm8k(data_file: str | None = None, **_run_metadata) -> DatasetDict:
    """``custom_dataset`` of ``opsd_gsm8k*``: ``--metadata data_file=...`` if given, else the hub."""
    if data_file is not None:
        path = resolve_data_file(str(data_file), "opsd_gsm8k*")
        docs = [gsm8k_doc(row, where) for where, row in _read_rows(path)]
    else:
        import datasets

        path, name, split = GSM8K_HUB
        try:
            hub_rows = datasets.load_dataset(path, name, split=split)
        except Exception as err:  # offline, no cache, gated, ...: say what to do instead
            raise RuntimeError(
                f"opsd_gsm8k*: no --metadata data_file was given and {path} ({name}/{split}) could not be loaded "
                f"from the hub ({type(err).__name__}: {err}). Pass a local copy with "
                "--metadata data_file=/absolute/path/gsm8k_test.jsonl (rows with 'question' and 'answer')."
            ) from err
        docs = [gsm8k_doc(row, f"{path} {split} row {i}") for i, row in enumerate(hub_rows)]
    return DatasetDict({"test": Dataset.from_list(docs)})


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def process_results(doc: dict, results: list[str]) -> dict:
    """Per-document metrics: ``exact_match`` (the verifier's flexible extraction: ``#### N``, "the answer
    is N", ``\\boxed{N}``, else the last number), ``exact_match_strict`` (only a ``#### N`` line counts)
    and the document's ``difficulty``. lm-eval writes each key at the top level of the sample log."""
    response = results[0]
    return {
        "exact_match": float(is_correct(response, doc["answer"])),
        "exact_match_strict": float(is_correct(response, doc["answer"], strict=True)),
        "difficulty": doc["difficulty"],
    }


def tokenizer_source(metadata: dict) -> str | None:
    """The evaluated model's tokenizer, as lm-eval's metadata knows it: the ``tokenizer`` model argument
    (or ``--metadata tokenizer=...``), else ``pretrained`` (lm-eval merges model args into metadata)."""
    for key in ("tokenizer", "pretrained"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


class OpsdTask(ConfigurableTask):
    """A ``ConfigurableTask`` that also logs ``num_output_tokens``: the response re-encoded with the
    evaluated model's tokenizer (the stop sequence excluded). The YAML hooks cannot do this: lm-eval
    passes them only the document and the response, never the run's metadata.

    Without a known tokenizer (API models given no ``tokenizer``) the field is left out, and
    ``trl-opsd compare`` falls back to whitespace words, saying so in its report.
    """

    def __init__(self, config: dict) -> None:
        config = {key: value for key, value in config.items() if key != "class"}
        super().__init__(config=config)
        self._tokenizer = None
        source = tokenizer_source(self.config.metadata or {})
        if source is None:
            logger.warning("%s: no tokenizer known (model arg 'tokenizer' or 'pretrained'); %s is not logged",
                           self.config.task, TOKENS_FIELD)
            return
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            logger.warning("%s: cannot load tokenizer %r (%s); %s is not logged", self.config.task, source, err,
                           TOKENS_FIELD)

    def process_results(self, doc: dict, results: list[str]) -> dict:
        metrics = super().process_results(doc, results)
        if self._tokenizer is not None:
            metrics[TOKENS_FIELD] = len(self._tokenizer(results[0], add_special_tokens=False)["input_ids"])
        return metrics
