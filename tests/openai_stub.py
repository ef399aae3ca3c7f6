"""A local OpenAI-compatible chat server for tests, scriptable per request.

    from openai_stub import OpenAIStub, Reply

    def answer(req, n):                      # req: the request JSON, n: 0-based request number
        return '{"score": 4}' if "judge" in OpenAIStub.text_of(req) else "a dog"

    with OpenAIStub(answer) as stub:         # 127.0.0.1, a free port, a daemon thread
        client = ChatClient(stub.url, "m")
        ...
        stub.requests                        # [(path, headers, json)] in arrival order

A responder returns the assistant text, or a ``Reply`` for anything else (HTTP status, a delay before answering, a
raw body, extra headers, a ``finish_reason``, a server that trickles its answer one byte at a time).
``stub.script(...)`` queues replies served first, in order, before the responder.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str | None = None
    status: int = 200
    delay: float = 0.0
    body: str | bytes | None = None  # raw body instead of a chat completion
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"
    trickle: float = 0.0  # > 0: send the response one byte every `trickle` seconds...
    trickle_after: int = 0  # ...after sending its first `trickle_after` bytes at once (0: from the status line)


Responder = Callable[[dict[str, Any], int], "str | Reply"]


class OpenAIStub:
    def __init__(self, responder: Responder | None = None, require_key: str | None = None) -> None:
        self.responder = responder or (lambda req, n: "ok")
        self.require_key = require_key
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.trickled = 0  # bytes sent one at a time by trickling replies
        self._queue: deque[str | Reply] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- helpers for responders and assertions ------------------------------------------------------------------
    @staticmethod
    def text_of(req: dict[str, Any]) -> str:
        """All text parts of all messages of a request, joined by newlines."""
        out = []
        for m in req.get("messages", []):
            c = m.get("content")
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out += [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(out)

    @staticmethod
    def images_of(req: dict[str, Any]) -> list[str]:
        """The image URLs (data URLs) of a request, in order."""
        out = []
        for m in req.get("messages", []):
            c = m.get("content")
            if isinstance(c, list):
                out += [p["image_url"]["url"] for p in c if isinstance(p, dict) and p.get("type") == "image_url"]
        return out

    def script(self, *replies: str | Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # ----- server -------------------------------------------------------------------------------------------------
    def _next(self, req: dict[str, Any]) -> Reply:
        with self._lock:
            n = len(self.requests) - 1
            queued = self._queue.popleft() if self._queue else None
        r = queued if queued is not None else self.responder(req, n)
        return r if isinstance(r, Reply) else Reply(content=str(r))

    def start(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    req = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    req = {"_raw": raw.decode("utf-8", "replace")}
                with stub._lock:
                    stub.requests.append((self.path, dict(self.headers.items()), req))
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, b'{"error": "not found"}', {})
                if stub.require_key and self.headers.get("Authorization") != f"Bearer {stub.require_key}":
                    return self._send(401, b'{"error": "bad key"}', {})
                r = stub._next(req)
                if r.delay:
                    time.sleep(r.delay)
                if r.body is not None:
                    body = r.body.encode() if isinstance(r.body, str) else r.body
                else:
                    body = json.dumps({
                        "id": f"stub-{len(stub.requests)}", "object": "chat.completion", "model": req.get("model"),
                        "choices": [{"index": 0, "finish_reason": r.finish_reason,
                                     "message": {"role": "assistant", "content": r.content}}],
                    }).encode()
                if r.trickle > 0:
                    return self._trickle(r.status, body, r.headers, r.trickle, r.trickle_after)
                self._send(r.status, body, r.headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and went away
                    pass

            def _trickle(self, status: int, body: bytes, headers: dict[str, str], every: float, after: int) -> None:
                head = [f"HTTP/1.1 {status} OK", "Content-Type: application/json", f"Content-Length: {len(body)}",
                        "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
                raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
                self.close_connection = True
                try:
                    self.wfile.write(raw[:after])
                    self.wfile.flush()
                    for i in range(after, len(raw)):
                        if stub._server is None:
                            return
                        time.sleep(every)
                        self.wfile.write(raw[i:i + 1])
                        self.wfile.flush()
                        with stub._lock:
                            stub.trickled += 1
                except OSError:  # the client gave up and closed the connection
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="openai-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class PeakConcurrency:
    """A responder that holds each request ``hold_s`` seconds and records the most requests it served at once
    (``peak``); ``answer(req)`` gives the reply text."""

    def __init__(self, answer: Callable[[dict[str, Any]], str], hold_s: float) -> None:
        self.answer, self.hold_s = answer, hold_s
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, req: dict[str, Any], n: int) -> str:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.hold_s)
        with self._lock:
            self.now -= 1
        return self.answer(req)
