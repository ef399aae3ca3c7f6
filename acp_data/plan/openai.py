"""``openai`` planner: the two-stage prompts sent to any OpenAI-compatible chat endpoint (vLLM, SGLang, Ollama,
OpenAI), through ``acp_data.http_client.ChatClient`` (timeouts, retries with backoff, bounded concurrency).

The API key is read from the environment variable named by ``api_key_env`` and never logged or stored in settings.
A request that still fails after the client's retries (timeouts, 5xx, unreadable bodies) is counted as a
``request_failed`` rejection of that unit; errors no retry can fix (401, 404: wrong key, model or URL) raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..generate.common import BackendOptionError, resolve_options
from ..stages import PlanResult, StageContext, WorkUnit
from .llm import CHAT_DEFAULTS, ChatPlanner, ChatReply

logger = logging.getLogger(__name__)

REQUEST_FAILED = "request_failed"

OPENAI_DEFAULTS: dict[str, Any] = {
    **CHAT_DEFAULTS,
    "api_key_env": None,  # name of the environment variable holding the key (None: no Authorization header)
    "timeout": 120.0,  # seconds per request
    "max_retries": 3,  # per request, for transient failures
    "backoff": 1.0,
    "max_backoff": 30.0,
    "concurrency": 8,  # requests in flight (plan_many runs that many units at once)
    "send_seed": True,  # pass the per-attempt seed (OpenAI, vLLM and SGLang honour it)
    "extra_params": {},  # more request fields, e.g. {"response_format": {"type": "json_object"}}
}
# Options that change how requests travel, not what the model writes: left out of the generation key.
_TRANSPORT = ("base_url", "api_key_env", "timeout", "max_retries", "backoff", "max_backoff", "concurrency")


class OpenAIPlanner(ChatPlanner):
    """Options: ``base_url`` (required, e.g. ``http://localhost:8000/v1``), ``model`` (required, the served model
    name), ``api_key_env``, ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``, ``concurrency``,
    ``send_seed``, ``extra_params``, plus the chat options (``retries``, ``shots``, ``temperature``, ``top_p``,
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
                concurrency=int(o["concurrency"]))
        except ValueError as e:
            raise BackendOptionError(f"planner openai: {e}") from None

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

        if isinstance(error, ChatError) and error.retryable:
            return REQUEST_FAILED
        return None

    def plan_many(self, units: Sequence[WorkUnit]) -> list[PlanResult]:
        """Plan units concurrently (``concurrency`` at a time); results in input order."""
        n = min(int(self.opts["concurrency"]), len(units))
        if n <= 1:
            return [self.plan(u) for u in units]
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="plan-openai") as pool:
            return list(pool.map(self.plan, units))
