"""A STUB PRM judge for the arithmetic world, served over the OpenAI chat-completions wire format.

THIS IS A STUB, NOT A LEARNED OR LLM JUDGE. Its step verdicts come from checking arithmetic, so it
stands in for a real judge model in offline tests, the demo and the calibration/RS-SFT commands, and it
exercises the real judge client path (prompt building, the ``openai`` client, strict reply parsing,
retries and caches) end to end. Calibrating it measures how well *step-level arithmetic checks* predict
the verifier, not how good any LLM judge is.

Verdicts (:func:`arithmetic_step_verdicts`), one per step:

- an equation line ``a op b = c`` (``op`` in ``+ - * x /``) is correct when ``a op b == c`` and, after the
  first equation, ``a`` is the previous line's stated result (the solution chains its results);
- a final-answer line ``#### N`` is correct when ``N`` equals the previous equation's stated result;
- anything else (prose, a number alone, an answer with no equation before it) is 0: the stub cannot check it.

It does not read the question, so a solution that is consistent but starts from the wrong number, or
stops a step early, passes every step while the verifier says it is wrong: the stub is an imperfect PRM,
which is what calibration is for.

:class:`StubJudgeServer` is a small stdlib HTTP server (``POST /v1/chat/completions`` on 127.0.0.1) whose
reply text comes from a ``responder(body) -> str`` callback; the default responder parses the judge prompt
(:func:`harness.prm.parse_judge_messages`) and answers ``{"steps": [...]}``. Tests pass other responders
(malformed replies, scripted ensembles) and read the per-path request counters.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness.prm import StubJudge, parse_judge_messages

STUB_MODEL = "arithmetic-stub-judge"
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_EQUATION = re.compile(rf"^\s*({_NUMBER})\s*([-+*x/\u00d7\u00f7])\s*({_NUMBER})\s*=\s*({_NUMBER})\s*\.?\s*$")
_ANSWER = re.compile(rf"^\s*####\s*({_NUMBER})\s*\.?\s*$")


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def _apply(a: float, op: str, b: float) -> float | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", "x", "\u00d7"):
        return a * b
    return a / b if b else None


def arithmetic_step_verdicts(steps: Sequence[str]) -> list[int]:
    """One 0/1 per step from arithmetic alone (module docstring)."""
    verdicts, previous = [], None
    for step in steps:
        equation, answer = _EQUATION.match(step), _ANSWER.match(step)
        if equation:
            a, op, b, c = equation.groups()
            result = _apply(_value(a), op, _value(b))
            chained = previous is None or _value(a) == previous
            verdicts.append(int(result is not None and abs(result - _value(c)) < 1e-9 and chained))
            previous = _value(c)
        elif answer:
            verdicts.append(int(previous is not None and _value(answer.group(1)) == previous))
        else:
            verdicts.append(0)
    return verdicts


def stub_judge_reply(body: dict[str, Any]) -> str:
    """The stub's reply to a judge request: ``{"steps": [...]}`` for the steps in the judge prompt."""
    _, steps, probabilities = parse_judge_messages(body["messages"])
    verdicts = arithmetic_step_verdicts(steps)
    return json.dumps({"steps": [float(v) for v in verdicts] if probabilities else verdicts})


class StubJudgeServer:
    """Loopback chat-completions server; use as ``with StubJudgeServer() as server: server.url``."""

    def __init__(self, responder: Callable[[dict[str, Any]], str] = stub_judge_reply, *,
                 model_name: str = STUB_MODEL) -> None:
        self.responder = responder
        self.model_name = model_name
        self.counts: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def __enter__(self) -> StubJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _record(self, path: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.counts[path] += 1
            self.bodies.append(body)

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text = self.responder(body)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def _handler(server: StubJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep command and test output quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return self._json(400, {"error": {"message": "body is not JSON", "code": 400}})
            server._record(self.path, body)
            if self.path not in CHAT_PATHS:
                return self._json(404, {"error": {"message": f"no route {self.path}", "code": 404}})
            try:
                payload = server.completion(body)
            except (KeyError, ValueError) as err:
                return self._json(400, {"error": {"message": f"not a judge request: {err}", "code": 400}})
            self._json(200, payload)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def serve_stub_judge(responder: Callable[[dict[str, Any]], str] = stub_judge_reply) -> Iterator[str]:
    """The stub judge's base URL (without ``/v1``) for the duration of the block."""
    with StubJudgeServer(responder) as server:
        yield server.url


STUB_JUDGE = StubJudge(STUB_MODEL, serve_stub_judge)  # what ``--judge stub`` serves in the world's commands
