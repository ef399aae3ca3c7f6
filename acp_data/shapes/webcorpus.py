"""The Shapes judge's "web corpus": what a CLIP-style model learns its concepts from, for the Shapes world.

A real CLIP or VLM judge learned its words from web data whose frequencies have nothing to do with LVIS's, which is
why it knows rare LVIS categories (docs/design.md "The Shapes world"). This corpus plays that part: every category of
the world (so every colour, every shape and "striped") appears in about the same number of images, drawn in styles
of its own (paper, dark, saturated, checkerboard and busy photo-like backgrounds; clip-art outlines, hard shading,
speckle textures; objects from a fifth of the image to nearly all of it; sensor noise and JPEG artefacts) that
differ from both the world's real images (``render.real_background``, flat paint) and the generator's output
(``render.synth_background``, glossy paint, lens blur). A small share of the labels is wrong (caption noise). Nothing
comes from the world's train or validation splits; the corpus depends only on the category names and the seed.

``web_corpus`` returns ``judge_data.Instances``, the form the judge trains on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .judge_data import Instances
from .render import (
    ANGLE_RANGE,
    APPEARANCES,
    hsv_rgb,
    mask_window,
    rasterize,
    shape_polygons,
    to_uint8,
)
from .world import parse_category

WEB_VERSION = 1
BACKGROUNDS = ("paper", "dark", "saturated", "checker", "busy")
PAINTS = ("clipart", "shaded", "speckled")


@dataclass(frozen=True)
class WebOptions:
    """Size and noise of the corpus; part of the judge's stamp."""

    images_per_category: int = 60  # images whose main object is the category (companions add about as many again)
    max_companions: int = 2  # other objects per image, of uniformly drawn categories
    label_noise: float = 0.03  # share of objects whose label names another category (caption noise)
    min_size: int = 64
    max_size: int = 128

    def validate(self) -> None:
        if self.images_per_category < 1:
            raise ValueError(f"web corpus images_per_category = {self.images_per_category} must be >= 1")
        if self.max_companions < 0:
            raise ValueError(f"web corpus max_companions = {self.max_companions} must be >= 0")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"web corpus label_noise = {self.label_noise} must be in [0, 1)")
        if not 16 <= self.min_size <= self.max_size:
            raise ValueError(f"web corpus sizes {self.min_size}..{self.max_size} must satisfy 16 <= min <= max")


# ----- drawing ----------------------------------------------------------------------------------------------------
def web_background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A background of the web style (float32 RGB)."""
    img = np.empty((height, width, 3), dtype=np.float32)
    if kind == "paper":
        img[:] = rng.uniform(225, 252) + rng.normal(0, 3, 3).astype(np.float32)
    elif kind == "dark":
        img[:] = rng.uniform(5, 45) + rng.normal(0, 3, 3).astype(np.float32)
    elif kind == "saturated":
        img[:] = hsv_rgb(rng.uniform(), rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95))
    elif kind == "checker":  # the "transparent background" pattern of cut-out pictures
        cell = int(rng.integers(4, 10))
        yy, xx = np.mgrid[0:height, 0:width]
        chk = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)[..., None]
        a, b = rng.uniform(180, 215), rng.uniform(225, 255)
        img[:] = a * chk + b * (1 - chk)
    elif kind == "busy":  # many soft coloured blobs: a cluttered photo
        img[:] = hsv_rgb(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        for _ in range(int(rng.integers(3, 8))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.1, 0.5) * max(height, width)
            w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img[:] = img * (1 - w) + hsv_rgb(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.0)) * w
    else:
        raise ValueError(f"unknown web background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return img


def web_paint(rng: np.random.Generator, colour: str, kind: str, h: int, w: int) -> np.ndarray:
    """Paint (float32 RGB, h x w) of an object of ``colour`` in the web style ``kind``; the colour word stays true:
    only brightness and texture vary, never the hue."""
    app = APPEARANCES[colour]
    if app.striped:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a, period = rng.uniform(0, np.pi), rng.uniform(3.0, 12.0)
        t = (xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)) % period < period * rng.uniform(0.35, 0.65)
        c0, c1 = (np.array(c, np.float32) + rng.normal(0, 12, 3).astype(np.float32) for c in app.colours)
        paint = np.where(t[..., None], c0, c1).astype(np.float32)
    else:
        c = np.array(app.colours[0], np.float32) * rng.uniform(0.8, 1.12) + rng.normal(0, 14, 3).astype(np.float32)
        paint = np.broadcast_to(c, (h, w, 3)).astype(np.float32).copy()
    if kind == "shaded":  # hard directional shading: light on one side, dark on the other
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = ((xx - w / 2) * np.cos(a) + (yy - h / 2) * np.sin(a)) / max(h, w, 1)
        paint = paint * (1.0 + rng.uniform(0.4, 0.8) * t)[..., None]
    elif kind == "speckled":
        paint = paint * rng.uniform(0.85, 1.15, (h, w, 1)).astype(np.float32)
    elif kind != "clipart":
        raise ValueError(f"unknown web paint {kind!r}; known: {', '.join(PAINTS)}")
    return paint


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    import cv2

    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    m = mask.astype(np.uint8)
    return (m > 0) & (cv2.erode(m, k) == 0)


def render_web_image(rng: np.random.Generator, objects: Sequence[tuple[str, str]], height: int,
                     width: int, subject: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw ``objects`` ((shape, colour), back to front) in the web style, object ``subject`` big and the others
    small; returns the uint8 image and each object's visible mask."""
    img = web_background(rng, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    paint_kind = PAINTS[int(rng.integers(len(PAINTS)))]  # one style per picture, as one artist drew it
    outline = paint_kind == "clipart" and rng.random() < 0.7
    short = min(height, width)
    for k, (shape, colour) in enumerate(objects):
        # the subject is big, its companions small
        frac = rng.uniform(0.45, 0.95) if k == subject else rng.uniform(0.2, 0.5)
        side = short * frac
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
        sx, sy = side / 2 * np.sqrt(aspect), side / 2 / np.sqrt(aspect)
        cx = rng.uniform(min(sx, width / 2), max(width - sx, width / 2))
        cy = rng.uniform(min(sy, height / 2), max(height - sy, height / 2))
        angle = float(rng.uniform(0, 2 * np.pi)) if rng.random() < 0.5 else float(rng.uniform(0, ANGLE_RANGE[shape]))
        m = rasterize(shape_polygons(shape, cx, cy, sx, sy, angle), height, width)
        box = mask_window(m)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        paint = np.zeros((height, width, 3), np.float32)
        paint[y0:y1, x0:x1] = web_paint(rng, colour, paint_kind, y1 - y0, x1 - x0)
        img[m] = paint[m]
        if outline:
            edge = _outline(m, int(rng.integers(1, 3)))
            img[edge] = rng.uniform(0, 40)
        owner[m] = k
    img += rng.normal(0, rng.uniform(0, 10), img.shape).astype(np.float32)
    return to_uint8(img), [owner == k for k in range(len(objects))]


def _jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


# ----- the corpus -------------------------------------------------------------------------------------------------
def web_corpus(names: Sequence[str], seed: int = 0, opts: WebOptions | None = None) -> Instances:
    """The corpus for the categories ``names`` (Shapes world names, index = class): per category
    ``images_per_category`` images with it as the main object plus up to ``max_companions`` objects of uniformly drawn
    categories; a ``label_noise`` share of the labels names a random other category. Same names, seed and options
    give the same corpus."""
    opts = opts or WebOptions()
    opts.validate()
    kinds = [parse_category(n) for n in names]
    k = len(names)
    rng = np.random.default_rng([int(seed), 0x3EB])
    subjects = np.repeat(np.arange(k), opts.images_per_category)
    rng.shuffle(subjects)
    images: list[np.ndarray] = []
    image_classes: list[list[int]] = []
    ii, boxes, classes = [], [], []
    for i, subject in enumerate(subjects.tolist()):
        r = np.random.default_rng([int(seed), 0x3EB, i])
        width, height = (int(v) for v in r.integers(opts.min_size, opts.max_size + 1, 2))
        objs = [subject] + [int(c) for c in r.integers(k, size=int(r.integers(opts.max_companions + 1)))]
        behind = r.random() < 0.5  # the subject behind the others or in front of them
        order = objs if behind else objs[1:] + objs[:1]
        img, masks = render_web_image(r, [kinds[c] for c in order], height, width, 0 if behind else len(objs) - 1)
        if r.random() < 0.5:
            img = _jpeg_roundtrip(img, int(r.integers(30, 90)))
        per_image = []
        for c, m in zip(order, masks):
            win = mask_window(m)
            if win is None or int(m.sum()) < 30:
                continue  # hidden behind the others
            label = c
            if r.random() < opts.label_noise:
                label = int((c + r.integers(1, k)) % k)
            ii.append(len(images))
            boxes.append(win)
            classes.append(label)
            per_image.append((-int(m.sum()), label))
        images.append(img)
        image_classes.append([c for _, c in sorted(per_image)])
    return Instances(images=images, image_classes=image_classes, inst_image=np.asarray(ii, dtype=np.int64),
                     inst_box=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                     inst_class=np.asarray(classes, dtype=np.int64), names=list(names))
