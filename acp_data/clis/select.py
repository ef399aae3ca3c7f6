"""Cherry-picking rules: which candidate of a work unit is used for training, and which of its instances.

The paper's rule for detection: keep the best of the N candidates of a unit by CLIS-I image score, drop instances
with CLIS-I below 60, drop the image when all its instances fall below; the multimodal setting adds CLIS-L >= 50.

Rules, in order (:func:`select_unit`):

1. **Unscored values** (None, or NaN as the cache index stores them: no reference pair, segmenter rejection, scorer
   failure) pass only a threshold <= 0, the same rule as ``ACP.MIN_CLIS_I`` / ``ACP.MIN_CLIS_L`` at load time.
   They are never read as 0 otherwise: an unscored candidate image cannot be "best" but lowers nothing either.
2. **Layout filter**: with ``min_clis_l > 0`` a unit whose layout fails it selects nothing.
3. **Best of N**: the candidate with the highest image score among those with one; ties go to the higher CLIS-L when
   per-candidate layout scores are given (an unscored one ranks below any score), then to the lower index.
4. **Instance filter**: an instance is kept iff it passes ``min_clis_i`` (computed for every candidate, so the
   ``all`` / ``random`` / ``first`` load-time selections can use it too).
5. **Empty image**: when no instance of the best candidate is kept, the unit selects nothing (the paper does not fall
   back to the second best).

Rules 2 and 3 are :func:`best_of_n`, vectorised over any number of units; :func:`select_unit` (prebuild, rescore)
calls it for one unit and the load-time selection over a cache index (``acp_data/cache/selection.py``, ``ACP.SELECT:
clis``) calls it for every unit of the caches with the load-time ``MIN_CLIS_L``, then applies rules 4 and 5 with the
load-time ``MIN_CLIS_I``: one implementation, so a cache loaded with the prebuild's thresholds keeps exactly the
candidates its stored ``selected`` flags name (over the instances stored; an object the segmenter found nothing for
has a score at prebuild time but no instance in the cache).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MIN_CLIS_I = 60.0
DEFAULT_MIN_CLIS_L = 0.0

# Reason counters of SelectResult.
SELECTED = "selected"
NO_CANDIDATES = "no_candidates"
NO_SCORED_CANDIDATE = "no_scored_candidate"
LAYOUT_BELOW = "layout_below_min_clis_l"
LAYOUT_UNSCORED = "layout_unscored"
ALL_INSTANCES_BELOW = "all_instances_below_min_clis_i"
INSTANCES_KEPT = "instances_kept"
INSTANCES_BELOW = "instances_below_min_clis_i"
INSTANCES_UNSCORED = "instances_unscored"
CANDIDATES_UNSCORED = "candidates_unscored"


def _value(x: Any) -> float | None:
    """None for unscored (None or NaN, the index's encoding), else a float."""
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) else v


def passes(score: float | None, threshold: float) -> bool:
    """The one threshold rule: a score passes when it is >= threshold; an unscored value (None or NaN) only when
    the threshold is <= 0."""
    if threshold <= 0:
        return True
    v = _value(score)
    return v is not None and v >= threshold


def passes_array(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """:func:`passes` over an array of scores (NaN = unscored) and one threshold or one per score."""
    scores = np.asarray(scores, dtype=np.float64)
    thr = np.asarray(threshold, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (scores >= thr) | (thr <= 0)


def best_of_n(group: np.ndarray, order: np.ndarray, image: np.ndarray, layout: np.ndarray,
              min_clis_l: float = DEFAULT_MIN_CLIS_L) -> np.ndarray:
    """Rules 2 and 3 over many units at once: a mask of each unit's best candidate (at most one per ``group`` value).

    Per candidate: ``group`` its unit, ``order`` its tie-break index (candidate position), ``image`` its CLIS-I image
    score and ``layout`` its CLIS-L (NaN = unscored). Only candidates whose layout passes ``min_clis_l`` and that have
    an image score compete; the best has the highest image score, then a scored layout, then the higher layout score,
    then the lower ``order``. The instance rules (4, 5) are the caller's.
    """
    group = np.asarray(group)
    image = np.asarray(image, dtype=np.float64)
    layout = np.asarray(layout, dtype=np.float64)
    eligible = passes_array(layout, min_clis_l)
    idx = np.flatnonzero(eligible & ~np.isnan(image))
    out = np.zeros(len(image), dtype=bool)
    if not len(idx):
        return out
    # one sort by unit, then the ranking keys one after another within each unit (O(n) passes, no float sort)
    idx = idx[np.argsort(group[idx], kind="stable")]
    g = group[idx]
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    unit = np.cumsum(np.concatenate([[False], g[1:] != g[:-1]]))
    alive = np.ones(len(idx), dtype=bool)
    lay = layout[idx]
    lay = np.where(np.isnan(lay), -np.inf, lay)  # an unscored layout ranks below any score
    for key in (image[idx], lay, -np.asarray(order, dtype=np.float64)[idx]):
        best = np.maximum.reduceat(np.where(alive, key, -np.inf), starts)
        alive &= key == best[unit]
    pos = np.flatnonzero(alive)  # equal on every key (a duplicate): the first
    pos = pos[np.concatenate([[True], unit[pos][1:] != unit[pos][:-1]])]
    out[idx[pos]] = True
    return out


@dataclass
class SelectResult:
    """The chosen candidate (None: the unit yields nothing), per-candidate instance flags and counted reasons."""

    selected_idx: int | None
    kept_instances: list[list[bool]]
    reasons: Counter = field(default_factory=Counter)


def select_unit(image_scores: Sequence[float | None], layout_score: float | None | Sequence[float | None],
                instance_scores: Sequence[Sequence[float | None]], min_clis_i: float = DEFAULT_MIN_CLIS_I,
                min_clis_l: float = DEFAULT_MIN_CLIS_L) -> SelectResult:
    """Best of N candidates of one work unit (see the module docstring for the rules).

    ``layout_score`` is the unit's CLIS-L (its candidates share the layout) or one value per candidate.
    """
    images = [_value(s) for s in image_scores]
    n = len(images)
    if len(instance_scores) != n:
        raise ValueError(f"select_unit: {n} image scores but {len(instance_scores)} instance score lists")
    if layout_score is None or np.ndim(layout_score) == 0:
        layouts: list[float | None] = [_value(layout_score)] * n
    else:
        layouts = [_value(v) for v in layout_score]  # type: ignore[union-attr]
        if len(layouts) != n:
            raise ValueError(f"select_unit: {n} image scores but {len(layouts)} layout scores")
    reasons: Counter = Counter()
    kept = [[passes(s, min_clis_i) for s in inst] for inst in instance_scores]
    reasons[CANDIDATES_UNSCORED] += sum(s is None for s in images)
    if n == 0:
        reasons[NO_CANDIDATES] += 1
        return SelectResult(None, kept, reasons)

    eligible = [i for i in range(n) if passes(layouts[i], min_clis_l)]
    if any(v is None for v in layouts):
        reasons[LAYOUT_UNSCORED] += 1
    if not eligible:
        reasons[LAYOUT_BELOW] += 1
        return SelectResult(None, kept, reasons)
    if all(images[i] is None for i in eligible):
        reasons[NO_SCORED_CANDIDATE] += 1
        return SelectResult(None, kept, reasons)
    nan = float("nan")
    chosen = best_of_n(np.zeros(n, dtype=np.int64), np.arange(n), np.array([nan if v is None else v for v in images]),
                       np.array([nan if v is None else v for v in layouts]), min_clis_l)
    best = int(np.flatnonzero(chosen)[0])
    inst = instance_scores[best]
    n_kept = sum(kept[best])
    reasons[INSTANCES_KEPT] += n_kept
    reasons[INSTANCES_UNSCORED] += sum(_value(s) is None for s in inst)
    reasons[INSTANCES_BELOW] += sum(1 for s, k in zip(inst, kept[best]) if not k and _value(s) is not None)
    if n_kept == 0:
        reasons[ALL_INSTANCES_BELOW] += 1
        return SelectResult(None, kept, reasons)
    reasons[SELECTED] += 1
    return SelectResult(best, kept, reasons)


__all__ = ["DEFAULT_MIN_CLIS_I", "DEFAULT_MIN_CLIS_L", "SelectResult", "best_of_n", "passes", "passes_array", "select_unit"]
