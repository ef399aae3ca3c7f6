"""Prebuild config: the keys and their defaults, reading the YAML file, ``KEY=VALUE`` overrides, and checking every
plain value before anything is built (``docs/prebuild.md`` documents each key)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..clis.select import DEFAULT_MIN_CLIS_I, DEFAULT_MIN_CLIS_L

__all__ = ["PrebuildError", "DEFAULTS", "load_config", "apply_overrides", "check_config", "stage_section",
           "stage_name", "json_safe", "datasets_root", "resolve_data_path"]


class PrebuildError(ValueError):
    """A prebuild config or input that cannot work; the message names the key, file or value at fault."""


# Top-level config keys and their defaults (``docs/prebuild.md`` documents each).
DEFAULTS: dict[str, Any] = {
    "categories": "lvis_v1",  # lvis_v1 | shapes[:demo|small] | LVIS-format json path | null (the priors' table)
    "concepts": "rare",  # rare | common | frequent | rare+common | all | [names] | "a, b" | @file
    "priors": None,  # `acp-data priors build` output
    "images_per_category": 10,
    "seed": 0,
    "max_objects": 4,
    "max_companions": None,  # default max_objects - 1
    "candidates": 4,  # N images per layout
    "planner": {"name": "prior"},
    "generator": None,  # required
    "segmenter": None,  # required
    "scorer": None,  # CLIS-I backend; null = unscored (rescore later)
    "layout_score": True,  # CLIS-L; a mapping gives LayoutScorer options
    "selection": {"min_clis_i": DEFAULT_MIN_CLIS_I, "min_clis_l": DEFAULT_MIN_CLIS_L},
    "keep": "all",  # all | selected
    "device": "auto",
    "dtype": "auto",
    "threads": None,  # intra-op threads per rank on CPU (default 1)
    "unit_batch": 8,  # units planned together and scored in one CLIS-I call
    "max_errors": 10,  # units a backend may raise on (logged, counted, retried next run) before the rank stops
    "shard_size": 1024,  # samples per shard (rolled at unit boundaries)
    "shard_max_mb": 1024,
    "image_format": "jpg",  # jpg | png
    "jpeg_quality": 95,
}
_REQUIRED_SECTIONS = ("generator", "segmenter")
_SELECTION_KEYS = ("min_clis_i", "min_clis_l")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a prebuild YAML config (a mapping); errors name the file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PrebuildError(f"cannot read prebuild config {str(p)!r}: {e}") from e
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PrebuildError(f"prebuild config {str(p)!r} is not valid YAML: {e}") from e
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise PrebuildError(f"prebuild config {str(p)!r} must be a mapping of keys, got {type(cfg).__name__}")
    return cfg


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``KEY=VALUE`` overrides applied (dotted keys reach into sections; values are YAML:
    ``images_per_category=2``, ``generator.steps=20``, ``scorer=null``)."""
    import yaml

    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise PrebuildError(f"override {item!r} must look like KEY=VALUE (e.g. generator.steps=20)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise PrebuildError(f"override {item!r}: value is not valid YAML: {e}") from e
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise PrebuildError(f"override {item!r} has an empty key")
        node = out
        for k in parts[:-1]:
            nxt = node.get(k)
            if isinstance(nxt, str) and k in ("planner", "generator", "segmenter", "scorer"):
                nxt = {"name": nxt}
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise PrebuildError(f"override {item!r}: {k!r} is not a section (it is {nxt!r})")
            node[k] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


DATASETS_PREFIX = "datasets"  # detectron2's default datasets root, the first component of a recipe data path


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), where detectron2 looks datasets up."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", DATASETS_PREFIX))


def resolve_data_path(path: str) -> str:
    """A recipe data path (``priors``, a ``categories`` json) as detectron2 resolves dataset paths: a relative path
    whose first component is ``datasets`` names a file under the datasets root (``datasets/lvis/x.npz`` ->
    ``$DETECTRON2_DATASETS/lvis/x.npz``; ``./datasets/lvis/x.npz`` without the variable); any other path is taken
    as given (relative to the working directory)."""
    p = os.path.expanduser(path)
    parts = Path(p).parts
    if not os.path.isabs(p) and len(parts) > 1 and parts[0] == DATASETS_PREFIX:
        return os.path.join(datasets_root(), *parts[1:])
    return p


def _int(cfg: dict[str, Any], key: str, lo: int | None = None, hi: int | None = None) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PrebuildError(f"config key {key!r} = {v!r} must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise PrebuildError(f"config key {key!r} = {v} must be {rng}")
    return int(v)


def stage_section(cfg: dict[str, Any], key: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` of a stage section: ``{name: X, **options}``, ``{name: X, options: {...}}`` or ``X``."""
    sec = cfg.get(key)
    if sec is None or (isinstance(sec, str) and sec.strip().lower() in ("none", "null", "")):
        return None
    if isinstance(sec, str):
        return sec.strip(), {}
    if not isinstance(sec, dict):
        raise PrebuildError(f"config section {key!r} must be a mapping with a 'name' (or a backend name), got {sec!r}")
    if "name" not in sec or not isinstance(sec["name"], str) or not sec["name"].strip():
        raise PrebuildError(f"config section {key!r} needs a 'name' (a registered backend or 'package.module:Class')")
    name = sec["name"].strip()
    if key == "scorer" and name.lower() == "none":
        return None
    opts = {k: v for k, v in sec.items() if k != "name"}
    if set(opts) == {"options"} and isinstance(opts["options"], dict):
        opts = dict(opts["options"])
    elif "options" in opts and isinstance(opts["options"], dict):
        raise PrebuildError(f"config section {key!r}: give backend options either flat or under 'options', not both")
    return name, copy.deepcopy(opts)


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with defaults filled in and every plain value checked (types, ranges, choices); the stage
    backends check their own options in ``prepare``."""
    if not isinstance(config, dict):
        raise PrebuildError(f"the prebuild config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise PrebuildError(f"unknown config key(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(config))
    for key in _REQUIRED_SECTIONS:
        if stage_section(cfg, key) is None:
            raise PrebuildError(f"config section {key!r} is required (e.g. {key}: {{name: "
                                f"{'gligen' if key == 'generator' else 'sam'}, model: ...}})")
    if stage_section(cfg, "planner") is None:
        raise PrebuildError("config section 'planner' is required (e.g. planner: {name: prior})")
    stage_section(cfg, "scorer")
    _int(cfg, "images_per_category", 1)
    _int(cfg, "seed", 0)
    _int(cfg, "max_objects", 1)
    _int(cfg, "candidates", 1)
    _int(cfg, "unit_batch", 1)
    _int(cfg, "max_errors", 0)
    _int(cfg, "shard_size", 1)
    _int(cfg, "shard_max_mb", 1)
    _int(cfg, "jpeg_quality", 1, 100)
    if cfg["max_companions"] is not None:
        mc = _int(cfg, "max_companions", 0)
        if mc > cfg["max_objects"] - 1:
            raise PrebuildError(f"config key 'max_companions' = {mc} must be <= max_objects - 1 "
                                f"({cfg['max_objects'] - 1})")
    if cfg["threads"] is not None:
        _int(cfg, "threads", 1)
    if cfg["keep"] not in ("all", "selected"):
        raise PrebuildError(f"config key 'keep' = {cfg['keep']!r} must be 'all' or 'selected'")
    if cfg["image_format"] not in ("jpg", "png"):
        raise PrebuildError(f"config key 'image_format' = {cfg['image_format']!r} must be 'jpg' or 'png'")
    dev = cfg["device"]
    if not isinstance(dev, str) or not (dev in ("auto", "cpu") or dev.startswith(("cuda", "mps", "xpu"))):
        raise PrebuildError(f"config key 'device' = {cfg['device']!r} must be auto, cpu, cuda or cuda:N")
    if cfg["dtype"] not in ("auto", "float32", "float16", "bfloat16"):
        raise PrebuildError(f"config key 'dtype' = {cfg['dtype']!r} must be auto, float32, float16 or bfloat16")
    sel = cfg["selection"] if cfg["selection"] is not None else {}
    if not isinstance(sel, dict):
        raise PrebuildError(f"config key 'selection' must be a mapping with min_clis_i / min_clis_l, got {sel!r}")
    bad = sorted(set(sel) - set(_SELECTION_KEYS))
    if bad:
        raise PrebuildError(f"unknown key(s) {', '.join(map(repr, bad))} in 'selection'; known: "
                            f"{', '.join(_SELECTION_KEYS)}")
    sel = {"min_clis_i": sel.get("min_clis_i", DEFAULT_MIN_CLIS_I),
           "min_clis_l": sel.get("min_clis_l", DEFAULT_MIN_CLIS_L)}
    for k, v in sel.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) <= 100:
            raise PrebuildError(f"config key 'selection.{k}' = {v!r} must be a number in 0..100")
        sel[k] = float(v)
    cfg["selection"] = sel
    ls = cfg["layout_score"]
    if not isinstance(ls, (bool, dict)):
        raise PrebuildError(f"config key 'layout_score' = {ls!r} must be true, false or a mapping of CLIS-L options")
    if not isinstance(cfg["concepts"], (str, list)) or not cfg["concepts"]:
        raise PrebuildError(f"config key 'concepts' = {cfg['concepts']!r} must be a group (rare, rare+common, all), "
                            "a list of names, a comma-separated string or @FILE")
    return cfg



def stage_name(cfg: dict[str, Any], key: str) -> str:
    sec = stage_section(cfg, key)
    return sec[0] if sec is not None else "none"



def json_safe(obj: Any) -> Any:
    """Round trip through JSON (tuples -> lists; numpy scalars -> numbers): settings hash and compare as stored."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, sort_keys=True, default=default))

