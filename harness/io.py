"""JSON Lines and state files in and out, the one way every harness module reads and writes them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that a reader, or a resume after a kill, sees the old file or the new one,
    never a half-written one: write a temporary file beside it, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding=encoding) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; ``ValueError`` naming the file and line otherwise."""
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text ({error.reason})") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}, column {error.colno}); "
                                 "fix or remove the line (a truncated last line is a half-written file)") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: a row must be a JSON object, got {type(row).__name__}")
            rows.append((line_number, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped); a bad line is named by its file and number."""
    return [row for _, row in read_jsonl_objects(path)]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write ``rows`` one JSON object per line, atomically (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
