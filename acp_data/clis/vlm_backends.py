"""Pieces of the ``vlm`` CLIS-I scorer: chat backends (OpenAI-compatible endpoint or local transformers model), the
way each VLM family is told where a box is, and the judge's prompt and answer parser.

Messages use one neutral form, ``{"role": ..., "content": str | [{"type": "image", "image": HxWx3 uint8},
{"type": "text", "text": ...}]}``, converted per backend.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Message = dict[str, Any]

# ----- where the box is ---------------------------------------------------------------------------------------------
BOX_FORMATS = ("qwen2_5_vl", "qwen2_vl", "internvl", "norm1000", "abs", "draw")
BOX_COLOR = (255, 0, 0)


def auto_box_format(model_type: str) -> str:
    """Box format for a model family from its transformers ``model_type`` or served model name; ``draw`` (the box
    drawn on the image) for families with no known grounding format."""
    t = model_type.lower().replace("-", "_").replace(".", "_")
    if "qwen2_5_vl" in t or "qwen2_5vl" in t:
        return "qwen2_5_vl"
    if "qwen2_vl" in t or "qwen2vl" in t:
        return "qwen2_vl"
    if "internvl" in t:
        return "internvl"
    return "draw"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL's input size rule: both sides multiples of ``factor``, area within [min, max] pixels.
    Qwen2.5-VL reads and writes absolute coordinates in this resized image."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return int(h), int(w)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def draw_box(image: np.ndarray, box_xyxy: Sequence[float], color: tuple[int, int, int] = BOX_COLOR,
             thickness: int | None = None) -> np.ndarray:
    """A copy of ``image`` with the box outlined (thickness about 0.6 % of the longer side, at least 2 px)."""
    out = np.array(image, copy=True)
    h, w = out.shape[:2]
    t = thickness or max(2, round(0.006 * max(h, w)))
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h))
    c = np.asarray(color, dtype=out.dtype)
    out[y0:min(y0 + t, h), x0:x1] = c
    out[max(y1 - t, 0):y1, x0:x1] = c
    out[y0:y1, x0:min(x0 + t, w)] = c
    out[y0:y1, max(x1 - t, 0):x1] = c
    return out


def region_query(image: np.ndarray, box_xyxy: Sequence[float], box_format: str,
                 qwen_pixels: tuple[int, int] = (56 * 56, 12845056)) -> tuple[np.ndarray, str]:
    """(image to send, text naming the region) for a box in absolute XYXY pixels of ``image``:

    - ``qwen2_5_vl``: the image resized by Qwen's rule first, then ``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute
      pixels of the resized image (so a server applying the same rule sees exactly these coordinates);
    - ``qwen2_vl``: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, coordinates normalised to 0-1000;
    - ``internvl``: ``<box>[[x1, y1, x2, y2]]</box>``, 0-1000;
    - ``norm1000``: ``[x1, y1, x2, y2]`` with the scale stated, 0-1000;
    - ``abs``: ``[x1, y1, x2, y2]`` in pixels of the original image, with its size stated;
    - ``draw``: the box drawn in red on the image, and "the red box".
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    if box_format == "qwen2_5_vl":
        nh, nw = smart_resize(h, w, min_pixels=qwen_pixels[0], max_pixels=qwen_pixels[1])
        sx, sy = nw / w, nh / h
        b = [round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)]
        return _resize(image, nh, nw), f'the region {{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}]}}'
    n = [round(1000 * x0 / w), round(1000 * y0 / h), round(1000 * x1 / w), round(1000 * y1 / h)]
    n = [min(1000, max(0, v)) for v in n]
    if box_format == "qwen2_vl":
        return image, f"the region <|box_start|>({n[0]},{n[1]}),({n[2]},{n[3]})<|box_end|>"
    if box_format == "internvl":
        return image, f"the region <box>[[{n[0]}, {n[1]}, {n[2]}, {n[3]}]]</box>"
    if box_format == "norm1000":
        return image, (f"the region [{n[0]}, {n[1]}, {n[2]}, {n[3]}] (x1, y1, x2, y2 on a 0-1000 scale of the "
                       "image width and height)")
    if box_format == "abs":
        b = [round(x0), round(y0), round(x1), round(y1)]
        return image, f"the region [{b[0]}, {b[1]}, {b[2]}, {b[3]}] (x1, y1, x2, y2 in pixels of this {w}x{h} image)"
    if box_format == "draw":
        return draw_box(image, (x0, y0, x1, y1)), "the red box"
    raise ValueError(f"box_format {box_format!r} is not one of {', '.join(BOX_FORMATS)} (or 'auto')")


# ----- the judge ----------------------------------------------------------------------------------------------------
JUDGE_SYSTEM = "You rate how well a description of an image matches a reference text. You answer with JSON only."
JUDGE_PROMPT = (
    "Reference: {reference}\n"
    "Description: {caption}\n\n"
    "Score from 0 to 5 how well the description matches the reference: 5 = the same objects with the same "
    "attributes and relations; 3 = the right objects with some wrong or missing details; 1 = mostly different "
    "objects; 0 = unrelated or empty. Answer with JSON only: {{\"score\": <number from 0 to 5>}}"
)
JUDGE_RETRY = ("That answer could not be used: {error}. Answer with JSON only, a single object like "
               "{{\"score\": 3}} with a number from 0 to 5.")


class JudgeAnswerError(ValueError):
    """A judge answer without a usable score (no JSON object, no ``score``, not a number, out of 0-5)."""


def parse_judge(text: str, low: float = 0.0, high: float = 5.0) -> float:
    """The ``score`` of the first JSON object in ``text`` that has one (fenced code and text around it are
    tolerated); JudgeAnswerError names what is wrong otherwise."""
    dec = json.JSONDecoder()
    obj: Any = None
    first: Any = None
    i = text.find("{")
    while i != -1:
        try:
            cand, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(cand, dict):
            first = cand if first is None else first
            if "score" in cand:
                obj = cand
                break
        i = text.find("{", end)
    if first is None:
        raise JudgeAnswerError(f"no JSON object in the answer {text[:80]!r}")
    if obj is None:
        raise JudgeAnswerError(f"the JSON object has no \"score\" key: {json.dumps(first)[:80]}")
    s = obj["score"]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        try:
            s = float(str(s).strip())
        except ValueError:
            raise JudgeAnswerError(f"score {obj['score']!r} is not a number") from None
    s = float(s)
    if not math.isfinite(s) or not low <= s <= high:
        raise JudgeAnswerError(f"score {s:g} is outside {low:g}-{high:g}")
    return s


def judge_conversation(reference: str, caption: str) -> list[Message]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(reference=reference, caption=caption)}]


# ----- chat backends ------------------------------------------------------------------------------------------------
class ChatBackend:
    """Conversations in, texts (or the exception each ended with) out, in order."""

    model_type: str = ""

    def chat_many(self, conversations: Sequence[list[Message]], max_new_tokens: int) -> list[str | Exception]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible endpoint through :class:`acp_data.http_client.ChatClient` (images as data URLs)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, concurrency: int = 4, image_format: str = "PNG",
                 temperature: float = 0.0, params: dict[str, Any] | None = None) -> None:
        from ..http_client import ChatClient

        self.client = ChatClient(base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=retries,
                                 backoff=backoff, concurrency=concurrency,
                                 default_params={"temperature": temperature, **(params or {})})
        self.image_format = image_format
        self.model_type = model

    def _convert(self, conv: list[Message]) -> list[dict[str, Any]]:
        from ..http_client import image_to_data_url

        out = []
        for m in conv:
            c = m["content"]
            if isinstance(c, list):
                parts = []
                for p in c:
                    if p["type"] == "image":
                        parts.append({"type": "image_url",
                                      "image_url": {"url": image_to_data_url(p["image"], fmt=self.image_format)}})
                    else:
                        parts.append({"type": "text", "text": p["text"]})
                out.append({"role": m["role"], "content": parts})
            else:
                out.append({"role": m["role"], "content": c})
        return out

    def chat_many(self, conversations: Sequence[list[Message]], max_new_tokens: int) -> list[str | Exception]:
        return list(self.client.chat_many([self._convert(c) for c in conversations], max_tokens=int(max_new_tokens)))

    def settings(self) -> dict[str, Any]:
        return {"backend": "openai", **self.client.settings()}


class TransformersBackend(ChatBackend):
    """A local model: ``kind="vlm"`` loads ``AutoProcessor`` + ``AutoModelForImageTextToText`` (images allowed),
    ``kind="llm"`` ``AutoTokenizer`` + ``AutoModelForCausalLM`` (text only). Greedy decoding, left-padded batches."""

    def __init__(self, model: str, kind: str = "vlm", device: str = "cpu", dtype: str | None = None,
                 batch_size: int = 4, revision: str | None = None, trust_remote_code: bool = False,
                 allow_random_init: bool = False) -> None:
        import torch
        import transformers as tf

        from ..generate.common import load_pretrained

        if kind not in ("vlm", "llm"):
            raise ValueError(f"transformers backend kind {kind!r} must be 'vlm' or 'llm'")
        self.model_path, self.kind, self.device = model, kind, device
        self.batch_size = max(1, int(batch_size))
        self.revision = revision
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
        kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if kind == "vlm":
            self.processor = tf.AutoProcessor.from_pretrained(model, **kw)
            self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
            self.model = load_pretrained(tf.AutoModelForImageTextToText, model, "scorer vlm (transformers backend)",
                                         allow_random_init, dtype=torch_dtype, **kw)
        else:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(model, **kw)
            self.processor = self.tokenizer
            self.model = load_pretrained(tf.AutoModelForCausalLM, model, "scorer vlm (transformers backend)",
                                         allow_random_init, dtype=torch_dtype, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device).eval()
        self.model_type = str(getattr(self.model.config, "model_type", ""))

    def _convert(self, conv: list[Message]) -> list[dict[str, Any]]:
        from PIL import Image

        out = []
        for m in conv:
            c = m["content"]
            if self.kind == "llm":
                if isinstance(c, list):
                    if any(p["type"] == "image" for p in c):
                        raise ValueError(f"{self.model_path} is a text-only model; it cannot take images")
                    c = "".join(p["text"] for p in c)
                out.append({"role": m["role"], "content": c})
            elif isinstance(c, list):
                parts = [{"type": "image", "image": Image.fromarray(p["image"])} if p["type"] == "image"
                         else {"type": "text", "text": p["text"]} for p in c]
                out.append({"role": m["role"], "content": parts})
            else:
                out.append({"role": m["role"], "content": [{"type": "text", "text": c}]})
        return out

    def _generate(self, batch: list[list[Message]], max_new_tokens: int) -> list[str]:
        import torch

        convs = [self._convert(c) for c in batch]
        pad = {"processor_kwargs": {"padding": True}} if self.kind == "vlm" else {"padding": True}
        inputs = self.processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", **pad)
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                      pad_token_id=pad_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def chat_many(self, conversations: Sequence[list[Message]], max_new_tokens: int) -> list[str | Exception]:
        results: list[str | Exception] = []
        for i in range(0, len(conversations), self.batch_size):
            batch = list(conversations[i:i + self.batch_size])
            try:
                results += self._generate(batch, max_new_tokens)
            except Exception as e:  # a failing batch fails its items (recorded), never the whole scoring run
                logger.warning("local %s generation failed for %d conversations: %s", self.kind, len(batch), e)
                results += [e] * len(batch)
        return results

    def settings(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.model_path, "revision": self.revision, "kind": self.kind}


BACKEND_KEYS = {
    "openai": {"backend", "base_url", "model", "api_key_env", "timeout", "retries", "backoff", "concurrency",
               "image_format", "temperature", "params", "max_new_tokens", "box_format"},
    "transformers": {"backend", "model", "device", "dtype", "batch_size", "revision", "trust_remote_code",
                     "max_new_tokens", "box_format", "allow_random_init"},
}


def build_backend(cfg: dict[str, Any], kind: str, default_device: str, where: str) -> ChatBackend:
    """A backend from a config section (``backend: openai | transformers`` plus its keys); ``where`` names the
    section in errors."""
    name = cfg.get("backend", "openai" if "base_url" in cfg else "transformers")
    if name not in BACKEND_KEYS:
        raise ValueError(f"{where}.backend = {name!r}: must be 'openai' or 'transformers'")
    unknown = set(cfg) - BACKEND_KEYS[name]
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} for backend {name!r}; "
                         f"known: {sorted(BACKEND_KEYS[name])}")
    if not cfg.get("model"):
        raise ValueError(f"{where}.model is required (served model name or local path)")
    kw = {k: v for k, v in cfg.items() if k not in ("backend", "max_new_tokens", "box_format")}
    if name == "openai":
        if not cfg.get("base_url"):
            raise ValueError(f"{where}.base_url is required for the openai backend (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(**kw)
    kw.setdefault("device", default_device)
    return TransformersBackend(kind=kind, **kw)


__all__ = ["BOX_FORMATS", "ChatBackend", "JudgeAnswerError", "OpenAIBackend", "TransformersBackend",
           "auto_box_format", "build_backend", "draw_box", "judge_conversation", "parse_judge", "region_query",
           "smart_resize"]
