"""A small OpenAI-compatible chat client (stdlib only): retries with backoff, timeouts, bounded concurrency, and an API
key that never reaches a log line or an exception message.

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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ChatError(RuntimeError):
    """A chat request that failed for good (after retries when ``retryable``); the message never holds the key."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = attempts


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

    ``base_url`` ends before ``/chat/completions`` (``http://host:port/v1``). Transient failures (connection errors,
    timeouts, HTTP 408/409/425/429/5xx, an unreadable body) are retried ``max_retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds plus up to ``backoff`` of jitter, at most ``max_backoff``; a ``Retry-After``
    header wins when shorter than ``max_backoff``). At most ``concurrency`` requests are in flight per client,
    whatever the number of calling threads.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 default_params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if not model:
            raise ValueError("model must name the served model")
        if int(concurrency) < 1:
            raise ValueError(f"concurrency = {concurrency} must be >= 1")
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

    def _request(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._sem:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked above)
                    return resp.status, resp.read(), dict(resp.headers.items())
            except urllib.error.HTTPError as e:
                try:
                    data = e.read()
                except OSError:
                    data = b""
                return e.code, data, dict(e.headers.items()) if e.headers else {}

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> str:
        """Send one conversation and return the assistant's text; raise ChatError when it finally fails."""
        payload = {"model": self.model, "messages": list(messages), **self.default_params, **params}
        body = json.dumps(payload).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            delay: float | None = None
            try:
                status, data, headers = self._request(body)
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated bodies
                reason = getattr(e, "reason", e)
                last = self._redact(f"{type(e).__name__}: {reason}")
                retryable = True
            else:
                if status == 200:
                    try:
                        return _content(json.loads(data.decode("utf-8")))
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                        last = self._redact(f"unreadable response body ({type(e).__name__}: {e}): "
                                            f"{data[:200]!r}")
                        retryable = True
                else:
                    last = self._redact(f"HTTP {status}: {data[:300].decode('utf-8', 'replace')}")
                    retryable = status in RETRYABLE_STATUS
                    delay = _retry_after(headers)
                    if not retryable:
                        raise ChatError(f"{self.url}: {last}", status=status, retryable=False, attempts=attempt + 1)
            if attempt == self.max_retries:
                break
            wait = self.backoff * (2 ** attempt) + self._rng.uniform(0, self.backoff)
            if delay is not None:
                wait = delay
            wait = min(wait, self.max_backoff)
            logger.warning("chat request to %s failed (%s); retry %d/%d in %.1f s", self.url, last, attempt + 1,
                           self.max_retries, wait)
            if wait > 0:
                time.sleep(wait)
        raise ChatError(f"{self.url}: {last} (after {self.max_retries + 1} attempts)", retryable=True,
                        attempts=self.max_retries + 1)

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


def _content(resp: dict[str, Any]) -> str:
    """Assistant text of a chat completion (string content or a list of text parts)."""
    msg = resp["choices"][0]["message"]
    content = msg.get("content")
    if content is None:
        raise KeyError("message.content is null")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _retry_after(headers: dict[str, str]) -> float | None:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return None
    return None


__all__ = ["ChatClient", "ChatError", "image_to_data_url", "redact", "user_message"]
