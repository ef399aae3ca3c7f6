"""Reusable test helpers: a tiny LVIS-format dataset on disk and tiny Mask R-CNN overrides.

    from helpers import write_tiny_lvis, tiny_model_overrides, run_train_net

``write_tiny_lvis(root)`` writes ``root/tiny_lvis/{train,val}.json`` and ``root/tiny_lvis/images/*.jpg``: coloured
shapes on a grey background, six categories (two rare, two common, two frequent: the ``frequency`` is written in
the json), polygon masks drawn from the exact same polygons, one ring stored as compressed RLE (it has a hole), and
exhaustive ``neg_category_ids`` on every image. Point ``DETECTRON2_DATASETS`` at ``root`` and register with
``ACP.REGISTER_LVIS`` using the relative paths in the returned dict.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "mask_rcnn_R18_tiny.yaml"

# name, shape, BGR-free RGB colour, frequency, image_count (as a real LVIS json would carry from its train split)
TINY_CATEGORIES: list[tuple[str, str, tuple[int, int, int], str, int]] = [
    ("red_disk", "disk", (220, 40, 40), "r", 4),
    ("blue_ring", "ring", (40, 60, 220), "r", 7),
    ("green_square", "square", (40, 200, 60), "c", 40),
    ("yellow_triangle", "triangle", (230, 210, 40), "c", 75),
    ("purple_bar", "bar", (150, 50, 200), "f", 300),
    ("cyan_diamond", "diamond", (40, 210, 210), "f", 800),
]


def tiny_categories() -> list[dict[str, Any]]:
    """LVIS-format category entries (ids 1..6, two per frequency group)."""
    return [
        {"id": i, "name": name, "synonyms": [name, name.replace("_", " ")], "def": f"a {name.replace('_', ' ')}",
         "frequency": freq, "image_count": count}
        for i, (name, _, _, freq, count) in enumerate(TINY_CATEGORIES, start=1)
    ]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """A flat polygon ``[x0, y0, ...]`` for a filled shape centred at (cx, cy) with radius ``r`` (not the ring)."""
    if shape == "disk":
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "bar":
        pts = [(cx - r, cy - r / 3), (cx + r, cy - r / 3), (cx + r, cy + r / 3), (cx - r, cy + r / 3)]
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [round(float(v), 2) for p in pts for v in p]


def ring_mask(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A ring (disk with a hole of half the radius) as a uint8 mask."""
    yy, xx = np.mgrid[:h, :w]
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    return ((d2 <= r * r) & (d2 >= (r / 2) ** 2)).astype(np.uint8)


def polygon_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([poly], h, w)))


def _image_plan(n_images: int, rng: np.random.Generator, first_id: int) -> list[list[int]]:
    """Category ids per image: every category appears at least once; image ``first_id`` gets the ring."""
    plans = []
    k = len(TINY_CATEGORIES)
    for i in range(n_images):
        cats = [(i * 2) % k + 1, (i * 2 + 1) % k + 1]
        if rng.random() < 0.5:
            cats.append(int(rng.integers(1, k + 1)))
        plans.append(cats[:3])
    if plans and 2 not in plans[0]:
        plans[0][0] = 2  # the ring (RLE) is in the first image
    return plans


def _write_split(root: Path, split: str, n_images: int, size: int, seed: int, first_image_id: int,
                 first_ann_id: int) -> tuple[dict[str, Any], int]:
    from PIL import Image
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = first_ann_id
    cells = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    for i, cat_ids in enumerate(_image_plan(n_images, rng, first_image_id)):
        image_id = first_image_id + i
        h, w = size, size + 16 * (i % 2)  # two aspect ratios
        canvas = np.full((h, w, 3), 128, dtype=np.uint8) + rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
        order = rng.permutation(len(cells))
        for j, cid in enumerate(cat_ids):
            _, shape, colour, _, _ = TINY_CATEGORIES[cid - 1]
            fx, fy = cells[order[j]]
            r = float(rng.uniform(0.12, 0.2) * min(h, w))
            cx, cy = fx * w + rng.uniform(-3, 3), fy * h + rng.uniform(-3, 3)
            if shape == "ring":
                m = ring_mask(h, w, cx, cy, r)
                rle = mask_util.encode(np.asfortranarray(m))
                segm: Any = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                poly = shape_polygon(shape, cx, cy, r)
                m = polygon_mask(poly, h, w)
                segm = [poly]
            canvas[m.astype(bool)] = colour
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cid, "segmentation": segm,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum())})
            ann_id += 1
        file_name = f"{split}_{image_id:06d}.jpg"
        Image.fromarray(canvas).save(img_dir / file_name, quality=95)
        present = set(cat_ids)
        images.append({
            "id": image_id, "file_name": file_name, "height": h, "width": w,
            "coco_url": f"http://example.invalid/{split}/{file_name}",
            "neg_category_ids": [c for c in range(1, len(TINY_CATEGORIES) + 1) if c not in present],
            "not_exhaustive_category_ids": [],
        })
    data = {"info": {"description": f"tiny LVIS-format {split} split written by tests/helpers.py"},
            "images": images, "annotations": anns, "categories": tiny_categories()}
    return data, ann_id


def write_tiny_lvis(root: str | os.PathLike, n_images: int = 6, n_val: int = 3, seed: int = 0,
                    size: int = 128) -> dict[str, Any]:
    """Write the tiny dataset under ``root/tiny_lvis``; return its paths (absolute and relative to ``root``).

    Keys: ``root``, ``train_json``, ``val_json``, ``image_dir`` (absolute), ``train_json_rel``, ``val_json_rel``,
    ``image_dir_rel`` (relative to root, for ``ACP.REGISTER_LVIS`` with ``DETECTRON2_DATASETS=root``),
    ``num_classes``, ``train``/``val`` (the json dicts).
    """
    root = Path(root)
    base = root / "tiny_lvis"
    train, next_ann = _write_split(base, "train", n_images, size, seed, first_image_id=1, first_ann_id=1)
    val, _ = _write_split(base, "val", n_val, size, seed + 1, first_image_id=1001, first_ann_id=next_ann)
    paths = {"train_json": base / "train.json", "val_json": base / "val.json"}
    for key, data in (("train_json", train), ("val_json", val)):
        paths[key].write_text(json.dumps(data))
    return {
        "root": str(root), "train_json": str(paths["train_json"]), "val_json": str(paths["val_json"]),
        "image_dir": str(base / "images"), "train_json_rel": "tiny_lvis/train.json",
        "val_json_rel": "tiny_lvis/val.json", "image_dir_rel": "tiny_lvis/images",
        "num_classes": len(TINY_CATEGORIES), "train": train, "val": val,
    }


def tiny_dataset_overrides(names: tuple[str, str] = ("tiny_train", "tiny_val")) -> list[str]:
    """``KEY VALUE`` overrides that register the tiny dataset (as written by ``write_tiny_lvis``) and use it."""
    train, val = names
    reg = [[train, "tiny_lvis/train.json", "tiny_lvis/images"], [val, "tiny_lvis/val.json", "tiny_lvis/images"]]
    return [
        "ACP.REGISTER_LVIS", json.dumps(reg),
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(TINY_CATEGORIES)),
    ]


def tiny_model_overrides(max_iter: int = 4) -> list[str]:
    """``KEY VALUE`` overrides turning any config based on Base-MaskRCNN-LVIS.yaml into the tiny CPU model of
    ``configs/tiny/mask_rcnn_R18_tiny.yaml`` (R-18-FPN from scratch, BN, 128 px, few proposals)."""
    return [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
        "MODEL.FPN.OUT_CHANNELS", "64",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "2", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "TEST.DETECTIONS_PER_IMAGE", "100",
    ]


def subprocess_env(datasets_root: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """Environment for a child training process: one CPU thread, ``DETECTRON2_DATASETS`` if given."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    env.update(extra)
    return env


def run_train_net(args: list[str], datasets_root: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tools/train_net.py ARGS`` in a child process (captured text output)."""
    return subprocess.run([sys.executable, str(TRAIN_NET), *args], cwd=str(cwd or REPO_ROOT),
                          env=subprocess_env(datasets_root), capture_output=True, text=True, timeout=timeout)
