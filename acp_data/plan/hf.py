"""``hf`` planner: a transformers causal LM (hub id or local path) prompted through its chat template with the
two-stage prompts. The model loads on first use, so building the planner (and checking its options) is cheap."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..generate.common import (
    RANDOM_INIT,
    BackendOptionError,
    check_model_ref,
    hf_dtype_kwargs,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    resolve_options,
)
from ..stages import StageContext
from .llm import CHAT_DEFAULTS, ChatPlanner, ChatReply

logger = logging.getLogger(__name__)

HF_DEFAULTS: dict[str, Any] = {
    **CHAT_DEFAULTS,
    "revision": None,
    "dtype": "auto",  # float16 on CUDA, float32 on CPU
    "device": None,  # default: the stage context's device
    "trust_remote_code": False,
    "chat_template": None,  # a Jinja template (string or .jinja file) for tokenizers that lack one
    "repetition_penalty": 1.0,
    RANDOM_INIT: False,  # True: weights missing from the checkpoint only warn (tests; docs/plugins.md)
}


class HFPlanner(ChatPlanner):
    """Options: ``model`` (required; hub id or path), ``revision``, ``dtype``, ``device``, ``trust_remote_code``,
    ``chat_template``, plus the chat options (``retries``, ``shots``, ``temperature``, ``top_p``,
    ``max_tokens_description``, ``max_tokens_layout``, ``system_role``, ``repetition_penalty``)."""

    DEFAULTS = HF_DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.opts = resolve_options("planner hf", options, HF_DEFAULTS, required=("model",))
        self.opts["model"] = check_model_ref(self.opts["model"], "planner hf")
        template = self.opts["chat_template"]
        if template and os.path.isfile(os.path.expanduser(template)):
            with open(os.path.expanduser(template)) as f:
                self._template: str | None = f.read()
        else:
            self._template = template
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: str | None = None

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.pop("device", None)  # where it runs does not change what it writes (seeded sampling aside)
        if not s.get(RANDOM_INIT):
            s.pop(RANDOM_INIT, None)  # generation keys as before unless random weights are allowed
        s["chat_template"] = self._template
        return s

    def load(self) -> None:
        """Load tokenizer and model once (also called lazily by the first ``plan``)."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        o = self.opts
        self._device = resolve_device(o["device"], self.ctx.device)
        dtype = resolve_dtype(o["dtype"], self._device, self.ctx.dtype)
        logger.info("loading planner LM %s (revision %s, %s on %s)", o["model"], o["revision"], dtype, self._device)
        tok = AutoTokenizer.from_pretrained(o["model"], revision=o["revision"], trust_remote_code=o["trust_remote_code"])
        if self._template:
            tok.chat_template = self._template
        if not getattr(tok, "chat_template", None):
            raise BackendOptionError(f"planner hf: the tokenizer of {o['model']!r} has no chat template; give one with "
                                     "the 'chat_template' option (a Jinja string or a .jinja file)")
        model = load_pretrained(AutoModelForCausalLM, o["model"], "planner hf", bool(o[RANDOM_INIT]),
                                revision=o["revision"], **hf_dtype_kwargs(dtype),
                                trust_remote_code=o["trust_remote_code"])
        model.to(self._device).eval()
        self._tokenizer, self._model = tok, model
        self._torch = torch

    def chat(self, messages: list[dict[str, str]], seed: int, max_tokens: int) -> ChatReply:
        self.load()
        torch, tok, model, o = self._torch, self._tokenizer, self._model, self.opts
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self._device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids), 0)
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_tokens), "pad_token_id": pad,
                                  "repetition_penalty": float(o["repetition_penalty"])}
        if float(o["temperature"]) > 0:
            kwargs.update(do_sample=True, temperature=float(o["temperature"]), top_p=float(o["top_p"]))
        else:
            kwargs.update(do_sample=False)
        # transformers' sampling draws from the global torch RNG: seed it per (unit, stage, attempt)
        torch.manual_seed(int(seed))
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in eos_ids
        finish = "stop" if ended or len(new) < int(max_tokens) else "length"
        return ChatReply(tok.decode(new, skip_special_tokens=True), finish)
