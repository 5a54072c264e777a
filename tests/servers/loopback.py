"""A loopback HTTP server that speaks vLLM's and Cortex's wire formats, backed by a real tiny model.

Endpoints (stdlib ``http.server`` on 127.0.0.1, port 0, in a thread):

- ``POST /v1/completions``: vLLM's completions as built by ``vllm/entrypoints/openai/completion/serving.py``
  (``request_output_to_completion_response`` + ``_create_completion_logprobs``): prompt as token ids or
  text; ``echo``; ``logprobs=K`` -> ``{tokens, token_logprobs, top_logprobs, text_offset}`` with ``null`` at
  position 0 and up to K+1 entries (actual token first, then ranks 1..K); ``prompt_logprobs=K`` ->
  ``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``; ``return_tokens_as_token_ids`` ->
  ``"token_id:N"``; ``max_tokens=0`` with echo returns the prompt only; ``max_logprobs`` 20 -> 400 above.
  ``flavor="openai"``: OpenAI's legacy dialect instead (cap 5, token strings, unknown fields refused).
- ``POST /v1/chat/completions`` and ``/api/v2/cortex/v1/chat/completions``: chat completions (non-streaming).
- ``POST /api/v2/cortex/inference:complete``: Cortex's SSE stream, ``data: {"id", "model",
  "choices": [{"delta": {"content"}}], "usage"}`` events, in HTTP/1.1 chunks that split events.

Fault injection: :meth:`LoopbackServer.inject` queues actions for the next requests (``"500"``, ``"503"``,
``"429:<s>"``, ``"429-date:<epoch>"``, ``"hang"``, ``"drop"``, ``"malformed"``, ``"sse_cut"``,
``"sse_drop"``, ``"sse_error"``, ``"400"``); ``fraction_500`` fails a seeded random fraction; ``latency_s`` delays every
request. Every request is counted and logged (path, JSON body, headers) for assertions.

Adversarial faults (``tests/adversarial``): a response that breaks the wire format (:data:`BROKEN_COMPLETIONS`,
:data:`BROKEN_CHATS`, applied to the real response); ``"trickle"`` (the real response, one byte every
``trickle_s`` seconds, until it is sent or the client hangs up); ``"echo_headers"`` / ``"echo_headers_400"``
(a 500 / 400 whose body echoes the request headers, raw and URL-quoted, as a careless gateway does);
``"sse_eof"`` (the stream ends cleanly after an ordinary event: no ``[DONE]``, no ``finish_reason``);
``"sse_error_echo"`` (an SSE ``event: error`` echoing the request's Authorization header).

:class:`LoopbackServerProcess` runs a ``LoopbackServer`` in a child process (``spawn``), as a real vLLM server
runs apart from its client: for benchmarks, where a server thread would share the client's GIL.

``cache_completions=True`` makes ``/v1/completions`` compute each distinct request body once and then serve
the stored response, kept encoded (fresh ``id`` and ``created``), so a repeated request costs only its HTTP
handling and ``latency_s``: for benchmarks of a client's concurrency, where the tiny model's forward would
otherwise compete for the CPU.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import random
import socket
import threading
import time
import uuid
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import quote

from .tiny_lm import TinyLM

VLLM_MAX_LOGPROBS = 20
OPENAI_MAX_LOGPROBS = 5
# Completions responses that break the wire format: fault name -> what is done to the real response.
BROKEN_COMPLETIONS = (
    "lp_missing",  # a prompt_logprobs entry without its "logprob" (vLLM) / a null token_logprob (OpenAI)
    "lp_nan", "lp_inf", "lp_positive",  # a log-prob that is NaN, -inf, or 0.5
    "short_token_logprobs", "short_top_logprobs",  # a list shorter than "tokens"
    "wrong_echo_ids",  # the echoed prompt is not the ids that were sent
    "too_many_topk",  # a position with far more than k + 1 entries
    "no_choices",  # {"choices": []}
)
BROKEN_CHATS = ("chat_content_number", "no_choices")
OPENAI_COMPLETION_FIELDS = {
    "model", "prompt", "echo", "logprobs", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed",
    "best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix", "user",
}


class LoopbackServer:
    """Start with ``with LoopbackServer(...) as server``; ``server.url`` is ``http://127.0.0.1:<port>``."""

    def __init__(
        self,
        lm: TinyLM | None = None,
        *,
        flavor: str = "vllm",
        model_name: str = "tiny-teacher",
        api_key: str | None = None,
        cortex_tokens: dict[str, str] | None = None,
        latency_s: float = 0.0,
        fraction_500: float = 0.0,
        seed: int = 0,
        hang_s: float = 10.0,
        sse_variants: bool = False,
        sse_done: bool = True,
        sse_chunk_bytes: int = 13,
        cache_completions: bool = False,
        trickle_s: float = 0.05,
    ) -> None:
        if flavor not in ("vllm", "openai"):
            raise ValueError(flavor)
        self.lm = lm or TinyLM()
        self.flavor = flavor
        self.model_name = model_name
        self.api_key = api_key
        self.cortex_tokens = dict(cortex_tokens or {})
        self.latency_s = latency_s
        self.fraction_500 = fraction_500
        self.hang_s = hang_s
        self.sse_variants = sse_variants
        self.sse_done = sse_done
        self.sse_chunk_bytes = sse_chunk_bytes
        self.cache_completions = cache_completions
        self.trickle_s = trickle_s
        self.completions_computed = 0  # /v1/completions responses actually computed (cache misses included)
        self._completion_cache: dict[str, tuple[int, bytes]] = {}
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.log: list[dict[str, Any]] = []
        self._faults: deque[str] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def inject(self, *actions: str) -> None:
        with self._lock:
            self._faults.extend(actions)

    def clear_faults(self) -> None:
        """Drop the injected faults not yet used (a call that failed for good leaves some queued)."""
        with self._lock:
            self._faults.clear()

    def requests_to(self, path: str) -> int:
        with self._lock:
            return self.counts[path]

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def _record(self, path: str, body: Any, headers: dict[str, str]) -> str | None:
        with self._lock:
            self.counts[path] += 1
            self.log.append({"path": path, "body": body, "headers": headers})
            if self._faults:
                return self._faults.popleft()
            if self.fraction_500 and self._rng.random() < self.fraction_500:
                return "500"
        return None

    # ------------------------------------------------------------ vLLM / OpenAI completions

    def completions(self, body: dict[str, Any]) -> tuple[int, bytes]:
        """Status and JSON body of a ``/v1/completions`` response."""
        if not self.cache_completions:
            status, payload = self._compute_completions(body)
            return status, json.dumps(payload).encode()
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            hit = self._completion_cache.get(key)
        if hit is None:
            status, payload = self._compute_completions(body)
            # Stored encoded, without the envelope (id, created) that is fresh per response: a hit then costs no
            # encoding of the log-prob blocks (~0.6 ms for a 30-token top-8 row, half the server's CPU per hit).
            hit = status, json.dumps({k: v for k, v in payload.items() if k not in ("id", "created")}).encode()
            with self._lock:
                self._completion_cache[key] = hit
        status, data = hit
        if status != 200:
            return status, data
        envelope = f'{{"id": "cmpl-{uuid.uuid4().hex}", "created": {int(time.time())}, '.encode()
        return status, envelope + data[1:]

    def _compute_completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.completions_computed += 1
        cap = VLLM_MAX_LOGPROBS if self.flavor == "vllm" else OPENAI_MAX_LOGPROBS
        if self.flavor == "openai":
            unknown = sorted(set(body) - OPENAI_COMPLETION_FIELDS)
            if unknown:
                return 400, _error(f"Unrecognized request argument supplied: {unknown[0]}", "invalid_request_error")
        k = body.get("logprobs")
        pk = body.get("prompt_logprobs")
        for name, value in (("sample", k), ("prompt", pk)):
            if value is not None and value > cap:
                return 400, _error(f"Requested {name} logprobs of {value}, which is greater than max allowed: {cap}")
        tok = self.lm.tokenizer
        prompt = body["prompt"]
        if isinstance(prompt, str):
            add_special = body.get("add_special_tokens", True) if self.flavor == "vllm" else False
            ids = tok(prompt, add_special_tokens=add_special)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        max_tokens = body.get("max_tokens", 16)
        echo = bool(body.get("echo"))
        generated = self.lm.generate(ids, max_tokens, float(body.get("temperature") or 0.0)) if max_tokens else []
        full = ids + generated
        rows = self.lm.next_token_logprobs(full)  # rows[i] predicts full[i + 1]
        as_ids = bool(body.get("return_tokens_as_token_ids")) and self.flavor == "vllm"

        decoded = self.lm.decoded

        @functools.cache  # echo logprobs and prompt_logprobs read the same positions
        def position(i: int, n: int) -> dict[int, dict[str, Any]] | None:
            """vLLM's per-position dict: the actual token (with its vocab rank) first, then ranks 1..n."""
            if i == 0:
                return None
            row = rows[i - 1]
            actual = full[i]
            entries = {actual: {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                "decoded_token": decoded[actual]}}
            if n > 0:
                top = row.topk(n)
                for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                    entries[tid] = {"logprob": lp, "rank": rank, "decoded_token": decoded[tid]}
            return entries

        positions = range(len(ids)) if echo and max_tokens == 0 else (
            range(len(full)) if echo else range(len(ids), len(full)))
        logprobs = None
        if k is not None:
            name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: decoded[t])
            logprobs = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
            offset = 0
            for i in positions:
                entry = position(i, k)
                token = name(full[i])
                logprobs["tokens"].append(token)
                logprobs["token_logprobs"].append(None if entry is None else max(entry[full[i]]["logprob"], -9999.0))
                logprobs["top_logprobs"].append(
                    None if entry is None else {name(t): max(e["logprob"], -9999.0) for t, e in entry.items()})
                logprobs["text_offset"].append(offset)
                offset += len(token)
        text_ids = [full[i] for i in positions]
        choice: dict[str, Any] = {"index": 0, "text": tok.decode(text_ids), "logprobs": logprobs,
                                  "finish_reason": "length"}
        if self.flavor == "vllm":
            choice["stop_reason"] = None
            choice["prompt_logprobs"] = (
                [None if (e := position(i, pk)) is None else {str(t): v for t, v in e.items()} for i in range(len(ids))]
                if pk is not None else None
            )
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                 "total_tokens": len(ids) + len(generated)}
        return 200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": self.model_name, "choices": [choice], "usage": usage}

    def broken_completions(self, body: dict[str, Any], fault: str) -> tuple[int, dict[str, Any]]:
        """The real response to ``body`` with one wire-format defect (``fault`` in :data:`BROKEN_COMPLETIONS`),
        placed at the last position, which is always a scored completion position."""
        status, payload = self._compute_completions(body)
        if status != 200:
            return status, payload
        if fault == "no_choices":
            return status, {**payload, "choices": []}
        choice = payload["choices"][0]
        prompt_lp, block = choice.get("prompt_logprobs"), choice.get("logprobs")
        last = len(body["prompt"]) - 1 if isinstance(body["prompt"], list) else -1
        if fault == "wrong_echo_ids":
            if prompt_lp is not None:  # vLLM: the position scored a token id that was not sent
                entry = prompt_lp[last]
                (tid, info), *rest = entry.items()
                prompt_lp[last] = {str(int(tid) + 1 if str(int(tid) + 1) not in entry else int(tid) + 2): info,
                                   **dict(rest)}
            if block is not None:
                block["tokens"][last] = block["tokens"][last - 1] if block["tokens"][last - 1] != block["tokens"][
                    last] else block["tokens"][last - 2]
            return status, payload
        if fault in ("short_token_logprobs", "short_top_logprobs"):
            key = "token_logprobs" if fault == "short_token_logprobs" else "top_logprobs"
            block[key] = block[key][:-2]
            return status, payload
        bad = {"lp_missing": None, "lp_nan": float("nan"), "lp_inf": float("-inf"), "lp_positive": 0.5}
        if fault in bad:
            if prompt_lp is not None:
                info = next(iter(prompt_lp[last].values()))
                if fault == "lp_missing":
                    del info["logprob"]
                else:
                    info["logprob"] = bad[fault]
            else:
                block["token_logprobs"][last] = bad[fault]
            return status, payload
        if fault == "too_many_topk":
            k = body.get("logprobs") or 0
            extra = {str(10_000 + i): {"logprob": -50.0, "rank": 1000 + i, "decoded_token": "x"} for i in range(k + 3)}
            if prompt_lp is not None:
                prompt_lp[last].update(extra)
            else:
                block["top_logprobs"][last].update({f"zz{i}": -50.0 for i in range(k + 3)})
            return status, payload
        raise ValueError(f"unknown completions fault {fault!r}")

    # ------------------------------------------------------------ chat completions

    def generated_text(
        self, messages: list[dict], max_tokens: int, temperature: float, seed: int
    ) -> tuple[str, int, int]:
        ids = self.lm.chat_ids(messages)
        out = self.lm.generate(ids, max_tokens, temperature, seed=seed)
        return self.lm.tokenizer.decode(out, skip_special_tokens=True), len(ids), len(out)

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index in range(int(body.get("n") or 1)):
            text, prompt_tokens, n_out = self.generated_text(
                body["messages"], int(body.get("max_tokens") or 16), float(body.get("temperature") or 0.0), seed=index)
            completion_tokens += n_out
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": "length"})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return 200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.model_name, "choices": choices, "usage": usage}

    # ------------------------------------------------------------ Cortex SSE

    def cortex_events(self, body: dict[str, Any]) -> list[str]:
        """The SSE text of one Cortex completion: one event per generated word."""
        ids = self.lm.chat_ids(body["messages"])
        out = self.lm.generate(ids, int(body.get("max_tokens") or 16), float(body.get("temperature") or 0.0))
        words = [w for w in (self.lm.tokenizer.decode([t], skip_special_tokens=True) for t in out) if w]
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)] or [""]
        request_id = str(uuid.uuid4())
        events = []
        for i, piece in enumerate(pieces):
            usage = {"prompt_tokens": len(ids), "completion_tokens": i + 1, "total_tokens": len(ids) + i + 1}
            payload = {"id": request_id, "model": body["model"], "choices": [{"delta": {"content": piece}}],
                       "usage": usage}
            data = json.dumps(payload)
            if self.sse_variants and i == 0:
                head, tail = data.split(", ", 1)  # one JSON value over two data lines
                events.append(f": ping\ndata: {head},\ndata:{tail}\n\n")
            elif self.sse_variants and i == 1:
                events.append(f"data: {data}\r\n\r\n")
            else:
                events.append(f"data: {data}\n\n")
        if self.sse_done:
            events.append("data: [DONE]\n\n")
        else:  # the other accepted end: a final chunk with a finish_reason, then the body ends
            final = {"id": request_id, "model": body["model"], "choices": [{"delta": {}, "finish_reason": "stop"}]}
            events.append(f"data: {json.dumps(final)}\n\n")
        return events

    def cortex_authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if auth.startswith("Snowflake Token="):
            return auth == f'Snowflake Token="{self.cortex_tokens.get("SESSION")}"'
        kind = headers.get("x-snowflake-authorization-token-type", "OAUTH")  # OAUTH is the documented default
        return auth.startswith("Bearer ") and self.cortex_tokens.get(kind) == auth[len("Bearer "):]


class LoopbackServerProcess:
    """A :class:`LoopbackServer` over a fresh ``TinyLM(lm_seed)`` in its own process; ``kwargs`` go to the server.

    ``with LoopbackServerProcess(latency_s=0.05) as server``: ``server.url`` and ``server.model_name`` as for
    ``LoopbackServer``; any other attribute of the server (e.g. ``completions_computed``, ``total_requests``)
    is read from the child on access. Fault injection and the request log stay in the child.
    """

    def __init__(self, *, lm_seed: int = 0, start_timeout_s: float = 120.0, **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads and torch
        self._conn, child_conn = context.Pipe()
        self._child_conn = child_conn
        self._process = context.Process(target=_serve, args=(child_conn, lm_seed, kwargs), daemon=True)
        self._start_timeout_s = start_timeout_s
        self._ask_lock = threading.Lock()  # one question and its answer at a time on the pipe
        self.url = self.model_name = None

    def __enter__(self) -> LoopbackServerProcess:
        self._process.start()
        self._child_conn.close()
        try:
            if not self._conn.poll(self._start_timeout_s):
                raise RuntimeError(f"the loopback server process did not start within {self._start_timeout_s:g}s")
            self.url, self.model_name = self._conn.recv()
        except EOFError:
            self.__exit__()
            raise RuntimeError(f"the loopback server process exited (code {self._process.exitcode}) before serving; "
                               "spawn needs an importable __main__ (a script, not stdin)") from None
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._process.is_alive():
            raise AttributeError(f"{name}: the server process is not running")
        with self._ask_lock:
            self._conn.send(name)
            ok, value = self._conn.recv()
        if not ok:
            raise AttributeError(value)
        return value

    def __exit__(self, *exc: Any) -> None:
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._conn.close()


def _serve(conn: Connection, lm_seed: int, kwargs: dict[str, Any]) -> None:
    """The child of :class:`LoopbackServerProcess`: serve until the parent sends ``None`` or goes away."""
    with LoopbackServer(TinyLM(seed=lm_seed), **kwargs) as server:
        conn.send((server.url, server.model_name))
        while True:
            try:
                name = conn.recv()
            except EOFError:
                return
            if name is None:
                return
            try:
                conn.send((True, getattr(server, name)))
            except AttributeError as err:
                conn.send((False, str(err)))


def _error(message: str, kind: str = "BadRequestError", code: int = 400) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _make_handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def setup(self) -> None:
            super().setup()
            # Small SSE chunks must not wait for delayed ACKs (Nagle), or each costs ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = None
            fault = server._record(self.path, body, headers)
            if server.latency_s:
                server.stop.wait(server.latency_s)
            self.trickle = fault == "trickle"
            if fault is not None and self._fault(fault, headers):
                return
            if body is None:
                return self._json(400, _error("body is not JSON"))
            try:
                self._route(body, headers, fault)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _route(self, body: dict[str, Any], headers: dict[str, str], fault: str | None) -> None:
            path = self.path
            if path in ("/v1/completions", "/v1/chat/completions"):
                if server.api_key is not None and headers.get("authorization") != f"Bearer {server.api_key}":
                    return self._json(401, _error("Incorrect API key provided.", "invalid_request_error", 401))
                if path == "/v1/completions":
                    if fault in BROKEN_COMPLETIONS:
                        return self._json(*server.broken_completions(body, fault))
                    return self._raw(*server.completions(body), "application/json")
                return self._chat(body, fault)
            if path == "/api/v2/cortex/v1/chat/completions":
                if headers.get("authorization") != f"Bearer {server.cortex_tokens.get('PROGRAMMATIC_ACCESS_TOKEN')}":
                    return self._json(401, {"code": "390303", "message": "Invalid programmatic access token."})
                return self._chat(body, fault)
            if path == "/api/v2/cortex/inference:complete":
                if not server.cortex_authorized(headers):
                    return self._json(401, {"code": "390303", "message": "Invalid OAuth access token."})
                return self._sse(server.cortex_events(body), fault)
            self._json(404, _error(f"no route {path}", code=404))

        def _chat(self, body: dict[str, Any], fault: str | None) -> None:
            status, payload = server.chat(body)
            if fault == "no_choices":
                payload["choices"] = []
            elif fault == "chat_content_number":
                payload["choices"][0]["message"]["content"] = 42
            self._json(status, payload)

        def _fault(self, fault: str, headers: dict[str, str]) -> bool:
            """Apply a fault; True if the response is complete (or deliberately absent)."""
            if fault in ("echo_headers", "echo_headers_400"):
                echoed = json.dumps(headers)
                message = f"gateway error; request headers: {echoed}; quoted: {quote(echoed, safe='')}"
                code = 400 if fault == "echo_headers_400" else 500
                self._json(code, _error(message, code=code))
            elif fault in ("500", "503", "400"):
                self._json(int(fault), _error("injected failure", code=int(fault)))
            elif fault.startswith("429"):
                kind, _, value = fault.partition(":")
                retry_after = (time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(float(value)))
                               if kind == "429-date" else value)
                self._json(429, _error("rate limited", code=429), {"Retry-After": retry_after})
            elif fault == "hang":
                server.stop.wait(server.hang_s)
                self.close_connection = True
            elif fault == "drop":
                self.close_connection = True
            elif fault == "malformed":
                self._raw(200, b'{"id": "cmpl-1", "choices": [{"index": 0, "text"', "application/json")
            else:
                return False  # sse_cut / sse_drop / sse_error apply inside the stream
            return True

        def _json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            self._raw(status, json.dumps(payload).encode(), "application/json", extra)

        def _raw(self, status: int, data: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self._write(data)

        def _write(self, data: bytes) -> None:
            """All of ``data``; under the "trickle" fault one byte per ``trickle_s`` until done, the client hangs
            up or the server stops (at most ``len(data)`` steps)."""
            if not getattr(self, "trickle", False):
                self.wfile.write(data)
                return
            for i in range(len(data)):
                if server.stop.is_set():
                    return
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                server.stop.wait(server.trickle_s)

        def _sse(self, events: list[str], fault: str | None) -> None:
            data = "".join(events).encode()
            if fault in ("sse_cut", "sse_drop"):
                data = events[0].encode() + b'data: {"id": "x", "choices": [{"delta": {"cont'
            elif fault == "sse_error":  # snowflake-ml-python's MidStreamException case
                data = events[0].encode() + b'data: {"error": {"message": "model overloaded"}}\n\n'
            elif fault == "sse_eof":  # ends cleanly after an ordinary delta: neither [DONE] nor a finish_reason
                ordinary = [e for e in events if "[DONE]" not in e and "finish_reason" not in e]
                data = "".join(ordinary[:2]).encode()
            elif fault == "sse_error_echo":
                auth = self.headers.get("Authorization", "")
                data = events[0].encode() + f"event: error\ndata: rejected request with {auth}\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            step = 1 if getattr(self, "trickle", False) else server.sse_chunk_bytes
            for start in range(0, len(data), step):
                piece = data[start:start + step]
                self.wfile.write(f"{len(piece):X}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
                if getattr(self, "trickle", False):
                    if server.stop.wait(server.trickle_s):
                        return
            if fault == "sse_drop":
                self.close_connection = True  # no terminating chunk: the connection just ends
                return
            self.wfile.write(b"0\r\n\r\n")

    return Handler
