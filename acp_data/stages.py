"""Interfaces of the pluggable pipeline stages (planner, generator, segmenter, image scorer) and the small records
that pass between them. Backends subclass these and are registered in ``acp_data.registry``.

Every backend is built as ``Backend(ctx, **options)`` where ``options`` is its section of the prebuild config (minus
``name``) and ``ctx`` carries what all stages share. Heavy libraries are imported inside the backend modules.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .categories import CategoryTable
    from .priors import Priors
    from .scene import SceneGraph


@dataclass
class StageContext:
    """What every backend may use: the category table, the priors (may be None), torch device and dtype names."""

    categories: CategoryTable
    priors: Priors | None = None
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class WorkUnit:
    """One object combination and a seed; ``index`` is its position in the global unit list (rank r takes
    ``index % W == r``); ``target`` is the concept this unit was drawn for."""

    index: int
    combo: tuple[int, ...]
    seed: int
    target: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "combo": list(self.combo), "seed": self.seed, "target": self.target}


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object with sorted keys (stable across processes and machines)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def generation_key(unit: WorkUnit, planner_settings: dict[str, Any], generator_settings: dict[str, Any]) -> str:
    """The generation key: combination, seed, planner and generator settings; nothing about scoring
    (docs/design.md "Work units, keys and determinism (contract)")."""
    return stable_hash({"combo": list(unit.combo), "seed": unit.seed, "planner": planner_settings,
                        "generator": generator_settings}, n=32)


@dataclass
class PlanResult:
    scene: SceneGraph | None
    rejections: Counter = field(default_factory=Counter)  # reason -> count, over all attempts
    repairs: Counter = field(default_factory=Counter)
    attempts: int = 1
    prompts: list[str] = field(default_factory=list)  # provenance (what was asked of an LLM)


class Stage:
    """What every backend shares: built as ``Backend(ctx, **options)`` (``options`` = its config section minus
    ``name``), no weights loaded until ``load()``; ``settings()`` says what changes its output.

    ``DEFAULTS`` may list the options the backend knows with their default values (empty: the backend checks its
    options itself; prebuild refuses unknown scorer options from it before building the scorer). ``load()`` loads
    the model once; prebuild calls it for every stage before the first unit (timed as ``load``), so building a stage
    only checks its options and paths and a bad config fails before any weights are read.
    See docs/design.md "Stage contract" and docs/plugins.md.
    """

    DEFAULTS: dict[str, Any] = {}

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        self.ctx = ctx
        self.options = options

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (hashed into the generation key for planner and generator, pinned by
        the cache manifest for the segmenter); nothing that does not (device, batch sizes)."""
        return {"name": type(self).__name__, **self.options}

    def load(self) -> None:
        """Load the model (idempotent); the default has nothing to load."""


class Planner(Stage, ABC):
    """Writes a SceneGraph (description + layout) for a work unit."""

    @abstractmethod
    def plan(self, unit: WorkUnit) -> PlanResult: ...

    def plan_many(self, units: Sequence[WorkUnit]) -> list[PlanResult]:
        """Plan several units (in order; prebuild passes ``unit_batch`` at a time); backends that can overlap
        requests override this."""
        return [self.plan(u) for u in units]


class Generator(Stage, ABC):
    """Draws ``n`` candidate RGB images (H x W x 3 uint8) for one layout; at most ``max_boxes`` boxes per layout."""

    max_boxes: int = 30

    @abstractmethod
    def generate(self, scene: SceneGraph, n: int, seed: int) -> list[np.ndarray]: ...


class Segmenter(Stage, ABC):
    """Turns each absolute XYXY box of an image into a boolean mask (H x W); an empty mask means 'not found'."""

    @abstractmethod
    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> list[np.ndarray]: ...

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """``segment`` of every image with its boxes (prebuild passes one unit's candidates); backends that batch
        override this."""
        return [self.segment(im, b) for im, b in zip(images, boxes)]


@dataclass
class Candidate:
    """One generated image with its scene graph, the absolute XYXY layout boxes and the final masks (one per
    scene object; an instance the segmenter rejected has ``None``)."""

    image: np.ndarray
    scene: SceneGraph
    boxes_xyxy: np.ndarray
    masks: list[np.ndarray | None]


@dataclass
class ImageScore:
    """CLIS-I of one candidate: image score and one score per instance; ``None`` = unscored (never 0 by default)."""

    image: float | None
    instances: list[float | None]
    details: dict[str, Any] = field(default_factory=dict)


class ImageScorer(Stage, ABC):
    """CLIS-I: scores candidates (whole image against the caption, each instance against its name/attributes).
    Built by prebuild after the other stages load, so a scorer may load its model when built."""

    @abstractmethod
    def score(self, candidates: list[Candidate]) -> list[ImageScore]: ...
