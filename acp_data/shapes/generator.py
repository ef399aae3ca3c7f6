"""``shapes`` generator: draws a SceneGraph's objects in their layout boxes in the synthetic style, with the failures
diffusion models make at configurable per-object rates.

Failures (at most one per object, drawn independently per object and candidate): ``wrong_colour``, ``wrong_shape``,
``missing`` (not drawn), ``merged`` (drawn in a neighbour's colour and fused to it by a band), ``offbox`` (shifted
half a box or more), ``smear`` (warped, motion-blurred, faded). What was drawn never reaches the scorer or any
selection rule but the oracle: ``generate_with_provenance`` (what the prebuild calls) returns the images and, per
candidate, the provenance field ``shapes_truth`` (the failure of each scene object, in scene order), which only
``ACP.SELECT oracle`` reads (acp_data/cache/truth.py); ``generate_with_truth`` also exposes the masks, for tests and
studies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..scene import SceneGraph
from ..stages import Generator, StageContext
from .render import (
    ANGLE_RANGE,
    APPEARANCES,
    SHAPES,
    composite,
    fit_polygons_to_box,
    mask_window,
    object_paint,
    rasterize_soft,
    shape_polygons,
    synth_background,
    to_uint8,
)
from .world import parse_category

GENERATOR_VERSION = 1
TRUTH_FIELD = "shapes_truth"  # the provenance field (acp_data/cache/records.py validates it)
FAILURES = ("wrong_colour", "wrong_shape", "missing", "merged", "offbox", "smear")
DEFAULTS: dict[str, Any] = {
    "p_wrong_colour": 0.10, "p_wrong_shape": 0.10, "p_missing": 0.05, "p_merged": 0.05, "p_offbox": 0.05,
    "p_smear": 0.05, "width": 160, "height": 160,
}
_LAYER_ORDER = ("Background", "Midground", "Foreground", "Immediate Foreground")  # drawn back to front


@dataclass
class DrawnImage:
    """One candidate with what was really drawn: per scene object its visible mask (bool H x W), its failure (None
    when drawn as asked) and the (shape, colour) drawn (None when missing)."""

    image: np.ndarray
    masks: list[np.ndarray]
    failures: list[str | None]
    drawn: list[tuple[str, str] | None]


def _draw_order(scene: SceneGraph, boxes: np.ndarray) -> list[int]:
    """Back to front: by depth layer when the scene has layers, then larger boxes first."""
    layer_of: dict[str, int] = {}
    for name, members in scene.layers.items():
        rank = _LAYER_ORDER.index(name) if name in _LAYER_ORDER else len(_LAYER_ORDER)
        for oid in members:
            for m in scene.groups.get(oid, [oid]):
                layer_of.setdefault(m, rank)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return sorted(range(len(scene.objects)), key=lambda i: (layer_of.get(scene.objects[i].id, 1), -area[i], i))


def _capsule(p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Polygon of a thick band between two points."""
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6) * radius
    a = np.arctan2(d[1], d[0])
    cap1 = [p1 + radius * np.array([np.cos(t), np.sin(t)]) for t in np.linspace(a - np.pi / 2, a + np.pi / 2, 7)]
    cap0 = [p0 + radius * np.array([np.cos(t), np.sin(t)]) for t in np.linspace(a + np.pi / 2, a + 3 * np.pi / 2, 7)]
    return np.array([p0 - n, p1 - n, *cap1, p1 + n, p0 + n, *cap0])


def _smear(rng: np.random.Generator, alpha: np.ndarray, size: float) -> np.ndarray:
    """Warp a coverage map with a smooth random displacement and motion-blur it along a random direction."""
    h, w = alpha.shape
    amp = 0.25 * size
    g = rng.uniform(-1, 1, size=(2, 5, 5)).astype(np.float32)
    dx = cv2.resize(g[0], (w, h), interpolation=cv2.INTER_CUBIC) * amp
    dy = cv2.resize(g[1], (w, h), interpolation=cv2.INTER_CUBIC) * amp
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warped = cv2.remap(alpha, xx + dx, yy + dy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    length = max(3, int(round(size * rng.uniform(0.35, 0.6))) | 1)
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    k /= max(float(k.sum()), 1e-6)
    return np.clip(cv2.filter2D(warped, -1, k) * 1.3, 0, 1)


class ShapesGenerator(Generator):
    """Draws Shapes world categories (``"<colour> <shape>"`` names in ``ctx.categories``) in their layout boxes.

    Options: ``p_wrong_colour``, ``p_wrong_shape``, ``p_missing``, ``p_merged``, ``p_offbox``, ``p_smear``
    (per-object rates, summing to at most 1; ``merged`` needs a second object in the scene), ``width``, ``height``.
    """

    DEFAULTS = DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"shapes generator: unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(DEFAULTS)}")
        opts = {**DEFAULTS, **options}
        for f in FAILURES:
            p = opts[f"p_{f}"]
            if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"shapes generator: option p_{f} = {p!r} must be a probability in [0, 1]")
            opts[f"p_{f}"] = float(p)
        total = sum(opts[f"p_{f}"] for f in FAILURES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"shapes generator: failure rates sum to {total:.3f} > 1 (one failure per object)")
        for k in ("width", "height"):
            if not isinstance(opts[k], int) or not 16 <= opts[k] <= 4096:
                raise ValueError(f"shapes generator: option {k} = {opts[k]!r} must be an integer in 16..4096")
        super().__init__(ctx, **opts)
        self.rates = np.array([opts[f"p_{f}"] for f in FAILURES])
        self.kinds: dict[int, tuple[str, str]] = {}
        for c in ctx.categories:
            try:
                self.kinds[c.id] = parse_category(c.name)
            except ValueError as e:
                raise ValueError(f"shapes generator draws only Shapes world categories: id {c.id} of "
                                 f"{ctx.categories.source or 'the category table'}: {e}") from e

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "version": GENERATOR_VERSION, **self.options}

    def generate(self, scene: SceneGraph, n: int, seed: int) -> list[np.ndarray]:
        return [d.image for d in self.generate_with_truth(scene, n, seed)]

    def generate_with_provenance(self, scene: SceneGraph, n: int,
                                 seed: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """``n`` candidates and, per candidate, ``{"shapes_truth": {"failures": [...]}}``: each scene object's failure
        (None when drawn as asked), in the order of ``scene.objects``; the prebuild adds it to the record's
        provenance."""
        drawn = self.generate_with_truth(scene, n, seed)
        return [d.image for d in drawn], [{TRUTH_FIELD: {"failures": list(d.failures)}} for d in drawn]

    def generate_with_truth(self, scene: SceneGraph, n: int, seed: int) -> list[DrawnImage]:
        """``n`` candidates; candidate ``k`` depends only on (scene, seed, k), so it is the same for any ``n``."""
        width, height = self.options["width"], self.options["height"]
        boxes = scene.boxes_xyxy(width, height)
        for o, b in zip(scene.objects, boxes):
            if not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
                raise ValueError(f"shapes generator: object {o.id} has no usable layout box ({o.bbox})")
            if o.category_id not in self.kinds:
                raise ValueError(f"shapes generator: object {o.id} has category id {o.category_id}, not in the table")
        scene_key = int(hashlib.sha256(scene.to_json().encode()).hexdigest()[:16], 16)
        return [self._draw(scene, boxes, np.random.default_rng([int(seed) % 2**64, scene_key, k]), height, width)
                for k in range(n)]

    # ----- drawing ------------------------------------------------------------------------------------------------
    def _failures(self, rng: np.random.Generator, boxes: np.ndarray) -> tuple[list[str | None], list[int]]:
        n = len(boxes)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        cum = np.cumsum(self.rates)
        failures: list[str | None] = []
        partners = []
        for i in range(n):
            j = int(np.searchsorted(cum, rng.random(), side="right"))
            f = FAILURES[j] if j < len(FAILURES) else None
            partner = -1
            if f == "merged":
                if n < 2:
                    f = None
                else:
                    d = np.hypot(*(centres - centres[i]).T)
                    d[i] = np.inf
                    partner = int(np.argmin(d))
            failures.append(f)
            partners.append(partner)
        return failures, partners

    def _draw(self, scene: SceneGraph, boxes: np.ndarray, rng: np.random.Generator, height: int,
              width: int) -> DrawnImage:
        n = len(scene.objects)
        asked = [self.kinds[o.category_id] for o in scene.objects]
        failures, partners = self._failures(rng, boxes)
        img = synth_background(rng, height, width)
        bg_mean = img.reshape(-1, 3).mean(axis=0)
        owner = np.full((height, width), -1, dtype=np.int32)
        drawn: list[tuple[str, str] | None] = [None] * n
        for i in _draw_order(scene, boxes):
            shape, colour = asked[i]
            f = failures[i]
            if f == "missing":
                continue
            if f == "wrong_colour":
                colour = str(rng.choice([c for c in APPEARANCES if c != colour]))
            elif f == "wrong_shape":
                shape = str(rng.choice([s for s in SHAPES if s != shape]))
            elif f == "merged":
                colour = asked[partners[i]][1]
            box = boxes[i].copy()
            bw, bh = box[2] - box[0], box[3] - box[1]
            if f == "offbox":
                a = rng.uniform(0, 2 * np.pi)
                shift = np.array([np.cos(a) * bw, np.sin(a) * bh]) * rng.uniform(0.5, 0.8)
                box += np.concatenate([shift, shift])
            margin = rng.uniform(0.0, 0.05, 4) * np.array([bw, bh, -bw, -bh])
            polys = fit_polygons_to_box(shape_polygons(shape, 0.0, 0.0, 1.0, 1.0,
                                                       float(rng.uniform(0, ANGLE_RANGE[shape]))), box + margin)
            if f == "merged":
                centre_i = (boxes[i, :2] + boxes[i, 2:]) / 2
                centre_j = (boxes[partners[i], :2] + boxes[partners[i], 2:]) / 2
                band = _capsule(centre_i, centre_j, 0.22 * min(bw, bh))
                alpha = np.maximum(rasterize_soft(polys, height, width), rasterize_soft([band], height, width))
            else:
                alpha = rasterize_soft(polys, height, width)
            if f == "smear":
                alpha = _smear(rng, alpha, float(max(bw, bh)))
            win = mask_window(alpha > 0.02, pad=1)
            if win is None:  # pushed out of the image
                continue
            paint = object_paint(rng, APPEARANCES[colour], win, "synth")
            if f == "smear":
                paint = paint * 0.6 + bg_mean * 0.4
            composite(img, alpha, paint, win)
            owner[alpha > 0.5] = i
            drawn[i] = (shape, colour)
        img = _finish(rng, img)
        return DrawnImage(image=img, masks=[owner == i for i in range(n)], failures=failures, drawn=drawn)


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Global look of a generated image: lighting gradient, vignette, colour cast, sensor noise, lens blur."""
    h, w = img.shape[:2]
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx - w / 2) * np.cos(a) + (yy - h / 2) * np.sin(a)) / max(h, w)
    light = 1.0 + rng.uniform(0.25, 0.5) * t
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.5 * max(h, w)) ** 2
    light = light * (1.0 - rng.uniform(0.05, 0.15) * r2)
    cast = rng.uniform(0.94, 1.06, 3).astype(np.float32)
    img = img * light[..., None] * cast + rng.normal(0, rng.uniform(2.5, 5.0), img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 0.9)))
    return to_uint8(img)
