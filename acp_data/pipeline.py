"""``acp-data prebuild``: work units through planner -> generator -> segmenter -> CLIS-L -> CLIS-I -> selection ->
cache, one rank at a time; resumable by generation key, shardable over any number of processes and hosts.

Each rank rebuilds the global unit list from the config (``make_units``), keeps the units with ``index % W == r``
(``shard_units``), skips those whose generation key is already in the cache, and writes its own shards (the cache's
manifest is the only shared state and refuses a writer with other generation settings). Everything in the config is
checked before any model is loaded; ``docs/prebuild.md`` documents every key. ``run_prebuild`` is the plain function
behind the command, for in-process callers such as the Shapes demo.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import socket
import sys
import time
import types
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .clis.select import DEFAULT_MIN_CLIS_I, DEFAULT_MIN_CLIS_L
from .stages import Candidate, Generator, ImageScore, Planner, Segmenter, Stage, StageContext, WorkUnit, generation_key

logger = logging.getLogger(__name__)

__all__ = [
    "PrebuildError", "DEFAULTS", "load_config", "apply_overrides", "check_config", "prepare", "Prepared",
    "run_prebuild", "format_summary", "merge_summaries", "cli_main",
]


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
EMPTY_PLANNER = "planner_rejected"
EMPTY_ERROR = "error"
EMPTY_NOTHING_SELECTED = "nothing_selected"
EMPTY_NO_CANDIDATES = "no_candidates"
# Reasons for a unit that ended with nothing stored that a resumed run retries (the others are final).
RETRY_REASONS = frozenset({"request_failed", EMPTY_ERROR})


# ----- config ---------------------------------------------------------------------------------------------------------
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


def _int(cfg: dict[str, Any], key: str, lo: int | None = None, hi: int | None = None) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PrebuildError(f"config key {key!r} = {v!r} must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise PrebuildError(f"config key {key!r} = {v} must be {rng}")
    return int(v)


def _section(cfg: dict[str, Any], key: str) -> tuple[str, dict[str, Any]] | None:
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
        if _section(cfg, key) is None:
            raise PrebuildError(f"config section {key!r} is required (e.g. {key}: {{name: "
                                f"{'gligen' if key == 'generator' else 'sam'}, model: ...}})")
    if _section(cfg, "planner") is None:
        raise PrebuildError("config section 'planner' is required (e.g. planner: {name: prior})")
    _section(cfg, "scorer")
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


# ----- validation and stage construction (no model is loaded here) ----------------------------------------------------
def _load_categories(spec: Any, priors: Any) -> Any:
    from .categories import CategoryError, CategoryTable

    if spec is None:
        if priors is None:
            raise PrebuildError("config key 'categories' is null and no 'priors' is given: say where the categories "
                                "come from (lvis_v1, shapes, or an LVIS-format json)")
        return priors.categories
    if not isinstance(spec, str) or not spec.strip():
        raise PrebuildError(f"config key 'categories' = {spec!r} must be lvis_v1, shapes[:SIZE] or a json path")
    s = spec.strip()
    if s.lower() in ("lvis_v1", "lvis"):
        try:
            return CategoryTable.from_lvis_v1()
        except ImportError as e:
            raise PrebuildError(f"categories: lvis_v1 needs detectron2's LVIS tables ({e}); give an LVIS-format json "
                                "path instead") from e
    if s.lower() == "shapes" or s.lower().startswith("shapes:"):
        from .shapes.world import world_category_table

        size = s.split(":", 1)[1] if ":" in s else "demo"
        try:
            return world_category_table(size)
        except ValueError as e:
            raise PrebuildError(f"categories: {e}") from e
    p = Path(s).expanduser()
    if not p.is_file():
        raise PrebuildError(f"categories: {s!r} is neither lvis_v1, shapes[:SIZE] nor an existing LVIS-format json")
    try:
        return CategoryTable.from_lvis_json(p)
    except CategoryError as e:
        raise PrebuildError(f"categories: {e}") from e


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or os.sep in ref and ref.count("/") != 1


def _check_model_refs(where: str, options: dict[str, Any]) -> None:
    """Fail fast on model references that are paths and do not exist (a backend that loads at construction, such as
    the CLIS-I scorers, would otherwise fail only after the other models loaded)."""
    from .generate.common import BackendOptionError, check_model_ref

    served = "base_url" in options or options.get("backend") == "openai"  # a served model name, not a path
    for key, value in options.items():
        if isinstance(value, dict):
            _check_model_refs(f"{where}.{key}", value)
        elif key in ("model", "pretrained", "checkpoint") and isinstance(value, str) and value.strip() and not served:
            ref = value.strip()
            if ref.startswith("hf-hub:"):
                continue
            if ref.startswith("local-dir:"):
                d = Path(ref[len("local-dir:"):]).expanduser()
                if not d.is_dir():
                    raise PrebuildError(f"{where}.{key}: model directory {str(d)!r} does not exist")
                continue
            if key == "pretrained" and not _looks_like_path(ref):
                continue  # a pretrained tag such as 'openai'
            try:
                check_model_ref(ref, f"{where}.{key}")
            except BackendOptionError as e:
                raise PrebuildError(str(e)) from None


def _resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; plain ``cuda`` under torchrun -> ``cuda:LOCAL_RANK``."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrebuildError(f"device {device!r} was asked for but CUDA is not available (use --device cpu)")
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
            local = int(os.environ["LOCAL_RANK"])
            device = f"cuda:{local % max(1, torch.cuda.device_count())}"
    return device


@dataclass
class Prepared:
    """Everything checked and built (stages lazily: no weights loaded yet), ready to run."""

    config: dict[str, Any]
    categories: Any
    targets: list[int]
    priors: Any
    ctx: StageContext
    planner: Any
    generator: Any
    segmenter: Any
    scorer_spec: tuple[str, dict[str, Any]] | None
    layout_options: dict[str, Any] | None
    planner_settings: dict[str, Any] = field(default_factory=dict)
    generator_settings: dict[str, Any] = field(default_factory=dict)
    segmenter_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates(self) -> int:
        return int(self.config["candidates"])

    def key(self, unit: WorkUnit) -> str:
        """The unit's generation key (design.md): combination, seed, planner and generator settings (with N)."""
        return generation_key(unit, self.planner_settings, self.generator_settings)

    def generation_settings(self) -> dict[str, Any]:
        """What the cache manifest pins: a second writer with other values is refused."""
        c = self.config
        return {"planner": self.planner_settings, "generator": self.generator_settings,
                "segmenter": self.segmenter_settings,
                "store": {"keep": c["keep"], "image_format": c["image_format"],
                          "jpeg_quality": c["jpeg_quality"] if c["image_format"] == "jpg" else None}}

    def scoring_settings(self) -> dict[str, Any]:
        """Scoring as configured (informational in the manifest; scores can be recomputed by ``acp-data rescore``)."""
        return {"scorer": None if self.scorer_spec is None else {"name": self.scorer_spec[0], **self.scorer_spec[1]},
                "layout": self.layout_options, "selection": dict(self.config["selection"])}

    def make_units(self, max_units: int | None = None) -> list[WorkUnit]:
        from .units import make_units

        c = self.config
        try:
            units = make_units(self.categories, self.targets, self.priors, int(c["images_per_category"]),
                               int(c["seed"]), max_objects=int(c["max_objects"]), max_companions=c["max_companions"])
        except ValueError as e:
            raise PrebuildError(f"work units: {e}") from e
        return units[:max_units] if max_units is not None else units


_OPTIONAL_MEMBERS = ("load", "plan_many", "segment_batch", "max_boxes")  # declared with defaults in stages.py


def _build_stage(registry: Any, base: type[Stage], section: str, name: str, options: dict[str, Any],
                 ctx: StageContext) -> Any:
    from .registry import RegistryError

    try:
        cls = registry.get(name)
    except RegistryError as e:
        raise PrebuildError(f"{section}: {e}") from None
    try:
        stage = cls(ctx, **options)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        raise PrebuildError(f"{section} {name!r}: {e}") from e
    return _with_base_hooks(stage, base)


def _with_base_hooks(stage: Any, base: type[Stage]) -> Any:
    """A plug-in that does not subclass its stage base (duck-typed: ``settings`` and the stage's main method) gets
    the base's optional members, so the runner calls every member of the contract plainly."""
    if isinstance(stage, base):
        return stage
    for name in _OPTIONAL_MEMBERS:
        member = getattr(base, name, None)
        if member is not None and not hasattr(stage, name):
            setattr(stage, name, types.MethodType(member, stage) if callable(member) else member)
    return stage


def _stage_name(cfg: dict[str, Any], key: str) -> str:
    sec = _section(cfg, key)
    return sec[0] if sec is not None else "none"


def _load_inputs(cfg: dict[str, Any]) -> tuple[Any, Any, list[int]]:
    """``(priors or None, CategoryTable, target category ids)`` from the config's priors, categories and concepts."""
    from .categories import CategoryError
    from .priors import Priors, PriorsError

    priors = None
    if cfg["priors"] is not None:
        if not isinstance(cfg["priors"], str):
            raise PrebuildError(f"config key 'priors' = {cfg['priors']!r} must be a file path or null")
        try:
            priors = Priors.load(Path(cfg["priors"]).expanduser())
        except (PriorsError, CategoryError, KeyError, ValueError) as e:
            raise PrebuildError(f"priors: {e}") from e
    categories = _load_categories(cfg["categories"], priors)
    if priors is not None and priors.categories is not categories:
        try:
            priors.categories.check_same(categories, f"priors file {cfg['priors']}",
                                         f"categories {cfg['categories']!r}", names_only=True)
        except CategoryError as e:
            raise PrebuildError(f"priors and categories disagree: {e}") from e
    concepts = cfg["concepts"]
    try:
        targets = categories.select(concepts if isinstance(concepts, str) else [str(c) for c in concepts])
    except CategoryError as e:
        raise PrebuildError(f"concepts: {e}") from e
    return priors, categories, targets


def _check_scoring(cfg: dict[str, Any], priors: Any) -> tuple[tuple[str, dict[str, Any]] | None, dict | None]:
    """``(scorer (name, options) or None, CLIS-L options or None)``, checked without building the scorer (scorers
    load their model when built)."""
    import inspect

    from .registry import SCORERS, RegistryError

    ls = cfg["layout_score"]
    layout_options = None if ls is False else (dict(ls) if isinstance(ls, dict) else {})
    if layout_options is not None:
        if priors is None:
            raise PrebuildError("layout_score (CLIS-L) needs reference box pairs: give 'priors' or set "
                                "layout_score: false")
        from .clis.layout import LayoutScorer

        params = set(inspect.signature(LayoutScorer).parameters) - {"priors"}
        bad = sorted(set(layout_options) - params)
        if bad:
            raise PrebuildError(f"layout_score: unknown option(s) {', '.join(map(repr, bad))}; known: "
                                f"{', '.join(sorted(params))}")
    elif cfg["selection"]["min_clis_l"] > 0:
        raise PrebuildError(f"selection.min_clis_l = {cfg['selection']['min_clis_l']} needs layout_score: true "
                            "(without CLIS-L no unit would pass)")
    scorer_spec = _section(cfg, "scorer")
    if scorer_spec is None:
        if cfg["keep"] == "selected":
            raise PrebuildError("keep: selected needs a scorer (without CLIS-I no candidate is selected)")
        return None, layout_options
    name, opts = scorer_spec
    try:
        cls = SCORERS.get(name)
    except RegistryError as e:
        raise PrebuildError(f"scorer: {e}") from None
    defaults = getattr(cls, "DEFAULTS", None)  # the Stage contract; a duck-typed scorer may lack it
    if isinstance(defaults, dict) and defaults:
        bad = sorted(set(opts) - set(defaults))
        if bad:
            raise PrebuildError(f"scorer {name!r}: unknown option(s) {', '.join(map(repr, bad))}; known: "
                                f"{', '.join(sorted(defaults))}")
    _check_model_refs(f"scorer {name!r}", opts)
    return scorer_spec, layout_options


def prepare(config: dict[str, Any], *, device: str | None = None, keep: str | None = None,
            threads: int | None = None) -> Prepared:
    """Check the whole config and build the planner, generator and segmenter without loading any model: unknown keys
    or backends, unknown concepts (with the closest names), unreadable priors, missing model paths and a planner
    asking for more objects than the generator draws all fail here, each with one message."""
    from .registry import GENERATORS, PLANNERS, SEGMENTERS

    raw = dict(config)
    for key, value in (("device", device), ("keep", keep), ("threads", threads)):
        if value is not None:
            raw[key] = value
    cfg = check_config(raw)
    priors, categories, targets = _load_inputs(cfg)
    scorer_spec, layout_options = _check_scoring(cfg, priors)
    ctx = StageContext(categories, priors, device="cpu" if cfg["device"] == "auto" else cfg["device"],
                       dtype="float32" if cfg["dtype"] == "auto" else cfg["dtype"])
    built = {}
    for section, registry, base in (("planner", PLANNERS, Planner), ("generator", GENERATORS, Generator),
                                    ("segmenter", SEGMENTERS, Segmenter)):
        name, opts = _section(cfg, section) or ("", {})
        built[section] = _build_stage(registry, base, section, name, opts, ctx)
    gen = built["generator"]
    max_boxes = int(gen.max_boxes)
    if cfg["max_objects"] > max_boxes:
        raise PrebuildError(f"max_objects = {cfg['max_objects']} but generator {_stage_name(cfg, 'generator')!r} "
                            f"draws at most {max_boxes} boxes per layout (its max_boxes): lower max_objects to "
                            f"{max_boxes} or less")
    prep = Prepared(cfg, categories, targets, priors, ctx, built["planner"], gen, built["segmenter"], scorer_spec,
                    layout_options)
    prep.planner_settings = _json_safe(prep.planner.settings())
    prep.generator_settings = _json_safe({**gen.settings(), "candidates": int(cfg["candidates"])})
    prep.segmenter_settings = _json_safe(prep.segmenter.settings())
    return prep


def _json_safe(obj: Any) -> Any:
    """Round trip through JSON (tuples -> lists; numpy scalars -> numbers): settings hash and compare as stored."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


# ----- running --------------------------------------------------------------------------------------------------------
STAGES = ("plan", "generate", "segment", "clis_l", "clis_i", "select", "encode", "write")
# select_unit reasons that reject a unit or an instance (the others are counts: kept, unscored, ...).
SELECT_REJECTIONS = ("no_candidates", "no_scored_candidate", "layout_below_min_clis_l",
                     "all_instances_below_min_clis_i", "instances_below_min_clis_i")


@dataclass
class _Stats:
    """Counters and timings of one run of one rank (the summary is made from them)."""

    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in ("load", *STAGES)})
    units_all: int = 0
    units_rank: int = 0
    units_skipped: int = 0
    units_processed: int = 0
    units_stored: int = 0
    units_selected: int = 0
    candidates: int = 0
    kept: int = 0
    instances: int = 0
    instances_dropped: int = 0
    instances_stored: int = 0
    errors: int = 0
    rejections: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in
                                                                    ("plan", "generate", "segment", "clis_l",
                                                                     "clis_i", "select")})
    repairs: Counter = field(default_factory=Counter)
    selection: Counter = field(default_factory=Counter)
    empty_units: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    t_start: float = field(default_factory=time.perf_counter)
    loop_start: float = 0.0  # wall clock (time.time) of the unit loop
    loop_end: float = 0.0
    loop_cpu_start: float = 0.0  # process CPU time (all threads)
    loop_cpu_end: float = 0.0

    def loop_started(self) -> None:
        self.loop_start = self.loop_end = time.time()
        self.loop_cpu_start = self.loop_cpu_end = time.process_time()

    def loop_tick(self) -> None:
        self.loop_end = time.time()
        self.loop_cpu_end = time.process_time()


class _Timer:
    def __init__(self, stats: _Stats, stage: str) -> None:
        self.stats, self.stage = stats, stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.seconds[self.stage] += time.perf_counter() - self.t0


@dataclass
class _UnitWork:
    unit: WorkUnit
    key: str
    plan: Any
    candidates: list[Candidate]
    clis_l: float | None


@contextlib.contextmanager
def _intra_op_threads(device: str, threads: int | None) -> Iterator[int | None]:
    """One intra-op thread per rank on CPU unless told otherwise (ranks share the machine's cores), for torch and
    OpenCV; the caller's settings are restored afterwards (``run_prebuild`` may run inside a training process)."""
    n = threads if threads is not None else (1 if device.startswith("cpu") else None)
    if n is None:
        yield None
        return
    import cv2
    import torch

    old = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(int(n))
    cv2.setNumThreads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(old[0])
        cv2.setNumThreads(old[1])


def _encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _check_images(images: Any, n: int, generator_name: str) -> list[np.ndarray]:
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = len(images) if hasattr(images, "__len__") else type(images).__name__
        raise PrebuildError(f"generator {generator_name!r} returned {got} images for n = {n} (the plug-in contract: "
                            "a list of exactly n H x W x 3 uint8 arrays)")
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise PrebuildError(f"generator {generator_name!r} returned an image of shape {a.shape} and dtype "
                                f"{a.dtype}; expected H x W x 3 uint8")
        out.append(np.ascontiguousarray(a))
    return out


def _previous_empty_units(cache_dir: Path, scoring: dict[str, Any]) -> dict[str, str]:
    """Units that earlier runs finished with nothing to store (from every ``summary/*.json``), minus those worth
    retrying: a request that failed, and "nothing selected" decided under other scoring settings."""
    from .cache.writer import read_summaries

    out: dict[str, str] = {}
    try:
        summaries = read_summaries(cache_dir)
    except Exception as e:  # a damaged summary only costs recomputation
        logger.warning("cannot read the summaries of %s (%s); empty units will be redone", cache_dir, e)
        return out
    for s in summaries:
        same_scoring = s.get("scoring_settings") == scoring
        for k, reason in (s.get("empty_units") or {}).items():
            if reason in RETRY_REASONS or (reason == EMPTY_NOTHING_SELECTED and not same_scoring):
                continue
            out[str(k)] = str(reason)
    return out


class _Runner:
    """One rank's loop over its units (stages built and loaded once)."""

    def __init__(self, prep: Prepared, writer: Any, scorer: Any, layout: Any, rank: int, world: int,
                 stats: _Stats) -> None:
        self.prep, self.writer, self.scorer, self.layout = prep, writer, scorer, layout
        self.rank, self.world, self.stats = rank, world, stats
        c = prep.config
        self.n = int(c["candidates"])
        self.keep = c["keep"]
        self.fmt, self.quality = c["image_format"], int(c["jpeg_quality"])
        self.sel = c["selection"]
        self.max_errors = int(c["max_errors"])
        self.host = socket.gethostname()
        from . import __version__
        from .generate.common import plain_caption

        self._plain_caption = plain_caption
        self.scorer_settings = _json_safe(scorer.settings()) if scorer is not None else None
        self.layout_settings = _json_safe(layout.settings()) if layout is not None else None
        self.tool = {"name": "acp-data", "version": __version__}
        self.generator_name = _stage_name(c, "generator")

    # -- stages ------------------------------------------------------------------------------------------------------
    def _unit_failed(self, stage: str, unit: WorkUnit, key: str, error: Exception) -> None:
        """Count a unit that a backend raised on (logged with its traceback); too many abort the run. The unit is
        retried by the next run. Contract violations (``PrebuildError``) are never swallowed."""
        if isinstance(error, PrebuildError):
            raise error
        st = self.stats
        st.errors += 1
        st.rejections[stage][f"error:{type(error).__name__}"] += 1
        st.empty_units[key] = EMPTY_ERROR
        logger.error("unit %d (key %s) failed in %s: %s: %s", unit.index, key, stage, type(error).__name__, error,
                     exc_info=error)
        if st.errors > self.max_errors:
            raise PrebuildError(f"{st.errors} units failed, more than max_errors = {self.max_errors}; the last one "
                                f"(unit {unit.index}) in {stage}: {type(error).__name__}: {error}") from error

    def _plan(self, chunk: Sequence[tuple[WorkUnit, str]]) -> list[Any]:
        """Plan results in order (None for a unit whose planner raised)."""
        planner = self.prep.planner
        units = [u for u, _ in chunk]
        with _Timer(self.stats, "plan"):
            try:
                return list(planner.plan_many(units))
            except PrebuildError:
                raise
            except Exception:  # one unit broke the batch: plan one by one to find it and keep the others
                out = []
                for unit, key in chunk:
                    try:
                        out.append(planner.plan(unit))
                    except Exception as e:
                        self._unit_failed("plan", unit, key, e)
                        out.append(None)
                return out

    def _generate(self, unit: WorkUnit, key: str, scene: Any) -> list[np.ndarray] | None:
        from .generate.common import TooManyBoxes

        st = self.stats
        with _Timer(st, "generate"):
            try:
                images = self.prep.generator.generate(scene, self.n, unit.seed)
            except TooManyBoxes as e:
                st.rejections["generate"][e.reason] += 1
                st.empty_units[key] = e.reason
                logger.warning("unit %d: %s", unit.index, e)
                return None
            return _check_images(images, self.n, self.generator_name)

    def _segment(self, scene: Any, images: list[np.ndarray]) -> list[Candidate]:
        """Candidates with their masks; an empty mask becomes None (a dropped instance, counted)."""
        st = self.stats
        with _Timer(st, "segment"):
            boxes = [scene.boxes_xyxy(im.shape[1], im.shape[0]) for im in images]
            masks_all = self.prep.segmenter.segment_batch(images, boxes)
            cands = []
            for im, bx, masks in zip(images, boxes, masks_all):
                if len(masks) != len(scene.objects):
                    raise PrebuildError(f"segmenter {_stage_name(self.prep.config, 'segmenter')!r} returned "
                                        f"{len(masks)} masks for {len(scene.objects)} boxes")
                kept: list[np.ndarray | None] = []
                for m in masks:
                    m = np.asarray(m, dtype=bool)
                    if m.shape != im.shape[:2]:
                        raise PrebuildError(f"segmenter {_stage_name(self.prep.config, 'segmenter')!r} returned a "
                                            f"mask of shape {m.shape} for an image of shape {im.shape[:2]}")
                    kept.append(m if m.any() else None)
                st.instances += len(kept)
                st.instances_dropped += sum(m is None for m in kept)
                st.rejections["segment"]["empty_mask"] += sum(m is None for m in kept)
                cands.append(Candidate(im, scene, bx, kept))
            return cands

    def _unit_work(self, unit: WorkUnit, key: str, plan: Any) -> _UnitWork | None:
        """Generate, segment and CLIS-L one planned unit (None: rejected or failed, recorded)."""
        stage = "generate"
        try:
            images = self._generate(unit, key, plan.scene)
            if images is None:
                return None
            self.stats.candidates += len(images)
            stage = "segment"
            cands = self._segment(plan.scene, images)
            clis_l = None
            if self.layout is not None:
                stage = "clis_l"
                with _Timer(self.stats, "clis_l"):
                    clis_l = self.layout.score(plan.scene).score
        except Exception as e:
            self._unit_failed(stage, unit, key, e)
            return None
        return _UnitWork(unit, key, plan, cands, None if clis_l is None else float(clis_l))

    def _score(self, works: list[_UnitWork]) -> list[tuple[_UnitWork, list[ImageScore]]]:
        """CLIS-I of every candidate of ``works`` in one call (unit by unit if that call raises, to keep the others)."""
        if self.scorer is None:
            return [(w, [ImageScore(None, [None] * len(c.scene.objects)) for c in w.candidates]) for w in works]
        if not works:
            return []
        with _Timer(self.stats, "clis_i"):
            try:
                scores = list(self.scorer.score([c for w in works for c in w.candidates]))
                groups = [(w, len(w.candidates)) for w in works]
            except Exception as e:
                if len(works) == 1:
                    self._unit_failed("clis_i", works[0].unit, works[0].key, e)
                    return []
                scores, groups = [], []
                for w in works:
                    try:
                        got = list(self.scorer.score(w.candidates))
                    except Exception as e1:
                        self._unit_failed("clis_i", w.unit, w.key, e1)
                        continue
                    scores += got
                    groups.append((w, len(got)))
        if sum(n for _, n in groups) != len(scores) or any(n != len(w.candidates) for w, n in groups):
            raise PrebuildError(f"scorer {_stage_name(self.prep.config, 'scorer')!r} returned {len(scores)} scores "
                                f"for {sum(len(w.candidates) for w, _ in groups)} candidates")
        out, i = [], 0
        for w, n in groups:
            out.append((w, scores[i:i + n]))
            i += n
        return out

    # -- records -----------------------------------------------------------------------------------------------------
    def _provenance(self, w: _UnitWork) -> dict[str, Any]:
        p, scene = w.plan, w.plan.scene
        return {
            "planner": {"settings": self.prep.planner_settings, "attempts": int(p.attempts),
                        "rejections": dict(p.rejections), "repairs": dict(p.repairs), "prompts": list(p.prompts)},
            "generator": {"settings": self.prep.generator_settings, "prompt": self._plain_caption(scene),
                          "phrases": scene.phrases(), "seed": int(w.unit.seed)},
            "segmenter": {"settings": self.prep.segmenter_settings},
            "scorer": self.scorer_settings, "layout_scorer": self.layout_settings,
            "selection": dict(self.sel), "tool": self.tool,
            "run": {"rank": self.rank, "world": self.world, "host": self.host, "created": time.time()},
        }

    def _records(self, w: _UnitWork, scores: list[ImageScore], selected: int | None) -> tuple[list[dict], list[bytes]]:
        from .masks import mask_to_rle, tight_box_xywh

        scene = w.plan.scene
        scene_dict = scene.to_dict()
        prov = self._provenance(w)
        records, blobs = [], []
        for c, (cand, sc) in enumerate(zip(w.candidates, scores)):
            if self.keep == "selected" and c != selected:
                continue
            h, wd = cand.image.shape[:2]
            layout_abs = scene.boxes_xywh() * np.array([wd, h, wd, h], dtype=np.float64)
            inst_scores = list(sc.instances) + [None] * (len(scene.objects) - len(sc.instances))
            instances = []
            for i, (o, m) in enumerate(zip(scene.objects, cand.masks)):
                if m is None:
                    continue
                instances.append({
                    "object_id": o.id, "category_id": int(o.category_id), "bbox": list(tight_box_xywh(m)),
                    "layout_bbox": [float(v) for v in layout_abs[i]], "segmentation": mask_to_rle(m),
                    "area": float(m.sum()), "clis_i": _score_or_none(inst_scores[i]),
                })
            records.append({
                "key": w.key, "unit": int(w.unit.index), "candidate_idx": c, "seed": int(w.unit.seed),
                "target": int(w.unit.target), "combo": [int(x) for x in w.unit.combo], "scene_graph": scene_dict,
                "width": int(wd), "height": int(h), "clis_l": w.clis_l, "clis_i": _score_or_none(sc.image),
                "selected": c == selected, "provenance": prov, "instances": instances,
            })
            blobs.append(_encode_image(cand.image, self.fmt, self.quality))
            self.stats.instances_stored += len(instances)
        return records, blobs

    # -- one chunk of units ------------------------------------------------------------------------------------------
    def run_chunk(self, chunk: Sequence[tuple[WorkUnit, str]]) -> int:
        """Plan, generate, segment, score, select and write a few units; returns the number of units finished."""
        from .clis.select import select_unit

        st = self.stats
        works: list[_UnitWork] = []
        for (unit, key), plan in zip(chunk, self._plan(chunk)):
            if plan is None:  # the planner raised (counted)
                continue
            st.rejections["plan"].update(plan.rejections)
            st.repairs.update(plan.repairs)
            if plan.scene is None:
                reason = "request_failed" if plan.rejections.get("request_failed") else EMPTY_PLANNER
                st.rejections["plan"]["no_scene"] += 1
                st.empty_units[key] = reason
                continue
            w = self._unit_work(unit, key, plan)
            if w is not None:
                works.append(w)
        for w, scores in self._score(works):
            with _Timer(st, "select"):
                res = select_unit([s.image for s in scores], w.clis_l, [list(s.instances) for s in scores],
                                  min_clis_i=self.sel["min_clis_i"], min_clis_l=self.sel["min_clis_l"])
            st.selection.update(res.reasons)
            st.rejections["select"].update({k: v for k, v in res.reasons.items() if k in SELECT_REJECTIONS and v})
            if res.selected_idx is not None:
                st.units_selected += 1
            with _Timer(st, "encode"):
                records, blobs = self._records(w, scores, res.selected_idx)
            if not records:
                st.empty_units[w.key] = EMPTY_NOTHING_SELECTED if self.keep == "selected" else EMPTY_NO_CANDIDATES
                continue
            with _Timer(st, "write"):
                if self.writer.add_unit(records, blobs):
                    st.units_stored += 1
                    st.kept += len(records)
        st.units_processed += len(chunk)
        return len(chunk)


def _score_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if not np.isfinite(f) else f


def _build_scorer(prep: Prepared) -> Any:
    from .registry import SCORERS

    if prep.scorer_spec is None:
        return None
    name, opts = prep.scorer_spec
    try:
        return SCORERS.build(name, prep.ctx, **opts)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        raise PrebuildError(f"scorer {name!r}: cannot build it: {type(e).__name__}: {e}") from e


def _build_layout(prep: Prepared) -> Any:
    if prep.layout_options is None:
        return None
    from .clis.layout import LayoutScorer

    try:
        return LayoutScorer(prep.priors, **prep.layout_options)
    except (ValueError, TypeError) as e:
        raise PrebuildError(f"layout_score: {e}") from e


def run_prebuild(config: dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike, rank: int = 0, world: int = 1,
                 max_units: int | None = None, *, device: str | None = None, threads: int | None = None,
                 keep: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run rank ``rank`` of ``world`` of the prebuild described by ``config`` (a mapping as in the YAML file, or the
    file's path) into the cache ``out_dir``; returns the summary (also written to ``out_dir/summary/``).

    ``max_units`` caps the global unit list (the first N units, before sharding, so W sharded runs cover the same
    units as one run). ``device``, ``threads`` and ``keep`` override the config. Units already in the cache are
    skipped; an interrupted run loses at most the units of its open shard.
    """
    from .cache.writer import CacheWriter
    from .units import shard_units

    t_start = time.perf_counter()
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if world < 1 or not 0 <= rank < world:
        raise PrebuildError(f"rank {rank} / world {world}: need world >= 1 and 0 <= rank < world")
    if max_units is not None and int(max_units) < 1:
        raise PrebuildError(f"max_units = {max_units} must be >= 1")
    prep = prepare(config, device=device, keep=keep, threads=threads)
    cfg = prep.config
    all_units = prep.make_units(max_units)
    mine = shard_units(all_units, rank, world)
    keys = [prep.key(u) for u in mine]

    dev = _resolve_device(cfg["device"])
    prep.ctx.device = dev
    if cfg["dtype"] == "auto":
        prep.ctx.dtype = "float16" if dev.startswith("cuda") else "float32"
    out = Path(out_dir)
    try:
        writer = CacheWriter(out, prep.categories, prep.generation_settings(), rank,
                             scoring_settings=_json_safe(prep.scoring_settings()),
                             shard_max_samples=int(cfg["shard_size"]),
                             shard_max_bytes=int(cfg["shard_max_mb"]) << 20)
    except RuntimeError as e:  # CacheError: another recipe's cache, a damaged manifest
        raise PrebuildError(str(e)) from e
    done = set(writer.done_keys)
    empty_before = _previous_empty_units(out, _json_safe(prep.scoring_settings()))
    todo = [(u, k) for u, k in zip(mine, keys) if k not in done and k not in empty_before]
    stats = _Stats(units_all=len(all_units), units_rank=len(mine), units_skipped=len(mine) - len(todo),
                   t_start=t_start)
    logger.info("prebuild rank %d/%d: %d units in all, %d for this rank, %d already done, %d to do", rank, world,
                len(all_units), len(mine), stats.units_skipped, len(todo))
    base = {"rank": rank, "world": world, "host": socket.gethostname(), "pid": os.getpid(), "device": dev,
            "config": _json_safe(cfg), "generation_settings": prep.generation_settings(),
            "scoring_settings": _json_safe(prep.scoring_settings()), "started": time.time()}
    status, error = "running", None
    try:
        with writer:
            if todo:
                with _intra_op_threads(dev, cfg["threads"]) as n_threads:
                    stats.threads = n_threads
                    scorer, layout = _load_models(prep, stats)
                    runner = _Runner(prep, writer, scorer, layout, rank, world, stats)
                    base.update(scorer_settings=runner.scorer_settings, layout_settings=runner.layout_settings)
                    _loop(runner, todo, int(cfg["unit_batch"]),
                          lambda: _write_summary(writer, base, stats, "running"),
                          _progress(len(todo), rank, world, progress))
        status = "complete"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except BaseException as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        summary = _write_summary(writer, base, stats, status, error)
    logger.info("prebuild rank %d/%d %s: %d units processed, %d samples kept; summary %s", rank, world, status,
                stats.units_processed, stats.kept, summary.get("summary_path"))
    return summary


def _load_models(prep: Prepared, stats: _Stats) -> tuple[Any, Any]:
    """Load every stage's model once (timed as ``load``); returns the CLIS-I scorer (None: unscored) and the CLIS-L
    scorer (None: off)."""
    cfg = prep.config
    with _Timer(stats, "load"):
        for section in ("planner", "generator", "segmenter"):
            try:
                getattr(prep, section).load()
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise PrebuildError(f"{section} {_stage_name(cfg, section)!r}: cannot load its model: "
                                    f"{type(e).__name__}: {e}") from e
        scorer = _build_scorer(prep)
        layout = _build_layout(prep)
    return scorer, layout


def _loop(runner: _Runner, todo: list[tuple[WorkUnit, str]], step: int, checkpoint: Any, bar: Any) -> None:
    """Run the units ``step`` at a time; ``checkpoint()`` (the summary) after every chunk that closed a shard."""
    stats, writer = runner.stats, runner.writer
    stats.loop_started()
    try:
        for i in range(0, len(todo), step):
            shards_before = len(writer.shards_closed)
            bar.update(runner.run_chunk(todo[i:i + step]))
            bar.set_postfix(kept=stats.kept, refresh=False)
            stats.loop_tick()
            if len(writer.shards_closed) != shards_before:
                checkpoint()
    finally:
        bar.close()
        stats.loop_tick()


def _progress(total: int, rank: int, world: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # ranks sharing a terminal (torchrun on one node) get one line each
    local = os.environ.get("LOCAL_RANK", "0")
    position = int(local) if world > 1 and local.isdigit() else 0
    return tqdm(total=total, desc=f"prebuild {rank}/{world}", unit="unit", position=position, disable=not enabled,
                dynamic_ncols=True, leave=True)


def _write_summary(writer: Any, base: dict[str, Any], stats: _Stats, status: str,
                   error: str | None = None) -> dict[str, Any]:
    loop_s = max(stats.loop_end - stats.loop_start, 0.0)
    staged = {s: stats.seconds[s] for s in STAGES}
    total_staged = sum(staged.values())
    summary = {
        **base, "status": status, "error": error, "threads": stats.threads, "finished": time.time(),
        "units": {"total": stats.units_all, "rank": stats.units_rank, "skipped_done": stats.units_skipped,
                  "processed": stats.units_processed, "stored": stats.units_stored,
                  "selected": stats.units_selected, "empty": len(stats.empty_units), "errors": stats.errors},
        "candidates": stats.candidates, "kept": stats.kept,
        "instances": {"segmented": stats.instances, "dropped": stats.instances_dropped,
                      "stored": stats.instances_stored},
        "rejections": {k: dict(sorted(v.items())) for k, v in stats.rejections.items()},
        "repairs": dict(sorted(stats.repairs.items())),
        "selection": dict(sorted(stats.selection.items())),
        "time_s": {**{k: round(v, 4) for k, v in stats.seconds.items()}, "loop": round(loop_s, 4),
                   "loop_cpu": round(max(stats.loop_cpu_end - stats.loop_cpu_start, 0.0), 4),
                   "total": round(time.perf_counter() - stats.t_start, 4)},
        "time_share": {s: (round(v / total_staged, 4) if total_staged > 0 else 0.0) for s, v in staged.items()},
        "loop_start": stats.loop_start, "loop_end": stats.loop_end,
        "kept_per_s": round(stats.kept / loop_s, 4) if loop_s > 0 else 0.0,
        "empty_units": dict(stats.empty_units),
    }
    try:
        path = writer.write_summary(summary)
        summary["summary_path"] = str(path)
    except OSError as e:  # the summary is a report: never hide the run's own outcome behind it
        logger.error("cannot write the prebuild summary: %s", e)
    return summary


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several ranks' summaries (units, candidates, kept, instances, rejections, stage time)."""
    out: dict[str, Any] = {"ranks": len(summaries), "units": Counter(), "candidates": 0, "kept": 0,
                           "instances": Counter(), "rejections": {}, "time_s": Counter()}
    for s in summaries:
        out["units"].update({k: v for k, v in s.get("units", {}).items() if k != "total"})
        out["candidates"] += int(s.get("candidates", 0))
        out["kept"] += int(s.get("kept", 0))
        out["instances"].update(s.get("instances", {}))
        for stage, reasons in s.get("rejections", {}).items():
            out["rejections"].setdefault(stage, Counter()).update(reasons)
        out["time_s"].update({k: v for k, v in s.get("time_s", {}).items()})
    out["units"] = dict(out["units"])
    out["instances"] = dict(out["instances"])
    out["rejections"] = {k: dict(v) for k, v in out["rejections"].items()}
    out["time_s"] = {k: round(v, 4) for k, v in out["time_s"].items()}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: counts, rejections by reason, time per stage."""
    u = summary["units"]
    inst = summary["instances"]
    lines = [
        f"prebuild rank {summary['rank']}/{summary['world']} [{summary['status']}]: {u['rank']} of {u['total']} "
        f"units for this rank, {u['skipped_done']} already done, {u['processed']} processed ({u['stored']} stored, "
        f"{u['selected']} with a selected candidate, {u['empty']} with nothing stored, {u['errors']} failed)",
        f"  candidates {summary['candidates']}, kept {summary['kept']}, instances {inst['segmented']} "
        f"({inst['dropped']} dropped: empty mask), {summary['kept_per_s']:.3g} kept/s",
    ]
    rej = [f"{stage}.{r} {n}" for stage, d in summary["rejections"].items() for r, n in d.items() if n]
    if rej:
        lines.append("  rejections: " + ", ".join(rej))
    t = summary["time_s"]
    share = summary["time_share"]
    lines.append("  time: " + ", ".join(f"{s} {t[s]:.2f}s ({100 * share[s]:.0f}%)" for s in STAGES if t[s] > 0)
                 + f"; load {t['load']:.2f}s, total {t['total']:.2f}s")
    if summary.get("summary_path"):
        lines.append(f"  summary: {summary['summary_path']}")
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    return "\n".join(lines)


# ----- command line ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acp-data prebuild", description=__doc__.split("\n\n")[0],
        epilog="Rank and world size come from --shard, else RANK/WORLD_SIZE (torchrun), a SLURM array "
               "(SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) or SLURM tasks. See docs/prebuild.md.")
    p.add_argument("--config", required=True, help="prebuild YAML config (docs/prebuild.md)")
    p.add_argument("--out", required=True, help="cache directory (created; shared by all ranks)")
    p.add_argument("--shard", default=None, metavar="r/W", help="run rank r of W (default: from the environment)")
    p.add_argument("--max-units", type=int, default=None, metavar="N",
                   help="only the first N units of the global list (before sharding)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads of this rank (default on CPU: 1)")
    p.add_argument("--keep", choices=("all", "selected"), default=None,
                   help="store every candidate (default) or only each unit's selected one")
    p.add_argument("--categories-from", default=None, metavar="JSON",
                   help="take the categories from this LVIS-format json (overrides the config's 'categories')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML value; dotted keys for sections), e.g. generator.steps=20")
    p.add_argument("--check", action="store_true",
                   help="validate the config and print the units this rank would run, without loading models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .units import ShardError, rank_world_from_env

    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        if args.categories_from:
            config["categories"] = args.categories_from
        rank, world = rank_world_from_env(args.shard)
        if args.check:
            prep = prepare(config, device=args.device, keep=args.keep, threads=args.threads)
            from .units import shard_units

            units = prep.make_units(args.max_units)
            mine = shard_units(units, rank, world)
            print(json.dumps({"units": len(units), "rank": rank, "world": world, "rank_units": len(mine),
                              "targets": len(prep.targets), "generation_settings": prep.generation_settings()},
                             indent=1, sort_keys=True))
            return 0
        summary = run_prebuild(config, args.out, rank, world, args.max_units, device=args.device,
                               threads=args.threads, keep=args.keep, progress=not args.no_progress)
    except (PrebuildError, ShardError) as e:
        print(f"acp-data prebuild: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary["status"] == "complete" else 1
