"""Training material for the Shapes judge: the world's real images and instances, the views the ``clip`` CLIS-I
scorer shows a model (box crop, box in dimmed context, whole image, each letterboxed to a square) rendered once into
a bank, batch augmentation that covers the generated look (lighting, noise, blur, colour cast), colour-permuted views
for shape-only targets, and prompts and captions with distractors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..priors import BUCKET_PHRASES

TEMPLATES = ("a photo of a {}.", "a photo of a {}", "a {}.", "a picture of a {}.", "an image of a {}.", "{}")
SIZE_WORDS = ("small", "large")
CAPTION_PREFIXES = ("A photo of", "a photo of", "An image of", "A picture of")


@dataclass
class Instances:
    """Images (uint8 RGB) and per-instance (image index, XYXY box, 0-based class) of one split of a world."""

    images: list[np.ndarray]
    image_classes: list[list[int]]  # classes of each image's instances, biggest first
    inst_image: np.ndarray  # (N,) int
    inst_box: np.ndarray  # (N, 4) float XYXY absolute
    inst_class: np.ndarray  # (N,) int, category id - 1
    names: list[str]  # category names, index = class

    def by_class(self) -> list[np.ndarray]:
        return [np.nonzero(self.inst_class == c)[0] for c in range(len(self.names))]


def load_instances(json_path: Path, image_root: Path, max_images: int | None = None) -> Instances:
    """Decode a world split: every image and every annotation's box and class."""
    from PIL import Image

    data = json.loads(Path(json_path).read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    imgs = data["images"][:max_images] if max_images else data["images"]
    index = {im["id"]: i for i, im in enumerate(imgs)}
    images = [np.asarray(Image.open(Path(image_root) / im["file_name"]).convert("RGB")) for im in imgs]
    per_image: list[list[tuple[float, int]]] = [[] for _ in imgs]
    ii, boxes, classes = [], [], []
    for a in data["annotations"]:
        if a["image_id"] not in index:
            continue
        x, y, w, h = a["bbox"]
        i = index[a["image_id"]]
        ii.append(i)
        boxes.append((x, y, x + w, y + h))
        classes.append(a["category_id"] - 1)
        per_image[i].append((-a["area"], a["category_id"] - 1))
    return Instances(images=images, image_classes=[[c for _, c in sorted(p)] for p in per_image],
                     inst_image=np.asarray(ii, dtype=np.int64), inst_box=np.asarray(boxes, dtype=np.float64),
                     inst_class=np.asarray(classes, dtype=np.int64), names=names)


# ----- views ------------------------------------------------------------------------------------------------------
def jitter_box(rng: np.random.Generator, box: np.ndarray, amount: float, width: int, height: int) -> np.ndarray:
    """Move each side by a normal fraction (``amount``) of the box size: layout boxes are never tight."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    d = rng.normal(0, amount, 4) * np.array([bw, bh, bw, bh])
    b = np.array([x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]])
    b[[0, 2]] = np.clip(b[[0, 2]], 0, width)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, height)
    if b[2] - b[0] < 2 or b[3] - b[1] < 2:
        return np.asarray(box, dtype=np.float64)
    return b


def box_view(img: np.ndarray, box: np.ndarray, context: float, dim: float) -> np.ndarray:
    """The scorer's instance views: ``context`` 0 is the box cut out; otherwise the box grown by ``context`` of its
    size on each side with the pixels outside the box dimmed by ``dim``."""
    h, w = img.shape[:2]
    x0, y0 = int(max(0, np.floor(box[0]))), int(max(0, np.floor(box[1])))
    x1, y1 = int(min(w, np.ceil(box[2]))), int(min(h, np.ceil(box[3])))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = img[y0:y1, x0:x1]
    if context <= 0:
        return crop
    mx, my = context * (x1 - x0), context * (y1 - y0)
    rx0, ry0 = int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my)))
    rx1, ry1 = int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my)))
    region = (img[ry0:ry1, rx0:rx1].astype(np.float32) * (1.0 - dim)).round().astype(np.uint8)
    region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = crop
    return region


def letterbox(view: np.ndarray, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """Pad to a square with ``fill`` and resize to ``size`` (bicubic), as the scorer does: uint8 (size, size, 3)."""
    from PIL import Image

    h, w = view.shape[:2]
    scale = min(size / w, size / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = Image.fromarray(np.ascontiguousarray(view)).resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def augment_batch(rng: np.random.Generator, x: Any) -> Any:
    """Shape-preserving and style augmentation of a float batch (B, 3, S, S) in [0, 1], never hue (colour is the
    category): flips, quarter turns, brightness, contrast, a lighting ramp, colour cast, blur, sensor noise; what
    makes real crops look like generated ones."""
    import torch
    import torch.nn.functional as F

    b, _, s, _ = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        v = x[i]
        if rng.random() < 0.5:
            v = v.flip(2)
        out[i] = torch.rot90(v, int(rng.integers(4)), (1, 2))
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * t(rng.uniform(0.75, 1.25, (b, 1, 1, 1))) + mean * t(rng.uniform(0.75, 1.2, (b, 1, 1, 1)))
    ang = rng.uniform(0, 2 * np.pi, b)
    grid = (np.arange(s, dtype=np.float32) - s / 2) / s
    ramp = np.cos(ang)[:, None, None] * grid[None, None, :] + np.sin(ang)[:, None, None] * grid[None, :, None]
    out = out * (1.0 + t(rng.uniform(0, 0.4, (b, 1, 1)) * ramp)[:, None]) * t(rng.uniform(0.93, 1.07, (b, 3, 1, 1)))
    sigma = float(rng.uniform(0.3, 0.8))
    k = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    k = t(np.outer(k, k) / np.outer(k, k).sum())[None, None].repeat(3, 1, 1, 1)
    blur = t(rng.random(b) < 0.4)[:, None, None, None]
    out = blur * F.conv2d(F.pad(out, (2, 2, 2, 2), mode="replicate"), k, groups=3) + (1 - blur) * out
    out = out + torch.randn(out.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * t(
        rng.uniform(0, 6 / 255, (b, 1, 1, 1)))
    return out.clamp(0, 1)


def permute_colours(rng: np.random.Generator, x: Any) -> Any:
    """Random channel order and sometimes inversion per sample: the shape stays, the colour becomes any colour, so a
    shape-only target teaches shape apart from the colours each shape happens to have in the data."""
    import torch

    out = torch.stack([v[torch.as_tensor(rng.permutation(3))] for v in x])
    inv = torch.as_tensor(rng.random(len(x)) < 0.3)[:, None, None, None]
    return torch.where(inv, 1.0 - out, out)


@dataclass
class ViewBank:
    """Letterboxed uint8 views (size x size x 3), made once: per instance ``views_per_instance`` views (box crop and
    box in dimmed context, exact and jittered boxes), object-free boxes, and whole images."""

    views: np.ndarray  # (N, V, S, S, 3)
    labels: np.ndarray  # (N,)
    background: np.ndarray  # (M, S, S, 3)
    images: np.ndarray  # (K, S, S, 3)
    image_classes: list[list[int]]


def build_view_bank(rng: np.random.Generator, inst: Instances, size: int, fill: tuple[int, int, int],
                    jitter: float = 0.08, n_background: int = 1000) -> ViewBank:
    """Render every view the training draws from; steps then only index and augment tensors."""
    specs = [(0.0, 0.0), (0.5, 0.5), (0.0, jitter), (float(rng.uniform(0.3, 0.7)), jitter)]
    views = np.empty((len(inst.inst_class), len(specs), size, size, 3), dtype=np.uint8)
    for n, (i, box) in enumerate(zip(inst.inst_image, inst.inst_box)):
        img = inst.images[i]
        h, w = img.shape[:2]
        for v, (context, jit) in enumerate(specs):
            b = jitter_box(rng, box, jit, w, h) if jit else box
            views[n, v] = letterbox(box_view(img, b, context, float(rng.uniform(0.3, 0.7)) if context else 0.5),
                                    size, fill)
    bg = []
    for _ in range(n_background * 3):
        if len(bg) >= n_background:
            break
        i = int(rng.integers(len(inst.images)))
        b = background_box(rng, inst, i)
        if b is not None:
            context = 0.0 if rng.random() < 0.5 else 0.5
            bg.append(letterbox(box_view(inst.images[i], b, context, 0.5), size, fill))
    images = np.stack([letterbox(im, size, fill) for im in inst.images]) if inst.images else np.zeros(
        (0, size, size, 3), np.uint8)
    return ViewBank(views=views, labels=inst.inst_class.copy(),
                    background=np.stack(bg) if bg else np.zeros((0, size, size, 3), np.uint8),
                    images=images, image_classes=inst.image_classes)


def background_box(rng: np.random.Generator, inst: Instances, i: int) -> np.ndarray | None:
    """A random object-sized box in image ``i`` overlapping no instance box by more than a tenth of its area."""
    img = inst.images[i]
    h, w = img.shape[:2]
    boxes = inst.inst_box[inst.inst_image == i]
    for _ in range(10):
        s = rng.uniform(0.12, 0.35) * min(h, w)
        bw, bh = s * np.exp(rng.normal(0, 0.2)), s * np.exp(rng.normal(0, 0.2))
        x0, y0 = rng.uniform(0, max(1, w - bw)), rng.uniform(0, max(1, h - bh))
        b = np.array([x0, y0, min(w, x0 + bw), min(h, y0 + bh)])
        ix = np.clip(np.minimum(boxes[:, 2], b[2]) - np.maximum(boxes[:, 0], b[0]), 0, None)
        iy = np.clip(np.minimum(boxes[:, 3], b[3]) - np.maximum(boxes[:, 1], b[1]), 0, None)
        if len(boxes) == 0 or float((ix * iy).max()) <= 0.1 * (b[2] - b[0]) * (b[3] - b[1]):
            return b
    return None


# ----- text -------------------------------------------------------------------------------------------------------
def class_prompts(rng: np.random.Generator, names: list[str]) -> list[str]:
    """One prompt per phrase as the scorer writes them: one template for all (the scorer's default half the
    time), so the names are what tells prompts apart; now and then a size word, as the planner adds."""
    template = TEMPLATES[0] if rng.random() < 0.5 else TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return [template.format(f"{SIZE_WORDS[int(rng.integers(2))]} {n}" if rng.random() < 0.1 else n) for n in names]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def caption_with_distractors(rng: np.random.Generator, classes: list[int], names: list[str],
                             n_distractors: int, max_objects: int = 3) -> list[str]:
    """A planner-like caption of up to ``max_objects`` of an image's objects ("A photo of a red star to the left of
    a blue ring.") and ``n_distractors`` copies with every name replaced by a category absent from the image (what
    the scorer's global view is ranked against)."""
    objs = list(dict.fromkeys(classes))[:max_objects]
    pool = [c for c in range(len(names)) if c not in set(classes)]
    phrases = list(BUCKET_PHRASES.values())
    rels = [phrases[int(rng.integers(len(phrases)))] for _ in range(len(objs) - 1)]
    prefix = CAPTION_PREFIXES[int(rng.integers(len(CAPTION_PREFIXES)))]

    def text(cs: list[int]) -> str:
        ns = [names[c] for c in cs]
        if len(ns) == 1:
            return f"{prefix} {_article(ns[0])} {ns[0]}."
        clauses = [f"{_article(ns[j])} {ns[j]} {rels[j - 1]} the {ns[0]}" if j > 1 else
                   f"{_article(ns[0])} {ns[0]} {rels[0]} {_article(ns[1])} {ns[1]}" for j in range(1, len(ns))]
        return f"{prefix} {', and '.join(clauses)}."

    out = [text(objs)]
    for _ in range(n_distractors):
        out.append(text([int(c) for c in rng.choice(pool, size=len(objs), replace=len(pool) < len(objs))]))
    return out
