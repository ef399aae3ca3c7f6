"""Composition of the world's real images: object sizes and poses, placement with bounded occlusion, painting."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .render import (
    ANGLE_RANGE,
    APPEARANCES,
    composite,
    mask_window,
    object_paint,
    rasterize,
    real_background,
    shape_polygons,
    to_uint8,
)

MIN_VISIBLE_FRAC = 0.55  # an object keeps at least this fraction of its area when later objects cover it
MIN_VISIBLE_PIXELS = 40
_TRIES = 40

_SHAPE_SCALE = {"circle": 1.0, "square": 0.92, "triangle": 1.08, "star": 1.12, "ring": 1.0, "cross": 1.0}


def sample_pose(rng: np.random.Generator, shape: str, height: int, width: int,
                shrink: float = 1.0) -> tuple[float, float, float, float, float]:
    """Centre, half-sizes and angle of an object: size log-normal around a quarter of the short side, aspect within
    0.8-1.25, centre such that at most a tenth of the object leaves the image."""
    short = min(height, width)
    side = float(np.clip(short * 0.24 * np.exp(rng.normal(0, 0.3)), 16, short * 0.5)) * _SHAPE_SCALE[shape] * shrink
    aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    sx, sy = side / 2 * np.sqrt(aspect), side / 2 / np.sqrt(aspect)
    r = max(sx, sy) * 0.8
    cx = rng.uniform(r, max(r + 1, width - r))
    cy = rng.uniform(r, max(r + 1, height - r))
    return cx, cy, sx, sy, float(rng.uniform(0, ANGLE_RANGE[shape]))


def render_real_image(rng: np.random.Generator, objects: Sequence[tuple[str, str]], height: int,
                      width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw ``objects`` ((shape, colour) pairs, back to front) on a real-style background.

    Returns the uint8 RGB image and each object's visible mask (bool, exactly the pixels painted with it). Every
    object keeps at least ``MIN_VISIBLE_FRAC`` of its area and ``MIN_VISIBLE_PIXELS`` pixels visible when possible.
    """
    owner = np.full((height, width), -1, dtype=np.int32)
    visible = np.zeros(len(objects), dtype=np.int64)
    full = np.zeros(len(objects), dtype=np.int64)
    full_masks: list[np.ndarray] = []
    for k, (shape, _) in enumerate(objects):
        best, best_score = None, -1.0
        for attempt in range(_TRIES):
            pose = sample_pose(rng, shape, height, width, shrink=0.88 ** (attempt // 8))
            m = rasterize(shape_polygons(shape, *pose), height, width)
            area = int(m.sum())
            if area < MIN_VISIBLE_PIXELS:
                continue
            covered = np.bincount(owner[m] + 1, minlength=k + 1)[1:k + 1]
            left = visible[:k] - covered
            frac = left / np.maximum(full[:k], 1)
            ok = bool(np.all((frac >= MIN_VISIBLE_FRAC) & (left >= MIN_VISIBLE_PIXELS)))
            score = float(frac.min()) if k else 1.0
            if ok or score > best_score:
                best, best_score = (m, area, covered), score
            if ok:
                break
        if best is None:  # only tiny images end here: draw a small blob at the centre
            pose = (width / 2, height / 2, 5.0, 5.0, 0.0)
            m = rasterize(shape_polygons(shape, *pose), height, width)
            best = (m, int(m.sum()), np.bincount(owner[m] + 1, minlength=k + 1)[1:k + 1])
        m, area, covered = best
        visible[:k] -= covered
        visible[k], full[k] = area, area
        owner[m] = k
        full_masks.append(m)

    img = real_background(rng, height, width)
    for k, (_, colour) in enumerate(objects):
        box = mask_window(full_masks[k])
        if box is None:
            continue
        composite(img, full_masks[k].astype(np.float32), object_paint(rng, APPEARANCES[colour], box, "real"), box)
    return to_uint8(img), [owner == k for k in range(len(objects))]
