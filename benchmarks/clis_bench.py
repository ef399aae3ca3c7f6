"""CLIS benchmark (one CPU core): clip scorer batched vs one view at a time, CLIS-L layouts per second against priors
holding about 1M reference pairs, and the priors build time for an LVIS-v1-sized synthetic json.

    .venv/bin/python benchmarks/clis_bench.py            # LVIS-sized (100K images, 1.27M boxes), about 1 min
    .venv/bin/python benchmarks/clis_bench.py --scale 0.1

Targets (issue 11): clip_batched_speedup >= 5, clis_l_layouts_per_s >= 1000. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOUNS = ["dog", "cat", "car", "ball", "cup", "table", "chair", "bottle", "bag", "hat", "box", "lamp", "book", "plate",
         "knife", "bench", "boat", "bird", "horse", "shoe", "clock", "vase", "bowl", "phone", "truck", "bus", "kite",
         "sign", "pillow", "towel"]
ADJS = ["red", "tiny", "old", "toy", "police", "paper", "glass", "wooden", "plastic", "striped", "sports", "baby",
        "metal", "rubber", "leather", "silver", "golden", "green", "big", "folding", "garden", "kitchen", "racing",
        "water", "beach", "table", "street", "desk", "coffee", "tea", "wine", "soup", "bread", "tennis", "soccer",
        "office", "traffic", "fire", "mini", "pocket"]


def synthetic_lvis(n_images: int, n_boxes: int, k: int = 1203, seed: int = 0) -> dict:
    """An LVIS-v1-shaped json: k categories, about a third of them in groups of 2-11 sharing a head noun ("<adjective>
    <noun>", as LVIS v1's names do: 37 % of its categories share a head noun, at most 11 per noun), a long-tailed
    category distribution, uniform boxes, 320-640 px images."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    g = 0
    while len(names) < int(0.37 * k):
        size = int(rng.integers(2, 12))
        names += [f"{ADJS[j % len(ADJS)]} {NOUNS[g % len(NOUNS)]}{g // len(NOUNS) or ''}" for j in range(size)]
        g += 1
    names = names[:int(0.37 * k)]
    names += [f"object{i}" for i in range(k - len(names))]
    names = [names[i] for i in rng.permutation(k)]
    p = 1.0 / np.arange(1, k + 1) ** 1.1
    p /= p.sum()
    img = np.sort(rng.integers(1, n_images + 1, n_boxes))
    cat = rng.choice(k, n_boxes, p=p) + 1
    W = rng.integers(320, 641, n_images + 1)
    H = rng.integers(240, 641, n_images + 1)
    w = rng.uniform(0.02, 0.5, n_boxes) * W[img]
    h = rng.uniform(0.02, 0.5, n_boxes) * H[img]
    x = rng.uniform(0, 1, n_boxes) * (W[img] - w)
    y = rng.uniform(0, 1, n_boxes) * (H[img] - h)
    bb = np.round(np.stack([x, y, w, h], 1), 2).tolist()
    return {
        "images": [{"id": i, "width": int(W[i]), "height": int(H[i])} for i in range(1, n_images + 1)],
        "annotations": [{"id": i + 1, "image_id": a, "category_id": c, "bbox": b, "iscrowd": 0}
                        for i, (a, c, b) in enumerate(zip(img.tolist(), cat.tolist(), bb))],
        "categories": [{"id": i + 1, "name": n, "synonyms": [n.replace(" ", "_")], "frequency": "f"}
                       for i, n in enumerate(names)],
    }


def bench_priors(scale: float, tmp: Path) -> tuple[dict, object]:
    from acp_data.priors import Priors

    n_img, n_box = max(100, int(100_000 * scale)), max(1000, int(1_270_000 * scale))
    t = time.perf_counter()
    data = synthetic_lvis(n_img, n_box)
    path = tmp / "synthetic_lvis.json"
    path.write_text(json.dumps(data))
    gen_s = time.perf_counter() - t
    del data
    t = time.perf_counter()
    pr = Priors.build(path)  # from the file, as `acp-data priors build` does (json parse included)
    build_s = time.perf_counter() - t
    out = tmp / "priors.npz"
    t = time.perf_counter()
    pr.save(out)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    Priors.load(out)
    load_s = time.perf_counter() - t
    res = {"priors_images": n_img, "priors_boxes": n_box, "priors_build_s": round(build_s, 2),
           "priors_build_core_s": pr.settings["build_seconds"], "priors_pairs": pr.num_pairs,
           "priors_file_mb": round(out.stat().st_size / 1e6, 1), "priors_save_s": round(save_s, 2),
           "priors_load_s": round(load_s, 2), "json_generate_s": round(gen_s, 1)}
    print(f"priors: {n_box} boxes on {n_img} images -> {pr.num_pairs} pairs in {build_s:.1f} s "
          f"(save {save_s:.2f} s, load {load_s:.2f} s)", flush=True)
    # priors with about 1M reference pairs for CLIS-L (10 pairs per image at LVIS size)
    pairs_per_image = max(1, round(1_200_000 / n_img))  # ~1M pairs left after the per-pool cap
    pr1m = Priors.build(path, max_pairs_per_image=pairs_per_image)
    return res, pr1m


def bench_clis_l(pr, n_layouts: int = 3000, seed: int = 0) -> dict:
    from acp_data.clis.layout import LayoutScorer
    from acp_data.priors import BUCKET_PHRASES, BUCKETS
    from acp_data.scene import Relation, SceneGraph, SceneObject

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    scorer = LayoutScorer(pr)
    init_s = time.perf_counter() - t
    k = len(pr.categories)
    counts = pr.size[1:, 0] + 1
    p = counts / counts.sum()
    layouts = []
    for _ in range(n_layouts):
        cats = rng.choice(k, 4, p=p) + 1
        objs = []
        for j, c in enumerate(cats):
            w, h = rng.uniform(0.1, 0.4, 2)
            objs.append(SceneObject(f"obj-{j + 1}", int(c), [], (float(rng.uniform(0, 1 - w)),
                                                                  float(rng.uniform(0, 1 - h)), float(w), float(h))))
        rels = [Relation([objs[a].id], [objs[b].id], BUCKET_PHRASES[BUCKETS[int(rng.integers(len(BUCKETS)))]])
                for a, b in ((0, 1), (1, 2), (2, 3))]
        layouts.append(SceneGraph(objs, rels))
    t = time.perf_counter()
    scores = [scorer.score(sg) for sg in layouts]
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    for sg in layouts:
        scorer.score(sg)
    warm_s = time.perf_counter() - t
    levels: dict[str, int] = {}
    refs = []
    for s in scores:
        for r in s.pairs:
            levels[str(r["pool"])] = levels.get(str(r["pool"]), 0) + 1
            refs.append(r["refs"])
    res = {"clis_l_layouts_per_s": round(n_layouts / cold_s, 1), "clis_l_layouts_per_s_warm": round(n_layouts / warm_s, 1),
           "clis_l_reference_pairs": pr.num_pairs, "clis_l_init_s": round(init_s, 2), "clis_l_pool_levels": levels,
           "clis_l_mean_refs_per_pair": round(float(np.mean(refs)), 1)}
    print(f"CLIS-L: {res['clis_l_layouts_per_s']:.0f} layouts/s cold, {res['clis_l_layouts_per_s_warm']:.0f} warm "
          f"(3 pairs each, {pr.num_pairs} reference pairs, pools {levels})", flush=True)
    return res


def bench_clip(tmp: Path, n_candidates: int = 16, n_instances: int = 4, repeats: int = 5) -> dict:
    import open_clip
    import torch

    from acp_data.categories import Category, CategoryTable
    from acp_data.clis.image import ClipScorer
    from acp_data.clis.openclip_io import save_open_clip_local_dir
    from acp_data.scene import SceneGraph, SceneObject
    from acp_data.stages import Candidate, StageContext

    torch.set_num_threads(1)
    # a small judge-sized model (4-layer 64-d ViT at 32 px, like the Shapes world's): on a CPU core a forward pass
    # of one view is mostly fixed per-call cost, which batching removes; preprocessing is the same in both runs
    cfg = {"embed_dim": 64,
           "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    spec = save_open_clip_local_dir(open_clip.CLIP(**cfg), cfg, tmp / "bench_clip", overwrite=True)
    table = CategoryTable([Category(i + 1, f"{ADJS[i // 30 % 40]} {NOUNS[i % 30]}") for i in range(300)])
    ctx = StageContext(table)
    rng = np.random.default_rng(0)
    cands = []
    for _ in range(n_candidates):
        objs = []
        for j in range(n_instances):
            w, h = rng.uniform(0.15, 0.4, 2)
            objs.append(SceneObject(f"o-{j + 1}", int(rng.integers(1, 301)), ["red"],
                                    (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), float(w), float(h))))
        sg = SceneGraph(objs, caption=" and ".join(f"a red thing(o-{j + 1})" for j in range(n_instances)))
        img = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        boxes = sg.boxes_xyxy(256, 256)
        masks = []
        for b in boxes:
            m = np.zeros((256, 256), bool)
            m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
            masks.append(m)
        cands.append(Candidate(img, sg, boxes, masks))
    batched = ClipScorer(ctx, model=spec, batch_size=128)
    single = ClipScorer(ctx, model=spec, batch_size=1)
    batched.score(cands)  # warm the text caches of both: the comparison is about image batching
    for c in cands:
        single.score([c])
    # best of `repeats` interleaved runs (robust to other load on a shared machine, as timeit does)
    b_s = s_s = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        rb = batched.score(cands)
        b_s = min(b_s, time.perf_counter() - t)
        t = time.perf_counter()
        rs = [single.score([c])[0] for c in cands]
        s_s = min(s_s, time.perf_counter() - t)
    diff = max(abs(a.image - b.image) for a, b in zip(rb, rs))
    views = np.concatenate([batched.views(c)[0] for c in cands])
    enc_b = enc_s = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        batched.encode_views(views)
        enc_b = min(enc_b, time.perf_counter() - t)
        t = time.perf_counter()
        for k in range(len(views)):
            single.encode_views(views[k:k + 1])
        enc_s = min(enc_s, time.perf_counter() - t)
    res = {"clip_candidates_per_s_batched": round(n_candidates / b_s, 1),
           "clip_candidates_per_s_one_at_a_time": round(n_candidates / s_s, 1),
           "clip_batched_speedup": round(s_s / b_s, 2), "clip_encode_only_speedup": round(enc_s / enc_b, 2),
           "clip_max_abs_diff": float(f"{diff:.2e}"),
           "clip_views_per_candidate": 1 + 2 * n_instances}
    print(f"clip: {res['clip_candidates_per_s_batched']} candidates/s batched vs "
          f"{res['clip_candidates_per_s_one_at_a_time']} one view at a time -> x{res['clip_batched_speedup']} "
          f"(max |diff| {diff:.1e})", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of LVIS v1 train size for the priors json")
    ap.add_argument("--layouts", type=int, default=3000)
    args = ap.parse_args()
    out: dict = {"cpu_threads": 1}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out.update(bench_clip(tmp))
        res, pr1m = bench_priors(args.scale, tmp)
        out.update(res)
        out.update(bench_clis_l(pr1m, args.layouts))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
