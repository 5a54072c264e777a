"""Persistent hash-keyed cache of remote teacher responses (SQLite, WAL).

The key is the sha256 of a canonical JSON of ``(backend, base_url, model, request payload)``: everything
that determines the answer and nothing else. Credentials never reach it: they travel in headers, which
are not part of the key; credentials inside the base URL (``https://user:pass@host``, ``?api_key=...``) are
cut from the key; and a value holding a registered secret (:mod:`trl_opsd.redaction`) is not stored. So the
cache file can be shared and inspected. Re-running a step or a whole
job therefore sends no request whose answer is already stored.

One connection is shared by all threads behind a lock; WAL mode and a busy timeout let several
processes (e.g. DDP ranks) use the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .. import redaction

logger = logging.getLogger(__name__)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, NaN refused (it has no canonical form)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(parts: Any) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def request_key_parts(backend: str, base_url: str, model: str, payload: Any) -> dict[str, Any]:
    """What identifies a remote request: never headers, never credentials (URL credentials are cut, so a
    rotated password keeps the cache valid)."""
    redaction.register_url(base_url)
    base_url = redaction.strip_url_credentials(base_url.rstrip("/"))
    return {"backend": backend, "base_url": base_url, "model": model, "payload": payload}


def _strings(value: Any):
    """The strings inside a JSON value, keys included (a scored row holds none: its check costs nothing)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (str, dict, list, tuple)):
                yield from _strings(item)


class ResponseCache:
    """``get``/``put`` of JSON values by key, safe across threads and processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
        )

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; a value that holds a secret is not stored (it stays uncached)."""
        text = canonical_json(value)
        if any(redaction.contains_secret(piece) for piece in _strings(value)):
            logger.warning("response cache %s: a response holding a secret was not cached", self.path)
            return
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)", (key, text, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def journal_mode(self) -> str:
        with self._lock:
            return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
