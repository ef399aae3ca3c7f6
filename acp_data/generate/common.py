"""Helpers shared by the model-backed stages (generators, segmenters, the ``hf`` planner): option checking, device
and dtype resolution, model-path checks, prompt text from a scene graph. No heavy import at module level."""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..scene import SceneGraph

__all__ = [
    "TooManyBoxes", "BackendOptionError", "resolve_options", "resolve_device", "resolve_dtype", "check_model_ref",
    "plain_caption", "to_uint8_images", "TOO_MANY_BOXES", "hf_dtype_kwargs", "RANDOM_INIT", "check_loaded_weights",
    "load_pretrained", "load_checked_pipeline",
]

logger = logging.getLogger(__name__)

RANDOM_INIT = "allow_random_init"  # the option that lets a stage run with random weights (tests only; docs/plugins.md)

TOO_MANY_BOXES = "too_many_boxes"


class TooManyBoxes(ValueError):
    """A layout has more boxes than the generator supports; the pipeline counts it as a rejection (``reason``)."""

    reason = TOO_MANY_BOXES

    def __init__(self, n: int, max_boxes: int, backend: str) -> None:
        super().__init__(f"{backend}: the layout has {n} boxes, at most {max_boxes} are supported")
        self.n = n
        self.max_boxes = max_boxes


class BackendOptionError(ValueError):
    """A backend option that is unknown, missing or invalid (names the backend and the key)."""


def resolve_options(backend: str, options: Mapping[str, Any], defaults: Mapping[str, Any],
                    required: Iterable[str] = ()) -> dict[str, Any]:
    """``defaults`` updated with ``options``; unknown keys (typos in a config) and missing required keys raise."""
    unknown = sorted(set(options) - set(defaults) - set(required))
    if unknown:
        raise BackendOptionError(f"{backend}: unknown option(s) {', '.join(map(repr, unknown))}; known: "
                                 f"{', '.join(sorted(set(defaults) | set(required)))}")
    missing = [k for k in required if options.get(k) in (None, "")]
    if missing:
        raise BackendOptionError(f"{backend}: missing required option(s) {', '.join(map(repr, missing))}")
    out = dict(defaults)
    out.update(options)
    return out


def resolve_device(device: str | None, ctx_device: str | None = None) -> str:
    """The torch device string: the option, else the stage context's, else cuda when available, else cpu."""
    dev = device or ctx_device
    if dev and dev != "auto":
        if str(dev).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BackendOptionError(f"device {dev!r} was asked for but CUDA is not available")
        return str(dev)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | None, device: str, ctx_dtype: str | None = None) -> torch.dtype:
    """``auto``/None: float16 on CUDA, else the context's dtype (float32 by default)."""
    import torch

    name = dtype
    if name in (None, "", "auto"):
        name = "float16" if str(device).startswith("cuda") else (ctx_dtype or "float32")
    key = _DTYPES.get(str(name).lower())
    if key is None:
        raise BackendOptionError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16 or auto")
    if key != "float32" and not str(device).startswith(("cuda", "mps", "xpu")):
        # half precision convolutions/attention are slow or unsupported on CPU: keep the model in float32 there
        return torch.float32
    return getattr(torch, key)


def hf_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The dtype keyword of ``from_pretrained`` for the installed transformers (``dtype=`` from 4.56, before that
    ``torch_dtype=``, which transformers 5 deprecates)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def diffusers_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype=`` from 0.35, before that ``torch_dtype=``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def check_model_ref(ref: Any, what: str) -> str:
    """A model reference is a hub id (``org/name``) or a local path; a path-like reference must exist."""
    if not isinstance(ref, str) or not ref.strip():
        raise BackendOptionError(f"{what}: model must be a hub id or a local path, got {ref!r}")
    ref = os.path.expanduser(ref.strip())
    if os.path.exists(ref):
        return ref
    if os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") != 1 and "/" in ref:
        raise BackendOptionError(f"{what}: model path {ref!r} does not exist (a hub id looks like 'org/name')")
    return ref


_TAG_RE = re.compile(r"\s*\((?:[^()]|\([^()]*\))*-\d+\)")


def plain_caption(scene: SceneGraph) -> str:
    """The caption without its ``(name-k)`` object tags, for a text encoder; built from the phrases if empty."""
    text = _TAG_RE.sub("", scene.caption or "").strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", text))
    if not text:
        phrases = scene.phrases()
        text = "a photo of " + ", ".join(phrases) if phrases else "a photo"
    return text


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """Float images in [0, 1] (N, H, W, 3) or a list of PIL images -> list of (H, W, 3) uint8 arrays."""
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return [np.ascontiguousarray(a) for a in arr]
    return [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]


def check_loaded_weights(info: Mapping[str, Any], what: str, model: str, allow_random_init: bool = False) -> None:
    """Stop when ``from_pretrained`` left parameters newly (randomly) initialised: keys missing from the checkpoint
    or with another shape. Production never runs on random weights; ``allow_random_init`` (tests) only warns."""
    missing = sorted(str(k) for k in info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    bad = missing + mismatched
    if not bad:
        return
    listed = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    msg = (f"{what}: {model!r} has no weights for {len(bad)} parameter(s) ({listed}), which would run randomly "
           "initialised")
    if not allow_random_init:
        raise BackendOptionError(f"{msg}; check the model path or revision ({RANDOM_INIT}: true allows it, for tests)")
    logger.warning("%s (%s: true)", msg, RANDOM_INIT)


def load_pretrained(cls: Any, model: str, what: str, allow_random_init: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, **kwargs)`` (transformers or diffusers model class) checked by
    :func:`check_loaded_weights`."""
    loaded, info = cls.from_pretrained(model, output_loading_info=True, **kwargs)
    check_loaded_weights(info, what, model, allow_random_init)
    return loaded


def load_checked_pipeline(pipeline_cls: Any, model: str, what: str, allow_random_init: bool = False, *,
                          revision: str | None = None, dtype: Any = None, skip: Iterable[str] = (),
                          **kwargs: Any) -> Any:
    """A diffusers pipeline whose model components (UNet, VAE, text encoders: every diffusers/transformers model in
    ``model_index.json`` except ``skip``) are loaded one by one and checked by :func:`check_loaded_weights`, since
    ``Pipeline.from_pretrained`` only logs weights it had to initialise; the rest loads as usual."""
    import diffusers
    import transformers

    index = diffusers.DiffusionPipeline.load_config(model, revision=revision)
    skip = set(skip) | {k for k, v in kwargs.items() if v is None}
    components: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        lib, cls_name = spec
        if lib not in ("diffusers", "transformers") or not cls_name:
            continue
        cls = getattr(importlib.import_module(lib), cls_name, None)
        if not isinstance(cls, type):
            continue
        if issubclass(cls, diffusers.ModelMixin):
            kw: dict[str, Any] = diffusers_dtype_kwargs(dtype) if dtype is not None else {}
        elif issubclass(cls, transformers.PreTrainedModel):
            kw = hf_dtype_kwargs(dtype) if dtype is not None else {}
        else:
            continue  # tokenizers, schedulers, feature extractors: nothing to initialise
        components[name] = load_pretrained(cls, model, f"{what} ({name})", allow_random_init, subfolder=name,
                                           revision=revision, **kw)
    dkw = diffusers_dtype_kwargs(dtype) if dtype is not None else {}
    return pipeline_cls.from_pretrained(model, revision=revision, **dkw, **components, **kwargs)
