"""``acp-data export CACHE --out FILE.json``: the cache (or a selection of it) as an LVIS v1 json that ``lvis.LVIS``,
detectron2 and mmdetection load.

Images get ``id`` (stable: a hash of key and candidate, as the synthetic dataset uses), ``width``, ``height``,
``file_name`` (``<key>.c<candidate>.<ext>``), ``coco_url`` (``file://<images dir>/<file_name>`` with ``--images``,
where the bytes are written; ``acp://<cache>/<file_name>`` otherwise), empty ``neg_category_ids`` /
``not_exhaustive_category_ids``, and every candidate field as ``acp_*`` extras (key, unit, candidate_idx, seed,
clis_l, clis_i, selected, scene_graph, provenance). Annotations carry ``segmentation`` (compressed RLE, or polygons
with ``--polygons``), ``bbox`` (tight), ``area``, ``acp_layout_bbox`` and ``acp_clis_i``. Categories are the
manifest's table: ``frequency`` from it, ``image_count``/``instance_count`` counted in this export,
``acp_real_image_count`` the table's count. Unscored values are ``null``.

For detectron2's own ``load_lvis_json`` (which builds paths from ``coco_url``) register with
``image_root = <parent of the images dir> + "/"``; ``acp_data.d2.lvis_format`` reads ``file_name`` directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .layout import BrokenSampleError, CacheError, atomic_write_bytes, member_stem
from .records import image_format

logger = logging.getLogger(__name__)


def export_lvis(cache_dirs: str | os.PathLike | list[str | os.PathLike], out: str | os.PathLike,
                selection: Any = None, images_dir: str | os.PathLike | None = None, polygons: bool = False) -> dict:
    """Write the LVIS json to ``out`` (atomically) and return it; see the module docstring."""
    from tqdm import tqdm

    from .reader import open_caches
    from .selection import ALL, select, stable_image_id

    readers = open_caches(cache_dirs if isinstance(cache_dirs, list) else [cache_dirs])
    result = select(readers, selection or ALL)
    table = readers[0].categories
    if images_dir is not None:
        images_dir = Path(os.path.abspath(images_dir))
        images_dir.mkdir(parents=True, exist_ok=True)
    if polygons:
        from ..masks import mask_to_polygons, rle_to_mask
    images, annotations = [], []
    img_count: Counter = Counter()
    inst_count: Counter = Counter()
    ids_seen: dict[int, str] = {}
    broken = 0
    for k in tqdm(range(len(result)), desc="export", unit="img", disable=None):
        ci, row = int(result.cache_index[k]), int(result.sample_row[k])
        reader = readers[ci]
        try:
            record, img = reader.read_sample(row)
        except BrokenSampleError as e:
            broken += 1
            logger.warning("export: skipping broken sample: %s", e)
            continue
        stem = member_stem(record["key"], record["candidate_idx"])
        image_id = int(stable_image_id(reader.value("key_hash", row), record["candidate_idx"])[0])
        if image_id in ids_seen:
            raise CacheError(f"image id collision between {ids_seen[image_id]} and {stem}; export them separately")
        ids_seen[image_id] = stem
        file_name = f"{stem}.{image_format(img) or 'bin'}"
        if images_dir is not None:
            atomic_write_bytes(images_dir / file_name, img)
            url = f"file://{images_dir}/{file_name}"
        else:
            url = f"acp://{reader.cache_dir}/{file_name}"
        images.append({
            "id": image_id, "width": record["width"], "height": record["height"], "file_name": file_name,
            "coco_url": url, "neg_category_ids": [], "not_exhaustive_category_ids": [],
            **{f"acp_{f}": record[f] for f in ("key", "unit", "candidate_idx", "seed", "clis_l", "clis_i", "selected",
                                               "scene_graph", "provenance")},
        })
        cats_here = set()
        for j in result.inst_local[result.instances(k)]:
            inst = record["instances"][int(j)]
            segm: Any = inst["segmentation"]
            if polygons:
                segm = mask_to_polygons(rle_to_mask(segm))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst["category_id"],
                "segmentation": segm, "bbox": inst["bbox"], "area": inst["area"], "iscrowd": 0,
                "acp_layout_bbox": inst["layout_bbox"], "acp_clis_i": inst["clis_i"], "acp_instance": int(j),
            })
            inst_count[inst["category_id"]] += 1
            cats_here.add(inst["category_id"])
        img_count.update(cats_here)
    categories = [{
        "id": c.id, "name": c.name, "synonyms": list(c.synonyms), "def": c.definition, "frequency": c.frequency,
        "image_count": img_count[c.id], "instance_count": inst_count[c.id], "acp_real_image_count": c.image_count,
    } for c in table]
    data = {
        "info": {"description": "acp-data synthetic samples", "caches": [str(r.cache_dir) for r in readers],
                 "selection": result.selection.to_dict(), "broken_skipped": broken,
                 "samples_in_caches": int(result.stats.get("samples", 0)),
                 "skipped": skipped_reasons(result.stats, broken)},
        "licenses": [], "images": images, "annotations": annotations, "categories": categories,
    }
    atomic_write_bytes(out, json.dumps(data, allow_nan=False).encode())
    return data


def skipped_reasons(stats: dict[str, int], broken: int = 0) -> dict[str, int]:
    """Samples of the caches an export left out, by reason (from the selection's counts), zero counts omitted."""
    n, dup = int(stats.get("samples", 0)), int(stats.get("duplicates", 0))
    after_select = int(stats.get("after_select", n - dup))
    reasons = {
        "duplicates (same key and candidate)": dup,
        "not chosen by --select": n - dup - after_select,
        "below --min-clis-l": after_select - int(stats.get("after_min_clis_l", after_select)),
        "target category not in --categories": int(stats.get("dropped_target_samples", 0)),
        "no instance left (--min-clis-i, --categories)": int(stats.get("empty_skipped", 0)),
        "over --max-images": int(stats.get("capped", 0)),
        "broken (see the warnings; run `acp-data verify`)": int(broken),
    }
    return {k: v for k, v in reasons.items() if v}


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, UsageError, check_output_path, fail
    from .selection import SELECT_MODES, Selection

    prog = "acp-data export"
    p = argparse.ArgumentParser(prog=prog, description="Export a cache as an LVIS v1 json (all candidates and "
                                "scores kept as acp_* fields). The defaults export every candidate and instance.",
                                formatter_class=HelpFormatter)
    p.add_argument("cache", nargs="+", help="cache directory (several share one category table)")
    p.add_argument("--out", required=True, help="output json file")
    p.add_argument("--images", default=None, help="also write the image files into this directory")
    p.add_argument("--polygons", action="store_true", help="masks as polygons (holes joined by a slit) instead of RLE")
    p.add_argument("--select", default="all", choices=SELECT_MODES, help="candidates to export")
    p.add_argument("--min-clis-i", type=float, default=0.0, help="drop instances below this CLIS-I")
    p.add_argument("--min-clis-l", type=float, default=0.0, help="drop images below this CLIS-L")
    p.add_argument("--categories", default="all", help="'all', 'rare', 'rare+common', names, or @FILE")
    p.add_argument("--max-images", type=int, default=0, help="keep at most this many images (0 = no cap)")
    p.add_argument("--seed", type=int, default=0, help="seed of --select random and --max-images")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import load_manifest

    try:
        check_output_path(a.out, "file", "--out")
        if a.images is not None:
            check_output_path(a.images, "dir", "--images")
        cats = load_manifest(a.cache[0]).categories
        ids = None if a.categories.strip().lower() == "all" else tuple(cats.select(a.categories))
        sel = Selection(select=a.select, min_clis_i=a.min_clis_i, min_clis_l=a.min_clis_l, category_ids=ids,
                        max_images=a.max_images, seed=a.seed)
        data = export_lvis(list(a.cache), a.out, sel, images_dir=a.images, polygons=a.polygons)
    except (CacheError, ValueError, UsageError) as e:
        return fail(prog, e)
    info = data["info"]
    skipped = info["skipped"]
    line = (f"wrote {a.out}: {len(data['images'])} images, {len(data['annotations'])} annotations from "
            f"{info['samples_in_caches']} samples; ")
    line += (f"skipped {sum(skipped.values())}: " + ", ".join(f"{v} {k}" for k, v in skipped.items())
             if skipped else "skipped none")
    print(line)
    return 0
