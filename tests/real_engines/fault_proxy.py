"""A fault-injecting HTTP proxy in front of a real server, so the teacher's retries meet real responses.

Every request is forwarded to ``upstream`` unchanged and the real response is returned, unless a fault was
queued with :meth:`FaultProxy.inject`; each queued fault answers one request, in order:

- ``"500"`` / ``"503"``: that status with a JSON error body, the request is not forwarded.
- ``"429"``: 429 with ``Retry-After: 0``, not forwarded.
- ``"reset"``: the connection is closed without a response (the client sees a reset / remote disconnect).
- ``"truncate"``: forwarded; the real body is cut in half, sent with the full ``Content-Length``, then the
  connection closes (an incomplete body).
- ``"wrong_shape"``: forwarded; the real JSON loses the last entry of ``prompt_logprobs`` and of
  ``logprobs.token_logprobs``, and a chat ``message.content`` becomes the number 42 (valid JSON in the wrong
  format: a client that cached before checking would store it).

``forwarded`` counts the requests that reached the real server; ``log`` holds ``(path, fault or None)``.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "429", "reset", "truncate", "wrong_shape")


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:8000") as proxy``: ``proxy.url`` replaces the upstream's base URL."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self.forwarded = 0
        self.log: list[tuple[str, str | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            self.log.append((path, fault))
            return fault

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            with self._lock:
                self.forwarded += 1
            return response.status, response.getheaders(), data
        finally:
            connection.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      content_length: int | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def _proxy(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.path)
                if fault in ("500", "503"):
                    return self._send(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "injected 429"}}', {"Retry-After": "0"})
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                status, upstream_headers, data = proxy._forward(self.command, self.path, headers, body)
                if fault == "truncate":
                    self.close_connection = True
                    return self._send(status, data[: len(data) // 2], content_length=len(data))
                if fault == "wrong_shape":
                    data = json.dumps(break_shape(json.loads(data))).encode()
                passed = {k: v for k, v in upstream_headers
                          if k.lower() not in ("content-length", "content-type", "transfer-encoding", "connection")}
                return self._send(status, data, passed)

            do_GET = do_POST = _proxy

        return Handler


def break_shape(response: dict) -> dict:
    """The ``wrong_shape`` fault: a list one entry short, or a number where text belongs, in every choice."""
    for choice in response.get("choices") or []:
        if isinstance(choice.get("prompt_logprobs"), list):
            choice["prompt_logprobs"].pop()
        if isinstance(choice.get("logprobs"), dict) and isinstance(choice["logprobs"].get("token_logprobs"), list):
            choice["logprobs"]["token_logprobs"].pop()
        if isinstance(choice.get("message"), dict):
            choice["message"]["content"] = 42
    return response
