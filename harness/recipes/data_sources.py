"""Where a recipe's rows come from, in the project's dataset contract (``messages`` + ``answer`` + extras).

``--dataset_name`` is one of:

- ``arithmetic``: the offline arithmetic world, generated in code (``--num_train_rows`` problems of the
  split, seeded by ``--dataset_seed``);
- a local ``.jsonl`` / ``.json`` file, a folder written by ``Dataset.save_to_disk``, or a folder holding
  ``<split>.jsonl``;
- anything else: a hub dataset (``datasets.load_dataset(name, dataset_config, split=...)``).

Two foreign row formats are converted to the contract:

- ``gsm8k`` (``question`` + ``answer`` ending in ``#### N``): the user turn is the question alone (as in
  the ``opsd_gsm8k`` lm-eval task), ``answer`` the normalised final number, and (when asked for) the
  worked solution a trailing assistant turn;
- ``problem_solution`` (the OPSD paper's data, e.g. ``siyanzhao/Openthoughts_math_30k_opsd``): the user
  turn is the problem, and the reference solution is ``privileged_context`` (only the teacher sees it).

Nothing here is loaded for a dry run except the arithmetic world and local files (cheap, and their
fingerprint belongs in the plan); hub datasets are only named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from harness.io import read_jsonl_objects
from harness.verifiers import normalize_number
from harness.world.arithmetic import generate_problems, problems_to_rows

ARITHMETIC = "arithmetic"
DEFAULT_ARITHMETIC_ROWS = 2000
DATASET_FORMATS = ("auto", "contract", "gsm8k", "problem_solution")
CONTRACT_PROMPT_FIELDS = ("messages", "prompt")


class DataSourceError(ValueError):
    """The dataset named by the recipe's arguments cannot be found or used."""


@dataclass(frozen=True)
class DataSource:
    kind: str  # "arithmetic" | "jsonl" | "saved_dataset" | "jsonl_folder" | "hub"
    name: str
    split: str

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def resolve_source(dataset_name: str | None, split: str) -> DataSource:
    """Classify ``dataset_name`` without loading anything."""
    if not dataset_name:
        raise DataSourceError("dataset_name is required: 'arithmetic', a local JSONL file or folder, or a hub name")
    if dataset_name == ARITHMETIC:
        return DataSource(ARITHMETIC, ARITHMETIC, split)
    path = Path(dataset_name).expanduser()
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DataSourceError(f"dataset_name={dataset_name!r}: a local file must be .jsonl or .json")
        return DataSource("jsonl", str(path.resolve()), split)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return DataSource("saved_dataset", str(path.resolve()), split)
        if (path / f"{split}.jsonl").is_file():
            return DataSource("jsonl_folder", str(path.resolve()), split)
        raise DataSourceError(
            f"dataset_name={dataset_name!r} is a folder with neither a saved dataset (dataset_info.json) nor "
            f"{split}.jsonl (dataset_train_split={split!r})"
        )
    if dataset_name.startswith((".", "/", "~")) or dataset_name.endswith((".jsonl", ".json")):
        raise DataSourceError(f"dataset_name={dataset_name!r} looks like a local path but does not exist")
    return DataSource("hub", dataset_name, split)


def load_rows(
    source: DataSource,
    *,
    dataset_config: str | None = None,
    num_rows: int | None = None,
    seed: int = 0,
    with_solution: bool = False,
    dataset_format: str = "auto",
) -> Dataset:
    """The rows of ``source`` in the dataset contract; the first ``num_rows`` of them when given."""
    if dataset_format not in DATASET_FORMATS:
        raise DataSourceError(f"dataset_format must be one of {DATASET_FORMATS}, got {dataset_format!r}")
    if source.kind == ARITHMETIC:
        problems = generate_problems(num_rows or DEFAULT_ARITHMETIC_ROWS, split=source.split, seed=seed)
        return Dataset.from_list(problems_to_rows(problems, with_solution=with_solution))
    if source.kind in ("jsonl", "jsonl_folder"):
        path = source.name if source.kind == "jsonl" else str(Path(source.name) / f"{source.split}.jsonl")
        check_json_file(path)
        try:
            dataset = load_dataset("json", data_files=path, split="train")
        except Exception as error:  # DatasetGenerationError wraps pyarrow's reason (e.g. a field changing type)
            cause = error.__cause__ or error
            raise DataSourceError(f"dataset_name: {path}: the rows do not form one table: {type(cause).__name__}: "
                                  f"{cause}; give each field one type on every line") from None
    elif source.kind == "saved_dataset":
        dataset = load_from_disk(source.name)
        if isinstance(dataset, DatasetDict):
            if source.split not in dataset:
                raise DataSourceError(
                    f"dataset_train_split={source.split!r} is not in {source.name} (splits: {sorted(dataset)})"
                )
            dataset = dataset[source.split]
    else:
        dataset = load_dataset(source.name, dataset_config, split=source.split)
    if num_rows is not None:
        dataset = dataset.select(range(min(num_rows, len(dataset))))
    return to_contract(dataset, dataset_format, with_solution)


def check_json_file(path: str) -> None:
    """Refuse a local JSON / JSONL file that ``datasets`` would reject with a bare ``DatasetGenerationError``,
    naming the file and line: every non-blank line a JSON object (or, for .json, the file one JSON array/object)."""
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            json.loads(text)
            return
        except UnicodeDecodeError as error:
            raise DataSourceError(f"dataset_name: {path}: not UTF-8 text ({error.reason})") from None
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):  # one JSON array: its parser knows the line
                raise DataSourceError(f"dataset_name: {path}:{error.lineno}: not valid JSON ({error.msg}, column "
                                      f"{error.colno})") from None
            # else maybe JSON lines in a .json file: the line-by-line check below names the bad line
    try:
        rows = read_jsonl_objects(path)
    except ValueError as error:
        raise DataSourceError(f"dataset_name: {error}") from None
    if not rows:
        raise DataSourceError(f"dataset_name: {path} holds no rows")


def to_contract(dataset: Dataset, dataset_format: str, with_solution: bool) -> Dataset:
    """``dataset`` in the project's contract: unchanged if it already is, converted if it is GSM8K-style."""
    columns = set(dataset.column_names)
    if dataset_format == "auto":
        if columns & set(CONTRACT_PROMPT_FIELDS):
            dataset_format = "contract"
        elif {"question", "answer"} <= columns:
            dataset_format = "gsm8k"
        elif {"problem", "solution"} <= columns:
            dataset_format = "problem_solution"
        else:
            raise DataSourceError(
                f"cannot tell the dataset's format from its columns {sorted(columns)}: rows need 'messages' (or "
                "'prompt'), GSM8K's 'question' and 'answer', or 'problem' and 'solution'; set dataset_format"
            )
    if dataset_format == "contract":
        if not columns & set(CONTRACT_PROMPT_FIELDS):
            raise DataSourceError(f"dataset_format='contract' needs a 'messages' or 'prompt' column, got "
                                  f"{sorted(columns)}")
        return dataset
    needed, convert = {
        "gsm8k": ({"question", "answer"}, lambda row, index: gsm8k_row(row, index, with_solution)),
        "problem_solution": ({"problem", "solution"}, problem_solution_row),
    }[dataset_format]
    if needed - columns:
        raise DataSourceError(f"dataset_format={dataset_format!r} needs columns {sorted(needed - columns)}, got "
                              f"{sorted(columns)}")
    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


def gsm8k_row(row: dict, index: int, with_solution: bool) -> dict:
    """One GSM8K ``question``/``answer`` row as ``messages`` + normalised ``answer`` (+ the worked solution)."""
    solution = row["answer"]
    if "####" not in solution:
        raise DataSourceError(f"row {index}: field 'answer' has no '#### N' final-answer line")
    final = normalize_number(solution.rsplit("####", 1)[1])
    if final is None:
        raise DataSourceError(f"row {index}: field 'answer' ends in a '####' line without a number")
    messages = [{"role": "user", "content": row["question"]}]
    if with_solution:
        messages.append({"role": "assistant", "content": solution})
    return {"messages": messages, "answer": final}


def problem_solution_row(row: dict, index: int) -> dict:
    """One ``problem``/``solution`` row: the problem for the student, the solution for the teacher only."""
    for name in ("problem", "solution"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise DataSourceError(f"row {index}: field {name!r} is empty")
    return {"messages": [{"role": "user", "content": row["problem"]}], "privileged_context": row["solution"]}


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the rows' canonical JSON: equal for equal data, whatever file or generator produced it."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
