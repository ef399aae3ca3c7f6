"""Counter-based, infinite training samplers that mix real and synthetic images (``concat`` and ``ratio`` modes).

Every random choice is a hash of ``(SEED, global position, ...)`` (:mod:`acp_data.rng`, vectorised in chunks), so
the stream is a pure function of the seed and the synthetic pool: the same for any number of dataloader workers,
and rank ``r`` of ``W`` takes ``islice(global_stream, r, None, W)`` exactly as detectron2's ``TrainingSampler``.
The sampler yields :class:`SampleRef` items ``(position, source, index, version)``; the dataset wrapper
(:class:`acp_data.d2.loader.MixedDataset`) resolves them and replaces a rejected sample from the same source at an
index derived from ``(SEED, position, attempt)`` (:meth:`MixSampler.replacement`).

- ``concat`` (the paper): synthetic images are appended to the real ones and repeat-factor sampling runs over the
  union, with category frequencies counted on the union. Synthetic images of a rare category raise its frequency and
  so *lower* the repeat factor of the real images that contain it; :func:`describe_concat_factors` states both.
- ``ratio``: position ``i`` is synthetic iff ``u(SEED, i) < ratio``; real positions walk a repeat-factor stream over
  the real images only; synthetic positions pick ``uniform``-ly over images or ``class_balanced`` (a category
  uniform over those present, then an image containing it).

Repeat-factor epochs follow detectron2's ``RepeatFactorTrainingSampler``: stochastic rounding of each image's factor,
then a permutation; both seeded by ``(SEED, epoch)`` (a Philox generator keyed by the hash), and epochs are laid end
to end along the positions (docs/design.md "The stream contract").
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch.utils.data as torchdata

from ..rng import (
    TAG_PERM,
    TAG_RETRY,
    TAG_ROUND,
    TAG_SEGMENT,
    TAG_SOURCE,
    TAG_SYNTH_CAT,
    TAG_SYNTH_PICK,
    derive_key,
    philox,
    uniform,
    uniform_scalar,
)

logger = logging.getLogger(__name__)

REAL, SYNTH = 0, 1
SOURCE_NAMES = {REAL: "real", SYNTH: "synthetic"}

# ----- image -> categories ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCategories:
    """The distinct category ids of each image, as CSR arrays: image ``i`` has ``cats[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # int64, (N + 1,)
    cats: np.ndarray  # int64, distinct per image

    @classmethod
    def from_lists(cls, lists: Iterable[Iterable[int]]) -> ImageCategories:
        offsets = [0]
        flat: list[int] = []
        for cs in lists:
            u = sorted({int(c) for c in cs})
            flat.extend(u)
            offsets.append(len(flat))
        return cls(np.asarray(offsets, dtype=np.int64), np.asarray(flat, dtype=np.int64))

    @classmethod
    def from_dataset_dicts(cls, dicts: Iterable[dict[str, Any]]) -> ImageCategories:
        """From detectron2 dataset dicts (category ids as in the dicts: contiguous 0-based after the loaders)."""
        return cls.from_lists((a["category_id"] for a in d.get("annotations", ())) for d in dicts)

    @classmethod
    def from_rows(cls, image_rows: np.ndarray, category_ids: np.ndarray, num_images: int) -> ImageCategories:
        """From per-instance arrays (image row, category id), e.g. a cache index's instance columns."""
        rows = np.asarray(image_rows, dtype=np.int64)
        cats = np.asarray(category_ids, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= num_images):
            raise ValueError(f"instance image rows must lie in [0, {num_images}); got {rows.min()}..{rows.max()}")
        pairs = np.unique(np.stack([rows, cats], axis=1), axis=0) if rows.size else np.zeros((0, 2), np.int64)
        counts = np.bincount(pairs[:, 0], minlength=num_images) if pairs.size else np.zeros(num_images, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, pairs[:, 1].astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, i: int) -> np.ndarray:
        return self.cats[self.offsets[i]:self.offsets[i + 1]]

    def subset(self, rows: np.ndarray) -> ImageCategories:
        """The category lists of images ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        counts = ends - starts
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.repeat(starts - offsets[:-1], counts) + np.arange(int(offsets[-1]), dtype=np.int64)
        return ImageCategories(offsets, self.cats[flat])

    def concat(self, other: ImageCategories) -> ImageCategories:
        return ImageCategories(np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]),
                               np.concatenate([self.cats, other.cats]))

    def image_counts(self) -> dict[int, int]:
        """Category id -> number of images that contain it."""
        ids, counts = np.unique(self.cats, return_counts=True)
        return {int(c): int(n) for c, n in zip(ids, counts)}


# ----- repeat factors -----------------------------------------------------------------------------------------------
def category_repeat_factors(ic: ImageCategories, repeat_thresh: float, sqrt: bool = True) -> dict[int, float]:
    """detectron2/LVIS: ``r(c) = max(1, sqrt(t / f(c)))`` with ``f(c)`` the fraction of images containing ``c``."""
    n = len(ic)
    out = {}
    for c, k in ic.image_counts().items():
        ratio = repeat_thresh / (k / n)
        out[c] = max(1.0, math.sqrt(ratio) if sqrt else ratio)
    return out


def image_repeat_factors(ic: ImageCategories, repeat_thresh: float, sqrt: bool = True) -> np.ndarray:
    """Per-image factor: the max of its categories' factors (1 for an image without annotations); float64."""
    n = len(ic)
    out = np.ones(n, dtype=np.float64)
    if repeat_thresh <= 0 or ic.cats.size == 0:
        return out
    ids, counts = np.unique(ic.cats, return_counts=True)
    ratio = repeat_thresh / (counts / n)
    rep = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
    lookup = rep[np.searchsorted(ids, ic.cats)]
    nonempty = np.diff(ic.offsets) > 0
    starts = ic.offsets[:-1][nonempty]
    out[nonempty] = np.maximum.reduceat(lookup, starts)
    return out


def describe_concat_factors(real: ImageCategories, synth: ImageCategories, repeat_thresh: float,
                            sqrt: bool = True, frequency: dict[int, str] | None = None) -> dict[str, Any]:
    """Repeat factors with and without the synthetic images (``concat`` mode changes the real images' factors).

    Returns per-group means of the category factors (``real_only``, ``union``), the expected number of real and
    synthetic images per epoch, and the expected synthetic fraction of the stream. ``frequency`` maps category id
    (as in ``real``/``synth``) to ``r``/``c``/``f``; without it everything counts as one group ``all``.
    """
    union = real.concat(synth)
    f_real = image_repeat_factors(real, repeat_thresh, sqrt)
    f_union = image_repeat_factors(union, repeat_thresh, sqrt)
    c_real = category_repeat_factors(real, repeat_thresh, sqrt) if repeat_thresh > 0 else {}
    c_union = category_repeat_factors(union, repeat_thresh, sqrt) if repeat_thresh > 0 else {}
    groups: dict[str, dict[str, list[float]]] = {}
    for c in sorted(set(c_real) | set(c_union)):
        g = (frequency or {}).get(c, "all")
        d = groups.setdefault(g, {"real_only": [], "union": []})
        d["real_only"].append(c_real.get(c, float("nan")))
        d["union"].append(c_union.get(c, float("nan")))
    n_real = len(real)
    per_group = {g: {k: float(np.nanmean(v)) if v else None for k, v in d.items()} for g, d in groups.items()}
    real_epoch_union = float(f_union[:n_real].sum())
    synth_epoch = float(f_union[n_real:].sum())
    return {
        "category_factor_mean": per_group,
        "real_images_per_epoch_real_only": float(f_real.sum()),
        "real_images_per_epoch_union": real_epoch_union,
        "synthetic_images_per_epoch": synth_epoch,
        "synthetic_fraction": synth_epoch / max(real_epoch_union + synth_epoch, 1e-12),
    }


class EpochStream:
    """An endless stream of indices in repeat-factor epochs: epoch ``e`` rounds each factor stochastically and permutes
    the result, both from ``(key, e)``. With all factors 1 this is detectron2's ``TrainingSampler`` order."""

    def __init__(self, factors: np.ndarray, key: int):
        f = np.asarray(factors, dtype=np.float64)
        if f.ndim != 1 or f.size == 0:
            raise ValueError("EpochStream needs a non-empty 1-D array of repeat factors")
        if not (f >= 1.0).all():  # also NaN; factors >= 1 give every image at least one copy per epoch
            raise ValueError(f"repeat factors must be >= 1 (as detectron2's RepeatFactorTrainingSampler's), got "
                             f"minimum {f.min()}")
        self._int = np.floor(f).astype(np.int64)
        self._frac = f - self._int
        self._has_frac = bool((self._frac > 0).any())
        self._key = key
        self._epoch = -1
        self._buf = np.zeros(0, dtype=np.int64)
        self._pos = 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        reps = self._int
        if self._has_frac:
            u = uniform(derive_key(self._key, TAG_ROUND, epoch), np.arange(self._int.size))
            reps = reps + (u < self._frac)
        idx = np.repeat(np.arange(self._int.size, dtype=np.int64), reps)  # non-empty: every factor >= 1
        return idx[philox(derive_key(self._key, TAG_PERM, epoch)).permutation(idx.size)]

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` indices of the stream."""
        out = []
        while n > 0:
            if self._pos >= self._buf.size:
                self._epoch += 1
                self._buf = self.epoch_indices(self._epoch)
                self._pos = 0
            k = min(n, self._buf.size - self._pos)
            out.append(self._buf[self._pos:self._pos + k])
            self._pos += k
            n -= k
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ----- synthetic pools and their schedule ---------------------------------------------------------------------------
class SynthPool:
    """What the sampler needs of one version of the synthetic dataset: its size, each image's categories and, for
    aspect-ratio grouping, each image's aspect group (``acp_data.d2.batching.aspect_groups``; ``None``: unknown)."""

    def __init__(self, categories: ImageCategories, ident: Any = None, groups: np.ndarray | None = None):
        self.categories = categories
        self.ident = ident  # identifies the content (e.g. the snapshot's shard list); equal idents = same pool
        n = len(categories)
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int8)
        if self.groups is not None and self.groups.shape != (n,):
            raise ValueError(f"{self.groups.shape[0]} aspect groups for a synthetic pool of {n} images")
        self._group_pools: dict[int, tuple[SynthPool, np.ndarray] | None] = {}
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(categories.offsets))
        order = np.argsort(categories.cats, kind="stable")
        self._cat_images = rows[order]
        self.present, starts, counts = np.unique(categories.cats[order], return_index=True, return_counts=True)
        self._cat_starts = starts.astype(np.int64)
        self._cat_counts = counts.astype(np.int64)

    def __len__(self) -> int:
        return len(self.categories)

    def pick(self, policy: str, key: int, counters: np.ndarray) -> np.ndarray:
        """One image index per counter: ``uniform`` over images, or ``class_balanced`` (category uniform over those
        present, then an image containing it)."""
        n = len(self)
        if n == 0:
            raise RuntimeError("the synthetic pool is empty; no synthetic sample can be drawn")
        if policy == "uniform" or self.present.size == 0:
            return np.minimum((uniform(derive_key(key, TAG_SYNTH_PICK), counters) * n).astype(np.int64), n - 1)
        if policy != "class_balanced":
            raise ValueError(f"ACP.SYNTH_SAMPLING = {policy!r}: must be 'uniform' or 'class_balanced'")
        u_cat = uniform(derive_key(key, TAG_SYNTH_CAT), counters)
        u_img = uniform(derive_key(key, TAG_SYNTH_PICK), counters)
        c = np.minimum((u_cat * self.present.size).astype(np.int64), self.present.size - 1)
        cnt = self._cat_counts[c]
        j = np.minimum((u_img * cnt).astype(np.int64), cnt - 1)
        return self._cat_images[self._cat_starts[c] + j]

    def group_pool(self, group: int) -> tuple[SynthPool, np.ndarray] | None:
        """The images of one aspect group as a pool of their own, with the map from its indices to this pool's
        (``None`` when the group has no image). Needs ``groups``."""
        if self.groups is None:
            raise ValueError("aspect-ratio grouping needs the synthetic images' sizes; this SynthPool has no groups")
        if group not in self._group_pools:
            rows = np.flatnonzero(self.groups == group).astype(np.int64)
            self._group_pools[group] = ((SynthPool(self.categories.subset(rows), ident=(self.ident, group)), rows)
                                        if rows.size else None)
        return self._group_pools[group]


class PoolSchedule:
    """Which synthetic pool applies at each global position: a static pool, or the online snapshots.

    ``boundary_after(p)`` is the next position after ``p`` at which the pool may change (``None``: never), known
    without waiting; ``pool_at(p)`` returns ``(version, SynthPool)`` and may wait for a snapshot to be published.
    """

    def __init__(self, pool: SynthPool):
        self._pool = pool

    def boundary_after(self, position: int) -> int | None:
        return None

    def pool_at(self, position: int) -> tuple[int, SynthPool]:
        return 0, self._pool


# ----- the samplers -------------------------------------------------------------------------------------------------
class SampleRef(NamedTuple):
    """One element of the stream: the global position, the source (REAL/SYNTH), the index into that source and the
    synthetic pool version the index refers to."""

    position: int
    source: int
    index: int
    version: int


class MixSampler(torchdata.Sampler):
    """Base of the ``concat`` and ``ratio`` samplers: chunked generation of the global stream and rank slicing."""

    chunk_size = 4096

    def __init__(self, *, seed: int, num_real: int, real_factors: np.ndarray | None, schedule: PoolSchedule,
                 synth_sampling: str = "uniform", rank: int | None = None, world_size: int | None = None):
        if seed is None or int(seed) < 0:
            raise ValueError(f"the ACP sampler needs a fixed seed >= 0, got {seed!r} (set SEED in the config)")
        if rank is None or world_size is None:
            from detectron2.utils import comm

            rank, world_size = comm.get_rank(), comm.get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_real = int(num_real)
        self.real_factors = (np.ones(self.num_real) if real_factors is None
                             else np.asarray(real_factors, dtype=np.float64))
        if self.real_factors.shape != (self.num_real,):
            raise ValueError(f"{self.real_factors.shape[0]} real repeat factors for {self.num_real} real images")
        self.schedule = schedule
        self.synth_sampling = synth_sampling
        self._real_cdf = np.cumsum(self.real_factors) if self.num_real else np.zeros(0)

    # -- the stream --
    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, SynthPool]]:
        """Yield ``(positions, sources, indices, version, pool)`` for consecutive runs of the global stream."""
        raise NotImplementedError

    def global_stream(self) -> Iterator[SampleRef]:
        """The whole stream (all ranks) in position order."""
        for pos, src, idx, ver, _ in self._chunks():
            for p, s, i in zip(pos.tolist(), src.tolist(), idx.tolist()):
                yield SampleRef(p, s, i, ver)

    def rank_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, SynthPool]]:
        """This rank's share of each chunk, ``(positions, sources, indices, version, pool)``: the arrays of
        :meth:`__iter__` (for the batch samplers of :mod:`acp_data.d2.batching`)."""
        r, w = self.rank, self.world_size
        for pos, src, idx, ver, pool in self._chunks():
            keep = (pos % w) == r
            yield pos[keep], src[keep], idx[keep], ver, pool

    def __iter__(self) -> Iterator[SampleRef]:
        # Equivalent to islice(global_stream(), rank, None, world_size), but sliced in numpy per chunk.
        for pos, src, idx, ver, _ in self.rank_chunks():
            for p, s, i in zip(pos.tolist(), src.tolist(), idx.tolist()):
                yield SampleRef(p, s, i, ver)

    def real_stream(self) -> EpochStream | None:
        """The repeat-factor stream of the real images (``None`` without real images): ``ratio``'s real positions and
        ``exact`` batches take their real images from it in order."""
        return EpochStream(self.real_factors, derive_key(self.seed, REAL)) if self.num_real else None

    def _segments(self, start: int = 0) -> Iterator[tuple[int, int | None, int, SynthPool]]:
        """Runs ``[a, b)`` of positions (``b`` None = endless) over which one synthetic pool applies."""
        a = start
        while True:
            version, pool = self.schedule.pool_at(a)
            b = self.schedule.boundary_after(a)
            yield a, b, version, pool
            if b is None:
                return
            a = b

    # -- replacement of rejected samples --
    def replacement(self, ref: SampleRef, attempt: int) -> SampleRef:
        """The sample that replaces a rejected ``ref`` on retry ``attempt`` (1, 2, ...): same source, same pool
        version, index from ``(SEED, position, attempt)`` (real: weighted by repeat factor; synthetic: the
        ``SYNTH_SAMPLING`` policy)."""
        key = derive_key(self.seed, TAG_RETRY, ref.position, attempt)
        if ref.source == REAL:
            u = uniform_scalar(key) * float(self._real_cdf[-1])
            i = min(int(np.searchsorted(self._real_cdf, u, side="right")), self.num_real - 1)
            return SampleRef(ref.position, REAL, i, ref.version)
        _, pool = self.schedule.pool_at(ref.position)
        i = int(pool.pick(self.synth_sampling, key, np.zeros(1, dtype=np.uint64))[0])
        return SampleRef(ref.position, SYNTH, i, ref.version)

    def synthetic_fraction(self, n: int = 100_000) -> float:
        """The synthetic fraction over the first ``n`` positions of the global stream (what the run will see)."""
        seen = syn = 0
        for pos, src, _, _, _ in self._chunks():
            k = min(pos.size, n - seen)
            syn += int(src[:k].sum())
            seen += k
            if seen >= n:
                break
        return syn / max(seen, 1)


class RatioSampler(MixSampler):
    """``ratio``: position ``i`` is synthetic iff ``u(SEED, i) < ratio``; real positions walk a repeat-factor stream
    over the real images (factors computed on real images only); synthetic positions follow ``synth_sampling``."""

    def __init__(self, *, ratio: float, **kw: Any):
        super().__init__(**kw)
        self.ratio = float(ratio)
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ACP.SYNTH_RATIO = {ratio!r} must be in [0, 1]")
        if self.ratio < 1.0 and self.num_real == 0:
            raise ValueError("ratio mode with SYNTH_RATIO < 1 needs real images; the real dataset is empty")

    def synthetic_fraction(self, n: int = 100_000) -> float:
        """The synthetic fraction over the first ``n`` positions (from the source hash alone: no pool is read)."""
        if self.ratio <= 0.0 or self.ratio >= 1.0:
            return float(self.ratio >= 1.0)
        return float((uniform(derive_key(self.seed, TAG_SOURCE), np.arange(n)) < self.ratio).mean())

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, SynthPool]]:
        real = self.real_stream()
        k_src = derive_key(self.seed, TAG_SOURCE)
        k_syn = derive_key(self.seed, SYNTH)
        for a, b, version, pool in self._segments():
            start = a
            while b is None or start < b:
                stop = start + self.chunk_size if b is None else min(start + self.chunk_size, b)
                pos = np.arange(start, stop, dtype=np.int64)
                if self.ratio >= 1.0:
                    is_syn = np.ones(pos.size, dtype=bool)
                elif self.ratio <= 0.0:
                    is_syn = np.zeros(pos.size, dtype=bool)
                else:
                    is_syn = uniform(k_src, pos) < self.ratio
                idx = np.empty(pos.size, dtype=np.int64)
                n_syn = int(is_syn.sum())
                if n_syn:
                    idx[is_syn] = pool.pick(self.synth_sampling, k_syn, pos[is_syn])
                if n_syn < pos.size:
                    idx[~is_syn] = real.take(pos.size - n_syn)
                yield pos, is_syn.astype(np.int64), idx, version, pool
                start = stop


class ConcatSampler(MixSampler):
    """``concat`` (the paper): repeat-factor sampling over real + synthetic images, factors from the union's category
    frequencies. A new synthetic pool (online mode) starts new epochs over the new union at its boundary."""

    def __init__(self, *, real_categories: ImageCategories, repeat_thresh: float, repeat_sqrt: bool = True,
                 **kw: Any):
        super().__init__(**kw)
        if len(real_categories) != self.num_real:
            raise ValueError(f"{len(real_categories)} real category lists for {self.num_real} real images")
        self.real_categories = real_categories
        self.repeat_thresh = float(repeat_thresh)
        self.repeat_sqrt = bool(repeat_sqrt)

    def union_factors(self, pool: SynthPool) -> np.ndarray:
        """Repeat factors of the union (real first, then synthetic) for one synthetic pool."""
        return image_repeat_factors(self.real_categories.concat(pool.categories), self.repeat_thresh,
                                    self.repeat_sqrt)

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, SynthPool]]:
        stream: EpochStream | None = None
        ident: Any = object()
        for a, b, version, pool in self._segments():
            if stream is None or pool.ident != ident:  # new content: new epochs over the new union
                stream = EpochStream(self.union_factors(pool), derive_key(self.seed, TAG_SEGMENT, a))
                ident = pool.ident
            start = a
            while b is None or start < b:
                stop = start + self.chunk_size if b is None else min(start + self.chunk_size, b)
                pos = np.arange(start, stop, dtype=np.int64)
                u = stream.take(pos.size)
                is_syn = u >= self.num_real
                idx = np.where(is_syn, u - self.num_real, u)
                yield pos, is_syn.astype(np.int64), idx, version, pool
                start = stop


def take_stream(sampler: Iterable[SampleRef], n: int) -> list[SampleRef]:
    """The first ``n`` items of a sampler (for tests and logs)."""
    return list(itertools.islice(iter(sampler), n))


