"""``shapes`` segmenter: finds the object in each box from pixels alone (it never sees what was drawn), so bad
generations give bad masks, as SAM gives on diffusion images.

Per box: a background model (a robust colour ramp fitted to a ring of pixels just outside the box) gives each pixel's
colour distance from the background; pixels beyond half the object's contrast are foreground; foreground colours are
clustered, and the union of clusters whose mask best fills the box while lying least outside it (neighbours and
occluders come in from outside) is kept: its main connected parts, holes filled unless they look like background
(the hole of a ring), rims under half coverage peeled.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from ..stages import Segmenter, StageContext

DEFAULTS: dict[str, Any] = {
    "ring_width": 0.2,  # width of the background ring outside the box, as a fraction of the box's longer side
    "min_contrast": 14.0,  # Lab distance below which a pixel is background whatever Otsu says
    "cover_weight": 0.25,  # reward per fraction of the box's foreground kept (ties go to the fuller mask)
    "spill_weight": 0.5,  # penalty for keeping colour clusters that also lie outside the box (other objects)
    "min_area_frac": 0.03,  # masks smaller than this fraction of the box are "not found" (empty)
    "clusters": 3,
    "min_score": 0.4,  # below this fit score (box IoU + cover - spill) the box holds no object of its own
}


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D array of non-negative floats."""
    if values.size < 2 or float(values.max()) <= float(values.min()):
        return float(values.max()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _kmeans(x: np.ndarray, k: int, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means (farthest-point initialisation) on rows of ``x``; returns (labels, centres)."""
    centres = [x[int(np.argmin(np.abs(x - np.median(x, axis=0)).sum(axis=1)))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(x[int(np.argmax(d))])
    c = np.array(centres, dtype=np.float32)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)
        for j in range(k):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(axis=0)
    return labels, c


def _fit_background(lab: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Per-channel colour ramp a + b x + c y fitted to the ring pixels, refitted twice without the worst third
    (other objects in the ring); evaluated over the whole crop."""
    h, w = ring.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones_like(xx), xx / max(w, 1), yy / max(h, 1)], axis=-1)
    a, y = design[ring], lab[ring]
    keep = np.ones(len(a), dtype=bool)
    coef = np.zeros((3, 3), dtype=np.float32)
    for _ in range(3):
        coef = np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
        resid = np.linalg.norm(y - a @ coef, axis=1)
        keep = resid <= np.quantile(resid, 0.67)
        if keep.sum() < 6:
            break
    return design @ coef


def _fill_holes(mask: np.ndarray, bg_dist: np.ndarray, thresh: float) -> np.ndarray:
    """Fill enclosed holes unless they look like background (``bg_dist``: each pixel's colour distance to the nearest
    background colour seen around the box), such as the hole of a ring."""
    inv = (~mask).astype(np.uint8)
    n, lab = cv2.connectedComponents(inv, connectivity=4)
    if n <= 2:
        return mask
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    out = mask.copy()
    for j in range(1, n):
        if j in border:
            continue
        hole = lab == j
        if hole.sum() <= 2 or float(np.median(bg_dist[hole])) > 0.5 * thresh:
            out |= hole
    return out


class ShapesSegmenter(Segmenter):
    """Colour/background contrast segmentation inside each box; the shape is unknown to it."""

    DEFAULTS = DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"shapes segmenter: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        opts = {**DEFAULTS, **options}
        for k, v in opts.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"shapes segmenter: option {k} = {v!r} must be a non-negative number")
        if int(opts["clusters"]) < 1:
            raise ValueError(f"shapes segmenter: option clusters = {opts['clusters']!r} must be >= 1")
        super().__init__(ctx, **opts)

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> list[np.ndarray]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"shapes segmenter: expected an H x W x 3 uint8 RGB image, got {image.shape} "
                             f"{image.dtype}")
        h, w = image.shape[:2]
        lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
        out = []
        for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
            mask = np.zeros((h, w), dtype=bool)
            if np.all(np.isfinite(box)):
                self._segment_box(lab, box, mask)
            out.append(mask)
        return out

    def _segment_box(self, lab: np.ndarray, box: np.ndarray, out: np.ndarray) -> None:
        h, w = out.shape
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        pad = max(3, int(round(self.options["ring_width"] * max(x1 - x0, y1 - y0))))
        X0, Y0, X1, Y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
        crop = lab[Y0:Y1, X0:X1]
        inbox = np.zeros(crop.shape[:2], dtype=bool)
        inbox[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = True
        near = cv2.dilate(inbox.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ring = ~near
        if ring.sum() < 12:  # box covers (almost) the whole image: use the box's own edge pixels
            edge = cv2.erode(inbox.astype(np.uint8), np.ones((5, 5), np.uint8), borderType=cv2.BORDER_CONSTANT,
                             borderValue=0)
            ring = inbox & ~edge.astype(bool)
        dist = np.linalg.norm(crop - _fit_background(crop, ring), axis=2)
        thresh = self._threshold(dist, inbox, ring)
        fg = dist > thresh
        if not (fg & inbox).any():
            return
        # distance to the nearest of the ring's colours: tells a background-coloured hole (a ring's) from a dark spot
        ring_px = crop[ring].astype(np.float32)
        centres = _kmeans(ring_px, min(4, len(ring_px)))[1] if len(ring_px) else crop[inbox][:1].astype(np.float32)
        bg_dist = np.min(np.linalg.norm(crop[:, :, None, :] - centres[None, None], axis=3), axis=2)
        keep = self._best_subset(crop, fg, inbox, ring, np.minimum(dist, bg_dist), thresh,
                                 (y0 - Y0, x0 - X0, y1 - Y0, x1 - X0))
        if keep is None:
            return
        keep = _refine_edge(keep, dist)
        if keep.sum() < self.options["min_area_frac"] * inbox.sum():
            return
        out[Y0:Y1, X0:X1] = keep

    def _threshold(self, dist: np.ndarray, inbox: np.ndarray, ring: np.ndarray) -> float:
        """Half the contrast of the object's weaker colours: pixels clearly off the background (beyond the ring's
        noise) are the object; eroded to drop blurred rims, their 30th percentile distance is a contrast every
        colour of the object reaches (both colours of stripes), and half of it puts the edge where the object
        covers about half a pixel."""
        noise = 3.0 * float(np.median(dist[ring])) + 2.0 if ring.any() else 0.0
        low = max(float(self.options["min_contrast"]), noise)
        cand = ((dist > low) & inbox).astype(np.uint8)
        core = cv2.erode(cand, np.ones((3, 3), np.uint8)).astype(bool)
        if core.sum() < 12:
            return max(low, _isodata(dist[inbox]))
        return max(low, 0.5 * float(np.percentile(dist[core], 30)))

    def _best_subset(self, crop: np.ndarray, fg: np.ndarray, inbox: np.ndarray, ring: np.ndarray,
                     bg_dist: np.ndarray, thresh: float, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """Cluster the foreground colours; among unions of clusters keep the one whose mask best fills the box
        (box IoU) while spilling least into the ring: a tight layout box holds one object that touches all its
        sides, and neighbours or occluders come in from outside."""
        fg_in, fg_out = fg & inbox, fg & ring
        n_in_px = int(fg_in.sum())
        k = int(min(self.options["clusters"], max(1, n_in_px // 10)))
        pts = np.concatenate([crop[fg_in], crop[fg_out]]).astype(np.float32)
        labels = _kmeans(pts, k)[0] if k > 1 else np.zeros(len(pts), dtype=np.int64)
        lin, lout = labels[:n_in_px], labels[n_in_px:]
        n_in = np.bincount(lin, minlength=k)
        n_out = np.bincount(lout, minlength=k)
        # a cluster with part of its pixels outside the box is (partly) another object; its penalty grows with that
        # part (full at a third) and with its share of the box's foreground
        outside = n_out / np.maximum(n_in + n_out, 1)
        penalty = n_in / n_in_px * np.minimum(1.0, 3.0 * outside)
        present = [j for j in range(k) if n_in[j] > 0]
        best, best_score = None, -np.inf
        for bits in range(1, 1 << len(present)):
            chosen = np.array([present[i] for i in range(len(present)) if bits >> i & 1])
            sel = np.zeros(k, dtype=bool)
            sel[chosen] = True
            cand = np.zeros_like(fg_in)
            cand[fg_in] = sel[lin]
            cand = _fill_holes(_main_parts(cand), bg_dist, thresh) & inbox
            score = (_box_iou(cand, box) + self.options["cover_weight"] * cand.sum() / n_in_px
                     - self.options["spill_weight"] * float(penalty[sel].sum()))
            if score > best_score + 1e-9:
                best, best_score = cand, score
        # nothing fills the box without coming from outside it (a background edge, a neighbour): not found
        return best if best_score >= self.options["min_score"] else None


def _refine_edge(mask: np.ndarray, dist: np.ndarray, steps: int = 2) -> np.ndarray:
    """Peel edge pixels whose contrast is under half that of the object next to them (less than half covered)."""
    kernel4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    out = mask.copy()
    for _ in range(steps):
        m8 = out.astype(np.uint8)
        edge = out & ~cv2.erode(m8, kernel4, borderType=cv2.BORDER_REPLICATE).astype(bool)
        local = cv2.dilate((dist * out).astype(np.float32), np.ones((5, 5), np.uint8))
        peel = edge & (dist < 0.5 * local)
        if not peel.any():
            break
        out &= ~peel
    return out


def _isodata(values: np.ndarray, iters: int = 6) -> float:
    """Threshold halfway between the mean of the values below and above it (Ridler-Calvard), started at Otsu's: on
    a blurred edge this is where the object covers half a pixel."""
    t = _otsu(values)
    for _ in range(iters):
        lo, hi = values[values <= t], values[values > t]
        if lo.size == 0 or hi.size == 0:
            break
        t_new = 0.5 * (float(lo.mean()) + float(hi.mean()))
        if abs(t_new - t) < 0.05:
            t = t_new
            break
        t = t_new
    return t


def _box_iou(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """IoU of a mask's tight box with ``box`` = (y0, x0, y1, x1), exclusive ends."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    by0, bx0, by1, bx1 = box
    my0, mx0, my1, mx1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    iw = max(0, min(bx1, mx1) - max(bx0, mx0))
    ih = max(0, min(by1, my1) - max(by0, my0))
    inter = iw * ih
    return inter / float((bx1 - bx0) * (by1 - by0) + (mx1 - mx0) * (my1 - my0) - inter)


def _main_parts(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part plus any part at least a quarter of its size."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = np.nonzero(areas >= 0.25 * areas.max())[0] + 1
    return np.isin(lab, big)
