"""The Shapes world: 30 categories (6 shapes x 4 colours and stripes) with an LVIS-like long tail, rendered into
LVIS-format ``train.json`` / ``val.json`` with exact polygon masks and JPEG images.

The category table is fixed (which categories are rare does not depend on the seed); the seed picks images. Training
image counts follow the LVIS groups (rare 1-10 images, common 11-100, frequent > 100); the validation split is
exhaustive (every absent category is a verified negative) and shows every category equally often, so APr is not
noise. A build is cached: ``world.json`` holds the build parameters and a rebuild happens only when they change.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import CategoryTable, frequency_from_count, normalize_name
from ..fsio import build_lock, fsync_dir, write_synced
from .render import APPEARANCES, SHAPES, Appearance

logger = logging.getLogger(__name__)

WORLD_VERSION = 1
STAMP_NAME = "world.json"
STAMP_FORMAT = "acp-data shapes world"
JPEG_QUALITY = 90
COLOURS = tuple(APPEARANCES)  # red, green, blue, yellow, striped

# Training images per category in the demo world, by shape row and colour column (red, green, blue, yellow, striped).
# 11 frequent (> 100), 11 common (11-100, both ends used), 8 rare (1-10, both ends used); every shape and colour has a
# rare member, so a detector can learn rare categories from their parts.
_DEMO_COUNTS: dict[str, tuple[int, int, int, int, int]] = {
    "circle": (800, 63, 350, 8, 26),
    "square": (88, 600, 4, 220, 42),
    "triangle": (2, 460, 100, 33, 300),
    "star": (520, 10, 75, 180, 1),
    "ring": (5, 20, 700, 52, 3),
    "cross": (15, 260, 12, 7, 400),
}
# Small world: counts by rank of the demo count (most frequent first); only rare and common groups fit in 80 images.
_SMALL_COUNTS = (30, 27, 24, 22, 20, 18, 16, 15, 14, 13, 12,
                 10, 9, 8, 7, 6, 5, 5, 4, 4, 3, 3,
                 3, 2, 2, 2, 1, 1, 1, 1)


@dataclass(frozen=True)
class WorldSize:
    """How big a world is: image counts, per-category training image counts by rank, objects per image."""

    name: str
    train_images: int
    val_images: int
    val_images_per_category: int
    counts_by_rank: tuple[int, ...]  # training images per category, most frequent demo category first
    max_objects: int = 7
    duplicate_prob: float = 0.12  # chance a category present in an image gets a second instance
    image_sizes: tuple[tuple[int, int], ...] = ((160, 160), (176, 144), (144, 176))  # (width, height)


SIZES: dict[str, WorldSize] = {
    "small": WorldSize("small", train_images=80, val_images=32, val_images_per_category=4,
                       counts_by_rank=_SMALL_COUNTS),
    "demo": WorldSize("demo", train_images=1700, val_images=300, val_images_per_category=40,
                      counts_by_rank=tuple(sorted((c for row in _DEMO_COUNTS.values() for c in row), reverse=True))),
}


@dataclass(frozen=True)
class ShapeCategory:
    """One category of the world; ``image_count`` is its number of training images in the chosen size."""

    id: int
    name: str
    shape: str
    colour: str
    frequency: str
    image_count: int
    val_image_count: int

    @property
    def appearance(self) -> Appearance:
        return APPEARANCES[self.colour]

    def definition(self) -> str:
        texture = "black and white stripes" if self.colour == "striped" else f"{self.colour} colour"
        return f"a {self.shape} shape painted in {texture}"


def _size_spec(size: str) -> WorldSize:
    if size not in SIZES:
        raise ValueError(f"unknown Shapes world size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def world_categories(size: str = "demo") -> list[ShapeCategory]:
    """The world's categories, ids 1..30 in shape-major order, with frequency and image counts for ``size``."""
    spec = _size_spec(size)
    demo = [(s, c, _DEMO_COUNTS[s][j]) for s in SHAPES for j, c in enumerate(COLOURS)]
    order = sorted(range(len(demo)), key=lambda i: -demo[i][2])
    rank = {i: r for r, i in enumerate(order)}
    cats = []
    for i, (shape, colour, _) in enumerate(demo):
        n = spec.counts_by_rank[rank[i]]
        cats.append(ShapeCategory(id=i + 1, name=f"{colour} {shape}", shape=shape, colour=colour,
                                  frequency=frequency_from_count(n), image_count=n,
                                  val_image_count=spec.val_images_per_category))
    return cats


def world_category_table(size: str = "demo") -> CategoryTable:
    """The world's CategoryTable without building it (equal to ``WorldPaths.categories()`` of a built world)."""
    from ..categories import Category

    return CategoryTable([Category(id=c.id, name=c.name, synonyms=(c.name,), definition=c.definition(),
                                   frequency=c.frequency, image_count=c.image_count) for c in world_categories(size)],
                         source=f"Shapes world ({size})")


def parse_category(name: str) -> tuple[str, str]:
    """``"red star"`` (any case, ``_`` or spaces) -> ``("star", "red")``; a clear error for names outside the world."""
    words = normalize_name(name).split(" ")
    if len(words) == 2 and words[0] in APPEARANCES and words[1] in SHAPES:
        return words[1], words[0]
    raise ValueError(f"category {name!r} is not a Shapes world category ('<colour> <shape>' with colour in "
                     f"{', '.join(COLOURS)} and shape in {', '.join(SHAPES)})")


# ----- layout of categories over images ---------------------------------------------------------------------------
def assign_categories(rng: np.random.Generator, counts: dict[int, int], n_images: int,
                      max_per_image: int) -> list[list[int]]:
    """Spread categories over images so category ``c`` is in exactly ``counts[c]`` images; each image gets a near
    even share (the least loaded images are picked first, with jitter), between 1 and ``max_per_image``."""
    load = np.zeros(n_images, dtype=np.float64)
    images: list[list[int]] = [[] for _ in range(n_images)]
    for cid in sorted(counts, key=lambda c: (-counts[c], c)):
        n = counts[cid]
        if n > n_images:
            raise ValueError(f"category {cid} needs {n} images but the split has only {n_images}")
        key = load + rng.uniform(0.0, 1.5, n_images)
        key[load >= max_per_image] = np.inf
        chosen = np.argsort(key, kind="stable")[:n]
        if np.isinf(key[chosen]).any():
            raise ValueError(f"{n_images} images with at most {max_per_image} categories cannot hold the counts")
        for i in chosen.tolist():
            images[i].append(cid)
        load[chosen] += 1
    if load.min() < 1:
        raise ValueError(f"{int((load < 1).sum())} images got no category; lower the image count or raise the counts")
    return images


# ----- paths, stamp, build ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldPaths:
    """Where a built world lives. Image ``file_name``s (and ``coco_url``s, which detectron2's LVIS loader reads) are
    ``train/<id>.jpg`` / ``val/<id>.jpg`` relative to ``image_root``."""

    root: Path
    train_json: Path
    val_json: Path
    image_root: Path
    stamp: Path

    def categories(self) -> CategoryTable:
        """The world's CategoryTable (frequency and image counts from ``train.json``)."""
        return CategoryTable.from_lvis_json(self.train_json)

    def stamp_data(self) -> dict[str, Any]:
        return json.loads(self.stamp.read_text())


def world_paths(root: str | os.PathLike) -> WorldPaths:
    r = Path(root)
    return WorldPaths(root=r, train_json=r / "train.json", val_json=r / "val.json", image_root=r,
                      stamp=r / STAMP_NAME)


def _build_params(seed: int, size: str) -> dict[str, Any]:
    return {"format": STAMP_FORMAT, "version": WORLD_VERSION, "seed": int(seed), "size": size,
            "size_spec": asdict(_size_spec(size))}


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_current(root: Path, params: dict[str, Any]) -> bool:
    stamp = _read_stamp(root)
    if stamp is None or {k: stamp.get(k) for k in params} != json.loads(json.dumps(params)):
        return False
    return (root / "train.json").is_file() and (root / "val.json").is_file()


def load_world(root: str | os.PathLike) -> WorldPaths:
    """Paths of an already built world; a clear error if ``root`` holds none."""
    paths = world_paths(root)
    stamp = _read_stamp(paths.root)
    if stamp is None or stamp.get("format") != STAMP_FORMAT or not paths.train_json.is_file():
        raise FileNotFoundError(f"{paths.root} holds no Shapes world (no {STAMP_NAME}); build it with "
                                f"`acp-data shapes build --out {paths.root}`")
    return paths


def build_world(out_dir: str | os.PathLike, seed: int = 0, size: str = "demo", force: bool = False,
                progress: bool = True) -> WorldPaths:
    """Build (or reuse) the Shapes world under ``out_dir``: ``train.json``, ``val.json``, ``train/``, ``val/`` and the
    stamp ``world.json``. Same seed and size give the same bytes. The build goes to a temporary sibling directory
    that replaces ``out_dir`` in one rename; an existing directory is replaced only if it is empty or a world."""
    root = Path(out_dir).absolute()
    params = _build_params(seed, size)
    with build_lock(root):
        if not force and _is_current(root, params):
            logger.info("Shapes world at %s is up to date (seed %d, size %s)", root, seed, size)
            return world_paths(root)
        if root.exists():
            if not root.is_dir():
                raise FileExistsError(f"--out {root} exists and is not a directory")
            stamp = _read_stamp(root)
            if any(root.iterdir()) and (stamp is None or stamp.get("format") != STAMP_FORMAT):
                raise FileExistsError(f"--out {root} exists, is not empty and holds no Shapes world; refusing to "
                                      "replace it: choose another directory")
        tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _build_into(tmp, params, progress=progress)
            old = None
            if root.exists():
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, old)
            os.rename(tmp, root)
            fsync_dir(root.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return world_paths(root)


def _jpeg_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _split_json(split: str, params: dict[str, Any], categories: Sequence[ShapeCategory],
                images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    img_sets: dict[int, set[int]] = {c.id: set() for c in categories}
    inst: dict[int, int] = {c.id: 0 for c in categories}
    for a in annotations:
        img_sets[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    cats = []
    for c in categories:
        n = len(img_sets[c.id])
        if split == "train" and n != c.image_count:
            raise RuntimeError(f"internal error: {c.name!r} is in {n} training images, expected {c.image_count}")
        cats.append({"id": c.id, "name": c.name, "synonyms": [c.name], "def": c.definition(),
                     "frequency": frequency_from_count(c.image_count), "image_count": c.image_count,
                     "instance_count": inst[c.id], "shape": c.shape, "colour": c.colour})
    info = {"description": f"acp-data Shapes world, {split} split", "version": params["version"],
            "seed": params["seed"], "size": params["size"]}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": cats}


def _build_into(tmp: Path, params: dict[str, Any], progress: bool = True) -> None:
    from tqdm import tqdm

    from ..masks import mask_to_polygons
    from .scenes import render_real_image

    seed, size = params["seed"], params["size"]
    spec = _size_spec(size)
    categories = world_categories(size)
    by_id = {c.id: c for c in categories}
    tmp.mkdir(parents=True)
    summary: dict[str, Any] = {}
    image_id, ann_id = 0, 0
    for split_code, split in enumerate(("train", "val")):
        (tmp / split).mkdir()
        if split == "train":
            counts, n_images = {c.id: c.image_count for c in categories}, spec.train_images
        else:
            counts, n_images = {c.id: c.val_image_count for c in categories}, spec.val_images
        layout = assign_categories(np.random.default_rng([seed, split_code, 0]), counts, n_images, spec.max_objects)
        images, annotations = [], []
        for i, cids in enumerate(tqdm(layout, desc=f"shapes world {split}", disable=not progress, unit="img")):
            rng = np.random.default_rng([seed, split_code, 1, i])
            width, height = spec.image_sizes[int(rng.integers(len(spec.image_sizes)))]
            objs = list(cids)
            for cid in cids:
                if len(objs) < spec.max_objects and rng.random() < spec.duplicate_prob:
                    objs.append(cid)
            rng.shuffle(objs)
            img, masks = render_real_image(rng, [(by_id[c].shape, by_id[c].colour) for c in objs], height, width)
            image_id += 1
            fname = f"{split}/{image_id:012d}.jpg"
            write_synced(tmp / fname, _jpeg_bytes(img))
            present = sorted(set(objs))
            images.append({"id": image_id, "width": width, "height": height, "file_name": fname, "coco_url": fname,
                           "neg_category_ids": [c.id for c in categories if c.id not in present],
                           "not_exhaustive_category_ids": []})
            for cid, m in zip(objs, masks):
                ys, xs = np.nonzero(m)
                if len(xs) == 0:
                    raise RuntimeError(f"internal error: an object of {by_id[cid].name!r} in {fname} is hidden")
                ann_id += 1
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": cid,
                    "bbox": [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
                    "area": float(len(xs)), "segmentation": mask_to_polygons(m),
                })
        data = _split_json(split, params, categories, images, annotations)
        write_synced(tmp / f"{split}.json", json.dumps(data, separators=(",", ":")).encode())
        summary[split] = {"images": len(images), "annotations": len(annotations)}
    fsync_dir(tmp / "train")
    fsync_dir(tmp / "val")
    stamp = {**params, "summary": summary,
             "groups": {g: sum(1 for c in categories if c.frequency == g) for g in ("r", "c", "f")},
             "categories": [asdict(c) for c in categories]}
    write_synced(tmp / STAMP_NAME, json.dumps(stamp, indent=1).encode())  # last: its presence marks a whole build
    fsync_dir(tmp)
