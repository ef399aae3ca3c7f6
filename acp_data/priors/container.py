"""The ``Priors`` container (box statistics, co-occurrence, box-pair pools over a CategoryTable; read-only arrays
and their lookups) and its file format.

**File format (no pickle).** One ``.npz`` holding numeric arrays and ``header``, a uint8 array with UTF-8 JSON: format
name and version, the CategoryTable, the build settings and counts. Written to a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import CategoryError, CategoryTable, normalize_name
from ..fsio import atomic_write
from .buckets import BUCKETS, PriorsError, bucket_index

__all__ = ["Priors", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "acp-priors"
FORMAT_VERSION = 1


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
        b = bucket if isinstance(bucket, (int, np.integer)) else bucket_index(bucket)
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
        b = bucket_index(bucket)
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
            lo = base + bucket_index(bucket)
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

    @classmethod
    def build(cls, lvis_json: dict[str, Any] | str | os.PathLike,
              relations: str | os.PathLike | Iterable[dict[str, Any]] | None = None, seed: int = 0,
              max_pairs_per_image: int = 32, max_refs_per_pool: int = 500, max_refs_per_bucket: int = 5000,
              ) -> Priors:
        """``acp_data.priors.build.build_priors`` (kept as a constructor: ``Priors.build(json).save(path)``)."""
        from .build import build_priors

        return build_priors(lvis_json, relations, seed=seed, max_pairs_per_image=max_pairs_per_image,
                            max_refs_per_pool=max_refs_per_pool, max_refs_per_bucket=max_refs_per_bucket)
