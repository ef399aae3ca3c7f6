"""Data priors: per-category box statistics, co-occurrence counts and subject-object box-pair pools.

Built by ``acp-data priors build --ann JSON [--relations FILE] --out FILE`` from any LVIS/COCO-format json, and read
by the ``prior`` planner (combinations, layouts), CLIS-L (reference pairs) and paste mode (object scale).

**Relation buckets.** LVIS has no relation phrases, so a box pair gets a bucket from geometry
(:func:`geometric_bucket`); phrase-annotated pairs (``--relations``) get one from a small lexicon
(:func:`relation_bucket`). Both functions are the single source of the bucket vocabulary for the planner and CLIS-L.

**Sampling caps (seeded, deterministic for a given input and seed).** Per image, the ordered pairs of its boxes
(``n * (n - 1)`` for ``n`` boxes) are all kept when there are at most ``max_pairs_per_image`` of them, else that many
are drawn uniformly without replacement. Per pool (subject, object, bucket), at most ``max_refs_per_pool`` pairs are
kept, drawn uniformly without replacement. Each bucket also keeps a category-independent pool of at most
``max_refs_per_bucket`` pairs drawn uniformly from the kept pairs of that bucket (the CLIS-L back-off). One
``numpy.random.Generator(PCG64(seed))`` draws, in this order: per-image samples (images in ascending id order), one
uniform key per pair for the pool cap, the bucket pools.

**File format (no pickle).** One ``.npz`` holding numeric arrays and ``header``, a uint8 array with UTF-8 JSON: format
name and version, the CategoryTable, the build settings and counts. Written to a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .categories import Category, CategoryError, CategoryTable, frequency_from_count, normalize_name
from .fsio import atomic_write

logger = logging.getLogger(__name__)

FORMAT_NAME = "acp-priors"
FORMAT_VERSION = 1

BUCKETS: tuple[str, ...] = ("above", "below", "left_of", "right_of", "inside", "overlapping", "next_to")
BUCKET_INDEX: dict[str, int] = {b: i for i, b in enumerate(BUCKETS)}
# A natural phrase per bucket (what the prior planner writes into a scene graph); relation_bucket maps it back.
BUCKET_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left_of": "to the left of",
    "right_of": "to the right of",
    "inside": "on",
    "overlapping": "with",
    "next_to": "next to",
}
# Buckets whose relation holds both ways (R(a, b) <=> R(b, a)): CLIS-L also tries each reference with its subject and
# object swapped and keeps the better score.
SYMMETRIC_BUCKETS: frozenset[str] = frozenset({"next_to", "overlapping"})

# Geometry thresholds of geometric_bucket (documented there).
INSIDE_MIN_IOA = 0.9
OVERLAP_MIN_IOMIN = 0.5
NEXT_TO_MAX_GAP = 0.25

# Relation lexicon: bucket -> phrases. A phrase matches when its normalised form equals one of these, else the
# longest of these that occurs in it as whole words wins ("sitting on top of" -> "on top of" -> above).
RELATION_LEXICON: dict[str, tuple[str, ...]] = {
    "above": ("above", "over", "on top of", "atop", "on the top of", "higher than", "up from", "hanging above",
              "flying over", "flying above", "hovering over", "floating above"),
    "below": ("below", "under", "underneath", "beneath", "lower than", "hanging from", "hanging below",
              "down from", "at the bottom of", "under the"),
    "left_of": ("left of", "to the left of", "on the left of", "on the left side of", "at the left of",
                "left to", "on left of", "left side of"),
    "right_of": ("right of", "to the right of", "on the right of", "on the right side of", "at the right of",
                 "right to", "on right of", "right side of"),
    "inside": ("inside", "in", "inside of", "within", "on", "onto", "upon", "into", "in the middle of", "part of",
               "attached to", "mounted on", "printed on", "painted on", "written on", "hanging on", "sitting on",
               "sitting in", "standing on", "standing in", "lying on", "lying in", "parked on", "resting on",
               "placed on", "contained in", "filled with", "on the surface of"),
    "overlapping": ("overlapping", "overlapping with", "overlaps", "with", "has", "have", "having", "holding",
                    "holds", "wearing", "wears", "carrying", "carries", "riding", "rides", "covering", "covered by",
                    "in front of", "behind", "touching", "against", "eating", "using", "playing with", "occluding",
                    "occluded by", "across", "around", "surrounding", "surrounded by", "crossing"),
    "next_to": ("next to", "next", "beside", "besides", "near", "nearby", "by", "alongside", "along", "close to",
                "adjacent to", "side by side with", "leaning on", "leaning against", "neighbouring", "neighboring",
                "beside of", "at"),
}
_LEXICON: dict[str, str] = {}
for _b, _phrases in RELATION_LEXICON.items():
    for _p in (*_phrases, _b.replace("_", " ")):
        _LEXICON.setdefault(_p, _b)
_LEXICON_BY_LENGTH = sorted(_LEXICON, key=lambda p: (-len(p.split()), -len(p)))
_FILLER = {"the", "a", "an", "is", "are", "be", "being", "was", "were", "it", "its", "of"}


class PriorsError(ValueError):
    """A priors file or a build input that cannot be used; the message names the file, key or value."""


# ----- buckets ------------------------------------------------------------------------------------------------------
def _normalize_phrase(phrase: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", normalize_name(phrase)).split())


@functools.lru_cache(maxsize=8192)
def relation_bucket(phrase: str) -> str | None:
    """Bucket of a relation phrase through the lexicon, or None when no lexicon phrase occurs in it.

    Case, underscores and punctuation are ignored; the exact phrase wins, then the phrase without articles and
    auxiliaries ("is on the left of" -> "on left of"), then the longest lexicon phrase contained as whole words.
    Bucket names map to themselves ("left_of" -> left_of).
    """
    p = _normalize_phrase(phrase)
    if not p:
        return None
    if p in _LEXICON:
        return _LEXICON[p]
    words = p.split()
    core = " ".join(w for w in words if w not in _FILLER)
    if core in _LEXICON:
        return _LEXICON[core]
    padded = f" {p} "
    for cand in _LEXICON_BY_LENGTH:
        if f" {cand} " in padded:
            return _LEXICON[cand]
    padded = f" {core} "
    for cand in _LEXICON_BY_LENGTH:
        if f" {cand} " in padded:
            return _LEXICON[cand]
    return None


def geometric_buckets(subj_xywh: np.ndarray, obj_xywh: np.ndarray) -> np.ndarray:
    """Vectorised :func:`geometric_bucket`: (n, 4) and (n, 4) XYWH boxes -> (n,) int bucket indices into BUCKETS."""
    s = np.asarray(subj_xywh, dtype=np.float64).reshape(-1, 4)
    o = np.asarray(obj_xywh, dtype=np.float64).reshape(-1, 4)
    sw, sh, ow, oh = s[:, 2], s[:, 3], o[:, 2], o[:, 3]
    ix = np.clip(np.minimum(s[:, 0] + sw, o[:, 0] + ow) - np.maximum(s[:, 0], o[:, 0]), 0, None)
    iy = np.clip(np.minimum(s[:, 1] + sh, o[:, 1] + oh) - np.maximum(s[:, 1], o[:, 1]), 0, None)
    inter = ix * iy
    area_s, area_o = sw * sh, ow * oh
    with np.errstate(divide="ignore", invalid="ignore"):
        ioa_s = np.where(area_s > 0, inter / area_s, 0.0)
        io_min = np.where(np.minimum(area_s, area_o) > 0, inter / np.minimum(area_s, area_o), 0.0)
        dx = (o[:, 0] + ow / 2) - (s[:, 0] + sw / 2)
        dy = (o[:, 1] + oh / 2) - (s[:, 1] + sh / 2)
        half_w, half_h = (sw + ow) / 2, (sh + oh) / 2
        ndx = np.where(half_w > 0, dx / half_w, 0.0)
        ndy = np.where(half_h > 0, dy / half_h, 0.0)
    out = np.empty(len(s), dtype=np.int8)
    vertical = np.abs(ndy) >= np.abs(ndx)
    out[vertical] = np.where(ndy[vertical] > 0, BUCKET_INDEX["above"], BUCKET_INDEX["below"])
    horiz = ~vertical
    gap = np.abs(ndx) - 1.0  # horizontal gap between the boxes, in units of their mean width
    near = horiz & (gap <= NEXT_TO_MAX_GAP) & (np.abs(ndy) < 1.0)
    out[horiz] = np.where(ndx[horiz] > 0, BUCKET_INDEX["left_of"], BUCKET_INDEX["right_of"])
    out[near] = BUCKET_INDEX["next_to"]
    out[io_min >= OVERLAP_MIN_IOMIN] = BUCKET_INDEX["overlapping"]
    out[ioa_s >= INSIDE_MIN_IOA] = BUCKET_INDEX["inside"]
    return out


def geometric_bucket(box_s_xywh: Sequence[float], box_o_xywh: Sequence[float]) -> str:
    """The bucket of "subject S, object O" from their XYWH boxes (normalised or absolute: the rule only uses ratios
    along each axis, so scaling x and y independently never changes the answer). First rule that holds wins:

    1. ``inside``: at least 90 % of S's area lies in O (S inside / on O).
    2. ``overlapping``: the intersection covers at least 50 % of the smaller box.
    3. ``above`` / ``below``: the centre offset, measured in units of the boxes' mean half-height vertically and mean
       half-width horizontally (``ndy = dy / ((hS + hO) / 2)``, ``ndx`` likewise), is at least as large vertically
       as horizontally; S above O when S's centre is higher (``ndy > 0`` with ``dy = cyO - cyS``).
    4. ``next_to``: horizontally offset, the vertical extents overlap (``|ndy| < 1``) and the horizontal gap is at
       most 25 % of the mean width (``|ndx| - 1 <= 0.25``).
    5. ``left_of`` / ``right_of``: otherwise; S left of O when S's centre is further left.
    """
    return BUCKETS[int(geometric_buckets(np.asarray(box_s_xywh), np.asarray(box_o_xywh))[0])]


# ----- helpers ------------------------------------------------------------------------------------------------------
def _ordered_pairs(starts: np.ndarray, sizes: np.ndarray, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """All ordered index pairs (i, j) inside each group ``[start, start + size)``; with ``diagonal`` also i == j."""
    sizes = sizes.astype(np.int64)
    k = sizes * sizes if diagonal else sizes * (sizes - 1)
    total = int(k.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    g = np.repeat(np.arange(len(sizes)), k)
    q = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    n = sizes[g]
    if diagonal:
        i, j = q // n, q % n
    else:
        m = n - 1
        i, j = q // m, q % m
        j = j + (j >= i)
    base = starts.astype(np.int64)[g]
    return base + i, base + j


def _head_words(name: str) -> set[str]:
    """Head nouns of a category name: the last word with any parenthesised part removed ("car_(automobile)" -> car)."""
    n = re.sub(r"\([^)]*\)", " ", normalize_name(name))
    words = re.sub(r"[^a-z0-9 ]+", " ", n).split()
    return {words[-1]} if words else set()


# ----- the priors ---------------------------------------------------------------------------------------------------
class Priors:
    """Box statistics, co-occurrence and box-pair pools over a CategoryTable (ids 1..K; arrays indexed by id).

    ``pairs`` holds every reference pair as ``(subject XYWH, object XYWH)`` normalised by the image size, float32,
    sorted by pool key ``(subject * (K + 1) + object) * len(BUCKETS) + bucket``; ``pool_keys`` / ``pool_offsets`` give
    each pool's row range (binary search, no dict), ``bucket_refs`` / ``bucket_offsets`` the per-bucket back-off pools
    (row indices into ``pairs``). All arrays are read-only.
    """

    def __init__(self, categories: CategoryTable, size: np.ndarray, cooc: np.ndarray, pairs: np.ndarray,
                 pool_keys: np.ndarray, pool_offsets: np.ndarray, bucket_refs: np.ndarray,
                 bucket_offsets: np.ndarray, settings: dict[str, Any] | None = None, source: str = "") -> None:
        self.categories = categories
        self.settings = dict(settings or {})
        self.source = source
        k1 = len(categories) + 1
        where = source or "priors"
        checks = [
            (size.shape == (k1, 5), f"size has shape {size.shape}, expected {(k1, 5)}"),
            (cooc.shape == (k1, k1), f"cooc has shape {cooc.shape}, expected {(k1, k1)}"),
            (pairs.ndim == 2 and pairs.shape[1] == 8, f"pairs has shape {pairs.shape}, expected (P, 8)"),
            (pool_offsets.shape == (len(pool_keys) + 1,), "pool_offsets does not match pool_keys"),
            (len(pool_offsets) == 0 or (pool_offsets[0] == 0 and pool_offsets[-1] == len(pairs)),
             "pool_offsets does not cover pairs"),
            (bucket_offsets.shape == (len(BUCKETS) + 1,), "bucket_offsets does not match BUCKETS"),
            (bucket_offsets[-1] == len(bucket_refs), "bucket_offsets does not cover bucket_refs"),
            (len(pool_keys) < 2 or bool(np.all(np.diff(pool_keys) > 0)), "pool_keys are not strictly increasing"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PriorsError(f"{where}: {msg}")
        arrays = {"size": size.astype(np.float64, copy=False), "cooc": cooc.astype(np.int64, copy=False),
                  "pairs": pairs.astype(np.float32, copy=False), "pool_keys": pool_keys.astype(np.int64, copy=False),
                  "pool_offsets": pool_offsets.astype(np.int64, copy=False),
                  "bucket_refs": bucket_refs.astype(np.int64, copy=False),
                  "bucket_offsets": bucket_offsets.astype(np.int64, copy=False)}
        for a in arrays.values():
            a.flags.writeable = False
        self.size: np.ndarray = arrays["size"]
        self.cooc: np.ndarray = arrays["cooc"]
        self.pairs: np.ndarray = arrays["pairs"]
        self.pool_keys: np.ndarray = arrays["pool_keys"]
        self.pool_offsets: np.ndarray = arrays["pool_offsets"]
        self.bucket_refs: np.ndarray = arrays["bucket_refs"]
        self.bucket_offsets: np.ndarray = arrays["bucket_offsets"]
        self._similar: dict[int, tuple[int, ...]] | None = None

    # ----- lookups ------------------------------------------------------------------------------------------------
    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"Priors({len(self.categories)} categories, {self.num_pairs} reference pairs in "
                f"{len(self.pool_keys)} pools, source={self.source!r})")

    def _check_id(self, cid: int) -> int:
        cid = int(cid)
        if not 1 <= cid <= len(self.categories):
            raise CategoryError(f"category id {cid} is outside 1..{len(self.categories)} of {self.source or 'priors'}")
        return cid

    def pool_key(self, subject_id: int, object_id: int, bucket: str | int) -> int:
        b = bucket if isinstance(bucket, (int, np.integer)) else _bucket_index(bucket)
        k1 = len(self.categories) + 1
        return (self._check_id(subject_id) * k1 + self._check_id(object_id)) * len(BUCKETS) + int(b)

    def _key_range(self, lo_key: int, hi_key: int) -> tuple[int, int]:
        """Rows of ``pairs`` whose pool key is in [lo_key, hi_key)."""
        a, b = np.searchsorted(self.pool_keys, [lo_key, hi_key])
        return int(self.pool_offsets[a]), int(self.pool_offsets[b])

    def pool_range(self, subject_id: int, object_id: int, bucket: str | int | None) -> tuple[int, int]:
        """Row range of a pool in ``pairs``; ``bucket=None`` spans all buckets of (subject, object)."""
        if bucket is None:
            lo = self.pool_key(subject_id, object_id, 0)
            return self._key_range(lo, lo + len(BUCKETS))
        key = self.pool_key(subject_id, object_id, bucket)
        return self._key_range(key, key + 1)

    def pool(self, subject_id: int, object_id: int, bucket: str | None) -> np.ndarray:
        """(M, 8) float32 reference pairs ``(subject XYWH, object XYWH)``, normalised; read-only view."""
        a, b = self.pool_range(subject_id, object_id, bucket)
        return self.pairs[a:b]

    def pool_buckets(self, subject_id: int, object_id: int) -> dict[str, int]:
        """Bucket -> number of references of (subject, object), only buckets that have some."""
        lo = self.pool_key(subject_id, object_id, 0)
        a, b = np.searchsorted(self.pool_keys, [lo, lo + len(BUCKETS)])
        out: dict[str, int] = {}
        for g in range(a, b):
            out[BUCKETS[int(self.pool_keys[g] - lo)]] = int(self.pool_offsets[g + 1] - self.pool_offsets[g])
        return out

    def bucket_pool_rows(self, bucket: str | None) -> np.ndarray:
        """Row indices of the category-independent back-off pool of a bucket (all buckets for None)."""
        if bucket is None:
            return self.bucket_refs
        b = _bucket_index(bucket)
        return self.bucket_refs[self.bucket_offsets[b]:self.bucket_offsets[b + 1]]

    def bucket_pool(self, bucket: str | None) -> np.ndarray:
        return self.pairs[self.bucket_pool_rows(bucket)]

    def pools_rows(self, subject_ids: Iterable[int], object_ids: Iterable[int], bucket: str | None) -> np.ndarray:
        """Row indices of the pools (s, o, bucket) for every s in ``subject_ids``, o in ``object_ids`` (each pair of
        ids once, in pool-key order)."""
        s = np.unique(np.asarray(list(subject_ids), dtype=np.int64))  # sorted: ordered keys search faster
        o = np.unique(np.asarray(list(object_ids), dtype=np.int64))
        if not len(s) or not len(o):
            return np.zeros(0, dtype=np.int64)
        k1, nb = len(self.categories) + 1, len(BUCKETS)
        base = ((s[:, None] * k1 + o[None, :]) * nb).ravel()
        if bucket is None:
            lo, hi = base, base + nb
        else:
            lo = base + _bucket_index(bucket)
            hi = lo + 1
        a = self.pool_offsets[np.searchsorted(self.pool_keys, lo)]
        b = self.pool_offsets[np.searchsorted(self.pool_keys, hi)]
        lens = b - a
        if not lens.sum():
            return np.zeros(0, dtype=np.int64)
        return np.repeat(a - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))

    def similar_categories(self, category_id: int) -> tuple[int, ...]:
        """Other categories sharing a head noun with this one (over names and synonyms: "police car" ~ "car"), the
        CLIS-L back-off between an exact pool and the bucket over all categories."""
        if self._similar is None:
            by_head: dict[str, set[int]] = {}
            heads: dict[int, set[str]] = {}
            for c in self.categories:
                hs: set[str] = set()
                for n in (c.name, *c.synonyms):
                    hs |= _head_words(n)
                heads[c.id] = hs
                for h in hs:
                    by_head.setdefault(h, set()).add(c.id)
            self._similar = {cid: tuple(sorted(set().union(*(by_head[h] for h in hs)) - {cid})) if hs else ()
                             for cid, hs in heads.items()}
        return self._similar[self._check_id(category_id)]

    def size_stats(self, category_id: int) -> tuple[float, float, float, float] | None:
        """(mean, std of sqrt(box area / image area), mean, std of log(w / h)), population std; None without boxes."""
        row = self.size[self._check_id(category_id)]
        if row[0] <= 0:
            return None
        return float(row[1]), float(row[2]), float(row[3]), float(row[4])

    def box_count(self, category_id: int) -> int:
        return int(self.size[self._check_id(category_id), 0])

    def cooccurrence(self) -> np.ndarray:
        """(K+1, K+1) int64: number of images in which both categories appear (diagonal: images with the category;
        row and column 0 unused so ids index directly). Read-only."""
        return self.cooc

    def sample_pair(self, subject_id: int, object_id: int,
                    rng: np.random.Generator) -> tuple[str, np.ndarray, np.ndarray] | None:
        """A real (bucket, subject XYWH, object XYWH) of the two categories: a reference drawn uniformly from all
        their pools (so buckets come in their observed proportions); None when the pair was never seen."""
        a, b = self.pool_range(subject_id, object_id, None)
        if b <= a:
            return None
        row = int(rng.integers(a, b))
        g = int(np.searchsorted(self.pool_offsets, row, side="right") - 1)
        bucket = BUCKETS[int(self.pool_keys[g] % len(BUCKETS))]
        pair = np.array(self.pairs[row], dtype=np.float32)
        return bucket, pair[:4], pair[4:]

    # ----- persistence --------------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "buckets": list(BUCKETS),
                "categories": self.categories.to_dict(), "settings": self.settings}

    def save(self, path: str | os.PathLike) -> None:
        """Write the priors atomically to ``path`` (npz, no pickle)."""
        header = np.frombuffer(json.dumps(self.header(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        arrays = {"header": header, "size": self.size, "cooc": self.cooc, "pairs": self.pairs,
                  "pool_keys": self.pool_keys, "pool_offsets": self.pool_offsets, "bucket_refs": self.bucket_refs,
                  "bucket_offsets": self.bucket_offsets}
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Priors:
        p = Path(path)
        if not p.is_file():
            raise PriorsError(f"priors file {str(p)!r} does not exist (build it with `acp-data priors build`)")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise PriorsError(f"cannot read priors file {str(p)!r}: {e}") from e
        need = ("header", "size", "cooc", "pairs", "pool_keys", "pool_offsets", "bucket_refs", "bucket_offsets")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise PriorsError(f"priors file {str(p)!r} lacks arrays {missing}; is it an acp-data priors file?")
        try:
            header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PriorsError(f"priors file {str(p)!r}: unreadable header: {e}") from e
        if header.get("format") != FORMAT_NAME:
            raise PriorsError(f"priors file {str(p)!r}: format {header.get('format')!r}, expected {FORMAT_NAME!r}")
        if header.get("version") != FORMAT_VERSION:
            raise PriorsError(f"priors file {str(p)!r}: version {header.get('version')!r} is not supported "
                              f"(this acp-data reads version {FORMAT_VERSION}); rebuild it")
        if tuple(header.get("buckets", ())) != BUCKETS:
            raise PriorsError(f"priors file {str(p)!r}: buckets {header.get('buckets')} differ from {list(BUCKETS)}")
        table = CategoryTable.from_dict(header["categories"], source=f"{p} (priors)")
        return cls(table, settings=header.get("settings", {}), source=str(p), **arrays)

    # ----- building -----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, lvis_json: dict[str, Any] | str | os.PathLike,
              relations: str | os.PathLike | Iterable[dict[str, Any]] | None = None, seed: int = 0,
              max_pairs_per_image: int = 32, max_refs_per_pool: int = 500, max_refs_per_bucket: int = 5000,
              ) -> Priors:
        """Build priors from an LVIS/COCO-format json (path or loaded dict) and optional relation records.

        Crowd boxes and boxes without area (after clipping to the image) are skipped. COCO's non-contiguous category
        ids are mapped to 1..K in id order (the mapping is kept in ``settings["json_category_ids"]``). A cap of 0
        means no cap.
        """
        t0 = time.perf_counter()
        source = "json"
        if not isinstance(lvis_json, dict):
            source = str(lvis_json)
            try:
                with open(lvis_json) as f:
                    lvis_json = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise PriorsError(f"cannot read annotations {source!r}: {e}") from e
        data: dict[str, Any] = lvis_json
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise PriorsError(f"{source} has no {key!r} key; is it an LVIS/COCO-format json?")
        for name, v in (("max_pairs_per_image", max_pairs_per_image), ("max_refs_per_pool", max_refs_per_pool),
                        ("max_refs_per_bucket", max_refs_per_bucket)):
            if int(v) < 0:
                raise PriorsError(f"{name} = {v} must be >= 0 (0 = no cap)")
        rng = np.random.default_rng(seed)

        # --- images and annotations as arrays
        try:
            img_ids = np.fromiter((im["id"] for im in data["images"]), dtype=np.int64, count=len(data["images"]))
            img_wh = np.array([(im["width"], im["height"]) for im in data["images"]], dtype=np.float64).reshape(-1, 2)
        except KeyError as e:
            raise PriorsError(f"{source}: an entry of 'images' lacks the key {e}") from e
        order = np.argsort(img_ids, kind="stable")
        img_ids, img_wh = img_ids[order], img_wh[order]
        if len(img_ids) > 1 and np.any(np.diff(img_ids) == 0):
            dup = img_ids[np.flatnonzero(np.diff(img_ids) == 0)[0]]
            raise PriorsError(f"{source}: image id {int(dup)} appears twice in 'images'")
        if np.any(img_wh <= 0):
            bad = img_ids[np.flatnonzero(np.any(img_wh <= 0, axis=1))[0]]
            raise PriorsError(f"{source}: image {int(bad)} has a non-positive width or height")
        anns = data["annotations"]
        n = len(anns)
        try:
            a_img = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=n)
            a_cat = np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=n)
            a_crowd = np.fromiter((a.get("iscrowd", 0) for a in anns), dtype=np.int64, count=n)
            a_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
        except KeyError as e:
            raise PriorsError(f"{source}: an annotation lacks the key {e}") from e
        except ValueError as e:
            raise PriorsError(f"{source}: an annotation 'bbox' is not four numbers ({e})") from e

        table, cat_lut, json_ids = _table_from_json(data, source, a_img, a_cat)
        k = len(table)
        bad = (a_cat < 0) | (a_cat >= len(cat_lut)) | (cat_lut[np.clip(a_cat, 0, len(cat_lut) - 1)] == 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PriorsError(f"{source}: annotation {anns[i].get('id', i)} has category_id {int(a_cat[i])}, which "
                              "is not in 'categories'")
        cat = cat_lut[a_cat]
        pos = np.searchsorted(img_ids, a_img)
        found = (pos < len(img_ids)) & (img_ids[np.clip(pos, 0, len(img_ids) - 1)] == a_img)
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise PriorsError(f"{source}: annotation {anns[i].get('id', i)} refers to image {int(a_img[i])}, which "
                              "is not in 'images'")
        wh = img_wh[pos]
        x0 = np.clip(a_box[:, 0] / wh[:, 0], 0, 1)
        y0 = np.clip(a_box[:, 1] / wh[:, 1], 0, 1)
        x1 = np.clip((a_box[:, 0] + a_box[:, 2]) / wh[:, 0], 0, 1)
        y1 = np.clip((a_box[:, 1] + a_box[:, 3]) / wh[:, 1], 0, 1)
        box = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        keep = (a_crowd == 0) & np.isfinite(box).all(axis=1) & (box[:, 2] > 0) & (box[:, 3] > 0)
        skipped = int(n - keep.sum())
        # sort by image (stable: annotation order inside an image)
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(pos[idx], kind="stable")]
        img, cat, box = pos[idx], cat[idx], box[idx]
        logger.info("priors: %d boxes on %d images, %d categories (%d boxes skipped: crowd or no area)",
                    len(idx), len(img_ids), k, skipped)

        # --- per-category size and aspect statistics
        size = np.zeros((k + 1, 5), dtype=np.float64)
        cnt = np.bincount(cat, minlength=k + 1).astype(np.float64)
        s = np.sqrt(box[:, 2] * box[:, 3])
        asp = np.log(box[:, 2] * wh[idx, 0] / (box[:, 3] * wh[idx, 1]))  # aspect in pixels
        with np.errstate(invalid="ignore", divide="ignore"):
            for col, v in ((1, s), (3, asp)):
                mean = np.bincount(cat, weights=v, minlength=k + 1) / cnt
                var = np.bincount(cat, weights=v * v, minlength=k + 1) / cnt - mean * mean
                size[:, col] = np.nan_to_num(mean)
                size[:, col + 1] = np.sqrt(np.clip(np.nan_to_num(var), 0, None))
        size[:, 0] = cnt

        # --- co-occurrence: unique (image, category), then all ordered pairs inside each image (with the diagonal)
        uk = np.unique(img * (k + 1) + cat)
        u_img, u_cat = uk // (k + 1), uk % (k + 1)
        starts, sizes = _groups(u_img)
        ci, cj = _ordered_pairs(starts, sizes, diagonal=True)
        cooc = np.bincount(u_cat[ci] * (k + 1) + u_cat[cj], minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        cooc = cooc.astype(np.int64)

        # --- box pairs, capped per image
        starts, sizes = _groups(img)
        multi = sizes >= 2
        starts, sizes = starts[multi], sizes[multi]
        npairs = sizes * (sizes - 1)
        cap = int(max_pairs_per_image)
        small = np.ones(len(sizes), dtype=bool) if cap == 0 else npairs <= cap
        pi, pj = _ordered_pairs(starts[small], sizes[small], diagonal=False)
        big_i, big_j = [], []
        big = np.flatnonzero(~small)
        for g in big:
            q = rng.choice(int(npairs[g]), size=cap, replace=False)
            m = int(sizes[g]) - 1
            i, j = q // m, q % m
            j = j + (j >= i)
            big_i.append(starts[g] + i)
            big_j.append(starts[g] + j)
        if big_i:
            pi = np.concatenate([pi, *big_i])
            pj = np.concatenate([pj, *big_j])
        subj_box, obj_box = box[pi], box[pj]
        p_s, p_o = cat[pi], cat[pj]
        p_b = geometric_buckets(subj_box, obj_box).astype(np.int64)
        n_geo = len(pi)

        # --- phrase-annotated pairs
        rel_stats: dict[str, Any] = {}
        if relations is not None:
            r_s, r_o, r_b, r_sb, r_ob, rel_stats = read_relations(relations, table)
            subj_box = np.concatenate([subj_box, r_sb])
            obj_box = np.concatenate([obj_box, r_ob])
            p_s, p_o, p_b = np.concatenate([p_s, r_s]), np.concatenate([p_o, r_o]), np.concatenate([p_b, r_b])

        # --- pools, capped per pool by a uniform random key
        nb = len(BUCKETS)
        key = (p_s * (k + 1) + p_o) * nb + p_b
        u = rng.random(len(key))
        order = np.lexsort((u, key))
        key_sorted = key[order]
        g_starts, g_sizes = _groups(key_sorted)
        rank = np.arange(len(key_sorted)) - np.repeat(g_starts, g_sizes)
        keep = rank < max_refs_per_pool if max_refs_per_pool else np.ones(len(rank), dtype=bool)
        rows = order[keep]
        key_kept = key_sorted[keep]
        pairs = np.concatenate([subj_box[rows], obj_box[rows]], axis=1).astype(np.float32)
        pool_keys, counts = np.unique(key_kept, return_counts=True)
        pool_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        # --- per-bucket back-off pools (rows of `pairs`)
        bucket_of_row = key_kept % nb
        refs, offs = [], [0]
        for b in range(nb):
            r = np.flatnonzero(bucket_of_row == b)
            if max_refs_per_bucket and len(r) > max_refs_per_bucket:
                r = np.sort(rng.choice(r, size=max_refs_per_bucket, replace=False))
            refs.append(r)
            offs.append(offs[-1] + len(r))
        bucket_refs = np.concatenate(refs).astype(np.int64)
        bucket_offsets = np.asarray(offs, dtype=np.int64)

        settings = {
            "source": source, "seed": int(seed), "max_pairs_per_image": int(max_pairs_per_image),
            "max_refs_per_pool": int(max_refs_per_pool), "max_refs_per_bucket": int(max_refs_per_bucket),
            "num_images": int(len(img_ids)), "num_boxes": int(len(idx)), "skipped_boxes": skipped,
            "geometric_pairs": int(n_geo), "relation_pairs": int(len(key) - n_geo), "reference_pairs": int(len(pairs)),
            "pools": int(len(pool_keys)), "relations": rel_stats,
            "geometry": {"inside_min_ioa": INSIDE_MIN_IOA, "overlap_min_iomin": OVERLAP_MIN_IOMIN,
                         "next_to_max_gap": NEXT_TO_MAX_GAP},
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        if json_ids is not None:
            settings["json_category_ids"] = json_ids
        logger.info("priors: %d reference pairs in %d pools (from %d geometric + %d relation pairs) in %.1f s",
                    len(pairs), len(pool_keys), n_geo, len(key) - n_geo, settings["build_seconds"])
        return cls(table, size=size, cooc=cooc, pairs=pairs, pool_keys=pool_keys, pool_offsets=pool_offsets,
                   bucket_refs=bucket_refs, bucket_offsets=bucket_offsets, settings=settings, source=source)


def _bucket_index(bucket: str) -> int:
    try:
        return BUCKET_INDEX[bucket]
    except KeyError:
        raise PriorsError(f"unknown relation bucket {bucket!r}; buckets: {', '.join(BUCKETS)}") from None


def _groups(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_keys)) + 1]).astype(np.int64)
    sizes = np.diff(np.concatenate([starts, [len(sorted_keys)]])).astype(np.int64)
    return starts, sizes


def _table_from_json(data: dict[str, Any], source: str, a_img: np.ndarray,
                     a_cat: np.ndarray) -> tuple[CategoryTable, np.ndarray, list[int] | None]:
    """CategoryTable of the json (image counts computed vectorised when absent), a lookup json id -> table id, and
    the json ids in table order when they had to be remapped to 1..K (COCO)."""
    cats = sorted(data["categories"], key=lambda d: int(d["id"]))
    ids = [int(d["id"]) for d in cats]
    if not ids:
        raise PriorsError(f"{source}: 'categories' is empty")
    if len(set(ids)) != len(ids):
        raise PriorsError(f"{source}: duplicate category ids in 'categories'")
    contiguous = ids == list(range(1, len(ids) + 1))
    lut = np.zeros(max(max(ids), int(a_cat.max(initial=0))) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    mapped = np.where((a_cat >= 0) & (a_cat < len(lut)), lut[np.clip(a_cat, 0, len(lut) - 1)], 0)
    pairs = np.unique(a_img * (len(ids) + 1) + mapped)
    counts = np.bincount(pairs % (len(ids) + 1), minlength=len(ids) + 1)
    out = []
    for new_id, d in enumerate(cats, start=1):
        count = int(d["image_count"]) if "image_count" in d else int(counts[new_id])
        try:
            out.append(Category(id=new_id, name=str(d["name"]), synonyms=tuple(d.get("synonyms", ())),
                                definition=d.get("def", ""), frequency=d.get("frequency") or frequency_from_count(count),
                                image_count=count))
        except KeyError as e:
            raise PriorsError(f"{source}: category {d.get('id')} lacks the key {e}") from e
    try:
        table = CategoryTable(out, source=source)
    except CategoryError as e:
        raise PriorsError(str(e)) from e
    return table, lut, None if contiguous else ids


# ----- relations input ----------------------------------------------------------------------------------------------
RELATIONS_FORMAT = """\
Relations file: JSON lines, one annotated relation per line (Visual Genome relationships or Flickr30K Entities
phrase pairs converted to this form):

  {"subject": "dog", "object": "frisbee", "relation": "jumping over",
   "subject_bbox": [x, y, w, h], "object_bbox": [x, y, w, h], "width": 640, "height": 480}

- subject / object: category names or synonyms of the CategoryTable (case, spaces and underscores ignored);
- relation: a phrase, mapped to a bucket by the relation lexicon;
- boxes: XYWH in pixels of an image of the given width and height, or normalised to [0, 1] with "normalized": true
  (then width/height may be omitted);
- optional keys (image_id, ...) are ignored. Blank lines and lines starting with '#' are skipped.
Lines with unknown names or phrases outside the lexicon are skipped and counted; malformed lines are errors.
Relation pairs join the pools of their lexicon bucket; they are not capped per image, the per-pool cap applies.
"""


def read_relations(relations: str | os.PathLike | Iterable[dict[str, Any]], table: CategoryTable,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Parse relation records (see RELATIONS_FORMAT) into subject ids, object ids, bucket indices, normalised
    subject and object XYWH boxes (each (n, 4)), and counts of what was skipped."""
    if isinstance(relations, (str, os.PathLike)):
        src = str(relations)
        if not Path(src).is_file():
            raise PriorsError(f"relations file {src!r} does not exist")
        records: Iterable[tuple[str, dict[str, Any]]] = _jsonl(Path(src))
    else:
        src = "relations"
        records = ((f"{src}[{i}]", r) for i, r in enumerate(relations))
    s_ids, o_ids, b_ids, sb, ob = [], [], [], [], []
    unknown_names: Counter = Counter()
    unknown_phrases: Counter = Counter()
    bad_boxes = 0
    total = 0
    for where, r in records:
        total += 1
        for key in ("subject", "object", "relation", "subject_bbox", "object_bbox"):
            if key not in r:
                raise PriorsError(f"{where}: missing key {key!r}\n{RELATIONS_FORMAT}")
        try:
            boxes = np.array([r["subject_bbox"], r["object_bbox"]], dtype=np.float64).reshape(2, 4)
        except (TypeError, ValueError) as e:
            raise PriorsError(f"{where}: subject_bbox/object_bbox must be [x, y, w, h] numbers ({e})") from e
        if not r.get("normalized", False):
            if "width" not in r or "height" not in r:
                raise PriorsError(f"{where}: pixel boxes need 'width' and 'height' (or set \"normalized\": true)")
            w, h = float(r["width"]), float(r["height"])
            if w <= 0 or h <= 0:
                raise PriorsError(f"{where}: width/height must be positive, got {w} x {h}")
            boxes = boxes / np.array([w, h, w, h])
        ids = []
        for key in ("subject", "object"):
            try:
                ids.append(table.id_of(str(r[key])))
            except CategoryError:
                unknown_names[normalize_name(str(r[key]))] += 1
                ids.append(0)
        if 0 in ids:
            continue
        b = relation_bucket(str(r["relation"]))
        if b is None:
            unknown_phrases[_normalize_phrase(str(r["relation"]))] += 1
            continue
        x0 = np.clip(boxes[:, 0], 0, 1)
        y0 = np.clip(boxes[:, 1], 0, 1)
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, 1)
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, 1)
        nb = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        if not np.isfinite(nb).all() or (nb[:, 2:] <= 0).any():
            bad_boxes += 1
            continue
        s_ids.append(ids[0])
        o_ids.append(ids[1])
        b_ids.append(BUCKET_INDEX[b])
        sb.append(nb[0])
        ob.append(nb[1])
    used = len(s_ids)
    stats = {"source": src, "lines": total, "used": used, "unknown_names": int(sum(unknown_names.values())),
             "unknown_phrases": int(sum(unknown_phrases.values())), "bad_boxes": bad_boxes,
             "top_unknown_names": [n for n, _ in unknown_names.most_common(10)],
             "top_unknown_phrases": [p for p, _ in unknown_phrases.most_common(10)]}
    if total and used < total:
        logger.warning("relations %s: used %d of %d; skipped %d with unknown names (e.g. %s), %d with phrases outside "
                       "the lexicon (e.g. %s), %d without box area", src, used, total, stats["unknown_names"],
                       ", ".join(stats["top_unknown_names"][:5]) or "-", stats["unknown_phrases"],
                       ", ".join(stats["top_unknown_phrases"][:5]) or "-", bad_boxes)
    z4 = np.zeros((0, 4))
    return (np.asarray(s_ids, dtype=np.int64), np.asarray(o_ids, dtype=np.int64), np.asarray(b_ids, dtype=np.int64),
            np.asarray(sb, dtype=np.float64).reshape(-1, 4) if sb else z4,
            np.asarray(ob, dtype=np.float64).reshape(-1, 4) if ob else z4, stats)


def _jsonl(path: Path):
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise PriorsError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise PriorsError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{lineno}", rec


# ----- command line -------------------------------------------------------------------------------------------------
def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="acp-data priors", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a priors file from an LVIS/COCO-format json",
                       epilog=RELATIONS_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--ann", required=True, help="LVIS/COCO-format json (e.g. lvis_v1_train.json)")
    b.add_argument("--relations", default=None, help="optional JSON lines of phrase-annotated box pairs (see below)")
    b.add_argument("--out", required=True, help="output priors file (.npz)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-pairs-per-image", type=int, default=32, help="ordered box pairs kept per image (0 = all)")
    b.add_argument("--max-refs-per-pool", type=int, default=500,
                   help="reference pairs kept per (subject, object, bucket) pool (0 = all)")
    b.add_argument("--max-refs-per-bucket", type=int, default=5000,
                   help="size of each bucket's category-independent back-off pool (0 = all)")
    i = sub.add_parser("info", help="print a summary of a priors file")
    i.add_argument("file")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build":
            pr = Priors.build(args.ann, relations=args.relations, seed=args.seed,
                              max_pairs_per_image=args.max_pairs_per_image, max_refs_per_pool=args.max_refs_per_pool,
                              max_refs_per_bucket=args.max_refs_per_bucket)
            pr.save(args.out)
            print(f"wrote {args.out}: {pr}")
        else:
            pr = Priors.load(args.file)
            summary = {k: v for k, v in pr.settings.items() if k != "json_category_ids"}
            summary["categories"] = len(pr.categories)
            summary["pool_sizes_by_bucket"] = {
                BUCKETS[bk]: int(np.diff(pr.pool_offsets)[pr.pool_keys % len(BUCKETS) == bk].sum())
                for bk in range(len(BUCKETS))}
            print(json.dumps(summary, indent=2, sort_keys=True))
    except (PriorsError, CategoryError) as e:
        print(f"acp-data priors: error: {e}", file=sys.stderr)
        return 2
    return 0
