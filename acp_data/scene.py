"""The ``SceneGraph`` contract: what a planner writes and a generator draws.

Objects carry ``name-k`` ids (``dog-1``; multi-word names use underscores: ``red_star-2``), a category id and
attributes; relations link subject ids to object ids with a phrase; depth layers group ids; the caption tags objects
as ``dog(dog-1)`` (one tag may list several ids: ``two dogs(dog-1, dog-2)``); layout boxes are normalised XYWH with a top-left origin. This module is the only place that converts
layout boxes to the absolute XYXY a generator or segmenter needs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Named rejection reasons (counted by planners and the prebuild summary).
MISSING_OBJECT = "missing_object"
DUPLICATE_OBJECT = "duplicate_object"
EXTRA_OBJECT = "extra_object"
MISSING_BOX = "missing_box"
BOX_OUT_OF_RANGE = "box_out_of_range"
BOX_ZERO_AREA = "box_zero_area"
UNKNOWN_RELATION_ID = "unknown_relation_id"
CAPTION_MISSING_OBJECT = "caption_missing_object"
BAD_OBJECT_ID = "bad_object_id"
REJECTION_REASONS = (
    MISSING_OBJECT, DUPLICATE_OBJECT, EXTRA_OBJECT, MISSING_BOX, BOX_OUT_OF_RANGE, BOX_ZERO_AREA,
    UNKNOWN_RELATION_ID, CAPTION_MISSING_OBJECT, BAD_OBJECT_ID,
)
# Repairs (counted, applied by ``SceneGraph.repair``).
REPAIR_CLIP_BOX = "clip_box"
REPAIR_NORMALIZE_ID = "normalize_id"

# A box edge may lie outside the image by at most this fraction of the image side (normalised units: x >= -0.1,
# x + w <= 1.1, same for y) and is then clipped to the image; an edge farther out rejects the box. Measured against
# the image, not the box: a small box and a large one get the same slack.
MAX_OVERSHOOT = 0.10
DEPTH_LAYERS = ("Immediate Foreground", "Foreground", "Midground", "Background")

_ID_RE = re.compile(r"^(?P<name>[a-z0-9_()'.&/+:,\-]+?)-(?P<k>\d+)$")
_TAG_RE = re.compile(r"\(([^()]+)\)")


def normalize_object_id(oid: str) -> str:
    """``"Red  Star-1"`` -> ``"red_star-1"``: lower case, runs of spaces/underscores become one underscore."""
    return re.sub(r"[\s_]+", "_", str(oid).strip()).lower()


def object_id(name: str, k: int) -> str:
    return normalize_object_id(f"{name}-{k}")


def caption_tags(caption: str) -> set[str]:
    """The (normalised) ids tagged in a caption: ``"two dogs(dog-1, Dog-2) and a cat(cat-3)"`` ->
    ``{"dog-1", "dog-2", "cat-3"}``."""
    return {normalize_object_id(t) for m in _TAG_RE.finditer(caption or "") for t in m.group(1).split(",")
            if t.strip()}


def object_name(oid: str) -> str:
    """The name part of an id, with spaces: ``red_star-2`` -> ``red star``."""
    return oid.rsplit("-", 1)[0].replace("_", " ")


@dataclass
class SceneObject:
    id: str
    category_id: int
    attributes: list[str] = field(default_factory=list)
    bbox: tuple[float, float, float, float] | None = None  # normalised XYWH

    @property
    def name(self) -> str:
        return object_name(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category_id": self.category_id, "attributes": list(self.attributes),
                "bbox": None if self.bbox is None else [float(v) for v in self.bbox]}


@dataclass
class Relation:
    subjects: list[str]
    objects: list[str]
    phrase: str

    def to_dict(self) -> dict[str, Any]:
        return {"subjects": list(self.subjects), "objects": list(self.objects), "phrase": self.phrase}


@dataclass
class Validation:
    """Result of ``SceneGraph.validate``: ``ok`` iff no rejection reason; details name the object or value."""

    reasons: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def codes(self) -> list[str]:
        return [r for r, _ in self.reasons]

    def add(self, code: str, detail: str) -> None:
        self.reasons.append((code, detail))

    def message(self) -> str:
        """Human (and LLM) readable list of the problems, fed back to a planner on retry."""
        return "; ".join(f"{c}: {d}" for c, d in self.reasons)


@dataclass
class SceneGraph:
    objects: list[SceneObject]
    relations: list[Relation] = field(default_factory=list)
    layers: dict[str, list[str]] = field(default_factory=dict)
    caption: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict)

    # ----- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "relations": [r.to_dict() for r in self.relations],
            "layers": {k: list(v) for k, v in self.layers.items()},
            "groups": {k: list(v) for k, v in self.groups.items()},
            "caption": self.caption,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneGraph:
        objs = [
            SceneObject(
                id=str(o["id"]), category_id=int(o["category_id"]), attributes=[str(a) for a in o.get("attributes", [])],
                bbox=None if o.get("bbox") is None else tuple(float(v) for v in o["bbox"]),  # type: ignore[arg-type]
            )
            for o in d.get("objects", [])
        ]
        rels = [Relation([str(s) for s in r["subjects"]], [str(s) for s in r["objects"]], str(r.get("phrase", "")))
                for r in d.get("relations", [])]
        return cls(
            objects=objs, relations=rels,
            layers={str(k): [str(x) for x in v] for k, v in d.get("layers", {}).items()},
            caption=str(d.get("caption", "")),
            groups={str(k): [str(x) for x in v] for k, v in d.get("groups", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> SceneGraph:
        return cls.from_dict(json.loads(text))

    # ----- accessors ----------------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return [o.id for o in self.objects]

    def object(self, oid: str) -> SceneObject:
        for o in self.objects:
            if o.id == oid:
                return o
        raise KeyError(oid)

    def boxes_xywh(self) -> np.ndarray:
        """Layout boxes, normalised XYWH, shape (N, 4) float64 (NaN rows for objects without a box)."""
        return np.array([o.bbox if o.bbox is not None else (np.nan,) * 4 for o in self.objects],
                        dtype=np.float64).reshape(-1, 4)

    def boxes_xyxy(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """The one XYWH -> XYXY conversion: normalised ``[x0, y0, x1, y1]``, or absolute pixels if a size is given."""
        b = self.boxes_xywh()
        out = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
        if width is not None and height is not None:
            out = out * np.array([width, height, width, height], dtype=np.float64)
        return out

    def phrases(self) -> list[str]:
        """One phrase per object for a layout-to-image model: attributes then name (``"striped red star"``)."""
        return [" ".join([*o.attributes, o.name]).strip() for o in self.objects]

    # ----- validation and repair ----------------------------------------------------------------------------------
    def validate(self, requested: Sequence[str] | None = None, check_caption: bool = True) -> Validation:
        """Check the graph; ``requested`` are the object ids the planner was asked for (each exactly once)."""
        v = Validation()
        counts = Counter(self.ids)
        for oid, n in counts.items():
            if n > 1:
                v.add(DUPLICATE_OBJECT, f"{oid} appears {n} times")
        for o in self.objects:
            if not _ID_RE.match(o.id):
                v.add(BAD_OBJECT_ID, f"{o.id!r} is not of the form name-k")
        if requested is not None:
            req = [normalize_object_id(r) for r in requested]
            for r in req:
                if r not in counts:
                    v.add(MISSING_OBJECT, f"{r} is missing")
            for oid in counts:
                if oid not in req:
                    v.add(EXTRA_OBJECT, f"{oid} was not requested")
        for o in self.objects:
            if o.bbox is None:
                v.add(MISSING_BOX, f"{o.id} has no box")
                continue
            x, y, w, h = o.bbox
            if not all(np.isfinite([x, y, w, h])):
                v.add(BOX_OUT_OF_RANGE, f"{o.id} box {list(o.bbox)} is not finite")
            elif w <= 0 or h <= 0:
                v.add(BOX_ZERO_AREA, f"{o.id} box {list(o.bbox)} has zero area")
            elif not (0 <= x and 0 <= y and x + w <= 1 and y + h <= 1):
                v.add(BOX_OUT_OF_RANGE, f"{o.id} box {list(o.bbox)} leaves the image (x, y, x+w, y+h must be in 0..1)")
        known = set(counts)
        for r in self.relations:
            for oid in [*r.subjects, *r.objects]:
                if oid not in known:
                    v.add(UNKNOWN_RELATION_ID, f"relation {r.phrase!r} names unknown object {oid}")
        for layer, members in self.layers.items():
            for oid in members:
                if oid not in known and oid not in self.groups:
                    v.add(UNKNOWN_RELATION_ID, f"layer {layer!r} names unknown object {oid}")
        if check_caption and self.caption:
            cap = self.caption.lower()
            tags = caption_tags(cap) if "(" in cap else None
            for o in self.objects:
                present = o.id in tags if tags is not None else o.name.lower() in cap
                if not present:
                    v.add(CAPTION_MISSING_OBJECT, f"caption does not mention {o.id}")
        elif check_caption:
            v.add(CAPTION_MISSING_OBJECT, "caption is empty")
        return v

    def repair(self) -> tuple[SceneGraph, Counter]:
        """Apply safe repairs and count them: normalise ids (case, spaces) everywhere they appear, and clip boxes
        whose edges lie at most ``MAX_OVERSHOOT`` (a fraction of the image side) outside the image. Anything worse is
        left for ``validate`` to reject."""
        repairs: Counter = Counter()
        mapping: dict[str, str] = {}
        objs = []
        for o in self.objects:
            nid = normalize_object_id(o.id)
            if nid != o.id:
                repairs[REPAIR_NORMALIZE_ID] += 1
            mapping[o.id] = nid
            box = o.bbox
            if box is not None and all(np.isfinite(box)) and box[2] > 0 and box[3] > 0:
                clipped = _clip_box(box)
                if clipped is not None and clipped != tuple(box):
                    repairs[REPAIR_CLIP_BOX] += 1
                    box = clipped
            objs.append(SceneObject(nid, o.category_id, [a.strip() for a in o.attributes if a.strip()], box))

        def fix(oid: str) -> str:
            return mapping.get(oid, normalize_object_id(oid))

        rels = [Relation([fix(s) for s in r.subjects], [fix(s) for s in r.objects], " ".join(r.phrase.split()))
                for r in self.relations]
        layers = {k: [fix(x) for x in v] for k, v in self.layers.items()}
        groups = {k: [fix(x) for x in v] for k, v in self.groups.items()}
        caption = self.caption
        for old, new in mapping.items():
            if old != new:
                caption = caption.replace(f"({old})", f"({new})")
        return SceneGraph(objs, rels, layers, caption, groups), repairs


def _clip_box(box: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Clip a normalised XYWH box to [0, 1] when no edge lies more than MAX_OVERSHOOT (of the image side) outside
    the image and something is left of it; else None (the box is rejected as it is)."""
    x, y, w, h = (float(v) for v in box)
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x0 >= 0 and y0 >= 0 and x1 <= 1 and y1 <= 1:
        return (x, y, w, h)
    tol = MAX_OVERSHOOT + 1e-12
    if min(x0, y0) < -tol or max(x1, y1) > 1 + tol:
        return None
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
    if x1 <= x0 or y1 <= y0:  # entirely outside the image
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Absolute or normalised XYXY -> XYWH (for records written back from masks)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
