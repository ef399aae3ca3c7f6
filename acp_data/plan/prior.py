"""``prior`` planner: no model. Layouts come from the priors (per-category size/aspect statistics and real
subject-object box pairs); caption, attributes, groups and depth layers from simple templates. The offline default:
it always returns a valid SceneGraph.

Layout: the target is placed first with a size drawn from its statistics. Each companion is placed from a real box
pair of (companion, target) or (target, companion), scaled so the pair's target box matches the placed target, and
shifted into the canvas; without a pair it gets its own size statistics and the free spot that overlaps least. The
relation phrase is always re-derived from the final boxes (``priors.geometric_bucket``), so the written relation
agrees with the geometry that CLIS-L will score.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from typing import Any

import numpy as np

from ..generate.common import resolve_options
from ..scene import Relation, SceneGraph, SceneObject
from ..stages import Planner, PlanResult, StageContext, WorkUnit
from .common import attempt_seed, display_name, requested_objects

logger = logging.getLogger(__name__)

PRIOR_DEFAULTS: dict[str, Any] = {
    "min_size": 0.12,  # sqrt(box area / image area) bounds for every object
    "max_size": 0.85,
    "target_min_size": 0.2,  # the concept the unit is for is drawn at least this large
    "margin": 0.01,  # boxes stay this far inside the canvas
    "default_size": (0.3, 0.1),  # (mean, std) of sqrt area fraction for a category without boxes
    "default_aspect": (0.0, 0.35),  # (mean, std) of log(w / h)
    "size_words": True,  # add "small"/"large" when an object is drawn far from its category's usual size
    "caption_prefix": "A photo of",
}

# Depth layer of an object from the bottom edge of its box (lower in the image = closer to the camera).
_LAYER_BY_BOTTOM = ((0.85, "Immediate Foreground"), (0.6, "Foreground"), (0.35, "Midground"), (0.0, "Background"))


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


class PriorPlanner(Planner):
    """Options: ``min_size``, ``max_size``, ``target_min_size``, ``margin``, ``default_size``, ``default_aspect``,
    ``size_words``, ``caption_prefix`` (see ``PRIOR_DEFAULTS``)."""

    DEFAULTS = PRIOR_DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.opts = resolve_options("planner prior", options, PRIOR_DEFAULTS)
        o = self.opts
        if not 0 < o["min_size"] <= o["target_min_size"] <= o["max_size"] <= 1:
            raise ValueError("planner prior: need 0 < min_size <= target_min_size <= max_size <= 1, got "
                             f"{o['min_size']}, {o['target_min_size']}, {o['max_size']}")
        if not 0 <= o["margin"] < 0.2:
            raise ValueError(f"planner prior: margin must be in [0, 0.2), got {o['margin']}")
        self.priors = ctx.priors
        if self.priors is None:
            logger.warning("planner prior: no priors given; sizes use the defaults and no real box pairs are used")
        elif len(self.priors.categories) != len(ctx.categories):
            raise ValueError(f"planner prior: the priors ({self.priors.source or 'in memory'}) have "
                             f"{len(self.priors.categories)} categories, the category table has {len(ctx.categories)}")
        self._fingerprint: str | None = None

    # ----- settings -----------------------------------------------------------------------------------------------
    def priors_fingerprint(self) -> str | None:
        """Content hash of the priors arrays the planner reads (part of the generation key)."""
        if self.priors is None:
            return None
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name in ("size", "cooc", "pairs", "pool_keys", "pool_offsets"):
                a = np.ascontiguousarray(getattr(self.priors, name))
                h.update(name.encode())
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **self.opts, "priors": self.priors_fingerprint()}

    # ----- sampling -----------------------------------------------------------------------------------------------
    def _stats(self, cid: int) -> tuple[float, float, float, float]:
        st = self.priors.size_stats(cid) if self.priors is not None else None
        if st is None:
            (ms, ss), (ma, sa) = self.opts["default_size"], self.opts["default_aspect"]
            return float(ms), float(ss), float(ma), float(sa)
        return st

    def _clip_size(self, s: float, lo: float) -> float:
        return float(np.clip(s, lo, self.opts["max_size"]))

    def _box_from_stats(self, cid: int, rng: np.random.Generator, lo: float) -> tuple[float, float, float, float]:
        """A (w, h) from the category's size and aspect statistics, then a uniform position; returns XYWH."""
        ms, ss, ma, sa = self._stats(cid)
        s = self._clip_size(rng.normal(ms, ss), lo)
        a = float(np.clip(rng.normal(ma, sa), -1.6, 1.6))
        w, h = s * math.exp(a / 2), s * math.exp(-a / 2)
        w, h = self._fit(w, h)
        m = self.opts["margin"]
        # max(): _fit can leave w a rounding error above 1 - 2m, and uniform(lo, hi) with hi < lo raises
        x = rng.uniform(m, max(m, 1 - m - w))
        y = rng.uniform(m, max(m, 1 - m - h))
        return (x, y, w, h)

    def _fit(self, w: float, h: float) -> tuple[float, float]:
        """Shrink (keeping the aspect) until the box fits inside the canvas margins."""
        room = 1 - 2 * self.opts["margin"]
        f = min(1.0, room / w, room / h)
        return w * f, h * f

    def _fit_group(self, group: dict[int, tuple[float, float, float, float]],
                   rng: np.random.Generator) -> dict[int, tuple[float, float, float, float]]:
        """Scale (down only) and translate a group of boxes into the canvas as a whole. Companions that would force
        the anchor (key 0) below ``target_min_size`` are dropped from the group (farthest first)."""
        m = self.opts["margin"]
        room = 1 - 2 * m
        group = dict(group)
        while True:
            b = np.array(list(group.values()))
            x0, y0 = b[:, 0].min(), b[:, 1].min()
            x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
            g = min(1.0, room / (x1 - x0), room / (y1 - y0))
            anchor_s = math.sqrt(group[0][2] * group[0][3]) * g
            if anchor_s >= self.opts["target_min_size"] - 1e-9 or len(group) == 1:
                break
            acx, acy = group[0][0] + group[0][2] / 2, group[0][1] + group[0][3] / 2
            far = max((k for k in group if k != 0),
                      key=lambda k: abs(group[k][0] + group[k][2] / 2 - acx) + abs(group[k][1] + group[k][3] / 2 - acy))
            del group[far]
        w, h = (x1 - x0) * g, (y1 - y0) * g
        ox = rng.uniform(m, max(m, 1 - m - w))
        oy = rng.uniform(m, max(m, 1 - m - h))
        out = {}
        for k, (x, y, bw, bh) in group.items():
            nx, ny, nw, nh = ox + (x - x0) * g, oy + (y - y0) * g, bw * g, bh * g
            # guard against rounding: stay inside [m, 1 - m]
            nw, nh = min(nw, 1 - 2 * m), min(nh, 1 - 2 * m)
            out[k] = (float(np.clip(nx, m, 1 - m - nw)), float(np.clip(ny, m, 1 - m - nh)), float(nw), float(nh))
        return out

    def _place_free(self, cid: int, rng: np.random.Generator, placed: list[tuple[float, float, float, float]],
                    tries: int = 12) -> tuple[float, float, float, float]:
        """A box from the statistics at the spot (of ``tries``) that overlaps the placed boxes least."""
        best, best_cost = None, math.inf
        for _ in range(tries):
            b = self._box_from_stats(cid, rng, self.opts["min_size"])
            cost = max((_iou(b, p) for p in placed), default=0.0)
            if cost < best_cost:
                best, best_cost = b, cost
            if cost == 0.0:
                break
        assert best is not None
        return best

    def _place_from_pair(self, comp: int, anchor_cid: int, anchor: tuple[float, float, float, float],
                         rng: np.random.Generator) -> tuple[tuple[float, float, float, float], bool] | None:
        """Companion box from a real (companion, anchor) or (anchor, companion) pair, relative to the anchor and not
        yet fitted to the canvas; returns (box, comp_is_subject)."""
        if self.priors is None:
            return None
        n_cs = sum(self.priors.pool_buckets(comp, anchor_cid).values())
        n_sc = sum(self.priors.pool_buckets(anchor_cid, comp).values())
        if n_cs + n_sc == 0:
            return None
        comp_is_subject = bool(rng.uniform() < n_cs / (n_cs + n_sc))
        got = (self.priors.sample_pair(comp, anchor_cid, rng) if comp_is_subject
               else self.priors.sample_pair(anchor_cid, comp, rng))
        if got is None:
            return None
        _, bs, bo = got
        comp_box, anchor_ref = (bs, bo) if comp_is_subject else (bo, bs)
        ax, ay, aw, ah = anchor
        f = math.sqrt((aw * ah) / max(float(anchor_ref[2] * anchor_ref[3]), 1e-8))
        # place the companion relative to the anchor as in the real pair, scaled uniformly (aspects kept)
        acx, acy = ax + aw / 2, ay + ah / 2
        rcx, rcy = anchor_ref[0] + anchor_ref[2] / 2, anchor_ref[1] + anchor_ref[3] / 2
        ccx, ccy = comp_box[0] + comp_box[2] / 2, comp_box[1] + comp_box[3] / 2
        w, h = float(comp_box[2]) * f, float(comp_box[3]) * f
        s = math.sqrt(w * h)
        if s > self.opts["max_size"] or s < self.opts["min_size"]:
            g = self._clip_size(s, self.opts["min_size"]) / s
            w, h = w * g, h * g
        cx, cy = acx + (ccx - rcx) * f, acy + (ccy - rcy) * f
        return (cx - w / 2, cy - h / 2, w, h), comp_is_subject

    # ----- text ---------------------------------------------------------------------------------------------------
    def _size_words(self, cid: int, box: tuple[float, float, float, float]) -> list[str]:
        if not self.opts["size_words"] or self.priors is None or self.priors.size_stats(cid) is None:
            return []
        ms, ss, _, _ = self._stats(cid)
        s = math.sqrt(box[2] * box[3])
        if ss > 0 and s > ms + 1.5 * ss and s > 0.4:
            return ["large"]
        if ss > 0 and s < ms - 1.5 * ss and s < 0.2:
            return ["small"]
        return []

    def _build(self, unit: WorkUnit, rng: np.random.Generator) -> SceneGraph:
        from ..priors import BUCKET_PHRASES, geometric_bucket

        requested = requested_objects(self.ctx.categories, unit.combo)
        ids, cids = list(requested), list(requested.values())
        anchor = self._box_from_stats(cids[0], rng, self.opts["target_min_size"])
        # companions from real pairs are laid out around the anchor, then the group is fitted into the canvas as a
        # whole (relative geometry kept); companions without a pair are placed afterwards where they overlap least
        paired: dict[int, tuple[float, float, float, float]] = {}
        subj_first: list[bool] = []
        for j, cid in enumerate(cids[1:], start=1):
            got = self._place_from_pair(cid, cids[0], anchor, rng)
            subj_first.append(True if got is None else got[1])
            if got is not None:
                paired[j] = got[0]
        group = self._fit_group({0: anchor, **paired}, rng)
        boxes = [group[0]]
        for j, cid in enumerate(cids[1:], start=1):
            boxes.append(group[j] if j in group else self._place_free(cid, rng, boxes + list(group.values())[1:]))
        objects = [SceneObject(oid, cid, self._size_words(cid, b), tuple(float(v) for v in b))  # type: ignore[arg-type]
                   for oid, cid, b in zip(ids, cids, boxes)]
        names = [" ".join([*o.attributes, display_name(self.ctx.categories[o.category_id].name)]) for o in objects]
        relations: list[Relation] = []
        clauses: list[str] = []
        mentioned = False
        groups: dict[str, list[str]] = {"group-1": [ids[0]]}

        def ref(i: int) -> str:
            nonlocal mentioned
            if i == 0 and mentioned:
                return f"the {names[0]}"
            if i == 0:
                mentioned = True
            return f"{_article(names[i])} {names[i]}({ids[i]})"

        for j, comp_subject in enumerate(subj_first, start=1):
            s, o = (j, 0) if comp_subject else (0, j)
            bucket = geometric_bucket(boxes[s], boxes[o])
            phrase = BUCKET_PHRASES[bucket]
            relations.append(Relation([ids[s]], [ids[o]], phrase))
            clauses.append(f"{ref(s)} {phrase} {ref(o)}")
            if bucket in ("inside", "overlapping"):
                groups["group-1"].append(ids[j])
            else:
                groups[f"group-{len(groups) + 1}"] = [ids[j]]
        if not clauses:
            clauses.append(ref(0))
        caption = f"{self.opts['caption_prefix']} {', and '.join(clauses)}."
        layers: dict[str, list[str]] = {}
        for g, members in groups.items():
            bottom = max(boxes[ids.index(m)][1] + boxes[ids.index(m)][3] for m in members)
            layer = next(name for thr, name in _LAYER_BY_BOTTOM if bottom >= thr)
            layers.setdefault(layer, []).append(g)
        return SceneGraph(objects=objects, relations=relations, layers=layers, caption=caption, groups=groups)

    def plan(self, unit: WorkUnit) -> PlanResult:
        requested = list(requested_objects(self.ctx.categories, unit.combo))
        rejections: Counter = Counter()
        for attempt in range(8):
            rng = np.random.default_rng(attempt_seed(unit.seed, "prior", attempt))
            scene, repairs = self._build(unit, rng).repair()
            v = scene.validate(requested)
            if v.ok:
                return PlanResult(scene=scene, rejections=rejections, repairs=repairs, attempts=attempt + 1)
            rejections.update(set(v.codes))
            logger.warning("planner prior: unit %d attempt %d invalid: %s", unit.index, attempt, v.message())
        raise RuntimeError(f"planner prior: no valid scene for unit {unit.index} combo {unit.combo} "
                           f"after 8 attempts ({dict(rejections)})")


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
