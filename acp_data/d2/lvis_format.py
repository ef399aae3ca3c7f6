"""Load and register any LVIS-format json as a detectron2 dataset, with explicit metadata.

detectron2's ``load_lvis_json`` builds image paths from ``coco_url`` by string joining, reads polygon masks only,
and picks metadata by a substring of the dataset name ("v1", "v0.5", "cocofied"). This loader takes the image's
``file_name`` (else the last part of ``coco_url``), converts RLE masks to polygons (holes joined to their outer
contour by a slit, so a ring stays a ring) and registers metadata built from the json itself.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..categories import CategoryError, CategoryTable
from ..masks import mask_to_polygons, rle_to_mask

logger = logging.getLogger(__name__)

DEFAULT_DATASETS_ROOT = "datasets"


class DatasetFormatError(ValueError):
    """An LVIS-format json that cannot be loaded; the message names the file and the entry at fault."""


# ----- masks -------------------------------------------------------------------------------------------------------
def rle_to_polygons(segm: dict[str, Any]) -> list[list[float]]:
    """Compressed or uncompressed COCO RLE -> polygons whose rasterisation is the mask again; holes are joined to
    their outer contour by a slit (``acp_data.masks.mask_to_polygons``), so a ring stays a ring."""
    return mask_to_polygons(rle_to_mask(segm))


def _valid_polygons(segm: list) -> list[list[float]]:
    return [[float(v) for v in p] for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]


# ----- loading -----------------------------------------------------------------------------------------------------
def _read_json(json_file: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(json_file) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetFormatError(f"LVIS-format json {str(json_file)!r} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"cannot read LVIS-format json {str(json_file)!r}: {e}") from e
    if not isinstance(data, dict) or not all(k in data for k in ("images", "categories")):
        raise DatasetFormatError(f"{json_file}: not an LVIS/COCO-format json (needs 'images' and 'categories')")
    return data


def image_file_name(img: dict[str, Any], json_file: str | os.PathLike = "") -> str:
    """The image's ``file_name``, else the last part of its ``coco_url``."""
    name = img.get("file_name") or str(img.get("coco_url") or "").rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise DatasetFormatError(f"{json_file}: image {img.get('id')!r} has neither 'file_name' nor 'coco_url'")
    return name


def load_lvis_format_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> list[dict[str, Any]]:
    """An LVIS-format json -> detectron2 dataset dicts (sorted by image id).

    ``category_id`` becomes the contiguous ``id - 1`` (ids must be 1..K); ``neg_category_ids`` and
    ``not_exhaustive_category_ids`` are kept as json ids; polygons are kept, RLE masks become polygons; boxes stay
    ``XYWH_ABS``. An annotation whose mask is empty is dropped (and counted in the log).
    """
    from detectron2.structures import BoxMode

    data = _read_json(json_file)
    try:
        table = CategoryTable.from_lvis_json(data)
    except CategoryError as e:
        raise DatasetFormatError(f"{json_file}: {e}") from e
    num_classes = len(table)
    image_root = os.fspath(image_root)

    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    seen_ann_ids: set[Any] = set()
    for a in data.get("annotations", []):
        aid = a.get("id")
        if aid is not None:
            if aid in seen_ann_ids:
                raise DatasetFormatError(f"{json_file}: annotation id {aid} appears more than once")
            seen_ann_ids.add(aid)
        anns_by_image.setdefault(int(a["image_id"]), []).append(a)

    dropped: Counter = Counter()
    dicts = []
    for img in sorted(data["images"], key=lambda d: int(d["id"])):
        image_id = int(img["id"])
        try:
            height, width = int(img["height"]), int(img["width"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(f"{json_file}: image {image_id} needs integer 'height' and 'width'") from e
        record: dict[str, Any] = {
            "file_name": os.path.join(image_root, image_file_name(img, json_file)),
            "height": height,
            "width": width,
            "image_id": image_id,
            "neg_category_ids": [int(c) for c in img.get("neg_category_ids", [])],
            "not_exhaustive_category_ids": [int(c) for c in img.get("not_exhaustive_category_ids", [])],
        }
        objs = []
        for a in anns_by_image.pop(image_id, []):
            cid = int(a["category_id"])
            if not 1 <= cid <= num_classes:
                raise DatasetFormatError(f"{json_file}: annotation {a.get('id')} has category_id {cid}, outside the "
                                         f"1..{num_classes} of its categories")
            bbox = a.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise DatasetFormatError(f"{json_file}: annotation {a.get('id')} has no [x, y, w, h] 'bbox'")
            obj: dict[str, Any] = {"bbox": [float(v) for v in bbox], "bbox_mode": BoxMode.XYWH_ABS,
                                   "category_id": cid - 1}
            if a.get("iscrowd"):
                obj["iscrowd"] = int(a["iscrowd"])
            segm = a.get("segmentation")
            if segm is not None:
                if isinstance(segm, dict):
                    try:
                        polys = rle_to_polygons(segm)
                    except (ValueError, TypeError) as e:
                        raise DatasetFormatError(f"{json_file}: annotation {a.get('id')}: bad RLE: {e}") from e
                    reason = "empty RLE mask"
                elif isinstance(segm, list):
                    polys = _valid_polygons(segm)
                    reason = "no polygon with >= 3 points"
                else:
                    raise DatasetFormatError(f"{json_file}: annotation {a.get('id')} has a segmentation of type "
                                             f"{type(segm).__name__}; expected polygons or RLE")
                if not polys:
                    dropped[reason] += 1
                    continue
                obj["segmentation"] = polys
            objs.append(obj)
        record["annotations"] = objs
        dicts.append(record)
    if anns_by_image:
        some = sorted(anns_by_image)[:5]
        raise DatasetFormatError(f"{json_file}: annotations refer to image ids not in 'images': {some}")
    if dropped:
        logger.warning("%s: dropped %d annotations (%s)", json_file, sum(dropped.values()),
                       ", ".join(f"{n}: {k}" for k, n in dropped.items()))
    logger.info("Loaded %d images in LVIS format from %s", len(dicts), json_file)
    return dicts


# ----- registration ------------------------------------------------------------------------------------------------
def register_lvis_format(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike) -> CategoryTable:
    """Register ``name`` in detectron2's catalogs (replacing an earlier registration) with explicit metadata:
    ``thing_classes``, ``class_image_count``, ``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``,
    ``evaluator_type="lvis"`` and the ``category_table``. Returns the CategoryTable."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    try:
        table = CategoryTable.from_lvis_json(_read_json(json_file))
    except CategoryError as e:
        raise DatasetFormatError(f"{json_file}: {e}") from e
    table.source = json_file
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_lvis_format_json(json_file, image_root))
    MetadataCatalog.get(name).set(
        thing_classes=table.thing_classes,
        class_image_count=table.class_image_count,
        thing_dataset_id_to_contiguous_id={c.id: c.id - 1 for c in table},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        category_table=table,
    )
    return table


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), where relative dataset paths are resolved."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", DEFAULT_DATASETS_ROOT))


def resolve_dataset_path(path: str) -> str:
    """A relative path is taken under ``$DETECTRON2_DATASETS``; an absolute one is kept."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(datasets_root(), path)


def config_lvis_entries(cfg) -> list[tuple[str, str, str]]:
    """``cfg.ACP.REGISTER_LVIS`` as ``(name, json_file, image_root)`` with paths resolved; touches no file."""
    return [(str(n), resolve_dataset_path(j), resolve_dataset_path(r)) for n, j, r in cfg.ACP.REGISTER_LVIS]


def register_from_config(cfg) -> list[str]:
    """Register every ``cfg.ACP.REGISTER_LVIS`` entry; one already registered from the same files is kept."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []
    for name, json_file, image_root in config_lvis_entries(cfg):
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
                names.append(name)
                continue
        register_lvis_format(name, json_file, image_root)
        names.append(name)
    return names


def _is_lvis_v1_builtin(dataset_name: str) -> bool:
    from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_LVIS

    return dataset_name in _PREDEFINED_SPLITS_LVIS["lvis_v1"]


def metadata_category_table(dataset_name: str) -> CategoryTable:
    """The CategoryTable of a registered dataset: the stored one for ours, detectron2's LVIS v1 tables for the
    built-in ``lvis_v1_*`` datasets, else built from the metadata's ``json_file``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered; register it with ACP.REGISTER_LVIS or "
                       "acp_data.d2.lvis_format.register_lvis_format")
    meta = MetadataCatalog.get(dataset_name)
    table = meta.get("category_table")
    if table is not None:
        return table
    if _is_lvis_v1_builtin(dataset_name):
        return CategoryTable.from_lvis_v1()
    json_file = meta.get("json_file")
    if json_file:
        try:
            return CategoryTable.from_lvis_json(json_file)
        except CategoryError as e:
            raise DatasetFormatError(f"dataset {dataset_name!r}: {e}") from e
    raise DatasetFormatError(f"dataset {dataset_name!r} has no category_table and no json_file in its metadata")


def required_files(dataset_name: str) -> list[tuple[str, str]]:
    """``(what, path)`` pairs a registered dataset needs on disk: its json and its image directories (for the
    built-in LVIS v1 datasets, ``coco/train2017`` and ``coco/val2017``: LVIS v1 draws images from both)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    out: list[tuple[str, str]] = []
    if meta.get("json_file"):
        out.append((f"{dataset_name} annotations", meta.json_file))
    root = meta.get("image_root")
    if root:
        if _is_lvis_v1_builtin(dataset_name) and not dataset_name.endswith(("test_dev", "test_challenge")):
            out += [("COCO 2017 images for LVIS v1", os.path.join(root, s)) for s in ("train2017", "val2017")]
        else:
            out.append((f"{dataset_name} images", root))
    return out


def missing_files(entries: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The entries of ``required_files`` (or similar) whose path does not exist."""
    return [(what, p) for what, p in entries if not os.path.exists(p)]
