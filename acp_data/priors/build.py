"""Building priors from an LVIS/COCO-format json and optional phrase-annotated relation records
(``build_priors``; ``acp-data priors build`` runs it).

**Sampling caps (seeded, deterministic for a given input and seed).** Per image, the ordered pairs of its boxes
(``n * (n - 1)`` for ``n`` boxes) are all kept when there are at most ``max_pairs_per_image`` of them, else that many
are drawn uniformly without replacement. Per pool (subject, object, bucket), at most ``max_refs_per_pool`` pairs are
kept, drawn uniformly without replacement. Each bucket also keeps a category-independent pool of at most
``max_refs_per_bucket`` pairs drawn uniformly from the kept pairs of that bucket (the CLIS-L back-off). One
``numpy.random.Generator(PCG64(seed))`` draws, in this order: per-image samples (images in ascending id order), one
uniform key per pair for the pool cap, the bucket pools.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import Category, CategoryError, CategoryTable, frequency_from_count, normalize_name
from ..fsio import load_json_arg
from .buckets import (
    BUCKET_INDEX,
    BUCKETS,
    INSIDE_MIN_IOA,
    NEXT_TO_MAX_GAP,
    OVERLAP_MIN_IOMIN,
    PriorsError,
    geometric_buckets,
    normalize_phrase,
    relation_bucket,
)
from .container import Priors

logger = logging.getLogger(__name__)

__all__ = ["build_priors", "read_relations", "RELATIONS_FORMAT"]


def build_priors(lvis_json: dict[str, Any] | str | os.PathLike,
                 relations: str | os.PathLike | Iterable[dict[str, Any]] | None = None, seed: int = 0,
                 max_pairs_per_image: int = 32, max_refs_per_pool: int = 500,
                 max_refs_per_bucket: int = 5000) -> Priors:
    """Build priors from an LVIS/COCO-format json (path or loaded dict) and optional relation records.

    Crowd boxes and boxes without area (after clipping to the image) are skipped. COCO's non-contiguous category
    ids are mapped to 1..K in id order (the mapping is kept in ``settings["json_category_ids"]``). A cap of 0
    means no cap.
    """
    t0 = time.perf_counter()
    data, source = load_json_arg(lvis_json, PriorsError, "annotations")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise PriorsError(f"{source} has no {key!r} key; is it an LVIS/COCO-format json?")
    for name, v in (("max_pairs_per_image", max_pairs_per_image), ("max_refs_per_pool", max_refs_per_pool),
                    ("max_refs_per_bucket", max_refs_per_bucket)):
        if int(v) < 0:
            raise PriorsError(f"{name} = {v} must be >= 0 (0 = no cap)")
    rng = np.random.default_rng(seed)

    # --- images and annotations as arrays
    try:
        img_ids = np.fromiter((im["id"] for im in data["images"]), dtype=np.int64, count=len(data["images"]))
        img_wh = np.array([(im["width"], im["height"]) for im in data["images"]], dtype=np.float64).reshape(-1, 2)
    except KeyError as e:
        raise PriorsError(f"{source}: an entry of 'images' lacks the key {e}") from e
    order = np.argsort(img_ids, kind="stable")
    img_ids, img_wh = img_ids[order], img_wh[order]
    if len(img_ids) > 1 and np.any(np.diff(img_ids) == 0):
        dup = img_ids[np.flatnonzero(np.diff(img_ids) == 0)[0]]
        raise PriorsError(f"{source}: image id {int(dup)} appears twice in 'images'")
    if np.any(img_wh <= 0):
        bad = img_ids[np.flatnonzero(np.any(img_wh <= 0, axis=1))[0]]
        raise PriorsError(f"{source}: image {int(bad)} has a non-positive width or height")
    anns = data["annotations"]
    n = len(anns)
    try:
        a_img = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=n)
        a_cat = np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=n)
        a_crowd = np.fromiter((a.get("iscrowd", 0) for a in anns), dtype=np.int64, count=n)
        a_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    except KeyError as e:
        raise PriorsError(f"{source}: an annotation lacks the key {e}") from e
    except ValueError as e:
        raise PriorsError(f"{source}: an annotation 'bbox' is not four numbers ({e})") from e

    table, cat_lut, json_ids = _table_from_json(data, source, a_img, a_cat)
    k = len(table)
    bad = (a_cat < 0) | (a_cat >= len(cat_lut)) | (cat_lut[np.clip(a_cat, 0, len(cat_lut) - 1)] == 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PriorsError(f"{source}: annotation {anns[i].get('id', i)} has category_id {int(a_cat[i])}, which "
                          "is not in 'categories'")
    cat = cat_lut[a_cat]
    pos = np.searchsorted(img_ids, a_img)
    found = (pos < len(img_ids)) & (img_ids[np.clip(pos, 0, len(img_ids) - 1)] == a_img)
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise PriorsError(f"{source}: annotation {anns[i].get('id', i)} refers to image {int(a_img[i])}, which "
                          "is not in 'images'")
    wh = img_wh[pos]
    x0 = np.clip(a_box[:, 0] / wh[:, 0], 0, 1)
    y0 = np.clip(a_box[:, 1] / wh[:, 1], 0, 1)
    x1 = np.clip((a_box[:, 0] + a_box[:, 2]) / wh[:, 0], 0, 1)
    y1 = np.clip((a_box[:, 1] + a_box[:, 3]) / wh[:, 1], 0, 1)
    box = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    keep = (a_crowd == 0) & np.isfinite(box).all(axis=1) & (box[:, 2] > 0) & (box[:, 3] > 0)
    skipped = int(n - keep.sum())
    # sort by image (stable: annotation order inside an image)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(pos[idx], kind="stable")]
    img, cat, box = pos[idx], cat[idx], box[idx]
    logger.info("priors: %d boxes on %d images, %d categories (%d boxes skipped: crowd or no area)",
                len(idx), len(img_ids), k, skipped)

    # --- per-category size and aspect statistics
    size = np.zeros((k + 1, 5), dtype=np.float64)
    cnt = np.bincount(cat, minlength=k + 1).astype(np.float64)
    s = np.sqrt(box[:, 2] * box[:, 3])
    asp = np.log(box[:, 2] * wh[idx, 0] / (box[:, 3] * wh[idx, 1]))  # aspect in pixels
    with np.errstate(invalid="ignore", divide="ignore"):
        for col, v in ((1, s), (3, asp)):
            mean = np.bincount(cat, weights=v, minlength=k + 1) / cnt
            var = np.bincount(cat, weights=v * v, minlength=k + 1) / cnt - mean * mean
            size[:, col] = np.nan_to_num(mean)
            size[:, col + 1] = np.sqrt(np.clip(np.nan_to_num(var), 0, None))
    size[:, 0] = cnt

    # --- co-occurrence: unique (image, category), then all ordered pairs inside each image (with the diagonal)
    uk = np.unique(img * (k + 1) + cat)
    u_img, u_cat = uk // (k + 1), uk % (k + 1)
    starts, sizes = _groups(u_img)
    ci, cj = _ordered_pairs(starts, sizes, diagonal=True)
    cooc = np.bincount(u_cat[ci] * (k + 1) + u_cat[cj], minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    cooc = cooc.astype(np.int64)

    # --- box pairs, capped per image
    starts, sizes = _groups(img)
    multi = sizes >= 2
    starts, sizes = starts[multi], sizes[multi]
    npairs = sizes * (sizes - 1)
    cap = int(max_pairs_per_image)
    small = np.ones(len(sizes), dtype=bool) if cap == 0 else npairs <= cap
    pi, pj = _ordered_pairs(starts[small], sizes[small], diagonal=False)
    big_i, big_j = [], []
    big = np.flatnonzero(~small)
    for g in big:
        q = rng.choice(int(npairs[g]), size=cap, replace=False)
        m = int(sizes[g]) - 1
        i, j = q // m, q % m
        j = j + (j >= i)
        big_i.append(starts[g] + i)
        big_j.append(starts[g] + j)
    if big_i:
        pi = np.concatenate([pi, *big_i])
        pj = np.concatenate([pj, *big_j])
    subj_box, obj_box = box[pi], box[pj]
    p_s, p_o = cat[pi], cat[pj]
    p_b = geometric_buckets(subj_box, obj_box).astype(np.int64)
    n_geo = len(pi)

    # --- phrase-annotated pairs
    rel_stats: dict[str, Any] = {}
    if relations is not None:
        r_s, r_o, r_b, r_sb, r_ob, rel_stats = read_relations(relations, table)
        subj_box = np.concatenate([subj_box, r_sb])
        obj_box = np.concatenate([obj_box, r_ob])
        p_s, p_o, p_b = np.concatenate([p_s, r_s]), np.concatenate([p_o, r_o]), np.concatenate([p_b, r_b])

    # --- pools, capped per pool by a uniform random key
    nb = len(BUCKETS)
    key = (p_s * (k + 1) + p_o) * nb + p_b
    u = rng.random(len(key))
    order = np.lexsort((u, key))
    key_sorted = key[order]
    g_starts, g_sizes = _groups(key_sorted)
    rank = np.arange(len(key_sorted)) - np.repeat(g_starts, g_sizes)
    keep = rank < max_refs_per_pool if max_refs_per_pool else np.ones(len(rank), dtype=bool)
    rows = order[keep]
    key_kept = key_sorted[keep]
    pairs = np.concatenate([subj_box[rows], obj_box[rows]], axis=1).astype(np.float32)
    pool_keys, counts = np.unique(key_kept, return_counts=True)
    pool_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # --- per-bucket back-off pools (rows of `pairs`)
    bucket_of_row = key_kept % nb
    refs, offs = [], [0]
    for b in range(nb):
        r = np.flatnonzero(bucket_of_row == b)
        if max_refs_per_bucket and len(r) > max_refs_per_bucket:
            r = np.sort(rng.choice(r, size=max_refs_per_bucket, replace=False))
        refs.append(r)
        offs.append(offs[-1] + len(r))
    bucket_refs = np.concatenate(refs).astype(np.int64)
    bucket_offsets = np.asarray(offs, dtype=np.int64)

    settings = {
        "source": source, "seed": int(seed), "max_pairs_per_image": int(max_pairs_per_image),
        "max_refs_per_pool": int(max_refs_per_pool), "max_refs_per_bucket": int(max_refs_per_bucket),
        "num_images": int(len(img_ids)), "num_boxes": int(len(idx)), "skipped_boxes": skipped,
        "geometric_pairs": int(n_geo), "relation_pairs": int(len(key) - n_geo), "reference_pairs": int(len(pairs)),
        "pools": int(len(pool_keys)), "relations": rel_stats,
        "geometry": {"inside_min_ioa": INSIDE_MIN_IOA, "overlap_min_iomin": OVERLAP_MIN_IOMIN,
                     "next_to_max_gap": NEXT_TO_MAX_GAP},
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    if json_ids is not None:
        settings["json_category_ids"] = json_ids
    logger.info("priors: %d reference pairs in %d pools (from %d geometric + %d relation pairs) in %.1f s",
                len(pairs), len(pool_keys), n_geo, len(key) - n_geo, settings["build_seconds"])
    return Priors(table, size=size, cooc=cooc, pairs=pairs, pool_keys=pool_keys, pool_offsets=pool_offsets,
                  bucket_refs=bucket_refs, bucket_offsets=bucket_offsets, settings=settings, source=source)


def _ordered_pairs(starts: np.ndarray, sizes: np.ndarray, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """All ordered index pairs (i, j) inside each group ``[start, start + size)``; with ``diagonal`` also i == j."""
    sizes = sizes.astype(np.int64)
    k = sizes * sizes if diagonal else sizes * (sizes - 1)
    total = int(k.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    g = np.repeat(np.arange(len(sizes)), k)
    q = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    n = sizes[g]
    if diagonal:
        i, j = q // n, q % n
    else:
        m = n - 1
        i, j = q // m, q % m
        j = j + (j >= i)
    base = starts.astype(np.int64)[g]
    return base + i, base + j


def _groups(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_keys)) + 1]).astype(np.int64)
    sizes = np.diff(np.concatenate([starts, [len(sorted_keys)]])).astype(np.int64)
    return starts, sizes


def _table_from_json(data: dict[str, Any], source: str, a_img: np.ndarray,
                     a_cat: np.ndarray) -> tuple[CategoryTable, np.ndarray, list[int] | None]:
    """CategoryTable of the json (image counts computed vectorised when absent), a lookup json id -> table id, and
    the json ids in table order when they had to be remapped to 1..K (COCO)."""
    cats = sorted(data["categories"], key=lambda d: int(d["id"]))
    ids = [int(d["id"]) for d in cats]
    if not ids:
        raise PriorsError(f"{source}: 'categories' is empty")
    if len(set(ids)) != len(ids):
        raise PriorsError(f"{source}: duplicate category ids in 'categories'")
    contiguous = ids == list(range(1, len(ids) + 1))
    lut = np.zeros(max(max(ids), int(a_cat.max(initial=0))) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    mapped = np.where((a_cat >= 0) & (a_cat < len(lut)), lut[np.clip(a_cat, 0, len(lut) - 1)], 0)
    pairs = np.unique(a_img * (len(ids) + 1) + mapped)
    counts = np.bincount(pairs % (len(ids) + 1), minlength=len(ids) + 1)
    out = []
    for new_id, d in enumerate(cats, start=1):
        count = int(d["image_count"]) if "image_count" in d else int(counts[new_id])
        try:
            out.append(Category(id=new_id, name=str(d["name"]), synonyms=tuple(d.get("synonyms", ())),
                                definition=d.get("def", ""), frequency=d.get("frequency") or frequency_from_count(count),
                                image_count=count))
        except KeyError as e:
            raise PriorsError(f"{source}: category {d.get('id')} lacks the key {e}") from e
    try:
        table = CategoryTable(out, source=source)
    except CategoryError as e:
        raise PriorsError(str(e)) from e
    return table, lut, None if contiguous else ids


# ----- relations input ----------------------------------------------------------------------------------------------
RELATIONS_FORMAT = """\
Relations file: JSON lines, one annotated relation per line (Visual Genome relationships or Flickr30K Entities
phrase pairs converted to this form):

  {"subject": "dog", "object": "frisbee", "relation": "jumping over",
   "subject_bbox": [x, y, w, h], "object_bbox": [x, y, w, h], "width": 640, "height": 480}

- subject / object: category names or synonyms of the CategoryTable (case, spaces and underscores ignored);
- relation: a phrase, mapped to a bucket by the relation lexicon;
- boxes: XYWH in pixels of an image of the given width and height, or normalised to [0, 1] with "normalized": true
  (then width/height may be omitted);
- optional keys (image_id, ...) are ignored. Blank lines and lines starting with '#' are skipped.
Lines with unknown names or phrases outside the lexicon are skipped and counted; malformed lines are errors.
Relation pairs join the pools of their lexicon bucket; they are not capped per image, the per-pool cap applies.
"""


def read_relations(relations: str | os.PathLike | Iterable[dict[str, Any]], table: CategoryTable,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Parse relation records (see RELATIONS_FORMAT) into subject ids, object ids, bucket indices, normalised
    subject and object XYWH boxes (each (n, 4)), and counts of what was skipped."""
    if isinstance(relations, (str, os.PathLike)):
        src = str(relations)
        if not Path(src).is_file():
            raise PriorsError(f"relations file {src!r} does not exist")
        records: Iterable[tuple[str, dict[str, Any]]] = _jsonl(Path(src))
    else:
        src = "relations"
        records = ((f"{src}[{i}]", r) for i, r in enumerate(relations))
    s_ids, o_ids, b_ids, sb, ob = [], [], [], [], []
    unknown_names: Counter = Counter()
    unknown_phrases: Counter = Counter()
    bad_boxes = 0
    total = 0
    for where, r in records:
        total += 1
        for key in ("subject", "object", "relation", "subject_bbox", "object_bbox"):
            if key not in r:
                raise PriorsError(f"{where}: missing key {key!r}\n{RELATIONS_FORMAT}")
        try:
            boxes = np.array([r["subject_bbox"], r["object_bbox"]], dtype=np.float64).reshape(2, 4)
        except (TypeError, ValueError) as e:
            raise PriorsError(f"{where}: subject_bbox/object_bbox must be [x, y, w, h] numbers ({e})") from e
        if not r.get("normalized", False):
            if "width" not in r or "height" not in r:
                raise PriorsError(f"{where}: pixel boxes need 'width' and 'height' (or set \"normalized\": true)")
            w, h = float(r["width"]), float(r["height"])
            if w <= 0 or h <= 0:
                raise PriorsError(f"{where}: width/height must be positive, got {w} x {h}")
            boxes = boxes / np.array([w, h, w, h])
        ids = []
        for key in ("subject", "object"):
            try:
                ids.append(table.id_of(str(r[key])))
            except CategoryError:
                unknown_names[normalize_name(str(r[key]))] += 1
                ids.append(0)
        if 0 in ids:
            continue
        b = relation_bucket(str(r["relation"]))
        if b is None:
            unknown_phrases[normalize_phrase(str(r["relation"]))] += 1
            continue
        x0 = np.clip(boxes[:, 0], 0, 1)
        y0 = np.clip(boxes[:, 1], 0, 1)
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, 1)
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, 1)
        nb = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        if not np.isfinite(nb).all() or (nb[:, 2:] <= 0).any():
            bad_boxes += 1
            continue
        s_ids.append(ids[0])
        o_ids.append(ids[1])
        b_ids.append(BUCKET_INDEX[b])
        sb.append(nb[0])
        ob.append(nb[1])
    used = len(s_ids)
    stats = {"source": src, "lines": total, "used": used, "unknown_names": int(sum(unknown_names.values())),
             "unknown_phrases": int(sum(unknown_phrases.values())), "bad_boxes": bad_boxes,
             "top_unknown_names": [n for n, _ in unknown_names.most_common(10)],
             "top_unknown_phrases": [p for p, _ in unknown_phrases.most_common(10)]}
    if total and used < total:
        logger.warning("relations %s: used %d of %d; skipped %d with unknown names (e.g. %s), %d with phrases outside "
                       "the lexicon (e.g. %s), %d without box area", src, used, total, stats["unknown_names"],
                       ", ".join(stats["top_unknown_names"][:5]) or "-", stats["unknown_phrases"],
                       ", ".join(stats["top_unknown_phrases"][:5]) or "-", bad_boxes)
    z4 = np.zeros((0, 4))
    return (np.asarray(s_ids, dtype=np.int64), np.asarray(o_ids, dtype=np.int64), np.asarray(b_ids, dtype=np.int64),
            np.asarray(sb, dtype=np.float64).reshape(-1, 4) if sb else z4,
            np.asarray(ob, dtype=np.float64).reshape(-1, 4) if ob else z4, stats)


def _jsonl(path: Path):
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise PriorsError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise PriorsError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{lineno}", rec


