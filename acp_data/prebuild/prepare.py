"""Checking a whole prebuild config against its inputs and building the stages (no model is loaded here): the
categories, the priors, the target concepts, the scorer's options, model paths, and the planner, generator and
segmenter built from the registries (``Prepared``)."""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..stages import Generator, Planner, Segmenter, Stage, StageContext, WorkUnit, generation_key
from .config import (
    DATASETS_PREFIX,
    PrebuildError,
    check_config,
    datasets_root,
    json_safe,
    resolve_data_path,
    stage_name,
    stage_section,
)

__all__ = ["Prepared", "prepare", "resolve_device", "build_scorer", "build_layout"]


def _load_categories(spec: Any, priors: Any) -> Any:
    from ..categories import CategoryError, CategoryTable

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
        from ..shapes.world import world_category_table

        size = s.split(":", 1)[1] if ":" in s else "demo"
        try:
            return world_category_table(size)
        except ValueError as e:
            raise PrebuildError(f"categories: {e}") from e
    p = Path(resolve_data_path(s))
    if not p.is_file():
        where = f" ({p})" if str(p) != s else ""
        raise PrebuildError(f"categories: {s!r}{where} is neither lvis_v1, shapes[:SIZE] nor an existing LVIS-format "
                            "json")
    try:
        return CategoryTable.from_lvis_json(p)
    except CategoryError as e:
        raise PrebuildError(f"categories: {e}") from e


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or os.sep in ref and ref.count("/") != 1


def _check_model_refs(where: str, options: dict[str, Any]) -> None:
    """Fail fast on model references that are paths and do not exist (a backend that loads at construction, such as
    the CLIS-I scorers, would otherwise fail only after the other models loaded)."""
    from ..generate.common import BackendOptionError, check_model_ref

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


def resolve_device(device: str) -> str:
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
        """The unit's generation key: combination, seed, planner and generator settings (with N)
        (docs/design.md "Work units, keys and determinism (contract)")."""
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
    from ..registry import RegistryError

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



def _missing_priors(given: str, path: str, categories: Any) -> str:
    """The message for a priors file that does not exist: where it was looked for and the command that builds it
    from the training annotations of ``categories``."""
    if isinstance(categories, str) and categories.strip().lower() in ("lvis_v1", "lvis"):
        ann = os.path.join(datasets_root(), "lvis", "lvis_v1_train.json")  # detectron2's lvis_v1_train
    elif isinstance(categories, str) and not categories.strip().lower().startswith("shapes"):
        ann = resolve_data_path(categories.strip())
    else:
        ann = "TRAIN_ANNOTATIONS.json"  # the training split's LVIS-format json
    where = ""
    if not os.path.isabs(given) and Path(given).parts[:1] == (DATASETS_PREFIX,):
        env = os.environ.get("DETECTRON2_DATASETS")
        where = (f" (config key 'priors' = {given!r}: a path under {DATASETS_PREFIX}/ is looked up in "
                 + (f"DETECTRON2_DATASETS={env}" if env else "./datasets, DETECTRON2_DATASETS being unset") + ")")
    return (f"priors: priors file {path!r} does not exist{where}. Build it with:\n  acp-data priors build --ann {ann} "
            f"--out {path}")


def _load_inputs(cfg: dict[str, Any]) -> tuple[Any, Any, list[int]]:
    """``(priors or None, CategoryTable, target category ids)`` from the config's priors, categories and concepts."""
    from ..categories import CategoryError
    from ..priors import Priors, PriorsError

    priors = None
    if cfg["priors"] is not None:
        if not isinstance(cfg["priors"], str):
            raise PrebuildError(f"config key 'priors' = {cfg['priors']!r} must be a file path or null")
        path = resolve_data_path(cfg["priors"])
        if not os.path.isfile(path):
            raise PrebuildError(_missing_priors(cfg["priors"], path, cfg["categories"]))
        try:
            priors = Priors.load(path)
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

    from ..registry import SCORERS, RegistryError

    ls = cfg["layout_score"]
    layout_options = None if ls is False else (dict(ls) if isinstance(ls, dict) else {})
    if layout_options is not None:
        if priors is None:
            raise PrebuildError("layout_score (CLIS-L) needs reference box pairs: give 'priors' or set "
                                "layout_score: false")
        from ..clis.layout import LayoutScorer

        params = set(inspect.signature(LayoutScorer).parameters) - {"priors"}
        bad = sorted(set(layout_options) - params)
        if bad:
            raise PrebuildError(f"layout_score: unknown option(s) {', '.join(map(repr, bad))}; known: "
                                f"{', '.join(sorted(params))}")
    elif cfg["selection"]["min_clis_l"] > 0:
        raise PrebuildError(f"selection.min_clis_l = {cfg['selection']['min_clis_l']} needs layout_score: true "
                            "(without CLIS-L no unit would pass)")
    scorer_spec = stage_section(cfg, "scorer")
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
    check_weights = getattr(cls, "check_weights", None)  # weights named, no random init (docs/plugins.md)
    if callable(check_weights):
        try:
            check_weights(opts)
        except (ValueError, FileNotFoundError) as e:
            raise PrebuildError(str(e)) from None
    return scorer_spec, layout_options


def prepare(config: dict[str, Any], *, device: str | None = None, keep: str | None = None,
            threads: int | None = None) -> Prepared:
    """Check the whole config and build the planner, generator and segmenter without loading any model: unknown keys
    or backends, unknown concepts (with the closest names), unreadable priors, missing model paths and a planner
    asking for more objects than the generator draws all fail here, each with one message."""
    from ..registry import GENERATORS, PLANNERS, SEGMENTERS

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
        name, opts = stage_section(cfg, section) or ("", {})
        built[section] = _build_stage(registry, base, section, name, opts, ctx)
    gen = built["generator"]
    max_boxes = int(gen.max_boxes)
    if cfg["max_objects"] > max_boxes:
        raise PrebuildError(f"max_objects = {cfg['max_objects']} but generator {stage_name(cfg, 'generator')!r} "
                            f"draws at most {max_boxes} boxes per layout (its max_boxes): lower max_objects to "
                            f"{max_boxes} or less")
    prep = Prepared(cfg, categories, targets, priors, ctx, built["planner"], gen, built["segmenter"], scorer_spec,
                    layout_options)
    prep.planner_settings = json_safe(prep.planner.settings())
    prep.generator_settings = json_safe({**gen.settings(), "candidates": int(cfg["candidates"])})
    prep.segmenter_settings = json_safe(prep.segmenter.settings())
    return prep



def build_scorer(prep: Prepared) -> Any:
    from ..registry import SCORERS

    if prep.scorer_spec is None:
        return None
    name, opts = prep.scorer_spec
    try:
        return SCORERS.build(name, prep.ctx, **opts)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        raise PrebuildError(f"scorer {name!r}: cannot build it: {type(e).__name__}: {e}") from e


def build_layout(prep: Prepared) -> Any:
    if prep.layout_options is None:
        return None
    from ..clis.layout import LayoutScorer

    try:
        return LayoutScorer(prep.priors, **prep.layout_options)
    except (ValueError, TypeError) as e:
        raise PrebuildError(f"layout_score: {e}") from e


