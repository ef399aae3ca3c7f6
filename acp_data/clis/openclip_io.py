"""open_clip models on disk: save in open_clip's ``local-dir`` format, load any open_clip model spec.

A ``local-dir`` checkpoint is a directory with ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg":
...}``) and ``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms("local-dir:PATH")`` loads it in
any process, without ``open_clip.add_model_config`` (which only registers a config in the calling process). The
Shapes-world judge and the tests' tiny models are saved with :func:`save_open_clip_local_dir`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"


def save_open_clip_local_dir(model: Any, model_cfg: dict[str, Any], path: str | os.PathLike,
                             tokenizer_name: str | None = None, preprocess_cfg: dict[str, Any] | None = None,
                             overwrite: bool = False) -> str:
    """Save an open_clip model as a ``local-dir`` checkpoint and return its spec ``"local-dir:PATH"``.

    ``model_cfg`` is the architecture dict the model was built from (``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ...). ``tokenizer_name``: None keeps open_clip's built-in CLIP BPE tokenizer (works offline); a Hugging Face
    tokenizer name or path is loaded with ``transformers.AutoTokenizer`` and saved into the directory, because
    open_clip reads a local-dir model's HF tokenizer from that directory. ``preprocess_cfg`` defaults to the model's
    own (mean, std, interpolation, resize mode). The directory is written under a temporary name and renamed, so a
    crash never leaves a half-written checkpoint at ``path``; an existing ``path`` is replaced only with
    ``overwrite``.
    """
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    cfg = copy.deepcopy(dict(model_cfg))
    for key in ("vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model_cfg lacks {key!r}; pass the architecture dict the model was built from")
    if tokenizer_name:
        cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_name
    pp = dict(preprocess_cfg) if preprocess_cfg is not None else _model_preprocess_cfg(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": pp}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if tokenizer_name:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_name).save_pretrained(str(tmp))
        for p in tmp.iterdir():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{LOCAL_DIR}{out}"


def _model_preprocess_cfg(model: Any) -> dict[str, Any]:
    visual = getattr(model, "visual", model)
    pp = dict(getattr(visual, "preprocess_cfg", {}) or {})
    pp.setdefault("mean", list(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)))
    pp.setdefault("std", list(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)))
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    pp.pop("size", None)  # follows the model config's image_size
    return pp


def resolve_spec(model: str) -> str:
    """``model`` as open_clip expects it: ``local-dir:``/``hf-hub:`` specs and built-in names pass through; an
    existing directory holding ``open_clip_config.json`` becomes ``local-dir:PATH``."""
    if model.startswith((LOCAL_DIR, HF_HUB)):
        return model
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"open_clip model directory {str(p)!r} has no {CONFIG_NAME}")
        return f"{LOCAL_DIR}{p}"
    return model


def check_weights_named(model: str | None, pretrained: str | None, allow_random_init: bool = False) -> str:
    """The open_clip spec of ``model`` (see :func:`resolve_spec`); ``ValueError`` when no model or no weights are
    named (an architecture name without ``pretrained`` builds a randomly initialised model), unless
    ``allow_random_init`` (tests)."""
    if not model:
        raise ValueError("no model named: give model local-dir:PATH or a directory, hf-hub:org/repo, or an open_clip "
                         "architecture with pretrained, e.g. model=ViT-B-32 pretrained=openai")
    spec = resolve_spec(str(model))
    if not allow_random_init and not pretrained and not spec.startswith((LOCAL_DIR, HF_HUB)):
        raise ValueError(f"model {model!r} is an open_clip architecture name and no weights are named, so it would "
                         "run with random weights: give pretrained (a tag such as 'openai', or a weights file), or "
                         "a checkpoint (local-dir:PATH, a directory, hf-hub:org/repo)")
    return spec


def load_open_clip(model: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32",
                   cache_dir: str | None = None, allow_random_init: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, preprocess config) for any open_clip spec: a built-in architecture with a
    ``pretrained`` tag or weights file, ``hf-hub:org/repo``, ``local-dir:PATH`` or a directory path.

    Weights that are not named or do not load raise (``ValueError``, ``FileNotFoundError`` or open_clip's
    ``RuntimeError``) instead of leaving the model randomly initialised; ``allow_random_init`` is for tests."""
    import open_clip

    spec = check_weights_named(model, pretrained, allow_random_init)
    if spec.startswith(LOCAL_DIR):
        d = Path(spec[len(LOCAL_DIR):])
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"open_clip local-dir {str(d)!r} has no {CONFIG_NAME}")
        if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")) and not any(d.glob("*.pth")):
            raise FileNotFoundError(f"open_clip local-dir {str(d)!r} has no weights ({WEIGHTS_NAME})")
    kwargs: dict[str, Any] = {"device": device, "precision": precision, "cache_dir": cache_dir,
                              "require_pretrained": not allow_random_init}
    if pretrained and not spec.startswith((LOCAL_DIR, HF_HUB)):
        kwargs["pretrained"] = pretrained
    m = open_clip.create_model(spec, **kwargs)
    m.eval()
    tok = open_clip.get_tokenizer(spec, cache_dir=cache_dir)
    pp = dict(getattr(m.visual, "preprocess_cfg", {}) or {})
    pp.setdefault("mean", getattr(m.visual, "image_mean", None))
    pp.setdefault("std", getattr(m.visual, "image_std", None))
    size = pp.get("size") or getattr(m.visual, "image_size", 224)
    pp["size"] = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    return m, tok, pp


__all__ = ["check_weights_named", "load_open_clip", "resolve_spec", "save_open_clip_local_dir"]
