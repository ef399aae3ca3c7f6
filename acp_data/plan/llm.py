"""The paper's two-stage LLM planner over any chat backend: description, then layout, each retried up to
``retries`` times with the validation problems fed back; every rejected answer counted by reason.

Subclasses implement ``chat(messages, seed, max_tokens) -> ChatReply`` (``hf``: a local transformers model;
``openai``: an OpenAI-compatible endpoint).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from ..stages import Planner, PlanResult, StageContext, WorkUnit
from . import prompts
from .common import attempt_seed, requested_objects
from .parse import TOO_LONG, TRUNCATED, Verdict, parse_description, parse_layout

logger = logging.getLogger(__name__)

__all__ = ["ChatReply", "ChatPlanner", "CHAT_DEFAULTS"]

# Options every chat planner understands (subclasses add their own).
CHAT_DEFAULTS: dict[str, Any] = {
    "retries": 2,  # extra attempts per stage after a rejected answer
    "shots": len(prompts.EXAMPLES),  # in-context examples per stage
    "system_role": True,  # False for chat templates without a system role
    "temperature": 0.7,
    "top_p": 0.95,
    "max_tokens_description": 600,
    "max_tokens_layout": 400,
}


@dataclass
class ChatReply:
    """One model answer; ``finish_reason`` is ``"length"`` when the token limit cut it off."""

    text: str
    finish_reason: str | None = None


class ChatPlanner(Planner):
    """Two-stage planning over ``self.chat``; options are checked by the subclass (``self.opts``)."""

    opts: dict[str, Any]

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)

    @abstractmethod
    def chat(self, messages: list[dict[str, str]], seed: int, max_tokens: int) -> ChatReply:
        """Answer the conversation (sampling seeded by ``seed`` where the backend allows it)."""

    def failure_reason(self, error: Exception) -> str | None:
        """The rejection reason to count when ``chat`` raises ``error`` (the unit is then given up), or None to let
        the error propagate (configuration errors that no retry can fix)."""
        return None

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "prompt_version": prompts.PROMPT_VERSION, **self.opts}

    def _stage(self, result: PlanResult, stage: str, base: list[dict[str, str]], unit: WorkUnit, max_tokens: int,
               parse: Any) -> Verdict | None:
        messages = base
        for attempt in range(1 + int(self.opts["retries"])):
            try:
                reply = self.chat(messages, attempt_seed(unit.seed, stage, attempt), max_tokens)
            except Exception as e:
                code = self.failure_reason(e)
                if code is None:
                    raise
                result.attempts += 1
                result.rejections[code] += 1
                logger.warning("unit %d %s: %s: %s", unit.index, stage, code, e)
                result.prompts.append(f"[{stage}] {base[-1]['content']}")
                return None
            result.attempts += 1
            verdict: Verdict = parse(reply)
            result.repairs.update(verdict.repairs)
            if verdict.ok:
                result.prompts.append(f"[{stage}] {base[-1]['content']}")
                return verdict
            for code in sorted(set(verdict.codes)):
                result.rejections[code] += 1
            logger.debug("unit %d %s attempt %d rejected: %s", unit.index, stage, attempt, verdict.message())
            # the answer goes back cut to prompts.ECHO_CHARS; a cut-off answer gets asked for a shorter one
            shorter = bool({TRUNCATED, TOO_LONG} & set(verdict.codes)) or reply.finish_reason == "length"
            messages = [*base, {"role": "assistant", "content": prompts.echo(reply.text)},
                        prompts.feedback_message(verdict.message()[:1500], shorter=shorter)]
        result.prompts.append(f"[{stage}] {base[-1]['content']}")
        return None

    def plan(self, unit: WorkUnit) -> PlanResult:
        requested = requested_objects(self.ctx.categories, unit.combo)
        ids = list(requested)
        o = self.opts
        result = PlanResult(scene=None, attempts=0)
        desc = self._stage(
            result, "description", prompts.description_messages(ids, o["shots"], o["system_role"]), unit,
            int(o["max_tokens_description"]), lambda r: parse_description(r.text, requested, r.finish_reason))
        if desc is None or desc.scene is None:
            return result
        scene = desc.scene
        lay = self._stage(
            result, "layout", prompts.layout_messages(ids, scene.caption, o["shots"], o["system_role"]), unit,
            int(o["max_tokens_layout"]), lambda r: parse_layout(r.text, scene, requested, r.finish_reason))
        if lay is not None:
            result.scene = lay.scene
        return result
