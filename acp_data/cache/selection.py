"""Load-time selection over the index, vectorised (no Python loop over samples).

Order of the rules (the ``ACP.*`` keys of docs/design.md "detectron2 integration (contract)"; docs/cache.md "Python
API" says which keys act at prebuild time and which here):
1. duplicates of a ``(key, candidate_idx)`` (the same cache listed twice, two writers on one rank) keep one copy;
2. ``select`` picks candidates per work unit (units are grouped by generation key): ``clis`` recomputes the best of
   N from the stored scores with the load-time ``min_clis_l`` (``acp_data.clis.select.best_of_n``, the prebuild's
   own rule), ``stored`` takes the stored ``selected`` flag (what the prebuild or the last rescore chose, with their
   thresholds), ``random`` one candidate per unit drawn from a hash of ``(seed, key)``, ``first`` the lowest stored
   ``candidate_idx`` (candidate 0 when all candidates are stored), ``all`` every candidate, ``oracle`` (Shapes caches
   only) the candidate with the fewest objects the generator drew wrong (its recorded truth, acp_data/cache/truth.py;
   ties by a hash of ``(seed, key)``) and its wrongly drawn instances dropped like rule 5's;
3. ``min_clis_l`` drops samples (an unscored value passes only a threshold of 0);
4. ``category_ids`` with ``categories_apply_to="samples"`` (default) keeps the samples whose unit was drawn for one of
   those categories (its target, ``acp_data.cache.targets``); every instance of a kept sample keeps its label;
5. ``min_clis_i`` drops instances: ``absolute`` one threshold; ``per_category`` lowers it, per category, to the
   ``min_clis_i_quantile`` quantile of that category's scored instances in the candidates rules 1-3 kept (computed
   from the cache's scores, never from ground truth), so a category the scorer rates low everywhere keeps its best
   instances instead of being emptied; an unscored instance passes only a ``min_clis_i`` of 0;
6. ``category_ids`` with ``categories_apply_to="instances"`` keeps only instances of those categories (paste mode's
   pool: only the chosen categories' crops);
7. samples left with no instance are skipped (for ``clis`` this is the prebuild's rule "the best candidate has no
   instance left: the unit yields nothing", with no fall-back to the second best);
8. ``max_images`` (> 0) keeps that many samples chosen by a hash of ``(seed, key, candidate_idx)``: the same cache and
   seed give the same subset whatever order shards are listed in, and a larger cap keeps a superset.

Instances removed from a kept sample by rules 5 and 6 stay in its pixels; their positions are kept (``drop_*``) so
the mapper can apply ``ACP.DROPPED_INSTANCES`` to them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..clis.select import best_of_n
from ..rng import GOLDEN
from ..rng import mix64_array as mix64

if TYPE_CHECKING:
    from ..categories import CategoryTable
    from .reader import CacheReader

logger = logging.getLogger(__name__)

SELECT_MODES = ("clis", "stored", "random", "first", "all", "oracle")
MIN_CLIS_I_RULES = ("absolute", "per_category")
CATEGORIES_APPLY_TO = ("samples", "instances")
DROP_MIN_CLIS_I, DROP_CATEGORY, DROP_ORACLE = 0, 1, 2  # SelectionResult.drop_reason
DROP_REASONS = ("min_clis_i", "category", "generator_truth")
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


class SelectionError(ValueError):
    """Settings a cache cannot serve (the message names the ``ACP.*`` key and the cache)."""


@dataclass(frozen=True)
class Selection:
    """Load-time selection settings; the defaults are the paper's recipe (best of N by CLIS-I, instances >= 60, whole
    images: every instance of a kept image keeps its label)."""

    select: str = "clis"
    min_clis_i: float = 60.0
    min_clis_l: float = 0.0
    category_ids: tuple[int, ...] | None = None
    max_images: int = 0
    seed: int = 0
    min_clis_i_rule: str = "absolute"
    min_clis_i_quantile: float = 0.5
    categories_apply_to: str = "samples"

    def __post_init__(self) -> None:
        if self.select not in SELECT_MODES:
            raise ValueError(f"selection mode {self.select!r} is not one of {', '.join(SELECT_MODES)}")
        if self.min_clis_i_rule not in MIN_CLIS_I_RULES:
            raise ValueError(f"min_clis_i_rule {self.min_clis_i_rule!r} is not one of {', '.join(MIN_CLIS_I_RULES)}")
        if self.categories_apply_to not in CATEGORIES_APPLY_TO:
            raise ValueError(f"categories_apply_to {self.categories_apply_to!r} is not one of "
                             f"{', '.join(CATEGORIES_APPLY_TO)}")
        for name in ("min_clis_i", "min_clis_l"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 100.0:
                raise ValueError(f"{name} = {v} must be in [0, 100]")
        if not 0.0 <= float(self.min_clis_i_quantile) <= 1.0:
            raise ValueError(f"min_clis_i_quantile = {self.min_clis_i_quantile} must be in [0, 1]")
        if int(self.max_images) < 0:
            raise ValueError(f"max_images = {self.max_images} must be >= 0 (0 = all)")
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", tuple(sorted({int(c) for c in self.category_ids})))

    def to_dict(self) -> dict[str, Any]:
        return {"select": self.select, "min_clis_i": float(self.min_clis_i), "min_clis_l": float(self.min_clis_l),
                "min_clis_i_rule": self.min_clis_i_rule, "min_clis_i_quantile": float(self.min_clis_i_quantile),
                "category_ids": None if self.category_ids is None else list(self.category_ids),
                "categories_apply_to": self.categories_apply_to,
                "max_images": int(self.max_images), "seed": int(self.seed)}


ALL = Selection(select="all", min_clis_i=0.0, min_clis_l=0.0)


def selection_from_cfg(cfg: Any, categories: CategoryTable) -> Selection:
    """``Selection`` from ``cfg.ACP.{SELECT, MIN_CLIS_I, MIN_CLIS_I_RULE, MIN_CLIS_I_QUANTILE, MIN_CLIS_L,
    CATEGORIES, CATEGORIES_APPLY_TO, MAX_IMAGES}`` and ``cfg.SEED``; ``CATEGORIES`` is resolved against
    ``categories`` (``all`` = no filter; unknown names fail with the closest)."""
    a = cfg.ACP
    spec = a.CATEGORIES
    if isinstance(spec, str) and spec.strip().lower() == "all":
        cat_ids = None
    else:
        cat_ids = tuple(categories.select(spec if isinstance(spec, str) else list(spec)))
    return Selection(select=str(a.SELECT), min_clis_i=float(a.MIN_CLIS_I), min_clis_l=float(a.MIN_CLIS_L),
                     category_ids=cat_ids, max_images=int(a.MAX_IMAGES), seed=max(0, int(cfg.SEED)),
                     min_clis_i_rule=str(a.get("MIN_CLIS_I_RULE", "absolute")),
                     min_clis_i_quantile=float(a.get("MIN_CLIS_I_QUANTILE", 0.5)),
                     categories_apply_to=str(a.get("CATEGORIES_APPLY_TO", "samples")))


@dataclass
class SelectionResult:
    """Kept samples and instances over one or more caches.

    Kept sample ``k`` is row ``sample_row[k]`` of cache ``cache_index[k]``; its kept instances are
    ``inst_offsets[k]:inst_offsets[k + 1]`` in the ``inst_*`` arrays: ``inst_row`` (row in that cache's instance
    columns), ``inst_local`` (position in the record's ``instances`` list), ``inst_category_id``. The instances of
    kept sample ``k`` that the rules removed (they stay in its pixels, unlabelled) are
    ``drop_offsets[k]:drop_offsets[k + 1]`` in the ``drop_*`` arrays, laid out the same way, with ``drop_reason``
    (``DROP_MIN_CLIS_I`` or ``DROP_CATEGORY``). ``stats`` counts what each rule removed; ``warnings`` are the
    messages logged (starved categories, thresholds a cache cannot honour); ``min_clis_i_by_category`` (index
    ``id``; NaN where no instance was scored) is the threshold each category got under the ``per_category`` rule.
    ``sample_mask``/``inst_mask`` (per cache, over all rows) are filled when asked for.
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
    warnings: list[str] = field(default_factory=list)
    min_clis_i_by_category: np.ndarray | None = None
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
        return (score >= threshold) | (threshold <= 0)


class IndexColumns:
    """Index columns held in memory that ``select`` accepts like a ``CacheReader`` (tests, benchmarks, tools that
    filter columns they built themselves). Needs ``key_hash``, ``candidate_idx``, ``selected``, ``clis_l``,
    ``inst_count``, ``inst_category_id`` and ``inst_clis_i``; ``clis_i`` (image scores) for ``select="clis"``; an
    optional ``target`` column (without it a sample's target is its first instance's category)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise KeyError(f"IndexColumns has no column {name!r} (has {', '.join(sorted(self.columns))})")
        return np.asarray(self.columns[name])

    def targets(self) -> np.ndarray:
        if "target" in self.columns:
            return np.asarray(self.columns["target"], dtype=np.int32)
        count = self.column("inst_count").astype(np.int64)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        cats = self.column("inst_category_id")
        out = np.full(len(count), -1, dtype=np.int32)
        has = count > 0
        out[has] = cats[start[has]]
        return out

    def __len__(self) -> int:
        return len(self.columns["key_hash"])

    @property
    def num_instances(self) -> int:
        return len(self.columns["inst_category_id"])


def _targets(reader: CacheReader | IndexColumns) -> np.ndarray:
    if isinstance(reader, IndexColumns):
        return reader.targets()
    from .targets import sample_targets

    return sample_targets(reader)


def _category_name(categories: Any, i: int) -> str:
    from ..categories import CategoryError

    try:
        return str(categories[int(i)].name)
    except (TypeError, CategoryError, IndexError, KeyError):  # IndexColumns carry no table; an id outside the table
        return f"id {int(i)}"


def _starved(cids: np.ndarray, considered: np.ndarray, kept: np.ndarray, sel: Selection,
             categories: Any) -> tuple[int, str | None]:
    """``(count, warning)`` about categories the instance threshold nearly empties (>= 10 instances considered,
    under a quarter kept and under half the overall kept share): their scorer scores even good instances low, so the
    threshold removes their synthetic data rather than its failures."""
    if not considered.any():
        return 0, None
    c = cids.astype(np.int64).clip(0)
    n_con = np.bincount(c[considered], minlength=int(c.max()) + 1)
    n_kept = np.bincount(c[kept], minlength=len(n_con))
    overall = n_kept.sum() / max(n_con.sum(), 1)
    share = n_kept / np.maximum(n_con, 1)
    bad = np.flatnonzero((n_con >= 10) & (share < 0.25) & (share < 0.5 * overall))
    if not len(bad):
        return 0, None
    names = ", ".join(f"{_category_name(categories, i)} ({n_kept[i]}/{n_con[i]})" for i in bad[:10])
    hint = ("check them in `acp-data inspect` and consider ACP.MIN_CLIS_I_RULE per_category (a threshold per "
            "category from its own scores), a lower threshold or another scorer" if sel.min_clis_i_rule == "absolute"
            else "check them in `acp-data inspect` and consider another scorer")
    return int(len(bad)), (f"MIN_CLIS_I {sel.min_clis_i:g} ({sel.min_clis_i_rule}) keeps under a quarter of the instances of "
            f"{len(bad)} categor{'y' if len(bad) == 1 else 'ies'} (kept/considered; {100 * overall:.0f}% overall): "
            f"{names}. The scorer rates even good instances of these low; {hint}.")


def per_category_thresholds(cids: np.ndarray, scores: np.ndarray, min_clis_i: float, quantile: float,
                            num_ids: int) -> np.ndarray:
    """Per-category CLIS-I thresholds (index ``id``; NaN for a category without a scored instance):
    ``min(min_clis_i, q-quantile of the category's scored instances)`` (linear interpolation, as ``np.quantile``).
    The threshold never exceeds the category's best score, so a category with a scored instance keeps at least one."""
    out = np.full(max(num_ids, 1), np.nan)
    ok = ~np.isnan(scores)
    c, v = cids[ok].astype(np.int64), scores[ok].astype(np.float64)
    if not len(c):
        return out
    order = np.lexsort((v, c))
    c, v = c[order], v[order]
    ids, start, n = np.unique(c, return_index=True, return_counts=True)
    pos = quantile * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    q = v[start + lo] + (v[start + hi] - v[start + lo]) * frac
    q = np.minimum(q, v[start + n - 1])
    if len(out) <= ids.max():
        out = np.concatenate([out, np.full(int(ids.max()) + 1 - len(out), np.nan)])
    out[ids] = np.minimum(float(min_clis_i), q)
    return out


def honour_warnings(readers: Sequence[Any], sel: Selection) -> list[str]:
    """Messages for caches that cannot honour the load-time thresholds: built with ``keep: selected`` (only each
    unit's prebuild choice stored) under stricter prebuild thresholds than ``sel`` asks for (the manifest records the
    prebuild's ``selection``): the units those thresholds rejected were never stored."""
    out = []
    for r in readers:
        mf = getattr(r, "manifest", None)
        if mf is None:
            continue
        store = (mf.generation or {}).get("store") or {}
        built = (mf.scoring or {}).get("selection") or {}
        if store.get("keep") != "selected" or not built:
            continue
        asks = {"min_clis_l": ("ACP.MIN_CLIS_L", float(sel.min_clis_l)),
                "min_clis_i": ("ACP.MIN_CLIS_I", float(sel.min_clis_i))}
        for key, (cfg_key, value) in asks.items():
            try:
                was = float(built.get(key, 0.0))
            except (TypeError, ValueError):
                continue
            looser = value < was or (key == "min_clis_i" and sel.min_clis_i_rule == "per_category" and was > 0)
            if looser:
                what = (f"{cfg_key} {value:g}" + (" with MIN_CLIS_I_RULE per_category (lower per-category thresholds)"
                                                  if key == "min_clis_i" and value >= was else ""))
                out.append(f"cache {r.cache_dir} was built with `keep: selected` and selection.{key} = {was:g}: "
                           f"units that failed it were never stored, so {what} cannot bring them back (the cache acts "
                           f"as {key} >= {was:g} for them). Rebuild with `keep: all` to select with looser "
                           "thresholds.")
    return out


def _oracle(readers: Sequence[Any], kh: np.ndarray, ci: np.ndarray, keep: np.ndarray,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``SELECT oracle``: per unit the candidate with the fewest failed objects (ties by a hash of ``(seed, key,
    candidate)``), and the failed flag of every instance; a cache without the generator's truth is an error."""
    from .truth import NO_TRUTH, sample_truth

    fails, flags = [], []
    for i, r in enumerate(readers):
        f, g = sample_truth(r)
        if len(f) and (f == NO_TRUTH).any():
            raise SelectionError(f"ACP.SELECT = 'oracle' needs the generator's truth of every sample (provenance."
                                 f"shapes_truth, recorded only by the Shapes generator), but cache "
                                 f"{getattr(r, 'cache_dir', i)} has {int((f == NO_TRUTH).sum())} of {len(f)} samples "
                                 "without it; oracle selection exists only for Shapes caches: choose another "
                                 "ACP.SELECT")
        fails.append(f)
        flags.append(g)
    fail = np.concatenate(fails).astype(np.uint64) if fails else np.zeros(0, np.uint64)
    order_key = (fail << np.uint64(40)) | (candidate_hash(seed, kh, ci, salt=3) >> np.uint64(24))
    return _one_per_unit(kh, order_key, keep), (np.concatenate(flags) if flags else np.zeros(0, dtype=bool))


def select(readers: CacheReader | IndexColumns | Sequence[CacheReader | IndexColumns],
           selection: Selection | None = None, return_masks: bool = False) -> SelectionResult:
    """Apply ``selection`` (default: ``Selection()``) to the caches; see the module docstring for the rules."""
    sel = selection or Selection()
    readers = [readers] if hasattr(readers, "column") else list(readers)
    names = ["key_hash", "candidate_idx", "selected", "clis_l", "inst_count"] + (["clis_i"] if sel.select == "clis"
                                                                                  else [])
    cols: dict[str, list[np.ndarray]] = {n: [] for n in names}
    icols: dict[str, list[np.ndarray]] = {n: [] for n in ("inst_category_id", "inst_clis_i")}
    sizes, isizes = [], []
    for r in readers:
        for n in cols:
            cols[n].append(r.column(n))
        for n in icols:
            icols[n].append(r.column(n))
        sizes.append(len(r))
        isizes.append(r.num_instances)
    cat = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in {**cols, **icols}.items()}
    categories = getattr(readers[0], "categories", None) if readers else None
    kh = cat["key_hash"].astype(np.uint64)
    ci = cat["candidate_idx"].astype(np.int64)
    count = cat["inst_count"].astype(np.int64)
    cids = cat["inst_category_id"].astype(np.int64)
    inst_scores = cat["inst_clis_i"].astype(np.float64)
    n, m = len(kh), len(cids)
    stats: dict[str, int] = {"samples": n, "instances": m}
    warnings: list[str] = []

    def warn(msg: str) -> None:
        logger.warning("%s", msg)
        warnings.append(msg)

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
    for msg in honour_warnings(readers, sel):
        warn(msg)

    # 2. candidates per unit
    if sel.select not in ("clis", "stored") and n and stats["units"] == int(keep.sum()) \
            and cat["selected"][keep].astype(bool).all():
        warn(f"ACP.SELECT {sel.select!r} on caches that hold only each unit's selected candidate (built with `keep: "
             "selected`?): it picks the same images as 'clis'. Random, first-candidate or unfiltered comparisons need "
             "a cache built with `keep: all`.")
    if sel.select == "clis":
        idx = np.flatnonzero(keep)
        keep[:] = False
        keep[idx[best_of_n(kh[idx], ci[idx], cat["clis_i"][idx], cat["clis_l"][idx], sel.min_clis_l)]] = True
    elif sel.select == "stored":
        keep &= cat["selected"].astype(bool)
    elif sel.select == "first":
        keep = _one_per_unit(kh, ci, keep)
    elif sel.select == "random":
        keep = _one_per_unit(kh, candidate_hash(sel.seed, kh, ci, salt=1), keep)
    inst_failed = np.zeros(m, dtype=bool)
    if sel.select == "oracle":
        keep, inst_failed = _oracle(readers, kh, ci, keep, sel.seed)
    stats["after_select"] = int(keep.sum())

    # 3. CLIS-L on samples
    keep &= _passes(cat["clis_l"], sel.min_clis_l)
    stats["after_min_clis_l"] = int(keep.sum())

    inst_sample = np.repeat(np.arange(n, dtype=np.int64), count)
    ibounds_all = np.cumsum([0, *isizes])
    considered_for_rule = keep[inst_sample]
    lut = None
    if sel.category_ids is not None:
        lut = np.zeros(max(int(cids.max(initial=0)), max(sel.category_ids, default=0)) + 2, dtype=bool)
        lut[[c for c in sel.category_ids if c >= 0]] = True

    # 4. CATEGORIES on samples (by the unit's target)
    stats["dropped_target_samples"] = 0
    if lut is not None and sel.categories_apply_to == "samples":
        targets = np.concatenate([_targets(r) for r in readers]).astype(np.int64) if readers else np.zeros(0, int)
        unknown = int((keep & (targets < 0)).sum())
        if unknown:
            warn(f"{unknown} samples have no readable target concept (damaged records?); ACP.CATEGORIES skips them")
        before = int(keep.sum())
        keep &= lut[np.clip(targets, 0, len(lut) - 1)] & (targets >= 0)
        stats["dropped_target_samples"] = before - int(keep.sum())

    # 5. CLIS-I on instances
    thresholds = None
    if sel.min_clis_i_rule == "per_category":
        for i, r in enumerate(readers):
            if isizes[i] and np.isnan(inst_scores[ibounds_all[i]:ibounds_all[i + 1]]).all():
                raise SelectionError(f"ACP.MIN_CLIS_I_RULE = 'per_category' needs per-instance CLIS-I scores, but "
                                     f"cache {getattr(r, 'cache_dir', i)} has none (built without a scorer?); score "
                                     "it with `acp-data rescore` or use MIN_CLIS_I_RULE absolute")
        thresholds = per_category_thresholds(cids[considered_for_rule], inst_scores[considered_for_rule],
                                             sel.min_clis_i, sel.min_clis_i_quantile, int(cids.max(initial=0)) + 1)
        thr = np.where(np.isnan(thresholds), sel.min_clis_i, thresholds)[np.clip(cids, 0, len(thresholds) - 1)]
        with np.errstate(invalid="ignore"):
            passes_i = (inst_scores >= thr) | (sel.min_clis_i <= 0)
    else:
        passes_i = _passes(inst_scores, sel.min_clis_i)
    inst_keep = keep[inst_sample]
    considered = int(inst_keep.sum())
    inst_keep &= passes_i
    stats["dropped_min_clis_i"] = considered - int(inst_keep.sum())
    if sel.select == "oracle":
        before = int(inst_keep.sum())
        inst_keep &= ~inst_failed
        stats["dropped_oracle"] = before - int(inst_keep.sum())
    stats["starved_categories"], starved = _starved(cids, keep[inst_sample], inst_keep, sel, categories)
    if starved:
        warn(starved)

    # 6. CATEGORIES on instances
    stats["dropped_categories"] = 0
    if lut is not None and sel.categories_apply_to == "instances":
        before = int(inst_keep.sum())
        inst_keep &= lut[np.clip(cids, 0, len(lut) - 1)]
        stats["dropped_categories"] = before - int(inst_keep.sum())

    # 7. samples without instances
    kept_per_sample = np.bincount(inst_sample[inst_keep], minlength=n)
    before = int(keep.sum())
    keep &= kept_per_sample > 0
    stats["empty_skipped"] = before - int(keep.sum())

    # 8. cap
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
    inst_start = np.zeros(n, dtype=np.int64)
    if n:
        inst_start[1:] = np.cumsum(count[:-1])

    def csr(which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(inst_sample[which], minlength=n)[kept])
        cache = np.searchsorted(ibounds, which, side="right") - 1
        return offsets, (which - ibounds[cache]).astype(np.int64), (which - inst_start[inst_sample[which]]).astype(
            np.int32)

    kept_inst = np.flatnonzero(inst_keep)
    drop_inst = np.flatnonzero(keep[inst_sample] & ~inst_keep)
    offsets, inst_row, inst_local = csr(kept_inst)
    drop_offsets, drop_row, drop_local = csr(drop_inst)
    result = SelectionResult(
        cache_index=cache_index, sample_row=(kept - bounds[cache_index]).astype(np.int64),
        inst_offsets=offsets, inst_row=inst_row, inst_local=inst_local,
        inst_category_id=cids[kept_inst].astype(np.int32), selection=sel,
        drop_offsets=drop_offsets, drop_row=drop_row, drop_local=drop_local,
        drop_category_id=cids[drop_inst].astype(np.int32),
        drop_reason=np.where(inst_failed[drop_inst] & passes_i[drop_inst], DROP_ORACLE,
                             np.where(passes_i[drop_inst], DROP_CATEGORY, DROP_MIN_CLIS_I)).astype(np.int8),
        stats=stats, warnings=warnings, min_clis_i_by_category=thresholds,
    )
    if return_masks:
        result.sample_mask = [keep[bounds[i]:bounds[i + 1]] for i in range(len(readers))]
        result.inst_mask = [inst_keep[ibounds[i]:ibounds[i + 1]] for i in range(len(readers))]
    return result
