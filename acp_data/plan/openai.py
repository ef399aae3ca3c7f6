"""``openai`` planner: the two-stage prompts sent to any OpenAI-compatible chat endpoint (vLLM, SGLang, Ollama,
OpenAI), through ``acp_data.http_client.ChatClient`` (timeouts, retries with backoff, bounded concurrency).

The API key is read from the environment variable named by ``api_key_env`` and never logged or stored in settings.
``load()`` (called by prebuild before the first unit) sends one tiny request: a wrong key (401/403), model or URL
(404), parameters the server refuses, or an endpoint that does not answer stop the run there, once, with a message
saying which. Later failures end just their unit, counted by reason: ``request_failed`` (timeouts, 5xx, unreadable
bodies after the client's retries; retried by the next run), ``bad_request`` (HTTP 400/413/422..., e.g. "maximum
context length exceeded"), ``too_long`` (an answer over the client's size cap). Only 401/403/404/405 raise.
Time bounds: docs/prebuild.md "LLM answers: shapes, repairs, rejections".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..generate.common import BackendOptionError, resolve_options
from ..stages import PlanResult, StageContext, WorkUnit
from .llm import CHAT_DEFAULTS, ChatPlanner, ChatReply
from .parse import TOO_LONG

logger = logging.getLogger(__name__)

REQUEST_FAILED = "request_failed"
BAD_REQUEST = "bad_request"

OPENAI_DEFAULTS: dict[str, Any] = {
    **CHAT_DEFAULTS,
    "api_key_env": None,  # name of the environment variable holding the key (None: no Authorization header)
    "timeout": 60.0,  # seconds for one request, connection to last byte (a trickling server is cut off)
    "max_retries": 3,  # per request, for transient failures
    "backoff": 1.0,
    "max_backoff": 30.0,
    "call_timeout": 120.0,  # seconds for one request with all its retries and waits (null: no bound beyond those)
    "startup_check": True,  # one tiny request in load(): a wrong key, model or URL stops the run before any unit
    "concurrency": 8,  # requests in flight (plan_many runs that many units at once)
    "send_seed": True,  # pass the per-attempt seed (OpenAI, vLLM and SGLang honour it)
    "extra_params": {},  # more request fields, e.g. {"response_format": {"type": "json_object"}}
}
# Options that change how requests travel, not what the model writes: left out of the generation key.
_TRANSPORT = ("base_url", "api_key_env", "timeout", "max_retries", "backoff", "max_backoff", "call_timeout",
              "concurrency", "startup_check")
_CHECK_PROMPT = 'This is a connection check. Answer with the JSON {"ok": true} and nothing else.'


class OpenAIPlanner(ChatPlanner):
    """Options: ``base_url`` (required, e.g. ``http://localhost:8000/v1``), ``model`` (required, the served model
    name), ``api_key_env``, ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``, ``call_timeout``,
    ``concurrency``, ``startup_check``, ``send_seed``, ``extra_params``, plus the chat options (``retries``, ``shots``, ``temperature``, ``top_p``,
    ``max_tokens_description``, ``max_tokens_layout``, ``system_role``)."""

    DEFAULTS = OPENAI_DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        from ..http_client import ChatClient

        o = resolve_options("planner openai", options, OPENAI_DEFAULTS, required=("base_url", "model"))
        if not isinstance(o["extra_params"], dict):
            raise BackendOptionError("planner openai: extra_params must be a mapping of request fields")
        self.opts = o
        try:
            self.client = ChatClient(
                str(o["base_url"]), str(o["model"]), api_key_env=o["api_key_env"], timeout=float(o["timeout"]),
                max_retries=int(o["max_retries"]), backoff=float(o["backoff"]), max_backoff=float(o["max_backoff"]),
                concurrency=int(o["concurrency"]),
                call_timeout=None if o["call_timeout"] is None else float(o["call_timeout"]))
        except (TypeError, ValueError) as e:
            raise BackendOptionError(f"planner openai: {e}") from None
        self._checked = False

    def load(self) -> None:
        """The start-up check (once): one tiny request with this planner's parameters. Raises ChatError with a
        message naming the cause when the endpoint refuses it or does not answer."""
        if self._checked or not self.opts["startup_check"]:
            return
        from ..http_client import ChatError

        c = self.client
        try:
            self.chat([{"role": "user", "content": _CHECK_PROMPT}], seed=0, max_tokens=8)
        except ChatError as e:
            if e.status in (401, 403):
                hint = (f"the key in ${c.api_key_env} (api_key_env)" if c.api_key_env else
                        "api_key_env: the endpoint wants a key and none is sent")
                hint = f"check {hint}"
            elif e.status in (404, 405):
                hint = f"check model {c.model!r} (the served model name) and base_url {c.base_url!r}"
            elif e.retryable:
                hint = "is the server up and reachable from this host?"
            else:
                hint = "every unit's requests carry these parameters: check extra_params, send_seed, temperature"
            raise ChatError(f"planner openai: the start-up check request failed ({e}); {hint}", status=e.status,
                            retryable=e.retryable, attempts=e.attempts) from None
        self._checked = True

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        for k in _TRANSPORT:
            s.pop(k, None)
        return s

    def chat(self, messages: list[dict[str, str]], seed: int, max_tokens: int) -> ChatReply:
        o = self.opts
        params: dict[str, Any] = {"max_tokens": int(max_tokens), "temperature": float(o["temperature"]),
                                  "top_p": float(o["top_p"]), **o["extra_params"]}
        if o["send_seed"]:
            params["seed"] = int(seed)
        done = self.client.complete(messages, **params)
        return ChatReply(done.text, done.finish_reason)

    def failure_reason(self, error: Exception) -> str | None:
        from ..http_client import ChatError

        if not isinstance(error, ChatError) or error.fatal:
            return None
        if error.retryable:
            return REQUEST_FAILED
        return TOO_LONG if error.status == 200 else BAD_REQUEST

    def plan_many(self, units: Sequence[WorkUnit]) -> list[PlanResult]:
        """Plan units concurrently (``concurrency`` at a time); results in input order."""
        n = min(int(self.opts["concurrency"]), len(units))
        if n <= 1:
            return [self.plan(u) for u in units]
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="plan-openai") as pool:
            return list(pool.map(self.plan, units))
