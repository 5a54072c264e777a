"""One redaction layer for every text that leaves the process: exceptions, logs, manifests, cache files.

A registry holds secret VALUES, fed by every source the project reads a secret from:

- :func:`register` -- a value read as a secret (``SecretSource`` env variables and files, Cortex tokens);
- :func:`register_env` / :func:`register_file` -- the value behind a config field such as
  ``teacher_api_key_env=VLLM_BEARER`` or ``api_key_file=...``;
- :func:`register_url` -- credentials inside a URL (``https://user:pass@host``, ``?api_key=...``);
- :func:`register_config` -- all of the above for a config or parsed arguments (``*_env``, ``*_file`` and other
  secret-named fields, URLs anywhere);
- environment variables whose NAME looks secret (``HF_TOKEN``, ``OPENAI_API_KEY``; :func:`is_secret_name`),
  read at each call so a variable set later is covered too.

:func:`redact` replaces, in any text:

- each registered value, raw, URL-quoted (``quote``/``quote_plus``), JSON-escaped, and, for a Basic-auth
  ``user:pass``, base64-encoded;
- every fragment of at least :data:`FRAGMENT_CHARS` (8) consecutive characters of a registered value, so a
  key split over two lines or cut to its first 20 characters is still caught. Values shorter than 8
  characters are only replaced whole (a 4-7 character value has no fragment distinctive enough); values
  under :data:`MIN_SECRET_CHARS` (4), flags (``true``, ``none``) and numbers are not registered (they would
  redact ordinary words);
- credentials in any URL (userinfo, secret-named query parameters), registered or not.

Exceptions: :func:`scrub_exception` redacts an exception's message and its chained ``__cause__`` /
``__context__`` in place, and drops a context that ``raise ... from None`` suppressed (tracebacks, loggers and
pytest may still print it). Logs: :func:`install_log_redaction` (done on the first :func:`register`) wraps the
log record factory, so every record of every logger is redacted before any handler (including pytest's
``caplog``) sees it; :class:`RedactingFilter` does the same for one handler or logger.

Light on purpose (stdlib only): it is imported by the recipes' manifest writer and the teachers alike.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4
FRAGMENT_CHARS = 8
SECRET_WORDS = frozenset(
    {"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwords", "passwd", "pat",
     "credential", "credentials", "auth", "authorization", "signature"}
)
_MAX_SECRET_FILE_BYTES = 64 * 1024
# scheme://userinfo@ (userinfo without "/", "@" or whitespace)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s\"'<>]+)@")
# ?name=value or &name=value; the name is checked with is_secret_name
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#\s\"'<>]*)")

# Secret-named fields whose value says what KIND of secret, not the secret (``token_type``).
_NOT_VALUE_SUFFIXES = ("_type", "_kind", "_mode", "_name", "_names", "_words")
_lock = threading.Lock()
_registered: set[str] = set()


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """True when a field or variable name contains a secret-like word (snake_case, kebab-case or camelCase)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    return any(word in SECRET_WORDS for word in re.findall(r"[a-z0-9]+", spaced.lower()))


_NOT_SECRETS = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off", "empty"})


def plausible_secret(value: Any) -> bool:
    """A value worth redacting: a string of ``MIN_SECRET_CHARS`` or more that is not a flag or a number
    (``HF_HUB_DISABLE_TOKEN=true`` must not redact every "true")."""
    if not isinstance(value, str):
        return False
    value = value.strip()
    return len(value) >= MIN_SECRET_CHARS and value.lower() not in _NOT_SECRETS and not value.isdigit()


def environment_secrets() -> list[str]:
    """Values of secret-named environment variables (long enough to be worth redacting)."""
    return [value.strip() for name, value in os.environ.items() if is_secret_name(name) and plausible_secret(value)]


def register(value: str | None) -> None:
    """Add a secret value to the registry (ignored when empty or shorter than ``MIN_SECRET_CHARS``)."""
    if not plausible_secret(value):
        return
    value = value.strip()
    with _lock:
        new = value not in _registered
        _registered.add(value)
    if new:
        install_log_redaction()


def register_env(name: str | None) -> None:
    """Register the value of the environment variable ``name`` (a config field such as ``api_key_env``)."""
    if name:
        register(os.environ.get(str(name)))


def register_file(path: str | os.PathLike | None) -> None:
    """Register the contents of a secret file (a token file; a file too large to be a token is skipped)."""
    if not path:
        return
    try:
        file = Path(path)
        if file.is_file() and file.stat().st_size <= _MAX_SECRET_FILE_BYTES:
            register(file.read_text(errors="replace"))
    except OSError:
        pass


def register_url(url: str | None) -> None:
    """Register the credentials inside ``url``: its userinfo (user, password, ``user:pass`` as Basic auth sends
    it) and the values of secret-named query parameters."""
    if not isinstance(url, str):
        return
    for match in _URL_USERINFO.finditer(url):
        userinfo = match.group("userinfo")
        user, _, password = userinfo.partition(":")
        for part in (userinfo, password or user):
            register(part)
            register(unquote(part))  # as sent (Basic auth) or echoed, decoded
    for match in _QUERY_PARAM.finditer(url):
        if is_secret_name(match.group("name")):
            register(match.group("value"))
            register(unquote_plus(match.group("value")))


def register_config(values: Any) -> None:
    """Register every secret a config (a dict, possibly nested, or a dataclass turned into one) points at.

    A secret-named field ending in ``_env`` names an environment variable (``teacher_api_key_env``): its value
    is registered, not the name. One ending in ``_file``/``_path`` names a secret file. Any other
    secret-named string field holds the secret itself (``hub_token``). URLs anywhere are searched for
    credentials.
    """
    if isinstance(values, dict):
        for key, value in values.items():
            key = str(key)
            if isinstance(value, str) and is_secret_name(key) and not key.lower().endswith(_NOT_VALUE_SUFFIXES):
                if key.lower().endswith("_env"):
                    register_env(value)
                elif key.lower().endswith(("_file", "_path")):
                    register_file(value)
                else:
                    register(value)
            register_config(value)
    elif isinstance(values, (list, tuple, set, frozenset)):
        for value in values:
            register_config(value)
    elif isinstance(values, str) and "://" in values:
        register_url(values)


def secrets() -> list[str]:
    """Every value redacted now: the registry plus secret-named environment variables."""
    with _lock:
        values = set(_registered)
    values.update(environment_secrets())
    return sorted(values, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _forms(secret: str) -> tuple[str, ...]:
    """The spellings of ``secret`` a text may hold: raw, URL-quoted, JSON-escaped, Basic-auth base64."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    if ":" in secret:
        forms.add(base64.b64encode(secret.encode()).decode())
    return tuple(sorted(forms, key=len, reverse=True))


def _secret_spans(text: str, secret: str) -> Iterable[tuple[int, int]]:
    """Character ranges of ``text`` that hold ``secret`` or a fragment of it (>= ``FRAGMENT_CHARS`` long)."""
    for form in _forms(secret):
        if len(form) < FRAGMENT_CHARS:
            start = text.find(form)
            while start >= 0:
                yield start, start + len(form)
                start = text.find(form, start + 1)
            continue
        # Every fragment of >= FRAGMENT_CHARS characters is covered by the FRAGMENT_CHARS-windows it contains.
        for i in range(len(form) - FRAGMENT_CHARS + 1):
            window = form[i : i + FRAGMENT_CHARS]
            start = text.find(window)
            while start >= 0:
                yield start, start + FRAGMENT_CHARS
                start = text.find(window, start + 1)


def _url_credentials(text: str) -> str:
    def userinfo(match: re.Match) -> str:
        return f"{match.group('scheme')}{REDACTED}@"

    def param(match: re.Match) -> str:
        if not is_secret_name(match.group("name")) or not match.group("value"):
            return match.group(0)
        return f"{match.group('lead')}{match.group('name')}={REDACTED}"

    if "://" in text:
        text = _URL_USERINFO.sub(userinfo, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(param, text)
    return text


def strip_url_credentials(url: str) -> str:
    """``url`` without userinfo and without the values of secret-named query parameters (for cache keys)."""
    return _url_credentials(url)


def redact(text: Any, extra: Iterable[str] = ()) -> Any:
    """``text`` with every secret (registered, secret-named env, ``extra``) and URL credential replaced by
    ``<redacted>``. Non-strings are returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    spans: list[tuple[int, int]] = []
    for secret in {*secrets(), *(s.strip() for s in extra if plausible_secret(s))}:
        spans.extend(_secret_spans(text, secret))
    if spans:
        spans.sort()
        merged = [list(spans[0])]
        for start, end in spans[1:]:
            if start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        pieces, last = [], 0
        for start, end in merged:
            pieces.append(text[last:start])
            pieces.append(REDACTED)
            last = end
        pieces.append(text[last:])
        text = "".join(pieces)
    return _url_credentials(text)


def contains_secret(text: str) -> bool:
    return isinstance(text, str) and redact(text) != text


# ----------------------------------------------------------------------------------------------- exceptions

class RedactedChainedError(Exception):
    """Stands in, in an exception chain, for an exception whose text held a secret (its text, redacted)."""


def scrub_exception(exc: BaseException) -> BaseException:
    """Redact ``exc`` in place and return it: its ``args``, and every exception chained to it.

    A context hidden by ``raise ... from None`` is dropped, not kept: ``__suppress_context__`` only asks
    printers not to show it. A chained exception whose text still holds a secret after its ``args`` are
    redacted (a ``__str__`` built from other attributes) is replaced by a :class:`RedactedChainedError`.
    """
    seen: set[int] = set()

    def scrub(error: BaseException, top: bool) -> BaseException:
        if id(error) in seen:
            return error
        seen.add(id(error))
        try:
            error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
        except (AttributeError, TypeError):
            pass
        for name in ("reason", "message"):
            value = getattr(error, name, None)
            if isinstance(value, str) and contains_secret(value):
                try:
                    setattr(error, name, redact(value))
                except (AttributeError, TypeError):
                    pass
        if error.__suppress_context__ and error.__context__ is not None:
            error.__context__ = None
        if error.__cause__ is not None:
            error.__cause__ = scrub(error.__cause__, False)
        if error.__context__ is not None:
            error.__context__ = scrub(error.__context__, False)
        if not top and _text_of(error) != redact(_text_of(error)):
            stand_in = RedactedChainedError(f"{type(error).__name__}: {redact(_text_of(error))}")
            stand_in.__cause__, stand_in.__context__ = error.__cause__, error.__context__
            stand_in.__suppress_context__ = error.__suppress_context__
            return stand_in
        return error

    return scrub(exc, True)


def _text_of(error: BaseException) -> str:
    try:
        return f"{error}|{error!r}"
    except Exception:  # noqa: BLE001 (a broken __str__ must not hide the original failure)
        return type(error).__name__


# ----------------------------------------------------------------------------------------------- logging

class RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments, exception text and stack before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_trl_opsd_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 (a bad format string is logging's to report, not ours)
        message = str(record.msg)
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    record.msg, record.args = redact(message), None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._trl_opsd_redacted = True
    return record


_installed = False


def install_log_redaction() -> None:
    """Redact every log record at creation (all loggers, all handlers); idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(make_record(*args, **kwargs))

    logging.setLogRecordFactory(factory)
