"""Sample records (docs/design.md "A sample"): validation on write, the JSON bytes stored in a shard, and the
per-sample index entry derived from a record (the same function serves the writer, orphan re-indexing and verify, so
an index rebuilt from a shard is identical to the one written with it).

Record fields: ``key`` (generation key of the work unit), ``unit``, ``candidate_idx``, ``seed``, ``scene_graph``,
``width``, ``height``, ``clis_l``, ``clis_i``, ``selected``, ``provenance``, ``instances``; each instance has
``category_id``, ``bbox`` (tight absolute XYWH box of the mask), ``layout_bbox`` (absolute XYWH), ``segmentation``
(compressed COCO RLE, string ``counts``, ``size = [height, width]``), ``area``, ``clis_i``. Unscored values are
``null`` in a record and NaN in the index.

One provenance field is checked here: ``shapes_truth`` (written only by the Shapes generator) is
``{"failures": [...]}`` with one entry per scene-graph object, ``null`` when the object was drawn as asked, else the
failure's name; only ``ACP.SELECT oracle`` reads it (acp_data/cache/truth.py).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..categories import CategoryTable
from .layout import KEY_RE, CacheError

IMAGE_FORMATS = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "webp": b"RIFF"}
_REQUIRED = ("key", "unit", "candidate_idx", "seed", "scene_graph", "width", "height", "clis_l", "clis_i",
             "selected", "provenance", "instances")
_BOX_TOL = 0.5
SHAPES_TRUTH = "shapes_truth"


def image_format(data: bytes) -> str | None:
    """``jpg``, ``png`` or ``webp`` from the magic bytes; ``None`` for anything else."""
    if data[:3] == IMAGE_FORMATS["jpg"]:
        return "jpg"
    if data[:8] == IMAGE_FORMATS["png"]:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header or a PNG's IHDR without decoding; ``None`` if not found."""
    if data[:8] == IMAGE_FORMATS["png"] and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:3] != IMAGE_FORMATS["jpg"]:
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _score(v: Any, what: str) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise CacheError(f"{what} = {v!r} is not a number or null") from e
    return None if math.isnan(f) else f


def _box(v: Any, what: str) -> list[float]:
    try:
        x, y, w, h = (float(t) for t in v)
    except (TypeError, ValueError) as e:
        raise CacheError(f"{what} = {v!r} is not 4 numbers [x, y, w, h]") from e
    if not (w >= 0 and h >= 0 and math.isfinite(x + y + w + h)):
        raise CacheError(f"{what} = {v!r} is not a finite absolute XYWH box")
    return [x, y, w, h]


def validate_record(record: dict[str, Any], image_bytes: bytes, categories: CategoryTable,
                    table_source: str) -> dict[str, Any]:
    """A normalised copy of ``record`` (NaN scores become ``null``, missing ``bbox``/``area`` are computed from the
    mask) or a ``CacheError`` naming the sample, the field and ``table_source`` for category ids."""
    if not isinstance(record, dict):
        raise CacheError(f"a sample record must be a dict, got {type(record).__name__}")
    missing = [k for k in _REQUIRED if k not in record]
    key = record.get("key")
    where = f"sample key={key!r} candidate_idx={record.get('candidate_idx')!r}"
    if missing:
        raise CacheError(f"{where}: record lacks {', '.join(missing)}")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise CacheError(f"{where}: key must match {KEY_RE.pattern} (a generation key)")
    rec = dict(record)
    try:
        for k in ("unit", "candidate_idx", "seed", "width", "height"):
            if isinstance(rec[k], bool) or int(rec[k]) != rec[k]:
                raise ValueError(k)
            rec[k] = int(rec[k])
    except (TypeError, ValueError) as e:
        raise CacheError(f"{where}: unit, candidate_idx, seed, width and height must be integers ({e})") from e
    if rec["candidate_idx"] < 0 or rec["width"] <= 0 or rec["height"] <= 0:
        raise CacheError(f"{where}: candidate_idx must be >= 0 and width/height > 0")
    if not isinstance(rec["selected"], (bool, np.bool_)):
        raise CacheError(f"{where}: selected = {rec['selected']!r} must be a bool")
    rec["selected"] = bool(rec["selected"])
    rec["clis_l"] = _score(rec["clis_l"], f"{where}: clis_l")
    rec["clis_i"] = _score(rec["clis_i"], f"{where}: clis_i")
    if not isinstance(rec["scene_graph"], dict) or not isinstance(rec["provenance"], dict):
        raise CacheError(f"{where}: scene_graph and provenance must be dicts (SceneGraph.to_dict())")
    if SHAPES_TRUTH in rec["provenance"]:
        _check_truth(rec["provenance"][SHAPES_TRUTH], rec["scene_graph"], where)
    fmt = image_format(image_bytes)
    if fmt is None:
        raise CacheError(f"{where}: image bytes are not JPEG, PNG or WebP (first bytes {bytes(image_bytes[:8])!r})")
    size = image_size(image_bytes)
    if size is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image_bytes)) as im:
                size = im.size
        except Exception as e:  # PIL raises many types for bad headers
            raise CacheError(f"{where}: image cannot be opened: {e}") from e
    if size != (rec["width"], rec["height"]):
        raise CacheError(f"{where}: image is {size[0]}x{size[1]} but the record says {rec['width']}x{rec['height']}")
    h, w = rec["height"], rec["width"]
    if not isinstance(rec["instances"], list):
        raise CacheError(f"{where}: instances must be a list")
    instances = []
    coco = []
    for j, inst in enumerate(rec["instances"]):
        iw = f"{where} instance {j}"
        if not isinstance(inst, dict):
            raise CacheError(f"{iw}: must be a dict")
        for k in ("category_id", "layout_bbox", "segmentation", "clis_i"):
            if k not in inst:
                raise CacheError(f"{iw}: lacks {k}")
        inst = dict(inst)
        cid = inst["category_id"]
        if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or not 1 <= int(cid) <= len(categories):
            raise CacheError(f"{iw}: category_id {cid!r} is outside 1..{len(categories)} of the CategoryTable in "
                             f"{table_source}")
        inst["category_id"] = int(cid)
        segm = inst["segmentation"]
        if not (isinstance(segm, dict) and isinstance(segm.get("counts"), str) and "size" in segm):
            raise CacheError(f"{iw}: segmentation must be compressed COCO RLE with string counts "
                             "({'size': [h, w], 'counts': str}); see acp_data.masks.mask_to_rle")
        if [int(v) for v in segm["size"]] != [h, w]:
            raise CacheError(f"{iw}: segmentation size {segm['size']} is not [height, width] = {[h, w]}")
        inst["segmentation"] = {"size": [h, w], "counts": segm["counts"]}
        coco.append({"size": [h, w], "counts": segm["counts"].encode("ascii")})
        inst["layout_bbox"] = _box(inst["layout_bbox"], f"{iw}: layout_bbox")
        inst["clis_i"] = _score(inst["clis_i"], f"{iw}: clis_i")
        instances.append(inst)
    areas, tights = _mask_stats(coco, where)
    for j, (inst, area, tight) in enumerate(zip(instances, areas, tights)):
        iw = f"{where} instance {j}"
        if area <= 0:
            raise CacheError(f"{iw}: the mask is empty (drop instances the segmenter did not find)")
        if inst.get("bbox") is None:
            inst["bbox"] = tight
        inst["bbox"] = _box(inst["bbox"], f"{iw}: bbox")
        if max(abs(a - b) for a, b in zip(inst["bbox"], tight)) > _BOX_TOL:
            raise CacheError(f"{iw}: bbox {inst['bbox']} is not the tight box of the mask {tight}")
        if inst.get("area") is None:
            inst["area"] = area
        try:
            inst["area"] = float(inst["area"])
        except (TypeError, ValueError) as e:
            raise CacheError(f"{iw}: area = {inst['area']!r} is not a number") from e
        if abs(inst["area"] - area) > _BOX_TOL:
            raise CacheError(f"{iw}: area {inst['area']} is not the mask's pixel count {area}")
    rec["instances"] = instances
    return rec


def _check_truth(truth: Any, scene_graph: dict[str, Any], where: str) -> None:
    """``provenance.shapes_truth``: ``{"failures": [null | str, ...]}`` with one entry per scene-graph object."""
    objects = scene_graph.get("objects")
    n = len(objects) if isinstance(objects, list) else None
    failures = truth.get("failures") if isinstance(truth, dict) else None
    if (not isinstance(failures, list) or len(failures) != n
            or any(f is not None and not (isinstance(f, str) and f) for f in failures)):
        raise CacheError(f"{where}: provenance.{SHAPES_TRUTH} must be {{'failures': [...]}} with one entry (null or a "
                         f"failure name) per scene-graph object ({n}), got {truth!r}")


def _mask_stats(coco: list[dict[str, Any]], where: str) -> tuple[list[float], list[list[float]]]:
    """Pixel counts and tight boxes of compressed RLEs (one pycocotools call each; per mask to name a bad one)."""
    from pycocotools import mask as mask_utils

    if not coco:
        return [], []
    try:
        return [float(a) for a in mask_utils.area(coco)], mask_utils.toBbox(coco).tolist()
    except Exception:  # pycocotools raises plain Exceptions on malformed counts; find the culprit
        for j, c in enumerate(coco):
            try:
                mask_utils.area(c)
            except Exception as e:
                raise CacheError(f"{where} instance {j}: segmentation counts cannot be parsed: {e}") from e
        raise


def record_bytes(record: dict[str, Any]) -> bytes:
    """The record as stored in a shard: compact UTF-8 JSON, sorted keys, no NaN."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


@dataclass
class IndexEntry:
    """What the index keeps of one sample (besides its byte ranges and checksum)."""

    key: str
    unit: int
    candidate_idx: int
    width: int
    height: int
    selected: bool
    clis_l: float
    clis_i: float
    image_offset: int
    image_size: int
    record_offset: int
    record_size: int
    checksum: int
    inst_category_id: np.ndarray
    inst_clis_i: np.ndarray
    inst_area: np.ndarray
    inst_bbox: np.ndarray
    inst_layout_bbox: np.ndarray


def index_entry(record: dict[str, Any], image_offset: int, image_size: int, record_offset: int, record_size: int,
                checksum: int) -> IndexEntry:
    """The index entry of a (validated or stored) record at the given byte ranges."""
    insts = record["instances"]
    n = len(insts)
    return IndexEntry(
        key=record["key"], unit=int(record["unit"]), candidate_idx=int(record["candidate_idx"]),
        width=int(record["width"]), height=int(record["height"]), selected=bool(record["selected"]),
        clis_l=_nan(record["clis_l"]), clis_i=_nan(record["clis_i"]),
        image_offset=image_offset, image_size=image_size, record_offset=record_offset, record_size=record_size,
        checksum=checksum,
        inst_category_id=np.array([i["category_id"] for i in insts], dtype=np.int32),
        inst_clis_i=np.array([_nan(i["clis_i"]) for i in insts], dtype=np.float64),
        inst_area=np.array([i["area"] for i in insts], dtype=np.float64),
        inst_bbox=np.array([i["bbox"] for i in insts], dtype=np.float32).reshape(n, 4),
        inst_layout_bbox=np.array([i["layout_bbox"] for i in insts], dtype=np.float32).reshape(n, 4),
    )
