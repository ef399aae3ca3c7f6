"""Reusable fake samples for cache tests: real images with the instances drawn in them, exact masks and real
compressed RLE, records in the layout of docs/design.md "A sample".

    cats = make_categories()
    record, jpeg = make_sample(unit=0, cand=0, cats=cats, rng=np.random.default_rng(0))
    records, images = make_unit(unit=0, n_cand=3, cats=cats, rng=rng)
    written = write_cache(tmp_path / "cache", cats, n_units=10)   # {key: [record, ...]}
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from acp_data.cache.writer import CacheWriter
from acp_data.categories import Category, CategoryTable
from acp_data.masks import mask_to_rle, tight_box_xywh

GENERATION_SETTINGS = {"planner": {"name": "test"}, "generator": {"name": "fake", "size": [96, 128], "n": 3}}

_NAMES = [("red circle", "r"), ("blue square", "r"), ("green ring", "r"), ("yellow star", "c"),
          ("white cross", "c"), ("black ellipse", "c"), ("purple bar", "f"), ("orange box", "f")]
_COUNTS = {"r": 5, "c": 40, "f": 300}


def make_categories(names: list[tuple[str, str]] | None = None) -> CategoryTable:
    """A small CategoryTable (name, frequency) with LVIS-like image counts."""
    names = names or _NAMES
    return CategoryTable([Category(id=i, name=n, frequency=f, image_count=_COUNTS[f])
                          for i, (n, f) in enumerate(names, start=1)], source="tests.cache_helpers")


def unit_key(unit: int, salt: str = "") -> str:
    """A 32-hex generation key for a unit index."""
    return hashlib.sha256(f"{salt}/{unit}".encode()).hexdigest()[:32]


def _colour(cid: int) -> tuple[int, int, int]:
    r = np.random.default_rng(1000 + cid)
    return tuple(int(v) for v in r.integers(40, 256, 3))


def _shape_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(w // 6, w - w // 6)), int(rng.integers(h // 6, h - h // 6))
    rx, ry = int(rng.integers(6, max(7, w // 4))), int(rng.integers(6, max(7, h // 4)))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        cv2.ellipse(m, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        cv2.rectangle(m, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
    else:  # a ring: a mask with a hole
        cv2.circle(m, (cx, cy), max(rx, ry), 1, -1)
        cv2.circle(m, (cx, cy), max(2, max(rx, ry) // 2), 0, -1)
    return m.astype(bool)


def make_sample(unit: int, cand: int, cats: CategoryTable, rng: np.random.Generator, *, key: str | None = None,
                size: tuple[int, int] = (96, 128), n_instances: int | None = None,
                category_ids: list[int] | None = None, scored: bool = True, selected: bool = False,
                image_format: str = "jpg", quality: int = 90) -> tuple[dict[str, Any], bytes]:
    """One candidate: ``(record, encoded image)``; the instances are drawn into the image with their exact masks
    (later ones occlude earlier ones; fully hidden ones are dropped). ``scored=False`` leaves every score null."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), np.full_like(xx, 90)], -1)
    img = (img + rng.integers(-10, 10, img.shape)).clip(0, 255).astype(np.uint8)
    if category_ids is None:
        n = int(n_instances if n_instances is not None else rng.integers(1, 5))
        category_ids = [int(c) for c in rng.integers(1, len(cats) + 1, n)]
    masks: list[np.ndarray] = []
    for cid in category_ids:
        m = _shape_mask(h, w, rng)
        masks = [pm & ~m for pm in masks]
        masks.append(m)
        img[m] = _colour(cid)
    instances = []
    objects = []
    for k, (cid, m) in enumerate(zip(category_ids, masks)):
        if not m.any():
            continue
        box = tight_box_xywh(m)
        jit = rng.uniform(-2, 2, 4)
        lx, ly = max(0.0, box[0] + jit[0]), max(0.0, box[1] + jit[1])
        lw, lh = max(1.0, min(w - lx, box[2] + jit[2])), max(1.0, min(h - ly, box[3] + jit[3]))
        instances.append({
            "category_id": cid, "bbox": list(box), "layout_bbox": [lx, ly, lw, lh], "segmentation": mask_to_rle(m),
            "area": float(m.sum()), "clis_i": float(rng.uniform(20, 100)) if scored else None,
        })
        objects.append({"id": f"{cats[cid].name.replace(' ', '_')}-{k + 1}", "category_id": cid, "attributes": [],
                        "bbox": [lx / w, ly / h, lw / w, lh / h]})
    scores = [i["clis_i"] for i in instances if i["clis_i"] is not None]
    record = {
        "key": key or unit_key(unit), "unit": int(unit), "candidate_idx": int(cand), "seed": 1000 + int(unit),
        "scene_graph": {"objects": objects, "relations": [], "layers": {}, "caption": "a test scene", "groups": {}},
        "width": w, "height": h,
        "clis_l": float(rng.uniform(0, 100)) if scored else None,
        "clis_i": float(np.mean(scores)) if scores else None,
        "selected": bool(selected), "provenance": {"generator": "tests.cache_helpers", "candidate": int(cand)},
        "instances": instances,
    }
    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return record, buf.getvalue()


def make_unit(unit: int, n_cand: int, cats: CategoryTable, rng: np.random.Generator, *, scored: bool = True,
              **kw: Any) -> tuple[list[dict[str, Any]], list[bytes]]:
    """All candidates of one unit (same key and categories); ``selected`` marks the best CLIS-I when scored, else
    candidate 0."""
    n = int(kw.pop("n_instances", rng.integers(1, 5)))
    cids = kw.pop("category_ids", None) or [int(c) for c in rng.integers(1, len(cats) + 1, n)]
    out = [make_sample(unit, c, cats, rng, category_ids=cids, scored=scored, **kw) for c in range(n_cand)]
    records, images = [r for r, _ in out], [b for _, b in out]
    vals = [(-1.0 if r["clis_i"] is None else r["clis_i"]) for r in records]
    best = int(np.argmax(vals))
    for c, r in enumerate(records):
        r["selected"] = c == best
    return records, images


def write_cache(cache_dir: str | Path, cats: CategoryTable, n_units: int, n_cand: int = 3, seed: int = 0,
                rank: int = 0, first_unit: int = 0, settings: dict[str, Any] | None = None,
                unit_kwargs: dict[str, Any] | None = None,
                **writer_kw: Any) -> dict[str, list[dict[str, Any]]]:
    """Write ``n_units`` units with ``n_cand`` candidates each through ``CacheWriter``; returns key -> records."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[dict[str, Any]]] = {}
    with CacheWriter(cache_dir, cats, settings or GENERATION_SETTINGS, rank=rank, **writer_kw) as w:
        for u in range(first_unit, first_unit + n_units):
            records, images = make_unit(u, n_cand, cats, rng, **(unit_kwargs or {}))
            if w.add_unit(records, images):
                written[records[0]["key"]] = records
    return written
