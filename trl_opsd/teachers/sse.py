"""Incremental parser for ``text/event-stream`` (server-sent events).

Follows the WHATWG HTML "Interpreting an event stream" rules (read at
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation): lines end in
CRLF, LF or CR; a line starting with ``:`` is a comment; ``field: value`` drops one leading space from the
value; several ``data`` lines join with ``\\n``; a blank line dispatches the event; a leading BOM is dropped.
Bytes may arrive split anywhere, including inside a UTF-8 character or between CR and LF.

Where the spec silently discards an unterminated event at end of stream, :meth:`SSEParser.close` raises
:class:`SSEStreamCut`: for an LLM response that means the text was truncated, and the call must be retried.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_LINE_END = re.compile(r"[\r\n]")


class SSEStreamCut(Exception):
    """The stream ended inside an event (or inside a UTF-8 character)."""


@dataclass
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """``feed(bytes) -> events`` as they complete; ``close()`` at end of stream."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._at_start = True
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._pending = False  # a field was seen since the last dispatch

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise SSEStreamCut(f"invalid UTF-8 in event stream: {err}") from None
        return self._consume(text, final=False)

    def close(self) -> list[SSEEvent]:
        try:
            text = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SSEStreamCut("event stream ended inside a UTF-8 character") from None
        events = self._consume(text, final=True)
        if self._buffer or self._pending:
            raise SSEStreamCut("event stream ended in the middle of an event")
        return events

    def _consume(self, text: str, *, final: bool) -> list[SSEEvent]:
        if self._at_start and text:
            text = text.removeprefix("\ufeff")
            self._at_start = False
        self._buffer += text
        events = []
        while (match := _LINE_END.search(self._buffer)) is not None:
            cut = match.start()
            if self._buffer[cut] == "\r" and cut + 1 == len(self._buffer) and not final:
                break  # a CR at the end of the data so far: the LF of a CRLF may still come
            end = cut + 2 if self._buffer.startswith("\r\n", cut) else cut + 1
            line, self._buffer = self._buffer[:cut], self._buffer[end:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        else:
            return None  # "retry" and unknown fields carry nothing we use
        self._pending = True
        return None

    def _dispatch(self) -> SSEEvent | None:
        self._pending = False
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(data="\n".join(data), event=event or "message", id=self._last_id)
