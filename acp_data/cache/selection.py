"""Load-time selection over the index, vectorised (no Python loop over samples).

Order of the rules (the ``ACP.*`` keys of docs/design.md "detectron2 integration (contract)"):
1. duplicates of a ``(key, candidate_idx)`` (the same cache listed twice, two writers on one rank) keep one copy;
2. ``select`` picks candidates per work unit (units are grouped by generation key): ``clis`` the stored ``selected``
   flag, ``random`` one candidate per unit drawn from a hash of ``(seed, key)``, ``first`` the lowest stored
   ``candidate_idx`` (candidate 0 when all candidates are stored), ``all`` every candidate;
3. ``min_clis_l`` drops samples, ``min_clis_i`` drops instances; an unscored (NaN) value passes only a threshold of 0;
4. ``category_ids`` keeps only instances of those categories (None = all);
5. samples left with no instance are skipped;
6. ``max_images`` (> 0) keeps that many samples chosen by a hash of ``(seed, key, candidate_idx)``: the same cache and
   seed give the same subset whatever order shards are listed in, and a larger cap keeps a superset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..rng import GOLDEN
from ..rng import mix64_array as mix64

if TYPE_CHECKING:
    from ..categories import CategoryTable
    from .reader import CacheReader

logger = logging.getLogger(__name__)

SELECT_MODES = ("clis", "random", "first", "all")
DROP_MIN_CLIS_I, DROP_CATEGORY = 0, 1  # SelectionResult.drop_reason
DROP_REASONS = ("min_clis_i", "category")
_GOLDEN = np.uint64(GOLDEN)


def _seeded(seed: int, salt: int) -> np.uint64:
    return mix64(np.array([(int(seed) * 0x100000001B3 + salt) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def candidate_hash(seed: int, key_hash: np.ndarray, candidate_idx: np.ndarray, salt: int) -> np.ndarray:
    """A 64-bit hash of ``(seed, salt, key, candidate_idx)`` per sample."""
    u = mix64(np.asarray(key_hash, dtype=np.uint64) ^ _seeded(seed, salt))
    return mix64(u + np.asarray(candidate_idx, dtype=np.uint64) * _GOLDEN)


def stable_image_id(key_hash: np.ndarray | int, candidate_idx: np.ndarray | int) -> np.ndarray:
    """Image ids that depend only on ``(key, candidate_idx)``: 53-bit (exact in JSON/float64), never 0."""
    h = candidate_hash(0, np.atleast_1d(key_hash), np.atleast_1d(candidate_idx), salt=0x1D)
    return (h & np.uint64((1 << 53) - 1)).astype(np.int64) | 1


@dataclass(frozen=True)
class Selection:
    """Load-time selection settings; the defaults are the paper's recipe (best candidate, CLIS-I >= 60)."""

    select: str = "clis"
    min_clis_i: float = 60.0
    min_clis_l: float = 0.0
    category_ids: tuple[int, ...] | None = None
    max_images: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select not in SELECT_MODES:
            raise ValueError(f"selection mode {self.select!r} is not one of {', '.join(SELECT_MODES)}")
        for name in ("min_clis_i", "min_clis_l"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 100.0:
                raise ValueError(f"{name} = {v} must be in [0, 100]")
        if int(self.max_images) < 0:
            raise ValueError(f"max_images = {self.max_images} must be >= 0 (0 = all)")
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", tuple(sorted({int(c) for c in self.category_ids})))

    def to_dict(self) -> dict[str, Any]:
        return {"select": self.select, "min_clis_i": float(self.min_clis_i), "min_clis_l": float(self.min_clis_l),
                "category_ids": None if self.category_ids is None else list(self.category_ids),
                "max_images": int(self.max_images), "seed": int(self.seed)}


ALL = Selection(select="all", min_clis_i=0.0, min_clis_l=0.0)


def selection_from_cfg(cfg: Any, categories: CategoryTable) -> Selection:
    """``Selection`` from ``cfg.ACP.{SELECT, MIN_CLIS_I, MIN_CLIS_L, CATEGORIES, MAX_IMAGES}`` and ``cfg.SEED``;
    ``CATEGORIES`` is resolved against ``categories`` (``all`` = no filter; unknown names fail with the closest)."""
    a = cfg.ACP
    spec = a.CATEGORIES
    if isinstance(spec, str) and spec.strip().lower() == "all":
        cat_ids = None
    else:
        cat_ids = tuple(categories.select(spec if isinstance(spec, str) else list(spec)))
    return Selection(select=str(a.SELECT), min_clis_i=float(a.MIN_CLIS_I), min_clis_l=float(a.MIN_CLIS_L),
                     category_ids=cat_ids, max_images=int(a.MAX_IMAGES), seed=max(0, int(cfg.SEED)))


@dataclass
class SelectionResult:
    """Kept samples and instances over one or more caches.

    Kept sample ``k`` is row ``sample_row[k]`` of cache ``cache_index[k]``; its kept instances are
    ``inst_offsets[k]:inst_offsets[k + 1]`` in the ``inst_*`` arrays: ``inst_row`` (row in that cache's instance
    columns), ``inst_local`` (position in the record's ``instances`` list), ``inst_category_id``. The instances of
    kept sample ``k`` that the rules removed (they stay in its pixels, unlabelled) are
    ``drop_offsets[k]:drop_offsets[k + 1]`` in the ``drop_*`` arrays, laid out the same way, with ``drop_reason``
    (``DROP_MIN_CLIS_I`` or ``DROP_CATEGORY``). ``stats`` counts what each rule removed. ``sample_mask``/``inst_mask``
    (per cache, over all rows) are filled when asked for.
    """

    cache_index: np.ndarray
    sample_row: np.ndarray
    inst_offsets: np.ndarray
    inst_row: np.ndarray
    inst_local: np.ndarray
    inst_category_id: np.ndarray
    selection: Selection
    drop_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    drop_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    drop_local: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    drop_category_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    drop_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    stats: dict[str, int] = field(default_factory=dict)
    sample_mask: list[np.ndarray] | None = None
    inst_mask: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.sample_row)

    def instances(self, k: int) -> slice:
        return slice(int(self.inst_offsets[k]), int(self.inst_offsets[k + 1]))

    def dropped(self, k: int) -> slice:
        """Kept sample ``k``'s dropped instances, as a slice of the ``drop_*`` arrays."""
        return slice(int(self.drop_offsets[k]), int(self.drop_offsets[k + 1]))

    def category_ids(self, k: int) -> np.ndarray:
        """Category ids of kept sample ``k``'s kept instances (with repeats)."""
        return self.inst_category_id[self.instances(k)]

    def sample_category_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique ``(kept sample position, category id)`` pairs, sorted by sample: what repeat factors and
        class-balanced sampling need (which categories each image contains)."""
        counts = np.diff(self.inst_offsets)
        pos = np.repeat(np.arange(len(self), dtype=np.int64), counts)
        if not len(pos):
            return pos, self.inst_category_id.astype(np.int64)
        combo = np.unique(pos * (1 << 20) + self.inst_category_id.astype(np.int64))
        return combo >> 20, combo & ((1 << 20) - 1)

    def category_image_counts(self, num_categories: int) -> np.ndarray:
        """Kept images containing each category; index ``id - 1``."""
        _, cats = self.sample_category_pairs()
        return np.bincount(cats - 1, minlength=num_categories)[:num_categories] if len(cats) else \
            np.zeros(num_categories, dtype=np.int64)


def _one_per_unit(key_hash: np.ndarray, order_key: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mask of the sample with the smallest ``order_key`` in each unit (same ``key_hash``) among ``valid`` ones."""
    idx = np.flatnonzero(valid)
    if not len(idx):
        return np.zeros(len(valid), dtype=bool)
    order = idx[np.lexsort((order_key[idx], key_hash[idx]))]
    kh = key_hash[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = kh[1:] != kh[:-1]
    out = np.zeros(len(valid), dtype=bool)
    out[order[first]] = True
    return out


def _passes(score: np.ndarray, threshold: float) -> np.ndarray:
    """Score >= threshold; unscored (NaN) passes only a threshold of 0."""
    with np.errstate(invalid="ignore"):
        ok = score >= threshold
    if threshold <= 0:
        ok |= np.isnan(score)
    return ok


class IndexColumns:
    """Index columns held in memory that ``select`` accepts like a ``CacheReader`` (tests, benchmarks, tools that
    filter columns they built themselves). Needs ``key_hash``, ``candidate_idx``, ``selected``, ``clis_l``,
    ``inst_count``, ``inst_category_id`` and ``inst_clis_i``."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.columns[name])

    def __len__(self) -> int:
        return len(self.columns["key_hash"])

    @property
    def num_instances(self) -> int:
        return len(self.columns["inst_category_id"])


def _warn_starved(cids: np.ndarray, considered: np.ndarray, kept: np.ndarray, min_clis_i: float,
                  categories: Any) -> int:
    """Warn about categories the instance threshold nearly empties (>= 10 instances considered, under a quarter kept
    and under half the overall kept share): their scorer scores even good instances low, so the threshold removes
    their synthetic data rather than its failures. Returns how many categories were named."""
    if not considered.any():
        return 0
    c = cids.astype(np.int64).clip(0)
    n_con = np.bincount(c[considered], minlength=int(c.max()) + 1)
    n_kept = np.bincount(c[kept], minlength=len(n_con))
    overall = n_kept.sum() / max(n_con.sum(), 1)
    share = n_kept / np.maximum(n_con, 1)
    bad = np.flatnonzero((n_con >= 10) & (share < 0.25) & (share < 0.5 * overall))
    if len(bad):
        from ..categories import CategoryError

        def name(i: int) -> str:
            try:
                return f"{categories[int(i)].name} ({n_kept[i]}/{n_con[i]})"
            except (TypeError, CategoryError):  # IndexColumns carry no table; an id outside the table
                return f"id {int(i)} ({n_kept[i]}/{n_con[i]})"
        logger.warning("MIN_CLIS_I %g keeps under a quarter of the instances of %d categor%s (kept/considered; %.0f%% "
                       "overall): %s. The scorer rates even good instances of these low; check them in `acp-data "
                       "inspect` and consider a lower threshold or another scorer.", min_clis_i, len(bad),
                       "y" if len(bad) == 1 else "ies", 100 * overall, ", ".join(name(i) for i in bad[:10]))
    return int(len(bad))


def select(readers: CacheReader | IndexColumns | Sequence[CacheReader | IndexColumns],
           selection: Selection | None = None, return_masks: bool = False) -> SelectionResult:
    """Apply ``selection`` (default: ``Selection()``) to the caches; see the module docstring for the rules."""
    sel = selection or Selection()
    readers = [readers] if hasattr(readers, "column") else list(readers)
    cols = {n: [] for n in ("key_hash", "candidate_idx", "selected", "clis_l", "inst_count")}
    icols = {n: [] for n in ("inst_category_id", "inst_clis_i")}
    sizes, isizes = [], []
    for r in readers:
        for n in cols:
            cols[n].append(r.column(n))
        for n in icols:
            icols[n].append(r.column(n))
        sizes.append(len(r))
        isizes.append(r.num_instances)
    cat = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in {**cols, **icols}.items()}
    kh = cat["key_hash"].astype(np.uint64)
    ci = cat["candidate_idx"].astype(np.int64)
    count = cat["inst_count"].astype(np.int64)
    n, m = len(kh), len(cat["inst_category_id"])
    stats: dict[str, int] = {"samples": n, "instances": m}

    # 1. duplicates
    keep = np.ones(n, dtype=bool)
    if n:
        order = np.lexsort((np.arange(n), ci, kh))
        dup = (kh[order][1:] == kh[order][:-1]) & (ci[order][1:] == ci[order][:-1])
        keep[order[1:][dup]] = False
    stats["duplicates"] = int(n - keep.sum())
    if stats["duplicates"]:
        logger.warning("%d duplicate samples (same key and candidate) ignored", stats["duplicates"])
    stats["units"] = int(len(np.unique(kh[keep]))) if n else 0

    # 2. candidates per unit
    if sel.select != "clis" and n and stats["units"] == int(keep.sum()) and cat["selected"][keep].astype(bool).all():
        logger.warning("ACP.SELECT %r on caches that hold only each unit's selected candidate (built with `keep: "
                       "selected`?): it picks the same images as 'clis'. Random, first-candidate or unfiltered "
                       "comparisons need a cache built with `keep: all`.", sel.select)
    if sel.select == "clis":
        keep &= cat["selected"].astype(bool)
    elif sel.select == "first":
        keep = _one_per_unit(kh, ci, keep)
    elif sel.select == "random":
        keep = _one_per_unit(kh, candidate_hash(sel.seed, kh, ci, salt=1), keep)
    stats["after_select"] = int(keep.sum())

    # 3. CLIS-L on samples
    keep &= _passes(cat["clis_l"], sel.min_clis_l)
    stats["after_min_clis_l"] = int(keep.sum())

    # 3-4. instances
    inst_sample = np.repeat(np.arange(n, dtype=np.int64), count)
    inst_keep = keep[inst_sample]
    considered = int(inst_keep.sum())
    inst_keep &= _passes(cat["inst_clis_i"], sel.min_clis_i)
    below_i = ~inst_keep  # (only meaningful where the sample is kept)
    stats["dropped_min_clis_i"] = considered - int(inst_keep.sum())
    stats["starved_categories"] = _warn_starved(cat["inst_category_id"], keep[inst_sample], inst_keep, sel.min_clis_i,
                                                getattr(readers[0], "categories", None) if readers else None)
    if sel.category_ids is not None:
        before = int(inst_keep.sum())
        cids = cat["inst_category_id"].astype(np.int64)
        lut = np.zeros(max(int(cids.max(initial=0)), max(sel.category_ids, default=0)) + 2, dtype=bool)
        lut[[c for c in sel.category_ids if c >= 0]] = True
        inst_keep &= lut[np.clip(cids, 0, len(lut) - 1)]
        stats["dropped_categories"] = before - int(inst_keep.sum())
    else:
        stats["dropped_categories"] = 0

    # 5. samples without instances
    kept_per_sample = np.bincount(inst_sample[inst_keep], minlength=n)
    before = int(keep.sum())
    keep &= kept_per_sample > 0
    stats["empty_skipped"] = before - int(keep.sum())

    # 6. cap
    stats["capped"] = 0
    if sel.max_images and int(keep.sum()) > sel.max_images:
        idx = np.flatnonzero(keep)
        prio = candidate_hash(sel.seed, kh[idx], ci[idx], salt=2)
        chosen = idx[np.lexsort((ci[idx], kh[idx], prio))[: sel.max_images]]
        stats["capped"] = int(keep.sum()) - sel.max_images
        keep[:] = False
        keep[chosen] = True
    inst_keep &= keep[inst_sample]
    stats["kept_samples"] = int(keep.sum())
    stats["kept_instances"] = int(inst_keep.sum())

    # result arrays
    bounds = np.cumsum([0, *sizes])
    ibounds = np.cumsum([0, *isizes])
    kept = np.flatnonzero(keep)
    cache_index = (np.searchsorted(bounds, kept, side="right") - 1).astype(np.int32)
    kept_inst = np.flatnonzero(inst_keep)
    inst_start = np.zeros(n, dtype=np.int64)
    if n:
        inst_start[1:] = np.cumsum(count[:-1])
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(inst_sample[kept_inst], minlength=n)[kept])
    inst_cache = np.searchsorted(ibounds, kept_inst, side="right") - 1
    drop_inst = np.flatnonzero(keep[inst_sample] & ~inst_keep)
    drop_offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    drop_offsets[1:] = np.cumsum(np.bincount(inst_sample[drop_inst], minlength=n)[kept])
    drop_cache = np.searchsorted(ibounds, drop_inst, side="right") - 1
    result = SelectionResult(
        cache_index=cache_index,
        sample_row=(kept - bounds[cache_index]).astype(np.int64),
        inst_offsets=offsets,
        inst_row=(kept_inst - ibounds[inst_cache]).astype(np.int64),
        inst_local=(kept_inst - inst_start[inst_sample[kept_inst]]).astype(np.int32),
        inst_category_id=cat["inst_category_id"][kept_inst].astype(np.int32),
        selection=sel,
        drop_offsets=drop_offsets,
        drop_row=(drop_inst - ibounds[drop_cache]).astype(np.int64),
        drop_local=(drop_inst - inst_start[inst_sample[drop_inst]]).astype(np.int32),
        drop_category_id=cat["inst_category_id"][drop_inst].astype(np.int32),
        drop_reason=np.where(below_i[drop_inst], DROP_MIN_CLIS_I, DROP_CATEGORY).astype(np.int8),
        stats=stats,
    )
    if return_masks:
        result.sample_mask = [keep[bounds[i]:bounds[i + 1]] for i in range(len(readers))]
        result.inst_mask = [inst_keep[ibounds[i]:ibounds[i + 1]] for i in range(len(readers))]
    return result
