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
    """design.md's generation key: combination, seed, planner and generator settings; nothing about scoring."""
    return stable_hash({"combo": list(unit.combo), "seed": unit.seed, "planner": planner_settings,
                        "generator": generator_settings}, n=32)


@dataclass
class PlanResult:
    scene: SceneGraph | None
    rejections: Counter = field(default_factory=Counter)  # reason -> count, over all attempts
    repairs: Counter = field(default_factory=Counter)
    attempts: int = 1
    prompts: list[str] = field(default_factory=list)  # provenance (what was asked of an LLM)


class Planner(ABC):
    """Writes a SceneGraph (description + layout) for a work unit."""

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        self.ctx = ctx
        self.options = options

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output; part of the generation key."""
        return {"name": type(self).__name__, **self.options}

    @abstractmethod
    def plan(self, unit: WorkUnit) -> PlanResult: ...


class Generator(ABC):
    """Draws ``n`` candidate RGB images (H x W x 3 uint8) for one layout."""

    max_boxes: int = 30

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        self.ctx = ctx
        self.options = options

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **self.options}

    @abstractmethod
    def generate(self, scene: SceneGraph, n: int, seed: int) -> list[np.ndarray]: ...


class Segmenter(ABC):
    """Turns each absolute XYXY box of an image into a boolean mask (H x W); an empty mask means 'not found'."""

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        self.ctx = ctx
        self.options = options

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **self.options}

    @abstractmethod
    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> list[np.ndarray]: ...


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


class ImageScorer(ABC):
    """CLIS-I: scores candidates (whole image against the caption, each instance against its name/attributes)."""

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        self.ctx = ctx
        self.options = options

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **self.options}

    @abstractmethod
    def score(self, candidates: list[Candidate]) -> list[ImageScore]: ...
