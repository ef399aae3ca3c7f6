"""The lazy synthetic dataset: a torch ``Dataset`` over the memory-mapped cache index and a load-time selection,
yielding detectron2 dicts; and its registration as ``acp_synth_<name>`` in ``DatasetCatalog``.

Nothing per sample is materialised up front: the dataset keeps the selection's arrays (a few bytes per kept
instance) and the readers (paths; memory maps opened lazily per process), so dataloader workers share the index
through the page cache instead of copying every record.

Broken samples: ``dataset[i]`` returns ``None`` when a sample fails its checksum or cannot be read or parsed (one
warning, then a count). The caller replaces it: the ACP mapper returns ``None`` for a ``None`` input, and the
loader's ``MixedDataset`` draws a replacement from the same source (docs/design.md "The stream contract"); training
never crashes on a damaged shard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.utils.data

from ..cache.layout import BrokenSampleError, CacheError
from ..cache.reader import CacheReader, open_caches
from ..cache.selection import DROP_REASONS, Selection, SelectionResult, select, stable_image_id
from ..categories import CategoryError, CategoryTable

logger = logging.getLogger(__name__)

__all__ = ["SyntheticDataset", "register_acp_synthetic", "synthetic_dataset_name", "BOX_MODES"]

BOX_MODES = ("mask", "layout")
_BOX_FIELD = {"mask": "bbox", "layout": "layout_bbox"}


class SyntheticDataset(torch.utils.data.Dataset):
    """Kept samples of one or more caches as detectron2 dicts.

    Each dict has ``file_name`` (pseudo path ``acp://<cache>/<row>``, for display only), ``image_id`` (stable: a hash
    of key and candidate), ``height``, ``width``, ``annotations`` (``category_id`` contiguous = id - 1, ``bbox`` from
    the mask or the layout per ``box_mode``, ``bbox_mode`` XYWH_ABS, ``segmentation`` compressed RLE, ``iscrowd`` 0,
    ``acp_clis_i``), ``acp_dropped`` (the stored instances the selection removed from this kept image, which stay in
    its pixels: the same form as ``annotations`` plus ``acp_drop_reason``, ``min_clis_i`` or ``category``; the
    mapper applies ``ACP.DROPPED_INSTANCES`` to them), ``acp_source = (cache_index, row)`` and, with
    ``include_image_bytes``, ``acp_image_bytes`` (the encoded image, checksum-verified, from the same read as the
    record; the mapper decodes it).
    """

    def __init__(self, caches: Sequence[str | os.PathLike | CacheReader] | str | os.PathLike,
                 selection: Selection | SelectionResult | None = None, box_mode: str = "mask",
                 include_image_bytes: bool = True) -> None:
        if box_mode not in BOX_MODES:
            raise ValueError(f"box_mode {box_mode!r} is not one of {', '.join(BOX_MODES)} (ACP.BOX)")
        if isinstance(caches, (str, os.PathLike)):
            caches = [caches]
        if all(isinstance(c, CacheReader) for c in caches):
            self.readers = list(caches)
        else:
            self.readers = open_caches([c.cache_dir if isinstance(c, CacheReader) else c for c in caches])
        self.result = selection if isinstance(selection, SelectionResult) else select(self.readers, selection)
        self.box_mode = box_mode
        self.include_image_bytes = include_image_bytes
        self.broken = 0
        self._next_report = 1

    @property
    def categories(self) -> CategoryTable:
        return self.readers[0].categories

    @property
    def selection(self) -> Selection:
        return self.result.selection

    def __len__(self) -> int:
        return len(self.result)

    def source(self, idx: int) -> tuple[int, int]:
        """``(cache_index, row)`` of dataset position ``idx``."""
        return int(self.result.cache_index[idx]), int(self.result.sample_row[idx])

    def _broken(self, idx: int, err: Exception) -> None:
        self.broken += 1
        if self.broken >= self._next_report:
            logger.warning("synthetic dataset: %d broken sample(s) skipped so far (latest: position %d: %s); run "
                           "`acp-data verify CACHE` to quarantine them", self.broken, idx, err)
            self._next_report *= 10

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a synthetic dataset of {len(self)} samples")
        ci, row = self.source(idx)
        reader = self.readers[ci]
        try:
            record, img = reader.read_sample(row)
            return self._to_dict(idx, ci, row, record, img)
        except (BrokenSampleError, KeyError, TypeError, ValueError, IndexError) as e:
            self._broken(idx, e)
            return None

    def _to_dict(self, idx: int, ci: int, row: int, record: dict[str, Any], img: bytes) -> dict[str, Any]:
        from detectron2.structures import BoxMode

        insts = record["instances"]
        field = _BOX_FIELD[self.box_mode]

        def ann(j: int) -> dict[str, Any]:
            inst = insts[int(j)]
            return {"category_id": int(inst["category_id"]) - 1, "bbox": [float(v) for v in inst[field]],
                    "bbox_mode": BoxMode.XYWH_ABS, "segmentation": dict(inst["segmentation"]), "iscrowd": 0,
                    "acp_clis_i": inst["clis_i"]}

        res = self.result
        anns = [ann(j) for j in res.inst_local[res.instances(idx)]]
        drops = res.dropped(idx)
        dropped = [{**ann(j), "acp_drop_reason": DROP_REASONS[int(r)]}
                   for j, r in zip(res.drop_local[drops], res.drop_reason[drops])]
        reader = self.readers[ci]
        image_id = int(stable_image_id(reader.value("key_hash", row), record["candidate_idx"])[0])
        d = {
            "file_name": f"acp://{reader.cache_dir}/{row}", "image_id": image_id,
            "height": int(record["height"]), "width": int(record["width"]), "annotations": anns,
            "acp_dropped": dropped, "acp_source": (ci, row), "acp_clis_l": record["clis_l"],
            "acp_clis_i": record["clis_i"],
        }
        if self.include_image_bytes:
            d["acp_image_bytes"] = img
        return d

    def read_image_bytes(self, idx: int) -> bytes:
        """Encoded image of dataset position ``idx`` (``BrokenSampleError`` if damaged)."""
        ci, row = self.source(idx)
        return self.readers[ci].read_image_bytes(row)

    def read_image(self, idx: int) -> np.ndarray:
        """Decoded RGB uint8 (H, W, 3) of dataset position ``idx`` (``BrokenSampleError`` if damaged)."""
        ci, row = self.source(idx)
        return self.readers[ci].read_image(row)

    def record(self, idx: int) -> dict[str, Any]:
        """The full stored record (all instances and scores) of dataset position ``idx``."""
        ci, row = self.source(idx)
        return self.readers[ci].read_record(row)

    def category_image_counts(self) -> np.ndarray:
        """Kept images per category (index id - 1)."""
        return self.result.category_image_counts(len(self.categories))

    def __repr__(self) -> str:
        caches = ", ".join(str(r.cache_dir) for r in self.readers)
        return f"SyntheticDataset([{caches}], {len(self)} images, select={self.selection.select})"


def synthetic_dataset_name(name: str) -> str:
    return name if name.startswith("acp_synth_") else f"acp_synth_{name}"


def _real_table(real_dataset_name: str) -> tuple[CategoryTable | None, list[str], Any]:
    """The real dataset's CategoryTable when ``lvis_format.metadata_category_table`` can give one, its
    ``thing_classes`` and ``class_image_count``."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(real_dataset_name)
    thing_classes = list(meta.get("thing_classes", []) or [])
    table = None
    try:
        from .lvis_format import metadata_category_table
    except ImportError:
        metadata_category_table = None
    if metadata_category_table is not None:
        try:
            table = metadata_category_table(real_dataset_name)
        except (KeyError, ValueError) as e:
            logger.debug("no CategoryTable for %s (%s); comparing thing_classes", real_dataset_name, e)
    if not thing_classes:
        if table is None:
            raise CacheError(f"dataset {real_dataset_name!r} has no thing_classes in its metadata; register it "
                             "(ACP.REGISTER_LVIS) before the synthetic dataset")
        thing_classes = table.thing_classes
    return table, thing_classes, meta.get("class_image_count", None)


def register_acp_synthetic(name: str, cache_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
                           real_dataset_name: str | None = None, selection: Selection | None = None,
                           box_mode: str = "mask", include_image_bytes: bool = True) -> str:
    """Register ``acp_synth_<name>`` lazily (re-registering replaces it) and return the registered name.

    Metadata (``thing_classes``, ``class_image_count``) is copied from ``real_dataset_name`` and checked against each
    cache manifest's CategoryTable (names and ids; a mismatch raises naming both sources); without a real dataset it
    comes from the first manifest. ``DatasetCatalog.get`` returns a ``SyntheticDataset`` (not a list).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..cache.manifest import load_manifest

    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode {box_mode!r} is not one of {', '.join(BOX_MODES)} (ACP.BOX)")
    dirs = [cache_dirs] if isinstance(cache_dirs, (str, os.PathLike)) else list(cache_dirs)
    if not dirs:
        raise CacheError("register_acp_synthetic: no cache directories given")
    manifests = [load_manifest(d) for d in dirs]
    table = manifests[0].categories
    if real_dataset_name is not None:
        real_table, thing_classes, class_image_count = _real_table(real_dataset_name)
        for mf in manifests:
            src = f"cache manifest {mf.path}"
            try:
                if real_table is not None:
                    mf.categories.check_same(real_table, src, f"dataset {real_dataset_name!r}", names_only=True)
                else:
                    names = CategoryTable.from_dict({"categories": [
                        {"id": i, "name": n, "frequency": "r"} for i, n in enumerate(thing_classes, start=1)]})
                    mf.categories.check_same(names, src, f"dataset {real_dataset_name!r} thing_classes",
                                             names_only=True)
            except CategoryError as e:
                raise CategoryError(f"synthetic dataset {name!r}: {e}") from e
        if class_image_count is None:
            class_image_count = table.class_image_count
    else:
        thing_classes, class_image_count = table.thing_classes, table.class_image_count
    full = synthetic_dataset_name(name)
    if full in DatasetCatalog.list():
        DatasetCatalog.remove(full)
    if full in MetadataCatalog.list():
        MetadataCatalog.remove(full)
    sel = selection or Selection()
    DatasetCatalog.register(full, lambda: SyntheticDataset(dirs, sel, box_mode, include_image_bytes))
    MetadataCatalog.get(full).set(
        thing_classes=list(thing_classes), class_image_count=class_image_count, category_table=table,
        acp_cache_dirs=[os.path.abspath(d) for d in dirs], acp_selection=sel.to_dict(), acp_box_mode=box_mode,
        acp_real_dataset=real_dataset_name,
    )
    return full
