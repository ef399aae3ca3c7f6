"""``ACPDatasetMapper``: detectron2's ``DatasetMapper`` for a stream of real and synthetic records, with paste mode.

- Real records go through ``DatasetMapper.__call__`` unchanged (and get ``gt_sources`` 0) unless paste mode pastes
  onto them.
- Synthetic records (from :class:`acp_data.d2.datasets.SyntheticDataset`) carry their encoded image
  (``acp_image_bytes``): it is decoded here, never through ``file_name``. Their RLE masks become polygons (holes
  joined by a slit) under ``INPUT.MASK_FORMAT: polygon`` and stay bitmasks under ``bitmask``. A synthetic record left
  without instances, or a broken one (``None``), is rejected (``None``): the caller replaces it from the same source.
- Paste mode: after the base augmentation, with probability ``ACP.PASTE.PROB``, 1..``MAX_INSTANCES`` cut-outs from the
  crop store are pasted (:mod:`acp_data.d2.paste`); every choice comes from the ``sample_key`` the dataset wrapper
  derives from ``(SEED, position)``. ``gt_sources`` marks each instance: 0 real, 1 pasted, 2 synthetic image.
- Dropped instances (a synthetic record's ``acp_dropped``: below ``MIN_CLIS_I`` or outside ``CATEGORIES``, still in
  its pixels) follow ``ACP.DROPPED_INSTANCES``: ``background`` leaves them as they are, ``erase`` inpaints them away
  before augmentation (:func:`erase_instances`), ``ignore`` returns an :class:`~acp_data.d2.modeling.IgnoreInstances`
  whose ``ignore_boxes`` are their boxes under the same augmentation (docs/mixing.md "Dropped instances
  (ACP.DROPPED_INSTANCES)").
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode

from ..rng import TAG_PASTE, derive_key
from .config import DROPPED_POLICIES, IGNORE_MODULES
from .paste import (
    SOURCE_REAL,
    SOURCE_SYNTHETIC,
    PasteParams,
    annots_from_d2,
    annots_to_d2,
    make_placement,
    paste_instances,
    plan_pastes,
    target_size,
)

logger = logging.getLogger(__name__)

__all__ = ["ACPDatasetMapper", "PasteSource", "is_synthetic", "rle_to_polygons_local", "paste_params_from_cfg",
           "erase_instances", "ERASE_RADIUS"]

ERASE_RADIUS = 3  # px: the dropped masks are dilated by this much (soft edges, mask error) and inpainted with it
CROP_CACHE_BYTES = 32 << 20  # per process: decoded cut-outs kept by PasteSource (a worker re-reads popular crops)


def is_synthetic(record: dict[str, Any]) -> bool:
    return "acp_source" in record or "acp_image_bytes" in record


def rle_to_polygons_local(rle: dict[str, Any]) -> list[np.ndarray]:
    """Compressed RLE -> polygons (absolute coordinates, holes joined by slits), traced on the mask's tight box only."""
    from ..masks import mask_to_polygons, rle_to_mask

    m = rle_to_mask(rle)
    rows = np.flatnonzero(m.any(1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(m.any(0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    off = np.array([x0, y0], dtype=np.float64)
    return [(np.asarray(p, dtype=np.float64).reshape(-1, 2) + off).reshape(-1)
            for p in mask_to_polygons(m[y0:y1, x0:x1])]


def erase_instances(image: np.ndarray, dropped: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]] = (),
                    radius: int = ERASE_RADIUS) -> np.ndarray:
    """``image`` (uint8, H x W x C) with the pixels of the ``dropped`` annotations' RLE masks, dilated by ``radius``
    px, inpainted (OpenCV Telea) from their surroundings; pixels of the ``kept`` annotations' RLE masks are never
    changed. Returns ``image`` itself when there is nothing to erase."""
    import cv2

    from ..masks import rle_to_mask

    h, w = image.shape[:2]
    region = np.zeros((h, w), np.uint8)
    for a in dropped:
        m = rle_to_mask(a["segmentation"])
        if m.shape != (h, w):
            raise ValueError(f"dropped instance mask {m.shape} does not match the image {(h, w)}")
        region[m] = 1
    if not region.any():
        return image
    if radius > 0:
        region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    for a in kept:
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            region[rle_to_mask(seg)] = 0
    if not region.any():
        return image
    out = cv2.inpaint(np.ascontiguousarray(image), region, max(int(radius), 1), cv2.INPAINT_TELEA)
    return out.reshape(image.shape)


def _ignore_boxes(dropped: Sequence[dict[str, Any]], transforms: Any, image_shape: tuple[int, int]) -> Boxes:
    """The dropped annotations' boxes (XYXY) under ``transforms``, clipped to the image; empty ones left out."""
    if not dropped:
        return Boxes(torch.zeros((0, 4)))
    xyxy = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in dropped],
                    dtype=np.float64)
    boxes = Boxes(torch.as_tensor(transforms.apply_box(xyxy), dtype=torch.float32).reshape(-1, 4))
    boxes.clip(image_shape)
    return boxes[boxes.nonempty()]


def decode_image_bytes(data: bytes, image_format: str) -> np.ndarray:
    """Encoded bytes -> array in detectron2's ``INPUT.FORMAT`` (BGR/RGB through OpenCV, others through PIL as
    ``detection_utils.read_image`` does); ``BrokenSampleError`` when they do not decode."""
    import cv2

    from ..cache.layout import BrokenSampleError

    if image_format in ("BGR", "RGB"):
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if arr is not None:
            return arr if image_format == "BGR" else np.ascontiguousarray(arr[:, :, ::-1])
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return utils.convert_PIL_to_numpy(ImageOps.exif_transpose(im), image_format)
    except Exception as e:  # PIL raises many types on damaged data
        raise BrokenSampleError(f"synthetic image does not decode: {e}") from e


class PasteSource:
    """The cut-out pool of paste mode: crops of one or more crop stores, grouped by category (class-balanced draws),
    with per-category size statistics from the priors. Small to pickle into workers (stores reopen lazily)."""

    def __init__(self, stores: Sequence[Any], crop_ids: Sequence[np.ndarray],
                 size_stats: dict[int, tuple[float, float, float, float]] | None = None,
                 cache_bytes: int = CROP_CACHE_BYTES):
        if len(stores) != len(crop_ids):
            raise ValueError("one array of crop ids per crop store")
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict()
        self._cached = 0
        self.stores = list(stores)
        store_of, crop_of, cat_of = [], [], []
        for s, (store, ids) in enumerate(zip(stores, crop_ids)):
            ids = np.asarray(ids, dtype=np.int64)
            store_of.append(np.full(ids.size, s, dtype=np.int32))
            crop_of.append(ids)
            cat_of.append(np.asarray(store.column("category_id"))[ids].astype(np.int64))
        store_arr = np.concatenate(store_of) if store_of else np.zeros(0, np.int32)
        crop_arr = np.concatenate(crop_of) if crop_of else np.zeros(0, np.int64)
        cats = np.concatenate(cat_of) if cat_of else np.zeros(0, np.int64)
        order = np.lexsort((crop_arr, store_arr, cats))
        self._store, self._crop, cats = store_arr[order], crop_arr[order], cats[order]
        self.categories, self._starts, self._counts = np.unique(cats, return_index=True, return_counts=True)
        self.size_stats = dict(size_stats or {})

    def __len__(self) -> int:
        return int(self._crop.size)

    def counts(self) -> dict[int, int]:
        """Category id (1-based) -> number of cut-outs."""
        return {int(c): int(n) for c, n in zip(self.categories, self._counts)}

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cache"], d["_cached"] = OrderedDict(), 0  # each worker fills its own
        return d

    def crop(self, category_slot: int, u: float) -> tuple[np.ndarray, int]:
        """``(rgba, category id)`` of the crop at fraction ``u`` of category ``categories[category_slot]``; the
        pixels are read-only: recently used crops come from a small per-process LRU (``cache_bytes``) instead of
        another read and checksum."""
        n = int(self._counts[category_slot])
        j = int(self._starts[category_slot]) + min(int(u * n), n - 1)
        hit = self._cache.get(j)
        if hit is not None:
            self._cache.move_to_end(j)
            return hit
        rgba, cid = self.stores[int(self._store[j])].read(int(self._crop[j]))
        rgba.setflags(write=False)
        if rgba.nbytes <= self.cache_bytes // 4:
            self._cache[j] = (rgba, cid)
            self._cached += rgba.nbytes
            while self._cached > self.cache_bytes:
                self._cached -= self._cache.popitem(last=False)[1][0].nbytes
        return rgba, cid


def paste_params_from_cfg(cfg: Any) -> PasteParams:
    """The ``ACP.PASTE.*`` settings as :class:`PasteParams`."""
    p = cfg.ACP.PASTE
    return PasteParams(prob=float(p.PROB), max_instances=int(p.MAX_INSTANCES),
                       scale_range=(float(p.SCALE_RANGE[0]), float(p.SCALE_RANGE[1])),
                       aspect_jitter=float(p.ASPECT_JITTER), min_visible_frac=float(p.MIN_VISIBLE_FRAC),
                       min_visible_pixels=int(p.MIN_VISIBLE_PIXELS))


class ACPDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` plus synthetic records and paste mode (see the module docstring).

    ``mapper(dataset_dict, sample_key=None)``: ``sample_key`` (a 64-bit int from ``(SEED, position)``) drives the
    paste choices; without it they are derived from ``(SEED, image_id)`` (the same pastes every epoch).
    """

    @configurable
    def __init__(self, is_train: bool, *, paste_source: PasteSource | None = None,
                 paste_params: PasteParams | None = None, seed: int = 0, dropped_instances: str = "background",
                 erase_radius: int = ERASE_RADIUS, **kwargs: Any):
        super().__init__(is_train, **kwargs)
        self.paste_source = paste_source
        self.paste_params = paste_params or PasteParams()
        self.seed = int(seed)
        if dropped_instances not in DROPPED_POLICIES:
            raise ValueError(f"dropped_instances (ACP.DROPPED_INSTANCES) must be one of {', '.join(DROPPED_POLICIES)}, "
                             f"got {dropped_instances!r}")
        if dropped_instances == "erase" and self.image_format not in ("BGR", "RGB", "L"):
            raise ValueError(f"ACP.DROPPED_INSTANCES erase needs INPUT.FORMAT BGR, RGB or L (8-bit), got "
                             f"{self.image_format!r}")
        self.dropped_instances = dropped_instances
        self.erase_radius = int(erase_radius)
        if paste_source is not None and self.image_format not in ("BGR", "RGB"):
            raise ValueError(f"paste mode needs INPUT.FORMAT BGR or RGB, got {self.image_format!r}")
        if paste_source is not None and (self.proposal_topk is not None or self.use_keypoint):
            raise ValueError("paste mode does not support precomputed proposals or keypoints")

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool = True, paste_source: PasteSource | None = None,
                    paste_params: PasteParams | None = None) -> dict[str, Any]:
        """detectron2's mapper arguments plus paste mode's: ``paste_params`` default to ``ACP.PASTE.*``."""
        ret = DatasetMapper.from_config(cfg, is_train)
        ret.update(paste_source=paste_source, paste_params=paste_params or paste_params_from_cfg(cfg),
                   seed=int(cfg.SEED), dropped_instances=str(cfg.ACP.DROPPED_INSTANCES))
        policy = cfg.ACP.DROPPED_INSTANCES
        if policy == "ignore" and is_train:
            stock = [f"MODEL.{n}.NAME = {cfg.MODEL.get(n).NAME}" for n, _, ours in IGNORE_MODULES
                     if cfg.MODEL.get(n).NAME != ours]
            if stock:
                logger.warning("ACP.DROPPED_INSTANCES ignore: the mapper passes ignore boxes, but %s does not read "
                               "them (load_cfg sets IgnoreRPN / IgnoreStandardROIHeads)", ", ".join(stock))
            else:
                logger.info("ACP.DROPPED_INSTANCES ignore: no RPN / ROI-head negatives where a dropped instance's box "
                            "covers more than %.2f of an anchor or proposal", float(cfg.ACP.IGNORE_IOA))
        elif policy == "erase" and is_train:
            logger.info("ACP.DROPPED_INSTANCES erase: dropped instances are inpainted away (masks dilated by %d px)",
                        ERASE_RADIUS)
        return ret

    # ----- entry point ------------------------------------------------------------------------------------------------
    def __call__(self, dataset_dict: dict[str, Any] | None, sample_key: int | None = None) -> dict[str, Any] | None:
        if dataset_dict is None:  # a broken synthetic sample: let the caller replace it
            return None
        synthetic = is_synthetic(dataset_dict)
        if not synthetic and (self.paste_source is None or not self.is_train):
            out = super().__call__(dataset_dict)
            if "instances" in out:
                out["instances"].gt_sources = torch.full((len(out["instances"]),), SOURCE_REAL, dtype=torch.int64)
            return out
        return self._map(dataset_dict, synthetic, sample_key)

    # ----- synthetic records and paste ----------------------------------------------------------------------------------
    def _read(self, d: dict[str, Any], synthetic: bool) -> np.ndarray | None:
        if not synthetic:
            return utils.read_image(d["file_name"], format=self.image_format)
        from ..cache.layout import BrokenSampleError

        data = d.pop("acp_image_bytes", None)
        if data is None:
            raise ValueError(f"synthetic record {d.get('file_name')} has no image bytes; build the SyntheticDataset "
                             "with include_image_bytes=True")
        try:
            return decode_image_bytes(data, self.image_format)
        except BrokenSampleError as e:
            logger.warning("rejecting synthetic sample %s: %s", d.get("file_name"), e)
            return None

    def _map(self, dataset_dict: dict[str, Any], synthetic: bool, sample_key: int | None) -> dict[str, Any] | None:
        data = dataset_dict.get("acp_image_bytes")
        shallow = {k: v for k, v in dataset_dict.items() if k != "acp_image_bytes"}
        d = copy.deepcopy(shallow)
        if data is not None:
            d["acp_image_bytes"] = data
        image = self._read(d, synthetic)
        if image is None:
            return None
        utils.check_image_size(d, image)
        dropped = d.pop("acp_dropped", None) or []
        if dropped and self.dropped_instances == "erase":
            image = erase_instances(image, dropped, d.get("annotations", ()), self.erase_radius)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        if not self.is_train:
            d.pop("annotations", None)
            d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            return d

        annos = []
        for obj in d.pop("annotations", []):
            if obj.get("iscrowd", 0) != 0:
                continue
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            elif synthetic and self.instance_mask_format == "polygon" and isinstance(obj.get("segmentation"), dict):
                polys = rle_to_polygons_local(obj["segmentation"])
                if not polys:
                    continue
                obj["segmentation"] = polys
            obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        sources = [SOURCE_SYNTHETIC if synthetic else SOURCE_REAL] * len(annos)
        if not synthetic and self.paste_source is not None and len(self.paste_source):
            key = sample_key if sample_key is not None else derive_key(self.seed, TAG_PASTE, int(d.get("image_id", 0)))
            # paste into packed (H, W, C) pixels, copied when PIL-based resizing left them read-only (or a flip left a
            # view): OpenCV then blends all channels in one pass, ~5x faster than plane by plane into the model's
            # (C, H, W) copy, which costs less than that one copy of the image
            if not (image.flags.writeable and image.flags.c_contiguous):
                image = np.array(image, order="C")
            annos, sources = self._paste(image, annos, key)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))

        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        if self.recompute_boxes and instances.has("gt_masks"):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances.gt_sources = torch.as_tensor(sources, dtype=torch.int64).reshape(-1)
        instances = utils.filter_empty_instances(instances)
        if synthetic and len(instances) == 0:
            return None
        if synthetic and self.dropped_instances == "ignore":
            from .modeling import IgnoreInstances

            instances = IgnoreInstances.wrap(instances, _ignore_boxes(dropped, transforms, image_shape))
        d["instances"] = instances
        d["image"] = torch.as_tensor(chw)
        return d

    def _paste(self, image: np.ndarray, annos: list[dict[str, Any]], key: int) -> tuple[list[dict[str, Any]], list[int]]:
        src = self.paste_source
        params = self.paste_params
        plans = plan_pastes(key, len(src.categories), params)
        if not plans:
            return annos, [SOURCE_REAL] * len(annos)
        hw = image.shape[:2]
        placements = []
        for plan in plans:
            rgba, cid = src.crop(plan.category_slot, plan.crop_u)
            size = target_size(plan, rgba.shape[:2], hw, src.size_stats.get(cid), params.scale_range)
            placements.append(make_placement(rgba, size, plan, hw, cid - 1, bgr=self.image_format == "BGR"))
        annots = annots_from_d2(annos)
        kept = paste_instances(image, annots, placements, min_visible_frac=params.min_visible_frac,
                               min_visible_pixels=params.min_visible_pixels)
        return annots_to_d2(kept, hw, self.instance_mask_format), [a.source for a in kept]
