#!/usr/bin/env python
"""LVIS evaluation benchmark (``make bench``): the fast backend against lvis-api on an LVIS-val-like set.

Data, generated once into ``--workdir`` (a temp dir by default) and reused when it is already there: images over the
real LVIS v1 category table (1,203 categories, drawn by their train image counts so frequent categories dominate as
in LVIS val), about 12 polygon instances per image, verified negatives and not-exhaustive categories per image, and
``--dets`` detections per image (jittered hits with right and wrong labels, random boxes; scores with ties) with
boxes and RLE masks, written as an LVIS results json.

Every (backend, task) pair runs in its own fresh process (``acp_data.d2.evaluation.evaluate_lvis_results`` on the two
files, so the time is end to end from the results file) that reports its wall time and its peak RSS
(``resource.getrusage``). Targets (issue 22): ``eval_speedup`` = lvis-api time / fast time, the smaller of bbox and
segm, >= 20; ``eval_rss_ratio`` = fast / lvis-api peak RSS (the larger of the two tasks) <= 0.5;
``eval_max_abs_diff`` over all 18 numbers == 0 (<= 1e-9). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 640))


# ----- data ------------------------------------------------------------------------------------------------------------
def _blobs(rng: np.random.Generator, boxes: np.ndarray, n_vertices: int = 8) -> np.ndarray:
    """Star-shaped polygons roughly filling ``boxes`` (N x 4 XYWH): N x 2*n_vertices flat [x0, y0, x1, y1, ...]."""
    n = len(boxes)
    t = np.sort(rng.uniform(0, 2 * np.pi, (n, n_vertices)), axis=1)
    rad = rng.uniform(0.6, 1.0, (n, n_vertices))
    x, y, w, h = (boxes[:, k:k + 1] for k in range(4))
    xs = x + w / 2 + (w / 2) * rad * np.cos(t)
    ys = y + h / 2 + (h / 2) * rad * np.sin(t)
    return np.round(np.stack([xs, ys], 2).reshape(n, 2 * n_vertices), 2)


def _rand_boxes(rng: np.random.Generator, n: int, iw: int, ih: int) -> np.ndarray:
    """N boxes (XYWH) of LVIS-like sizes: sqrt(area fraction) log-uniform in [0.02, 0.8], so most are small."""
    s = np.exp(rng.uniform(np.log(0.02), np.log(0.8), n)) * np.sqrt(iw * ih)
    ar = np.exp(rng.uniform(-0.7, 0.7, n))
    w = np.clip(s * ar, 2.0, iw - 1.0)
    h = np.clip(s / ar, 2.0, ih - 1.0)
    return np.stack([rng.uniform(0, 1, n) * (iw - w), rng.uniform(0, 1, n) * (ih - h), w, h], 1)


def _jitter(rng: np.random.Generator, boxes: np.ndarray, iw: int, ih: int) -> np.ndarray:
    """``boxes`` moved and rescaled by a random amount (2%..25% of their size), kept inside the image."""
    a = rng.uniform(0.02, 0.25, (len(boxes), 1))
    x, y, w, h = boxes.T
    x2 = np.clip(x + rng.normal(0, 1, len(x)) * a[:, 0] * w, 0, iw - 2.0)
    y2 = np.clip(y + rng.normal(0, 1, len(y)) * a[:, 0] * h, 0, ih - 2.0)
    w2 = np.clip(w * np.exp(rng.normal(0, 1, len(w)) * a[:, 0]), 1.0, iw - x2)
    h2 = np.clip(h * np.exp(rng.normal(0, 1, len(h)) * a[:, 0]), 1.0, ih - y2)
    return np.stack([x2, y2, w2, h2], 1)


def _rles(polys: np.ndarray, ih: int, iw: int) -> list[dict[str, Any]]:
    """Compressed RLEs (string counts, as detectron2 writes them) of flat polygons."""
    from pycocotools import mask as mask_util

    out = mask_util.frPyObjects(polys.tolist(), ih, iw) if len(polys) else []
    for rle in out:
        rle["counts"] = rle["counts"].decode("ascii")
    return out


def make_lvis_set(
    n_images: int,
    dets_per_image: int,
    seed: int = 0,
    categories: list[dict[str, Any]] | None = None,
    instances_per_image: float = 12.0,
    score_decimals: int | None = None,
    polygon_masks: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An LVIS-format ground truth and a results list over ``categories`` (default: the LVIS v1 table).

    Categories are drawn by their ``image_count``; each image lists verified negatives and sometimes a
    not-exhaustive category. ``dets_per_image`` detections per image (an image's count varies +-20% around it, so some
    images exceed 300): a third are jittered copies of its ground truth (a fifth of those with a wrong label), the rest
    random boxes on positive, negative or unrelated categories. ``score_decimals`` rounds scores (ties);
    ``polygon_masks`` gives detections polygon masks instead of RLE (lvis-api accepts both for the ground truth).
    """
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    if categories is None:
        from acp_data.categories import CategoryTable

        categories = [{"id": c.id, "name": c.name, "frequency": c.frequency, "image_count": c.image_count,
                       "synonyms": list(c.synonyms), "def": c.definition} for c in CategoryTable.from_lvis_v1()]
    cat_ids = np.array([c["id"] for c in categories])
    weights = np.array([max(1, int(c.get("image_count", 1))) for c in categories], dtype=float)
    weights /= weights.sum()
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for i in range(n_images):
        img_id = i + 1
        iw, ih = SIZES[int(rng.integers(len(SIZES)))]
        n_pos = min(len(cat_ids), 1 + int(rng.poisson(max(0.0, instances_per_image / 3 - 1))))
        pos = [int(c) for c in rng.choice(cat_ids, size=n_pos, replace=False, p=weights)]
        if instances_per_image == 0 or rng.random() < 0.03:
            pos = []  # an image with only verified negatives
        gt_cats = np.array([c for c in pos for _ in range(int(rng.geometric(1 / 3)))], dtype=np.int64)
        gt_boxes = _rand_boxes(rng, len(gt_cats), iw, ih)
        gt_polys = _blobs(rng, gt_boxes, int(rng.integers(6, 13)))
        others = [int(c) for c in rng.choice(cat_ids, size=min(len(cat_ids), 12), replace=False, p=weights)
                  if int(c) not in pos]
        neg = sorted(others[: int(rng.integers(1, 9))])
        not_exh = [pos[0]] if pos and rng.random() < 0.1 else []
        images.append({"id": img_id, "width": iw, "height": ih, "file_name": f"{img_id:012d}.jpg",
                       "neg_category_ids": neg, "not_exhaustive_category_ids": not_exh})
        rles = _rles(gt_polys, ih, iw)
        if rles:
            areas, tight = mask_util.area(rles), mask_util.toBbox(rles)
            for c, poly, area, box in zip(gt_cats.tolist(), gt_polys.tolist(), areas.tolist(), tight.tolist()):
                if area > 0:
                    anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c, "segmentation": [poly],
                                 "bbox": box, "area": float(area)})
        n_det = int(round(dets_per_image * rng.uniform(0.8, 1.2))) if dets_per_image else 0
        n_hit = min(n_det // 3, 3 * len(gt_cats))
        hit_idx = rng.integers(0, max(1, len(gt_cats)), n_hit)
        boxes = np.concatenate([_jitter(rng, gt_boxes[hit_idx], iw, ih) if n_hit else np.zeros((0, 4)),
                                _rand_boxes(rng, n_det - n_hit, iw, ih)])
        cats = np.concatenate([gt_cats[hit_idx] if n_hit else np.zeros(0, np.int64),
                               rng.choice(pos + neg, n_det - n_hit) if pos + neg else
                               rng.choice(cat_ids, n_det - n_hit, p=weights)])
        wrong = rng.random(n_det) < np.where(np.arange(n_det) < n_hit, 0.2, 0.3)
        cats = np.where(wrong, rng.choice(cat_ids, n_det, p=weights), cats)
        polys = _blobs(rng, boxes)
        masks: list[Any] = [[p] for p in polys.tolist()] if polygon_masks else _rles(polys, ih, iw)
        scores = rng.uniform(0.0, 1.0, n_det)
        if score_decimals is not None:
            scores = np.round(scores, score_decimals)
        for box, c, m, sc in zip(np.round(boxes, 2).tolist(), cats.tolist(), masks, scores.tolist()):
            dets.append({"image_id": img_id, "category_id": c, "bbox": box, "score": sc, "segmentation": m})
    gt = {"info": {"description": "generated LVIS-val-like set"}, "licenses": [], "images": images,
          "annotations": anns, "categories": categories}
    return gt, dets


# ----- timing ----------------------------------------------------------------------------------------------------------
def worker(backend: str, task: str, gt_path: str, dt_path: str) -> dict[str, Any]:
    """One evaluation in this (fresh) process: wall time from the two files to the numbers, and peak RSS."""
    import logging

    from acp_data.d2.evaluation import evaluate_lvis

    logging.basicConfig(level=logging.ERROR)
    t0 = time.perf_counter()
    ev = evaluate_lvis(gt_path, dt_path, tasks=(task,), backend=backend)
    seconds = time.perf_counter() - t0
    if ev.backend != backend:
        raise SystemExit(f"eval_bench: asked for {backend}, ran {ev.backend}")
    return {"backend": backend, "task": task, "seconds": seconds, "dets": ev.num_dets,
            "peak_rss_mb": peak_rss_mb(), "metrics": ev.results[task]}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ``ru_maxrss``, which a child started
    from a big parent inherits), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(backend: str, task: str, gt_path: Path, dt_path: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", backend, task, str(gt_path), str(dt_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"eval_bench: {backend} {task} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ensure_data(workdir: Path, n_images: int, dets: int, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    """The generated set in ``workdir`` (made once per size and seed, then reused)."""
    tag = f"{n_images}x{dets}_s{seed}"
    gt_path, dt_path, info_path = workdir / f"gt_{tag}.json", workdir / f"dt_{tag}.json", workdir / f"info_{tag}.json"
    if info_path.is_file() and gt_path.is_file() and dt_path.is_file():
        return gt_path, dt_path, json.loads(info_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gt, dts = make_lvis_set(n_images, dets, seed=seed)
    over = sum(1 for c in np.bincount([d["image_id"] for d in dts]) if c > 300)
    gt_path.write_text(json.dumps(gt))
    with open(dt_path, "w") as f:
        json.dump(dts, f)
    freq = {g: sum(1 for c in gt["categories"] if c["frequency"] == g) for g in "rcf"}
    ann_cats = {a["category_id"] for a in gt["annotations"]}
    info = {"images": len(gt["images"]), "annotations": len(gt["annotations"]), "detections": len(dts),
            "images_over_300": over, "categories": len(gt["categories"]), "categories_by_frequency": freq,
            "categories_annotated": len(ann_cats), "dt_file_mb": round(dt_path.stat().st_size / 2 ** 20, 1),
            "generate_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return gt_path, dt_path, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000, help="images in the generated set (default 5000)")
    p.add_argument("--dets", type=int, default=300, help="detections per image, on average (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep (and reuse) the generated files here; default: a temp dir, removed")
    p.add_argument("--backends", nargs="+", default=["lvis", "hotcoco"], help="reference first (default: lvis hotcoco)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per evaluation process")
    p.add_argument("--worker", nargs=4, metavar=("BACKEND", "TASK", "GT", "DT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="eval_bench_")
    workdir = Path(args.workdir or tmp.name)
    try:
        gt_path, dt_path, info = ensure_data(workdir, args.images, args.dets, args.seed)
        print(f"data: {json.dumps(info)}", flush=True)
        runs: dict[tuple[str, str], dict[str, Any]] = {}
        for task in ("bbox", "segm"):
            for backend in args.backends:
                r = run_worker(backend, task, gt_path, dt_path, args.timeout)
                runs[backend, task] = r
                print(f"{backend:8s} {task}: {r['seconds']:8.2f} s, peak RSS {r['peak_rss_mb']:8.0f} MB", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    ref, fast = args.backends[0], args.backends[-1]
    speedups = {t: runs[ref, t]["seconds"] / runs[fast, t]["seconds"] for t in ("bbox", "segm")}
    rss = {b: max(runs[b, t]["peak_rss_mb"] for t in ("bbox", "segm")) for b in args.backends}
    diff = 0.0
    for t in ("bbox", "segm"):
        for m, a in runs[ref, t]["metrics"].items():
            b = runs[fast, t]["metrics"][m]
            diff = max(diff, float("inf") if (a is None) != (b is None) else 0.0 if a is None else abs(a - b))
    for t in ("bbox", "segm"):
        print(f"{t}: " + "  ".join(f"{m} {v:.3f}" if v is not None else f"{m} -"
                                    for m, v in runs[fast, t]["metrics"].items()))
    print(f"speedup bbox {speedups['bbox']:.1f}x, segm {speedups['segm']:.1f}x; peak RSS {fast} / {ref} "
          f"{rss[fast] / rss[ref]:.3f}; max |diff| {diff:g} (percent points)")
    print(json.dumps({
        "eval_speedup": round(min(speedups.values()), 2),
        "eval_rss_ratio": round(rss[fast] / rss[ref], 4),
        "eval_max_abs_diff": diff,
        "eval_images": info["images"],
        "eval_dets": info["detections"],
        "eval_speedup_bbox": round(speedups["bbox"], 2), "eval_speedup_segm": round(speedups["segm"], 2),
        "eval_seconds": {f"{b}_{t}": round(r["seconds"], 2) for (b, t), r in runs.items()},
        "eval_peak_rss_mb": {b: round(v) for b, v in rss.items()},
        "backends": [ref, fast],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
