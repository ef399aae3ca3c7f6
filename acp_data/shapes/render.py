"""Drawing for the Shapes world: shape outlines, backgrounds and object paint, in two styles.

The ``real`` style makes the dataset images (muted flat/gradient/blotchy backgrounds, hard edges, flat paint with a
little shading). The ``synth`` style is what the shapes generator draws: other backgrounds (noise textures, tiles,
floor and wall), soft edges, glossy shading, texture noise, a lighting gradient over the whole image and blur, so
models trained on real images meet a style gap as they do with diffusion images.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
RING_INNER = 0.55  # inner radius of a ring as a fraction of the outer one
# rotation symmetry of each shape: angles beyond it draw the same outline
ANGLE_RANGE = {"circle": np.pi, "ring": np.pi, "square": np.pi / 2, "cross": np.pi / 2,
               "triangle": 2 * np.pi / 3, "star": 2 * np.pi / 5}
_SUB = 16  # cv2 fixed-point factor (shift=4) for sub-pixel polygon vertices


@dataclass(frozen=True)
class Appearance:
    """A colour word or texture: one RGB colour (solid) or two (stripes)."""

    name: str
    colours: tuple[tuple[int, int, int], ...]

    @property
    def striped(self) -> bool:
        return len(self.colours) > 1


APPEARANCES: dict[str, Appearance] = {a.name: a for a in (
    Appearance("red", ((205, 35, 35),)),
    Appearance("green", ((40, 155, 55),)),
    Appearance("blue", ((35, 75, 205),)),
    Appearance("yellow", ((235, 200, 25),)),
    Appearance("striped", ((25, 25, 25), (240, 240, 240))),
)}


# ----- geometry ---------------------------------------------------------------------------------------------------
def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(a), np.sin(a)], axis=1) * radius


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(72),
    "ring": _regular(72),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": _regular(3),
    "star": _star(),
    "cross": _cross(),
}


def shape_polygons(shape: str, cx: float, cy: float, sx: float, sy: float, angle: float) -> list[np.ndarray]:
    """Outline (and for a ring its hole) of ``shape`` in pixel coordinates: unit shape scaled by (sx, sy) half-sizes,
    rotated by ``angle`` radians, centred at (cx, cy). The first polygon is filled, the others are holes."""
    if shape not in _OUTLINES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    polys = [_OUTLINES[shape]]
    if shape == "ring":
        polys.append(_OUTLINES["ring"] * RING_INNER)
    return [(p * (sx, sy)) @ rot.T + (cx, cy) for p in polys]


def fit_polygons_to_box(polys: list[np.ndarray], box_xyxy: np.ndarray) -> list[np.ndarray]:
    """Scale and shift polygons (independently in x and y) so their joint extent fills ``box_xyxy``."""
    allp = np.concatenate(polys, axis=0)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    scale = np.array([x1 - x0, y1 - y0]) / np.maximum(hi - lo, 1e-6)
    return [(p - lo) * scale + (x0, y0) for p in polys]


def rasterize(polys: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Hard bool mask of a shape (first polygon filled, the rest cut out), no anti-aliasing. Vertices are in COCO
    pixel coordinates (pixel i covers [i, i + 1]); cv2 puts pixel centres on integers, hence the half-pixel shift."""
    m = np.zeros((height, width), dtype=np.uint8)
    pts = [np.round((p - 0.5) * _SUB).astype(np.int32) for p in polys]
    cv2.fillPoly(m, pts[:1], 1, lineType=cv2.LINE_8, shift=4)
    if len(pts) > 1:
        cv2.fillPoly(m, pts[1:], 0, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def rasterize_soft(polys: list[np.ndarray], height: int, width: int, factor: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32), by drawing at ``factor`` times the size and averaging."""
    big = rasterize([p * factor for p in polys], height * factor, width * factor)
    return cv2.resize(big.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)


# ----- colour helpers ---------------------------------------------------------------------------------------------
def hsv_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise in about [-1, 1]: a random ``cells`` x ``cells`` grid upsampled bicubically."""
    g = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(g, (width, height), interpolation=cv2.INTER_CUBIC)


def _linear_ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ramp in [0, 1] along a random direction."""
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * np.cos(a) + yy * np.sin(a)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


# ----- backgrounds ------------------------------------------------------------------------------------------------
def real_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted background of the dataset images (float32 RGB): flat, two-colour gradient, blotches or soft stripes."""
    h0 = rng.uniform()
    base = hsv_rgb(h0, rng.uniform(0.05, 0.35), rng.uniform(0.40, 0.68))
    other = hsv_rgb(h0 + rng.uniform(-0.15, 0.15), rng.uniform(0.05, 0.35), rng.uniform(0.40, 0.68))
    kind = int(rng.integers(4))
    img = np.empty((height, width, 3), dtype=np.float32)
    if kind == 0:
        img[:] = base
    elif kind == 1:
        t = _linear_ramp(rng, height, width)[..., None]
        img[:] = base * (1 - t) + other * t
    elif kind == 2:
        t = (_smooth_noise(rng, height, width, int(rng.integers(2, 5))) * 0.5 + 0.5).clip(0, 1)[..., None]
        img[:] = base * (1 - t) + other * t
    else:
        period = rng.uniform(10, 30)
        t = _linear_ramp(rng, height, width) * max(height, width) / period
        img[:] = base + (np.sin(2 * np.pi * t)[..., None] * rng.uniform(4, 10)).astype(np.float32)
    img += rng.normal(0, 2.0, size=img.shape).astype(np.float32)
    return img


def synth_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Generated-image background (float32 RGB): noisy texture, tiles, or floor and wall; more saturated and
    busier than the real ones."""
    h0 = rng.uniform()
    base = hsv_rgb(h0, rng.uniform(0.15, 0.45), rng.uniform(0.45, 0.70))
    other = hsv_rgb(h0 + rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.45), rng.uniform(0.45, 0.70))
    kind = int(rng.integers(3))
    img = np.empty((height, width, 3), dtype=np.float32)
    if kind == 0:  # two-octave texture
        n = _smooth_noise(rng, height, width, 6) * 0.6 + _smooth_noise(rng, height, width, 24) * 0.4
        t = (n * 0.5 + 0.5).clip(0, 1)[..., None]
        img[:] = base * (1 - t) + other * t * 0.35 + base * t * 0.65
    elif kind == 1:  # tiles with grout
        cell = int(rng.integers(14, 30))
        yy, xx = np.mgrid[0:height, 0:width]
        chk = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)[..., None]
        tint = base * 0.9 + other * 0.1
        img[:] = base * (1 - chk) + tint * chk
        grout = ((xx % cell) < 2) | ((yy % cell) < 2)
        img[grout] = img[grout] * 0.75
    else:  # floor and wall
        horizon = int(height * rng.uniform(0.3, 0.7))
        img[:horizon] = base
        img[horizon:] = other * 0.85
        ramp = np.linspace(0.85, 1.1, height, dtype=np.float32)[:, None, None]
        img *= ramp
    img += (_smooth_noise(rng, height, width, 40)[..., None] * 6.0).astype(np.float32)
    return img


# ----- paint ------------------------------------------------------------------------------------------------------
def _stripes(rng: np.random.Generator, appearance: Appearance, box: tuple[int, int, int, int],
             jitter: float) -> np.ndarray:
    """Two-colour stripes over a window (float32 RGB)."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = rng.uniform(0, np.pi)
    period = rng.uniform(5.0, 8.0)
    t = (xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)) % period < period / 2
    c0, c1 = (np.array(c, np.float32) + rng.normal(0, jitter, 3).astype(np.float32) for c in appearance.colours)
    return np.where(t[..., None], c0, c1).astype(np.float32)


def object_paint(rng: np.random.Generator, appearance: Appearance, box: tuple[int, int, int, int],
                 style: str) -> np.ndarray:
    """Paint (float32 RGB) for an object window ``box`` = (x0, y0, x1, y1): its colour or stripes with the style's
    shading: ``real`` flat with a faint gradient, ``synth`` glossy with a highlight and texture noise."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    if appearance.striped:
        paint = _stripes(rng, appearance, box, 10.0)
    else:
        c = np.array(appearance.colours[0], np.float32) + rng.normal(0, 10.0, 3).astype(np.float32)
        paint = np.broadcast_to(c * rng.uniform(0.88, 1.08), (h, w, 3)).astype(np.float32)
    if style == "real":
        ramp = _linear_ramp(rng, h, w)[..., None]
        paint = paint * (0.94 + 0.10 * ramp) + rng.normal(0, 3.0, (h, w, 3)).astype(np.float32)
    elif style == "synth":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        lx, ly = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
        r = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2) / max(h, w)
        shade = (1.18 - 0.45 * r).clip(0.72, 1.2)[..., None]
        grain = 1.0 + _smooth_noise(rng, h, w, max(2, max(h, w) // 4))[..., None] * 0.07
        paint = paint * shade * grain + rng.normal(0, 4.0, (h, w, 3)).astype(np.float32)
    else:
        raise ValueError(f"unknown style {style!r} (real or synth)")
    return paint


def mask_window(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) bounds (exclusive) of a mask's nonzero pixels, grown by ``pad`` and clipped; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape[:2]
    return (max(0, int(xs.min()) - pad), max(0, int(ys.min()) - pad),
            min(w, int(xs.max()) + 1 + pad), min(h, int(ys.max()) + 1 + pad))


def composite(img: np.ndarray, alpha: np.ndarray, paint: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """``img[box] = img * (1 - alpha) + paint * alpha`` in place; ``alpha`` is full-size, ``paint`` window-size."""
    x0, y0, x1, y1 = box
    a = alpha[y0:y1, x0:x1, None].astype(np.float32)
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1.0 - a) + paint * a


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
