"""The paste core: cut-outs pasted onto an (already augmented) image, on arrays, one box region at a time.

X-Paste's recipe (hard-mask blend, later pastes occlude earlier objects, occluded objects re-masked and dropped when
too little remains), but every operation touches only the pasted box and the boxes it overlaps: an instance's mask is
rasterised inside its own region the first time a paste covers part of it, and never as a full-canvas array per paste
and per instance. Untouched instances keep their original segmentation (polygons or bitmask) and box.

Coordinates are absolute pixels of the augmented image; boxes are XYXY in pixel-corner coordinates (a pixel at
column x spans [x, x + 1)), as detectron2 and COCO use them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..masks import mask_polygon_arrays
from ..rng import uniform

SOURCE_REAL, SOURCE_PASTED, SOURCE_SYNTHETIC = 0, 1, 2


@dataclass
class Annot:
    """One instance while pasting. ``segmentation`` is the untouched original (polygons: a list of flat coordinate
    arrays; or a full (H, W) bool array); once a paste covers part of it, ``local`` holds its mask over the region
    ``[y0:y0 + h, x0:x0 + w]`` and ``segmentation`` is no longer used."""

    category_id: int
    box: np.ndarray  # XYXY float, absolute
    source: int = SOURCE_REAL
    segmentation: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # other annotation keys, passed through
    local: np.ndarray | None = None
    x0: int = 0
    y0: int = 0
    area0: int = 0  # visible pixels before the first occlusion
    # its mask and box come from ``local``: a paste removed some of its pixels, or it is itself pasted (no original)
    occluded: bool = False

    @property
    def materialised(self) -> bool:
        return self.local is not None

    def region(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Integer pixel region ``(x0, y0, x1, y1)`` (exclusive end) holding the whole mask, clipped to the image."""
        if self.local is not None:
            return self.x0, self.y0, self.x0 + self.local.shape[1], self.y0 + self.local.shape[0]
        lo, hi = self.box[:2].astype(np.float64), self.box[2:].astype(np.float64)
        if isinstance(self.segmentation, list) and self.segmentation:
            pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in self.segmentation])
            lo, hi = np.minimum(lo, pts.min(0)), np.maximum(hi, pts.max(0))
        elif isinstance(self.segmentation, np.ndarray):  # a bitmask may reach outside its box: a paste there occludes
            tight = _tight_box(self.segmentation)
            if tight is not None:
                lo = np.minimum(lo, tight[:2])
                hi = np.maximum(hi, tight[2:])
        x0, y0 = max(0, int(math.floor(lo[0]))), max(0, int(math.floor(lo[1])))
        x1, y1 = min(width, int(math.ceil(hi[0]))), min(height, int(math.ceil(hi[1])))
        return x0, y0, max(x0, x1), max(y0, y1)

    def materialise(self, height: int, width: int, region: tuple[int, int, int, int] | None = None) -> None:
        """Rasterise the original segmentation inside its region (once), and remember its visible area. ``region``:
        ``self.region(height, width)`` when the caller has it already."""
        if self.local is not None:
            return
        x0, y0, x1, y1 = region if region is not None else self.region(height, width)
        seg = self.segmentation
        if isinstance(seg, np.ndarray):
            if seg.shape != (height, width):
                raise ValueError(f"bitmask of shape {seg.shape} on an image of shape {(height, width)}")
            tight = _tight_box(seg)
            if tight is not None:  # the tight region of the whole mask, even where it leaves the box
                x0, y0, x1, y1 = tight
                local = seg[y0:y1, x0:x1].astype(bool)
            else:
                local = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        elif isinstance(seg, list):
            local = polygons_to_local(seg, x0, y0, x1 - x0, y1 - y0)
        else:  # no mask: the box stands for the object
            local = np.ones((y1 - y0, x1 - x0), dtype=bool)
        self.local, self.x0, self.y0 = local, x0, y0
        self.area0 = int(np.count_nonzero(local))


def polygons_to_local(polygons: list, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Rasterise polygons (absolute coordinates) into a (h, w) bool mask of the region at (x0, y0), as pycocotools
    (and so detectron2) rasterises them."""
    from pycocotools import mask as mask_utils

    if w <= 0 or h <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    off = np.array([x0, y0], dtype=np.float64)
    shifted = [(q - off).reshape(-1) for q in (np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons)
               if len(q) >= 3]  # flat float64 arrays of >= 6 values: pycocotools reads them as polygons
    if not shifted:
        return np.zeros((h, w), dtype=bool)
    rles = mask_utils.frPyObjects(shifted, h, w)
    return mask_utils.decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles)).astype(bool)  # Fortran order


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive end) of the nonzero pixels of a 2-D mask, ``None`` when there are none
    (OpenCV's ``boundingRect`` on bytes: about twice as fast as two ``any`` reductions)."""
    import cv2

    if mask.dtype in (np.bool_, np.uint8, np.int8) and mask.size:
        m = mask.view(np.uint8)
        if _cv_layout(m):
            x, y, w, h = cv2.boundingRect(m)
        elif _cv_layout(m.T):  # Fortran order (pycocotools' decode): the transpose, axes swapped back
            y, x, h, w = cv2.boundingRect(m.T)
        else:
            x, y, w, h = cv2.boundingRect(np.ascontiguousarray(m))
        return (x, y, x + w, y + h) if w else None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass
class Placement:
    """A cut-out ready to paste: pixels and mask already resized/flipped, top-left corner ``(x0, y0)`` (may lie
    outside the image; the part outside is clipped)."""

    rgb: np.ndarray  # (h, w, C) uint8, in the image's channel order
    mask: np.ndarray  # (h, w) bool
    x0: int
    y0: int
    category_id: int


def _cv_layout(a: np.ndarray) -> bool:
    """Whether OpenCV can wrap ``a`` without a copy: pixels packed within rows, rows at a positive stride."""
    return a.ndim >= 2 and a.strides[0] > 0 and a.strides[1] == a.itemsize * (a.shape[2] if a.ndim == 3 else 1) \
        and (a.ndim == 2 or a.strides[2] == a.itemsize)


def _masked_copy(src: np.ndarray, mask: np.ndarray, dst: np.ndarray) -> None:
    """``dst[mask] = src[mask]`` in place (OpenCV's masked copy: ~50x numpy's ``copyto(where=)`` on 3 channels)."""
    import cv2

    if src.dtype == np.uint8 and dst.dtype == np.uint8 and src.ndim == 3 and src.shape[2] in (1, 3, 4):
        m = mask.view(np.uint8)
        s = src if _cv_layout(src) else np.ascontiguousarray(src)
        m = m if _cv_layout(m) else np.ascontiguousarray(m)
        if _cv_layout(dst):
            out = cv2.copyTo(s, m, dst)
            if not np.shares_memory(out, dst):
                dst[...] = out
        elif all(_cv_layout(dst[:, :, c]) for c in range(dst.shape[2])):
            # an (H, W, C) view of a (C, H, W) buffer (the mapper's model input): one plane at a time, in place,
            # instead of gathering the strided region into a copy and scattering it back (~5x faster)
            for c, plane in enumerate(cv2.split(s) if s.shape[2] > 1 else (s[:, :, 0],)):
                d = dst[:, :, c]
                out = cv2.copyTo(np.ascontiguousarray(plane), m, d)
                if not np.shares_memory(out, d):
                    d[...] = out
        else:  # e.g. a horizontally flipped view of the image
            dst[...] = cv2.copyTo(s, m, np.ascontiguousarray(dst))
        return
    np.copyto(dst, src, where=mask[:, :, None] if dst.ndim == 3 else mask)


def paste_instances(image: np.ndarray, annots: list[Annot], placements: list[Placement], *,
                    min_visible_frac: float, min_visible_pixels: int) -> list[Annot]:
    """Paste ``placements`` in order onto ``image`` (modified in place) and return the surviving instances.

    A later paste occludes every earlier object (real or pasted) where its mask lies. An occluded instance gets its
    mask and tight box recomputed and is dropped when fewer than ``min_visible_pixels`` or less than
    ``min_visible_frac`` of its pixels (before any occlusion) remain. A paste whose part inside the image is below
    the same limits (relative to its whole cut-out) is skipped and leaves the image untouched.
    """
    height, width = image.shape[:2]
    out = list(annots)
    regions = np.zeros((len(out) + len(placements), 4), dtype=np.int64)  # x0, y0, x1, y1 (exclusive)
    for k, a in enumerate(out):
        regions[k] = a.region(height, width)
    n = len(out)
    for pl in placements:
        ph, pw = pl.mask.shape
        cx0, cy0 = max(pl.x0, 0), max(pl.y0, 0)
        cx1, cy1 = min(pl.x0 + pw, width), min(pl.y0 + ph, height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        pm = pl.mask[cy0 - pl.y0:cy1 - pl.y0, cx0 - pl.x0:cx1 - pl.x0]
        visible = int(np.count_nonzero(pm))
        whole = visible if pm.shape == pl.mask.shape else np.count_nonzero(pl.mask)
        if visible == 0 or visible < min_visible_pixels or visible < min_visible_frac * whole:
            continue
        # hard-mask blend inside the box region only
        _masked_copy(pl.rgb[cy0 - pl.y0:cy1 - pl.y0, cx0 - pl.x0:cx1 - pl.x0], pm, image[cy0:cy1, cx0:cx1])
        # occlude earlier instances whose region overlaps the pasted box
        r = regions[:n]
        hits = np.flatnonzero((r[:, 0] < cx1) & (r[:, 2] > cx0) & (r[:, 1] < cy1) & (r[:, 3] > cy0))
        for k in hits.tolist():
            a = out[k]
            if not a.materialised:
                a.materialise(height, width, tuple(regions[k].tolist()))
                regions[k] = a.region(height, width)
            ax0, ay0, ax1, ay1 = regions[k].tolist()
            ix0, iy0, ix1, iy1 = max(ax0, cx0), max(ay0, cy0), min(ax1, cx1), min(ay1, cy1)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            lx0, ly0 = a.x0, a.y0
            sub = a.local[iy0 - ly0:iy1 - ly0, ix0 - lx0:ix1 - lx0]
            hit = sub & pm[iy0 - cy0:iy1 - cy0, ix0 - cx0:ix1 - cx0]
            if hit.any():
                np.logical_xor(sub, hit, out=sub)
                a.occluded = True
        # trim the paste mask to its tight box and add it as a new instance
        c0, r0, c1, r1 = _tight_box(pm)
        local = pm[r0:r1, c0:c1].copy()
        x0, y0 = cx0 + c0, cy0 + r0
        new = Annot(category_id=pl.category_id, box=np.array([x0, y0, x0 + c1 - c0, y0 + r1 - r0], np.float64),
                    source=SOURCE_PASTED, local=local, x0=x0, y0=y0, area0=visible, occluded=True)
        out.append(new)
        regions[n] = (x0, y0, x0 + local.shape[1], y0 + local.shape[0])
        n += 1
    return finalize_occluded(out, min_visible_frac=min_visible_frac, min_visible_pixels=min_visible_pixels)


def finalize_occluded(annots: list[Annot], *, min_visible_frac: float, min_visible_pixels: int) -> list[Annot]:
    """Drop occluded (and pasted) instances with too little left; give the rest their tight box and a trimmed local
    mask."""
    out = []
    for a in annots:
        if not a.occluded:
            out.append(a)
            continue
        vis = int(np.count_nonzero(a.local))
        if vis == 0 or vis < min_visible_pixels or vis < min_visible_frac * a.area0:
            continue
        c0, r0, c1, r1 = _tight_box(a.local)
        a.local = a.local[r0:r1, c0:c1]
        a.x0, a.y0 = a.x0 + c0, a.y0 + r0
        a.box = np.array([a.x0, a.y0, a.x0 + (c1 - c0), a.y0 + (r1 - r0)], dtype=np.float64)
        out.append(a)
    return out


def local_mask_to_polygons(mask: np.ndarray, x0: int = 0, y0: int = 0) -> list[np.ndarray]:
    """Polygons of a local mask window placed at ``(x0, y0)`` (``acp_data.masks.mask_polygon_arrays``)."""
    return mask_polygon_arrays(mask, x0, y0)


def annots_to_d2(annots: list[Annot], image_shape: tuple[int, int], mask_format: str) -> list[dict[str, Any]]:
    """detectron2 annotation dicts (XYXY_ABS boxes) for ``annotations_to_instances``: instances no paste covered keep
    their segmentation; occluded and pasted ones become polygons (holes joined by slits) or a full-canvas bitmask."""
    from detectron2.structures import BoxMode

    h, w = image_shape
    out = []
    for a in annots:
        d = dict(a.extra)
        d.update(bbox=np.asarray(a.box, dtype=np.float64), bbox_mode=BoxMode.XYXY_ABS, category_id=int(a.category_id))
        if a.occluded:
            if mask_format == "polygon":
                d["segmentation"] = local_mask_to_polygons(a.local, a.x0, a.y0)
            else:
                full = np.zeros((h, w), dtype=np.uint8)
                lh, lw = a.local.shape
                full[a.y0:a.y0 + lh, a.x0:a.x0 + lw] = a.local
                d["segmentation"] = full
        elif a.segmentation is not None:
            d["segmentation"] = a.segmentation
        out.append(d)
    return out


def annots_from_d2(annos: list[dict[str, Any]], source: int = SOURCE_REAL) -> list[Annot]:
    """Wrap transformed detectron2 annotations (``bbox_mode`` XYXY_ABS after ``transform_instance_annotations``)."""
    from detectron2.structures import BoxMode

    out = []
    for d in annos:
        box = np.asarray(d["bbox"], dtype=np.float64).reshape(4)
        if d["bbox_mode"] != BoxMode.XYXY_ABS:
            box = np.asarray(BoxMode.convert(box.tolist(), d["bbox_mode"], BoxMode.XYXY_ABS), np.float64)
        extra = {k: v for k, v in d.items() if k not in ("bbox", "bbox_mode", "category_id", "segmentation")}
        out.append(Annot(category_id=int(d["category_id"]), box=box, source=source,
                         segmentation=d.get("segmentation"), extra=extra))
    return out


# ----- where, how big, which way: the random choices of one image ---------------------------------------------------
@dataclass(frozen=True)
class PasteParams:
    """The ``ACP.PASTE.*`` settings the planner needs."""

    prob: float = 0.5
    max_instances: int = 10
    min_instances: int = 1  # the count is uniform in [min_instances, max_instances] (benchmarks fix it)
    scale_range: tuple[float, float] = (0.1, 0.5)
    aspect_jitter: float = 0.2
    min_visible_frac: float = 0.25
    min_visible_pixels: int = 32


@dataclass(frozen=True)
class PastePlan:
    """One planned paste: which pool category (index into the pool's categories) and crop (uniform in [0, 1) to be
    scaled by the category's crop count), target sqrt-area fraction (or ``None``: from the priors), the standard
    normal for the priors draw, the aspect jitter factor, flip, and the centre as fractions of the image."""

    category_slot: int
    crop_u: float
    scale_u: float
    scale_z: float
    aspect_factor: float
    flip: bool
    cx: float
    cy: float


def plan_pastes(key: int, num_categories: int, params: PasteParams) -> list[PastePlan]:
    """The pastes of one image from a 64-bit key alone (so from (SEED, position)): none with probability
    ``1 - prob``, else ``min_instances``..``max_instances`` of them (uniform), categories uniform over the pool
    (class-balanced)."""
    if num_categories <= 0 or params.max_instances <= 0:
        return []
    n_max = int(params.max_instances)
    u = uniform(key, np.arange(2 + 9 * n_max))
    if u[0] >= params.prob:
        return []
    n_min = max(1, min(int(params.min_instances), n_max))
    n = n_min + min(int(u[1] * (n_max - n_min + 1)), n_max - n_min)
    plans = []
    for j in range(n):
        v = u[2 + 9 * j: 11 + 9 * j]
        z = math.sqrt(-2.0 * math.log(max(v[3], 1e-300))) * math.cos(2.0 * math.pi * v[4])  # Box-Muller
        plans.append(PastePlan(
            category_slot=min(int(v[0] * num_categories), num_categories - 1),
            crop_u=float(v[1]), scale_u=float(v[2]), scale_z=float(max(-2.0, min(2.0, z))),
            aspect_factor=1.0 + params.aspect_jitter * (2.0 * float(v[5]) - 1.0),
            flip=bool(v[6] < 0.5), cx=float(v[7]), cy=float(v[8]),
        ))
    return plans


def target_size(plan: PastePlan, crop_hw: tuple[int, int], image_hw: tuple[int, int],
                size_stats: tuple[float, float, float, float] | None,
                scale_range: tuple[float, float]) -> tuple[int, int]:
    """``(w, h)`` in pixels: sqrt(box area / image area) from the category's priors (mean + std * z, z clipped to
    +-2) or uniform in ``scale_range``; the crop's own aspect times the jitter factor; at most the image size."""
    ih, iw = image_hw
    ch, cw = crop_hw
    if size_stats is not None:
        mean, std = float(size_stats[0]), float(size_stats[1])
        s = min(max(mean + std * plan.scale_z, 0.01), 1.0)
    else:
        lo, hi = float(scale_range[0]), float(scale_range[1])
        s = lo + (hi - lo) * plan.scale_u
    aspect = max(cw, 1) / max(ch, 1) * plan.aspect_factor  # w / h
    area = (s * s) * ih * iw
    w = math.sqrt(area * aspect)
    h = math.sqrt(area / aspect)
    shrink = min(1.0, iw / w, ih / h)
    return max(1, int(round(w * shrink))), max(1, int(round(h * shrink)))


def make_placement(rgba: np.ndarray, size_wh: tuple[int, int], plan: PastePlan, image_hw: tuple[int, int],
                   category_id: int, bgr: bool = False) -> Placement:
    """Resize an RGBA cut-out (one bilinear resize of pixels and alpha; alpha thresholded at 128), flip it and
    centre it at the plan's centre; ``bgr`` gives the pixels in BGR order (detectron2's default INPUT.FORMAT)."""
    import cv2

    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"a cut-out must be RGBA (h, w, 4), got shape {rgba.shape}")
    w, h = size_wh
    out = cv2.resize(np.ascontiguousarray(rgba), (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 4)
    if plan.flip:
        out = cv2.flip(out, 1).reshape(h, w, 4)
    ih, iw = image_hw
    x0 = int(round(plan.cx * iw - w / 2.0))
    y0 = int(round(plan.cy * ih - h / 2.0))
    px = cv2.cvtColor(out, cv2.COLOR_RGBA2BGR if bgr else cv2.COLOR_RGBA2RGB).reshape(h, w, 3)
    if sys.byteorder == "little" and out.flags.c_contiguous:  # alpha is each pixel's top byte: one 32-bit compare
        mask = out.view(np.uint32)[:, :, 0] >= np.uint32(128 << 24)
    else:
        mask = out[:, :, 3] >= 128
    return Placement(rgb=px, mask=mask, x0=x0, y0=y0, category_id=category_id)
