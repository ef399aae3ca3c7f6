"""CLIS-L: how plausible a layout is, judged against real box pairs from the priors (no model).

For every related (subject, object) pair of a scene graph, the pair's boxes ``L`` are compared to each reference pair
``R`` of the matching pool (same categories, same relation bucket):

- ``sim(a, b) = min(a, b) / max(a, b)`` for non-negative features, with ``sim(0, 0) = 1`` (two pairs that both do
  not overlap agree perfectly on IoU) and ``sim(0, b > 0) = 0``;
- size term ``sim(area_S / area_O)``;
- distance term ``(sim(IoU) + sim(d)) / 2`` with ``d = |c_S - c_O| / ((diag_S + diag_O) / 2)``, the centre distance
  relative to the mean box diagonal;
- direction term ``(cos(v_L, v_R) + 1) / 2`` with ``v`` the subject-to-object centre vector; cos = 1 when both
  vectors are zero (concentric boxes) and 0 when only one is;
- penalty: a term ``t`` below ``penalty_threshold`` (0.03) is replaced by the line from ``penalty_floor`` (-1) at
  ``t = 0`` to ``t = 0.03`` at the threshold, ``floor + (thr - floor) * t / thr``; at or above the threshold it is
  unchanged. A near-zero term thus vetoes the reference instead of merely lowering it;
- reference score ``clip((0.5 size + 1.0 distance + 0.8 direction) / 2.3, 0, 1)``;
- symmetric buckets (``SYMMETRIC_BUCKETS``): each reference is also tried with subject and object swapped (area ratio
  inverted, direction reversed) and the better score is kept; the pool also includes the (object, subject) pairs;
- pair score ``100 x`` the nearest-rank ``percentile`` (98) of the reference scores: the value at rank
  ``ceil(p / 100 * n)`` of the ascending scores (with 3 references: the maximum).

Pools back off when they hold fewer than ``min_refs`` references: exact pool -> pools of similar categories (shared
head noun, see ``Priors.similar_categories``) -> the bucket over all categories. A pair's weight in the layout mean is
its level's weight (1, 0.5, 0.25) times ``min(1, n_refs / min_refs)``; a pool larger than ``max_refs`` (2000) is
replaced by a fixed seeded subset of that size (back-off unions can be large). A phrase outside the relation lexicon
uses all buckets of the pair. The layout score is the weighted mean of the scored pairs; a pair without any usable
reference is unscored (None, never 0), and a layout with no scored pair is unscored with a reason. All boxes are
normalised XYWH.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..priors import BUCKETS, SYMMETRIC_BUCKETS, Priors, relation_bucket
from ..scene import SceneGraph

LEVELS = ("exact", "similar", "bucket")
# Reasons a layout is unscored.
NO_RELATIONS = "no related pairs in the scene graph"
NO_REFERENCES = "no related pair has a usable reference"

_F_RATIO, _F_IOU, _F_DIST, _F_UX, _F_UY, _F_NZ = range(6)


def similarity(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """``min(a, b) / max(a, b)`` for non-negative values; 1 where both are 0, 0 where exactly one is."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 1.0)


def pair_features(subj_xywh: np.ndarray, obj_xywh: np.ndarray) -> np.ndarray:
    """(n, 6) float64 features of box pairs: area ratio S/O, IoU, relative centre distance, unit direction (x, y) of
    the subject-to-object centre vector (0, 0 when the centres coincide) and a 0/1 flag "centres differ"."""
    s = np.asarray(subj_xywh, dtype=np.float64).reshape(-1, 4)
    o = np.asarray(obj_xywh, dtype=np.float64).reshape(-1, 4)
    area_s, area_o = s[:, 2] * s[:, 3], o[:, 2] * o[:, 3]
    ix = np.clip(np.minimum(s[:, 0] + s[:, 2], o[:, 0] + o[:, 2]) - np.maximum(s[:, 0], o[:, 0]), 0, None)
    iy = np.clip(np.minimum(s[:, 1] + s[:, 3], o[:, 1] + o[:, 3]) - np.maximum(s[:, 1], o[:, 1]), 0, None)
    inter = ix * iy
    union = area_s + area_o - inter
    vx = (o[:, 0] + o[:, 2] / 2) - (s[:, 0] + s[:, 2] / 2)
    vy = (o[:, 1] + o[:, 3] / 2) - (s[:, 1] + s[:, 3] / 2)
    norm = np.hypot(vx, vy)
    mean_diag = (np.hypot(s[:, 2], s[:, 3]) + np.hypot(o[:, 2], o[:, 3])) / 2
    out = np.empty((len(s), 6), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, _F_RATIO] = np.where(area_o > 0, area_s / area_o, np.inf)
        out[:, _F_IOU] = np.where(union > 0, inter / union, 0.0)
        out[:, _F_DIST] = np.where(mean_diag > 0, norm / mean_diag, 0.0)
        nz = norm > 0
        out[:, _F_UX] = np.where(nz, vx / np.where(nz, norm, 1.0), 0.0)
        out[:, _F_UY] = np.where(nz, vy / np.where(nz, norm, 1.0), 0.0)
    out[:, _F_NZ] = nz
    return out


def nearest_rank(values: np.ndarray, percentile: float) -> float:
    """Nearest-rank percentile: the value at rank ``ceil(p / 100 * n)`` (1-based, at least 1) of the sorted values."""
    n = len(values)
    rank = min(n, max(1, math.ceil(round(percentile * n / 100.0, 9))))
    return float(np.partition(values, rank - 1)[rank - 1])


@dataclass
class LayoutScore:
    """CLIS-L of one layout (0-100, or None with ``reason``); ``pairs`` has one record per related pair."""

    score: float | None
    pairs: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None


class LayoutScorer:
    """CLIS-L against a priors file; see the module docstring for the definition."""

    def __init__(self, priors: Priors, percentile: float = 98.0, weights: tuple[float, float, float] = (0.5, 1.0, 0.8),
                 penalty_threshold: float = 0.03, penalty_floor: float = -1.0, min_refs: int = 5,
                 level_weights: tuple[float, float, float] = (1.0, 0.5, 0.25), max_refs: int = 2000,
                 cache_size: int = 100_000) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"CLIS-L percentile = {percentile}: must be in (0, 100]")
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"CLIS-L weights = {weights}: need three non-negative numbers (size, distance, direction)")
        if not 0 <= penalty_threshold < 1:
            raise ValueError(f"CLIS-L penalty_threshold = {penalty_threshold}: must be in [0, 1)")
        if len(level_weights) != 3 or min(level_weights) < 0:
            raise ValueError(f"CLIS-L level_weights = {level_weights}: need three non-negative numbers")
        if int(min_refs) < 1:
            raise ValueError(f"CLIS-L min_refs = {min_refs}: must be >= 1")
        self.priors = priors
        self.percentile = float(percentile)
        self.weights = tuple(float(w) for w in weights)
        self._wsum = sum(self.weights)
        self.penalty_threshold = float(penalty_threshold)
        self.penalty_floor = float(penalty_floor)
        self.min_refs = int(min_refs)
        self.level_weights = tuple(float(w) for w in level_weights)
        self.max_refs = int(max_refs)
        self.cache_size = int(cache_size)
        f = pair_features(priors.pairs[:, :4], priors.pairs[:, 4:])
        with np.errstate(divide="ignore"):  # 1/x with 1/0 = inf: sim(a, x) = min(x / a, a / x) without branches
            cols = [f[:, _F_RATIO], 1.0 / f[:, _F_RATIO], f[:, _F_IOU], 1.0 / f[:, _F_IOU], f[:, _F_DIST],
                    1.0 / f[:, _F_DIST], f[:, _F_UX], f[:, _F_UY], f[:, _F_NZ]]
        # one row per feature (_B_*), each contiguous: an exact pool is a view, any other pool one gather
        self._F = np.ascontiguousarray(np.stack(cols)) if len(f) else np.zeros((9, 0))
        self._pools: OrderedDict[tuple[int, int, str | None], tuple[str, slice | np.ndarray, int]] = OrderedDict()
        self._blocks: OrderedDict[Any, np.ndarray] = OrderedDict()

    def settings(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "weights": list(self.weights),
                "penalty_threshold": self.penalty_threshold, "penalty_floor": self.penalty_floor,
                "min_refs": self.min_refs, "level_weights": list(self.level_weights), "max_refs": self.max_refs,
                "priors": self.priors.source, "priors_settings": {k: self.priors.settings.get(k) for k in
                                                                  ("seed", "max_pairs_per_image", "max_refs_per_pool")}}

    # ----- reference pools ----------------------------------------------------------------------------------------
    def _exact_rows(self, s: int, o: int, bucket: str | None) -> slice | np.ndarray:
        a, b = self.priors.pool_range(s, o, bucket)
        if bucket in SYMMETRIC_BUCKETS and s != o:
            a2, b2 = self.priors.pool_range(o, s, bucket)
            if b2 > a2:
                return np.concatenate([np.arange(a, b), np.arange(a2, b2)])
        return slice(a, b)

    def reference_rows(self, subject_id: int, object_id: int, bucket: str | None) -> tuple[str, slice | np.ndarray, int]:
        """(level, rows of ``priors.pairs``, n) of the pool CLIS-L uses for a pair (cached); level "" when empty."""
        key = (int(subject_id), int(object_id), bucket)
        hit = self._pools.get(key)
        if hit is not None:
            self._pools.move_to_end(key)
            return hit
        s, o = key[0], key[1]
        levels: list[tuple[str, slice | np.ndarray, int]] = []
        rows = self._exact_rows(s, o, bucket)
        levels.append(("exact", rows, _count(rows)))
        if levels[-1][2] < self.min_refs:
            sim_s, sim_o = self.priors.similar_categories(s), self.priors.similar_categories(o)
            if sim_s or sim_o:
                ss, oo = (s, *sim_s), (o, *sim_o)
                r = self.priors.pools_rows(ss, oo, bucket)
                if bucket in SYMMETRIC_BUCKETS:
                    r = np.unique(np.concatenate([r, self.priors.pools_rows(oo, ss, bucket)]))
                levels.append(("similar", r, len(r)))
        if levels[-1][2] < self.min_refs:
            r = self.priors.bucket_pool_rows(bucket)
            levels.append(("bucket", r, len(r)))
        chosen = next((lv for lv in levels if lv[2] >= self.min_refs), None)
        if chosen is None:
            chosen = max(levels, key=lambda lv: lv[2])  # first of the largest
            if chosen[2] == 0:
                chosen = ("", slice(0, 0), 0)
        if self.max_refs and chosen[2] > self.max_refs:  # a fixed, seeded subset keeps large back-off pools fast
            b_idx = -1 if bucket is None else BUCKETS.index(bucket)
            seed = [b_idx + 1] if chosen[0] == "bucket" else [s, o, b_idx + 1]  # one subset per bucket pool
            all_rows = np.arange(chosen[1].start, chosen[1].stop) if isinstance(chosen[1], slice) else chosen[1]
            pick = np.sort(np.random.default_rng(seed).choice(len(all_rows), self.max_refs, replace=False))
            chosen = (chosen[0], all_rows[pick], self.max_refs)
        self._pools[key] = chosen
        if len(self._pools) > self.cache_size:
            self._pools.popitem(last=False)
        return chosen

    # ----- scoring ------------------------------------------------------------------------------------------------
    def penalise(self, t: np.ndarray) -> np.ndarray:
        """The linear penalty below ``penalty_threshold`` (identity at or above it); see the module docstring."""
        thr = self.penalty_threshold
        t = np.asarray(t, dtype=np.float64)
        if thr <= 0 or not t.size or t.min() >= thr:
            return t
        return np.where(t < thr, self.penalty_floor + (thr - self.penalty_floor) * t / thr, t)

    def _block(self, key: tuple[int, int, str | None], level: str, rows: slice | np.ndarray) -> np.ndarray:
        """(9, n) reference features of a pool: a view for a contiguous pool, else a gather cached per pool (the
        bucket back-off pools are shared by every pair that uses them)."""
        if isinstance(rows, slice):
            return self._F[:, rows]
        bkey: Any = ("bucket", key[2]) if level == "bucket" else key
        block = self._blocks.get(bkey)
        if block is None:
            block = self._F[:, rows]
            self._blocks[bkey] = block
            if len(self._blocks) > 1024:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(bkey)
        return block

    def reference_scores(self, feat: np.ndarray, rows: slice | np.ndarray, mirrored: bool = False) -> np.ndarray:
        """Score (0-1) of one candidate pair (a row of :func:`pair_features`) against each reference in ``rows`` of
        ``priors.pairs``; ``mirrored`` swaps subject and object of every reference."""
        return self._scores(feat, self._F[:, rows], mirrored)

    def _scores(self, feat: np.ndarray, block: np.ndarray, mirrored: bool = False) -> np.ndarray:
        """:meth:`reference_scores` on a feature block. Mirroring is done on the candidate side: sim(r, 1/x) equals
        sim(1/r, x), and reversing both direction vectors leaves the cosine unchanged."""
        ratio, inv_ratio, iou, inv_iou, dist, inv_dist, ux, uy, nz = block
        f_ratio, f_ux, f_uy = feat[_F_RATIO], feat[_F_UX], feat[_F_UY]
        if mirrored:
            f_ratio, f_ux, f_uy = 1.0 / f_ratio, -f_ux, -f_uy
        size = _sim_scalar(f_ratio, ratio, inv_ratio)
        distance = _sim_scalar(feat[_F_IOU], iou, inv_iou)
        distance += _sim_scalar(feat[_F_DIST], dist, inv_dist)
        distance *= 0.5
        if feat[_F_NZ]:
            direction = f_ux * ux
            direction += f_uy * uy
        else:  # concentric candidate: cos 1 against concentric references, 0 against the rest
            direction = 1.0 - nz
        direction += 1.0
        direction *= 0.5
        w_size, w_dist, w_dir = self.weights
        total = self.penalise(size) * (w_size / self._wsum)
        total += self.penalise(distance) * (w_dist / self._wsum)
        total += self.penalise(direction) * (w_dir / self._wsum)
        np.maximum(total, 0.0, out=total)
        np.minimum(total, 1.0, out=total)
        return total

    def score_pair(self, subject_box: np.ndarray, object_box: np.ndarray, subject_id: int, object_id: int,
                   relation: str | None) -> dict[str, Any]:
        """Score one box pair (normalised XYWH). ``relation`` is a phrase or a bucket name (None: all buckets).
        Returns a record: bucket, pool (level), refs, weight, score (None when unscored) and reason."""
        sb = np.asarray(subject_box, dtype=np.float64).reshape(4)
        ob = np.asarray(object_box, dtype=np.float64).reshape(4)
        return self._score_pair(sb, ob, pair_features(sb, ob)[0], subject_id, object_id, relation)

    def _score_pair(self, sb: np.ndarray, ob: np.ndarray, feat: np.ndarray, subject_id: int, object_id: int,
                    relation: str | None) -> dict[str, Any]:
        bucket = None if relation is None else relation_bucket(relation)
        rec: dict[str, Any] = {"subject_category": int(subject_id), "object_category": int(object_id),
                               "phrase": relation, "bucket": bucket, "pool": None, "refs": 0, "weight": 0.0,
                               "score": None, "reason": None}
        if not (np.isfinite(sb).all() and np.isfinite(ob).all()) or min(sb[2], sb[3], ob[2], ob[3]) <= 0:
            rec["reason"] = "box missing or without area"
            return rec
        level, rows, n = self.reference_rows(subject_id, object_id, bucket)
        rec["pool"], rec["refs"] = level or None, n
        if n == 0:
            rec["reason"] = "no reference pair in the priors"
            return rec
        block = self._block((int(subject_id), int(object_id), bucket), level, rows)
        scores = self._scores(feat, block)
        if bucket in SYMMETRIC_BUCKETS:
            scores = np.maximum(scores, self._scores(feat, block, mirrored=True))
        rec["score"] = 100.0 * nearest_rank(scores, self.percentile)
        rec["weight"] = self.level_weights[LEVELS.index(level)] * min(1.0, n / self.min_refs)
        return rec

    def score(self, scene: SceneGraph) -> LayoutScore:
        """CLIS-L of a scene graph's layout: the weighted mean over its related pairs (see the module docstring)."""
        objs = {o.id: o for o in scene.objects}
        records: list[dict[str, Any] | None] = []
        todo: list[tuple[int, Any, Any, str]] = []
        for rel in scene.relations:
            for sid in rel.subjects:
                for oid in rel.objects:
                    if sid == oid:
                        continue
                    s, o = objs.get(sid), objs.get(oid)
                    if s is None or o is None:
                        records.append({"subject": sid, "object": oid, "phrase": rel.phrase, "score": None,
                                        "weight": 0.0, "pool": None, "refs": 0,
                                        "reason": f"unknown object {sid if s is None else oid}"})
                        continue
                    todo.append((len(records), s, o, rel.phrase))
                    records.append(None)
        if todo:
            nan4 = (np.nan,) * 4
            sbs = np.array([s.bbox if s.bbox is not None else nan4 for _, s, _, _ in todo], dtype=np.float64)
            obs = np.array([o.bbox if o.bbox is not None else nan4 for _, _, o, _ in todo], dtype=np.float64)
            feats = pair_features(sbs, obs)
            for t, (i, s, o, phrase) in enumerate(todo):
                rec = self._score_pair(sbs[t], obs[t], feats[t], s.category_id, o.category_id, phrase)
                records[i] = {"subject": s.id, "object": o.id, **rec}
        out: list[dict[str, Any]] = [r for r in records if r is not None]
        if not out:
            return LayoutScore(None, out, NO_RELATIONS)
        scored = [r for r in out if r["score"] is not None and r["weight"] > 0]
        if not scored:
            return LayoutScore(None, out, NO_REFERENCES)
        w = np.array([r["weight"] for r in scored])
        v = np.array([r["score"] for r in scored])
        return LayoutScore(float((w * v).sum() / w.sum()), out, None)


def _sim_scalar(a: float, arr: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """:func:`similarity` of one non-negative value against an array, given ``inv = 1 / arr`` (inf where 0)."""
    if a == 0:
        return (arr == 0).astype(np.float64)
    if math.isinf(a):
        return np.isinf(arr).astype(np.float64)
    out = arr * (1.0 / a)
    np.minimum(out, inv * a, out=out)
    return out


def _count(rows: slice | np.ndarray) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


__all__ = ["BUCKETS", "LayoutScore", "LayoutScorer", "nearest_rank", "pair_features", "similarity"]
