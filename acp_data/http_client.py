"""A small OpenAI-compatible chat client (stdlib only): retries with backoff, an overall deadline per request, bounded
concurrency, and an API key that never reaches a log line or an exception message.

    client = ChatClient("http://localhost:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct", api_key_env="MY_KEY")
    text = client.chat([user_message("Describe the image.", images=[rgb_array])], max_tokens=64)

The key is read from the environment variable named by ``api_key_env`` (never from config files); without it no
``Authorization`` header is sent (local servers). Images travel as ``data:`` URLs inside ``image_url`` content parts.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Statuses that no request of this run can get past (wrong key, no such model or URL): callers stop the run.
FATAL_STATUS = frozenset({401, 403, 404, 405})
_CHUNK = 1 << 16


class ChatError(RuntimeError):
    """A chat request that failed for good (after retries when ``retryable``); the message never holds the key.

    ``fatal``: the endpoint refuses every request (HTTP 401/403/404/405: key, model or URL); otherwise the failure
    belongs to this request (retryable: timeouts, 5xx, 429 after the retries; or not: HTTP 400 such as "maximum
    context length exceeded", an oversized answer)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = attempts

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_STATUS


class _Expired(TimeoutError):
    """The request's overall deadline passed (however slowly the server was still sending)."""


@dataclass
class Completion:
    """One answer: the assistant's text and the server's ``finish_reason`` (``"length"``: cut at ``max_tokens``)."""

    text: str
    finish_reason: str | None = None


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``."""
    if secret and text:
        return text.replace(secret, "***")
    return text


def image_to_data_url(image: Any, fmt: str = "PNG", quality: int = 95) -> str:
    """An RGB image (H x W x 3 uint8 array or PIL image) as a ``data:image/...;base64,`` URL."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(_as_uint8_rgb(image))
    buf = io.BytesIO()
    fmt = fmt.upper()
    if fmt in ("JPG", "JPEG"):
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    else:
        img.save(buf, format="PNG")
        mime = "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _as_uint8_rgb(a: Any) -> Any:
    import numpy as np

    arr = np.asarray(a)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def user_message(text: str, images: Sequence[Any] = (), fmt: str = "PNG") -> dict[str, Any]:
    """An OpenAI ``user`` message: the images (arrays, PIL images or ready ``data:``/``http`` URLs) then the text."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = []
    for im in images:
        url = im if isinstance(im, str) else image_to_data_url(im, fmt=fmt)
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class ChatClient:
    """OpenAI-compatible ``/chat/completions`` client.

    ``base_url`` ends before ``/chat/completions`` (``http://host:port/v1``). ``timeout`` is the deadline of one
    request, from connecting to the last byte of the answer: a server that trickles its answer is cut off there
    (a watchdog shuts the socket; per-read socket timeouts alone never fire against one byte every few seconds).
    Transient failures (connection errors, deadlines, HTTP 408/409/425/429/5xx, an unreadable body) are retried
    ``max_retries`` times with exponential backoff (``backoff * 2**attempt`` seconds plus up to ``backoff`` of jitter,
    at most ``max_backoff``; a ``Retry-After`` header wins when shorter than ``max_backoff``). ``call_timeout``
    (None: no extra bound) caps one ``chat`` call, all attempts and waits included: an attempt gets the smaller of
    ``timeout`` and what is left. So one call takes at most ``min(call_timeout, (max_retries + 1) * timeout +
    max_retries * max_backoff)`` seconds (plus name resolution, which the OS bounds). Answers over
    ``max_response_bytes`` fail (not retried). At most ``concurrency`` requests are in flight per client, whatever
    the number of calling threads.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 default_params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                 call_timeout: float | None = None, max_response_bytes: int = 32 << 20) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if not model:
            raise ValueError("model must name the served model")
        if int(concurrency) < 1:
            raise ValueError(f"concurrency = {concurrency} must be >= 1")
        if not float(timeout) > 0:
            raise ValueError(f"timeout = {timeout} must be > 0 (seconds per request)")
        if call_timeout is not None and not float(call_timeout) > 0:
            raise ValueError(f"call_timeout = {call_timeout} must be > 0 or None")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env!r} (api_key_env) is not set or empty")
            self._key = key
        self.timeout = float(timeout)
        self.call_timeout = None if call_timeout is None else float(call_timeout)
        self.max_response_bytes = int(max_response_bytes)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self.default_params = dict(default_params or {})
        self.headers = dict(headers or {})
        self._sem = threading.BoundedSemaphore(self.concurrency)
        self._rng = random.Random(0)

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else "none"
        return f"ChatClient({self.base_url!r}, model={self.model!r}, key={key})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def settings(self) -> dict[str, Any]:
        """Provenance (no secrets): endpoint, model and request parameters."""
        return {"base_url": self.base_url, "model": self.model, "params": dict(self.default_params)}

    def _redact(self, text: str) -> str:
        return redact(text, self._key)

    def _request(self, body: bytes, deadline: float) -> tuple[int, bytes, dict[str, str]]:
        """POST ``body``; the status, body and headers of the answer, all of it before ``deadline`` (monotonic) or
        ``_Expired``."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        with self._sem:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Expired("no time left for this request")
            conn, path, extra = self._connection(left)
            expired = threading.Event()

            def cut() -> None:  # unblocks a read that is still trickling in at the deadline
                expired.set()
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            watchdog = threading.Timer(left, cut)
            watchdog.daemon = True
            watchdog.start()
            try:
                try:
                    conn.connect()  # bounded by the socket timeout (left), TLS handshake included
                    if expired.is_set():
                        raise _Expired(f"no connection within {self.timeout:g} s")
                    conn.request("POST", path, body=body, headers={**headers, **extra})
                    resp = conn.getresponse()
                    data = self._read(resp, conn, deadline)
                    if expired.is_set():
                        raise _Expired("deadline passed")
                    return resp.status, data, dict(resp.getheaders())
                except (OSError, http.client.HTTPException):
                    if expired.is_set():
                        raise _Expired(f"no complete answer within {self.timeout:g} s") from None
                    raise
            finally:
                watchdog.cancel()
                conn.close()

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection to the endpoint (through the environment's proxy, as urllib would), the request target and
        the proxy's headers."""
        u = urllib.parse.urlsplit(self.url)
        host, port = u.hostname or "", u.port
        path = u.path + (f"?{u.query}" if u.query else "")
        proxy = urllib.request.getproxies().get(u.scheme)
        if proxy and urllib.request.proxy_bypass(host):
            proxy = None
        if not proxy:
            if u.scheme == "https":
                return (http.client.HTTPSConnection(host, port, timeout=timeout,
                                                    context=ssl.create_default_context()), path, {})
            return http.client.HTTPConnection(host, port, timeout=timeout), path, {}
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        auth = {}
        if p.username:
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            auth = {"Proxy-Authorization": "Basic " + base64.b64encode(cred.encode()).decode("ascii")}
        if u.scheme == "https":  # CONNECT tunnel, then TLS to the endpoint
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                p.hostname or "", p.port, timeout=timeout, context=ssl.create_default_context())
            conn.set_tunnel(host, port, headers=auth)
            return conn, path, {}
        return http.client.HTTPConnection(p.hostname or "", p.port, timeout=timeout), self.url, auth

    def _read(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float) -> bytes:
        """The body in chunks, each read bounded by the time left; over ``max_response_bytes`` raises ChatError."""
        size = resp.getheader("Content-Length")
        if size and size.isdigit() and int(size) > self.max_response_bytes:
            raise ChatError(f"{self.url}: the answer is {int(size)} bytes, more than max_response_bytes = "
                            f"{self.max_response_bytes}", status=resp.status)
        parts: list[bytes] = []
        total = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Expired(f"no complete answer within {self.timeout:g} s")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read1(_CHUNK) if hasattr(resp, "read1") else resp.read(_CHUNK)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)
            if total > self.max_response_bytes:
                raise ChatError(f"{self.url}: the answer is longer than max_response_bytes = "
                                f"{self.max_response_bytes}", status=resp.status)

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> str:
        """Send one conversation and return the assistant's text; raise ChatError when it finally fails."""
        return self.complete(messages, **params).text

    def complete(self, messages: Sequence[dict[str, Any]], **params: Any) -> Completion:
        """Send one conversation and return the answer with its ``finish_reason``; raise ChatError when it finally
        fails (see the class docstring for retries and time bounds)."""
        payload = {"model": self.model, "messages": list(messages), **self.default_params, **params}
        body = json.dumps(payload).encode("utf-8")
        t0 = time.monotonic()
        end = None if self.call_timeout is None else t0 + self.call_timeout
        last = "no attempt"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            deadline = time.monotonic() + self.timeout
            if end is not None:
                deadline = min(deadline, end)
            delay: float | None = None
            attempts = attempt + 1
            try:
                status, data, headers = self._request(body, deadline)
            except _Expired as e:
                last = f"timed out: {e}"
            except (OSError, http.client.HTTPException) as e:  # refused, resets, socket timeouts, truncated bodies
                reason = getattr(e, "reason", e)
                last = self._redact(f"{type(e).__name__}: {reason}")
            else:
                if status == 200:
                    try:
                        return _completion(json.loads(data.decode("utf-8")))
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                        last = self._redact(f"unreadable response body ({type(e).__name__}: {e}): "
                                            f"{data[:200]!r}")
                else:
                    last = self._redact(f"HTTP {status}: {data[:300].decode('utf-8', 'replace')}")
                    delay = _retry_after(headers)
                    if status not in RETRYABLE_STATUS:
                        raise ChatError(f"{self.url}: {last}", status=status, retryable=False, attempts=attempts)
            if attempt == self.max_retries:
                break
            wait = self.backoff * (2 ** attempt) + self._rng.uniform(0, self.backoff)
            if delay is not None:
                wait = delay
            wait = min(wait, self.max_backoff)
            if end is not None and time.monotonic() + wait >= end:
                last += f"; call_timeout = {self.call_timeout:g} s spent"
                break
            logger.warning("chat request to %s failed (%s); retry %d/%d in %.1f s", self.url, last, attempt + 1,
                           self.max_retries, wait)
            if wait > 0:
                time.sleep(wait)
        raise ChatError(f"{self.url}: {last} (after {attempts} attempts, {time.monotonic() - t0:.1f} s)",
                        retryable=True, attempts=attempts)

    def chat_many(self, conversations: Sequence[Sequence[dict[str, Any]]],
                  **params: Any) -> list[str | ChatError]:
        """Run conversations concurrently (at most ``concurrency`` at a time); each result is the text or the
        ChatError it ended with, in input order."""
        def one(msgs: Sequence[dict[str, Any]]) -> str | ChatError:
            try:
                return self.chat(msgs, **params)
            except ChatError as e:
                return e

        if len(conversations) <= 1 or self.concurrency == 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))


def _completion(resp: dict[str, Any]) -> Completion:
    """Assistant text (string content or a list of text parts) and finish reason of a chat completion."""
    choice = resp["choices"][0]
    content = choice["message"].get("content")
    if content is None:
        raise KeyError("message.content is null")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reason = choice.get("finish_reason")
    return Completion(str(content), reason if isinstance(reason, str) else None)


def _retry_after(headers: dict[str, str]) -> float | None:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return None
    return None


__all__ = ["ChatClient", "ChatError", "Completion", "FATAL_STATUS", "image_to_data_url", "redact", "user_message"]
