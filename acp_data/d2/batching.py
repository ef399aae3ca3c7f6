"""Whole batches formed in the sampler: aspect-ratio grouping that does not depend on the dataloader workers, and the
``exact`` batch composition (``ACP.BATCH_COMPOSITION``; docs/design.md "The stream contract", docs/mixing.md).

detectron2 groups images by aspect *after* the workers (``AspectRatioGroupedDataset`` over the interleaved worker
outputs), so which images share a batch changes with ``NUM_WORKERS``; and ``ratio`` holds over the image stream, not
per batch. The batch samplers here form whole batches from sizes known without decoding (the real dicts' ``width`` /
``height``, the cache index's sizes) and yield them flat, ``batch_size`` references per batch. detectron2's
``ToIterableDataset`` gives each worker whole chunks of ``batch_size`` references and its ``DataLoader`` (grouping off)
makes one batch of each chunk, in worker order: the batches are a function of ``(SEED, world size)`` only.

- :class:`GroupedBatches` (``stream`` with grouping): detectron2's two buckets (``w > h`` and the rest) over the
  rank's stream, i.e. what ``AspectRatioGroupedDataset`` gives with 0 workers.
- :class:`ExactBatches` (``exact``): global batch ``j`` (``batch_size`` images, positions ``j B .. j B + B - 1``)
  belongs to rank ``j mod W`` as its batch ``b = j div W`` and holds exactly
  ``k_b = floor((P (b + 1) + U) / q) - floor((P b + U) / q)`` synthetic images, with ``P / q = SYNTH_RATIO x B`` as
  an exact fraction and the phase ``U`` from ``(SEED, rank)``: each ``k_b`` is the floor or the ceil of
  ``SYNTH_RATIO x B``, and over any ``n`` batches of a rank the synthetic count is within one image of
  ``SYNTH_RATIO x B x n``. Real images come in order from the real repeat-factor stream and synthetic ones from the
  ``SYNTH_SAMPLING`` policy at their positions, as in ``ratio``. With grouping the real images are bucketed by
  aspect (the batch's group is the bucket that fills first) and the synthetic images are drawn among those of the
  batch's group (all of them when the group has none).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch.utils.data as torchdata

from ..rng import TAG_BATCH, TAG_GROUP, TAG_RETRY, derive_key, uniform_scalar
from .sampler import REAL, SYNTH, EpochStream, MixSampler, RatioSampler, SampleRef, SynthPool

COMPOSITIONS = ("stream", "exact")
LANDSCAPE, OTHER = 0, 1  # detectron2's two aspect groups: w > h, and the rest (squares go with portraits)


def aspect_groups(widths: Any, heights: Any) -> np.ndarray:
    """The aspect group of each image as detectron2's ``AspectRatioGroupedDataset`` forms them (int8)."""
    return np.where(np.asarray(widths) > np.asarray(heights), LANDSCAPE, OTHER).astype(np.int8)


def real_aspect_groups(dataset: Sequence[dict[str, Any]]) -> np.ndarray:
    """Aspect groups of the real dataset dicts from their ``width`` and ``height`` (no image is decoded)."""
    ws, hs = np.empty(len(dataset), np.int64), np.empty(len(dataset), np.int64)
    for i in range(len(dataset)):
        d = dataset[i]
        try:
            ws[i], hs[i] = int(d["width"]), int(d["height"])
        except (KeyError, TypeError, ValueError) as e:
            name = d.get("file_name") if isinstance(d, dict) else None
            raise ValueError(f"aspect-ratio grouping (DATALOADER.ASPECT_RATIO_GROUPING) needs 'width' and 'height' in "
                             f"every real dataset dict; dict {i} (file_name {name!r}) has {e}") from e
    return aspect_groups(ws, hs)


class SynthCounts:
    """The planned synthetic count of each batch of one rank: ``floor((P (b + 1) + U) / q) - floor((P b + U) / q)``
    with ``P / q = ratio x batch_size`` (the ratio as a fraction of denominator <= 2**20) and ``U`` in ``[0, q)`` from
    ``(seed, rank)``. Integer arithmetic: every count is the floor or the ceil, and the counts of batches ``0..n-1``
    sum to ``floor((P n + U) / q) - floor(U / q)``, within one of ``ratio x batch_size x n``."""

    def __init__(self, seed: int, ratio: float, batch_size: int, rank: int):
        frac = Fraction(float(ratio)).limit_denominator(1 << 20)
        self.ratio = frac
        self.p, self.q = frac.numerator * int(batch_size), frac.denominator
        self.u = min(int(uniform_scalar(derive_key(seed, TAG_BATCH), rank) * self.q), self.q - 1)

    def __call__(self, batches: np.ndarray | Sequence[int]) -> np.ndarray:
        b = np.asarray(batches, dtype=np.int64)
        return (self.p * (b + 1) + self.u) // self.q - (self.p * b + self.u) // self.q


class BatchSampler(torchdata.Sampler):
    """Base of the batch samplers: yields the rank's batches flat (``batch_size`` :class:`SampleRef` each, in batch
    order) and replaces rejected samples as the mix sampler ``base`` does."""

    def __init__(self, base: MixSampler, batch_size: int):
        if int(batch_size) < 1:
            raise ValueError(f"batch size per rank must be >= 1, got {batch_size}")
        self.base = base
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = base.seed, base.rank, base.world_size

    def batches(self) -> Iterator[list[SampleRef]]:
        """This rank's batches, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[SampleRef]:
        for batch in self.batches():
            yield from batch

    def replacement(self, ref: SampleRef, attempt: int) -> SampleRef:
        """The sample replacing a rejected ``ref`` (same source; see :meth:`MixSampler.replacement`)."""
        return self.base.replacement(ref, attempt)


class _GroupedReplacement:
    """Replacement from the same source *and* the same aspect group, so a grouped batch stays one group: real images
    weighted by repeat factor, synthetic images by the ``SYNTH_SAMPLING`` policy within the group."""

    def __init__(self, base: MixSampler, real_groups: np.ndarray):
        self.base = base
        self.real_groups = real_groups
        self._rows = {g: np.flatnonzero(real_groups == g) for g in (LANDSCAPE, OTHER)}
        self._cdf = {g: np.cumsum(base.real_factors[rows]) for g, rows in self._rows.items()}

    def __call__(self, ref: SampleRef, attempt: int) -> SampleRef:
        key = derive_key(self.base.seed, TAG_RETRY, ref.position, attempt)
        if ref.source == REAL:
            g = int(self.real_groups[ref.index])
            rows, cdf = self._rows[g], self._cdf[g]
            i = min(int(np.searchsorted(cdf, uniform_scalar(key) * float(cdf[-1]), side="right")), rows.size - 1)
            return SampleRef(ref.position, REAL, int(rows[i]), ref.version)
        _, pool = self.base.schedule.pool_at(ref.position)
        idx = _pick_in_group(pool, int(_synth_groups(pool)[ref.index]), self.base.synth_sampling, key,
                             np.zeros(1, dtype=np.int64))
        return SampleRef(ref.position, SYNTH, int(idx[0]), ref.version)


def _synth_groups(pool: SynthPool) -> np.ndarray:
    if pool.groups is None:
        raise ValueError("aspect-ratio grouping needs the synthetic images' sizes, but the synthetic pool has none "
                         "(build it with acp_data.d2.loader.synth_pool, or turn DATALOADER.ASPECT_RATIO_GROUPING off)")
    return pool.groups


def _pick_in_group(pool: SynthPool, group: int, policy: str, key: int, counters: np.ndarray) -> np.ndarray:
    """``SYNTH_SAMPLING`` picks among the synthetic images of one aspect group (all of them if the group has none)."""
    sub = pool.group_pool(group)
    if sub is None:
        return pool.pick(policy, key, counters)
    sub_pool, rows = sub
    return rows[sub_pool.pick(policy, key, counters)]


class GroupedBatches(BatchSampler):
    """``stream`` composition with aspect-ratio grouping: detectron2's two buckets over this rank's stream (a bucket
    that reaches ``batch_size`` is a batch), formed before the workers."""

    def __init__(self, base: MixSampler, batch_size: int, real_groups: np.ndarray):
        super().__init__(base, batch_size)
        self.real_groups = np.asarray(real_groups, dtype=np.int8)
        if self.real_groups.shape != (base.num_real,):
            raise ValueError(f"{self.real_groups.shape[0]} real aspect groups for {base.num_real} real images")
        self._replace = _GroupedReplacement(base, self.real_groups)

    def batches(self) -> Iterator[list[SampleRef]]:
        buckets: tuple[list[SampleRef], list[SampleRef]] = ([], [])
        size = self.batch_size
        for pos, src, idx, ver, pool in self.base.rank_chunks():
            groups = np.empty(pos.size, dtype=np.int8)
            real = src == REAL
            groups[real] = self.real_groups[idx[real]]
            if not real.all():
                groups[~real] = _synth_groups(pool)[idx[~real]]
            for p, s, i, g in zip(pos.tolist(), src.tolist(), idx.tolist(), groups.tolist()):
                bucket = buckets[g]
                bucket.append(SampleRef(p, s, i, ver))
                if len(bucket) == size:
                    batch = bucket[:]
                    del bucket[:]
                    yield batch

    def replacement(self, ref: SampleRef, attempt: int) -> SampleRef:
        return self._replace(ref, attempt)


class _RealBuckets:
    """The real repeat-factor stream bucketed by aspect group: :meth:`take` returns ``m`` real images of one group,
    from the bucket that holds ``m`` first (the older head when both already do)."""

    def __init__(self, stream: EpochStream, groups: np.ndarray, chunk: int = 4096):
        self.stream, self.groups, self.chunk = stream, groups, chunk
        self.buckets: tuple[deque, deque] = (deque(), deque())  # (sequence number, real index)
        self._seq = 0
        self._buf: list[int] = []
        self._at = 0

    def _next(self) -> int:
        if self._at >= len(self._buf):
            self._buf = self.stream.take(self.chunk).tolist()
            self._at = 0
        self._at += 1
        return self._buf[self._at - 1]

    def take(self, m: int) -> tuple[int, list[int]]:
        ready = [g for g in (LANDSCAPE, OTHER) if len(self.buckets[g]) >= m]
        if ready:
            g = min(ready, key=lambda x: self.buckets[x][0][0])
        else:
            while True:
                i = self._next()
                g = int(self.groups[i])
                self.buckets[g].append((self._seq, i))
                self._seq += 1
                if len(self.buckets[g]) >= m:
                    break
        bucket = self.buckets[g]
        return g, [bucket.popleft()[1] for _ in range(m)]


class ExactBatches(BatchSampler):
    """``exact`` composition over a ``ratio`` stream: every batch of every rank holds the planned number of synthetic
    images (:class:`SynthCounts`); rank ``r`` of ``W`` takes global batches ``r, r + W, ...``. ``real_groups`` (the
    real images' aspect groups) turns aspect-ratio grouping on."""

    block = 256  # batches generated at a time (vectorised picks)

    def __init__(self, base: MixSampler, batch_size: int, real_groups: np.ndarray | None = None):
        if not isinstance(base, RatioSampler):
            raise ValueError(f"ACP.BATCH_COMPOSITION = 'exact' needs a ratio stream (ACP.MIX_MODE ratio, ratio+paste or "
                             f"paste), got {type(base).__name__}: concat is repeat-factor sampling over the union of "
                             "real and synthetic images and has no per-batch ratio; use BATCH_COMPOSITION 'stream'")
        super().__init__(base, batch_size)
        self.ratio = base.ratio
        self.counts = [SynthCounts(self.seed, self.ratio, self.batch_size, r) for r in range(self.world_size)]
        self.real_groups = None if real_groups is None else np.asarray(real_groups, dtype=np.int8)
        self._replace = None
        if self.real_groups is not None:
            if self.real_groups.shape != (base.num_real,):
                raise ValueError(f"{self.real_groups.shape[0]} real aspect groups for {base.num_real} real images")
            self._replace = _GroupedReplacement(base, self.real_groups)

    @property
    def grouping(self) -> bool:
        return self.real_groups is not None

    def planned_counts(self, batches: np.ndarray | Sequence[int]) -> np.ndarray:
        """The synthetic count of global batches ``batches``."""
        j = np.asarray(batches, dtype=np.int64)
        out = np.empty(j.shape, dtype=np.int64)
        for r, counts in enumerate(self.counts):
            sel = (j % self.world_size) == r
            out[sel] = counts(j[sel] // self.world_size)
        return out

    def synthetic_fraction(self, n: int = 100_000) -> float:
        """The synthetic fraction over the first ``n`` positions (whole batches) of the global stream."""
        nb = max(n // self.batch_size, 1)
        return float(self.planned_counts(np.arange(nb)).sum()) / (nb * self.batch_size)

    def global_batches(self) -> Iterator[tuple[int, list[SampleRef]]]:
        """``(global batch index, batch)`` for the whole stream (all ranks), in order."""
        base, size = self.base, self.batch_size
        policy = base.synth_sampling
        real = base.real_stream()
        buckets = _RealBuckets(real, self.real_groups) if (self.grouping and real is not None) else None
        k_syn, k_grp = derive_key(self.seed, SYNTH), derive_key(self.seed, TAG_GROUP)
        segments = base._segments()
        _, bound, version, pool = next(segments)
        j0 = 0
        while True:
            while bound is not None and j0 * size >= bound:
                _, bound, version, pool = next(segments)
            nb = self.block
            if bound is not None:  # a block never crosses a pool boundary
                nb = max(1, min(nb, -(-(bound - j0 * size) // size)))
            js = np.arange(j0, j0 + nb, dtype=np.int64)
            ks = self.planned_counts(js)
            starts = js * size
            first = np.cumsum(ks) - ks  # where each batch's synthetic slots start in the flat arrays
            syn_pos = np.repeat(starts - first, ks) + np.arange(int(ks.sum()), dtype=np.int64)
            syn_batch = np.repeat(np.arange(nb), ks)
            if not self.grouping:
                syn_idx = pool.pick(policy, k_syn, syn_pos) if syn_pos.size else syn_pos
                n_real = int(nb * size - ks.sum())
                real_idx = real.take(n_real).tolist() if n_real else []
                real_lists, at = [], 0
                for k in ks.tolist():
                    real_lists.append(real_idx[at:at + size - k])
                    at += size - k
            else:
                groups = np.empty(nb, dtype=np.int8)
                real_lists = []
                for t, k in enumerate(ks.tolist()):
                    if k < size:
                        groups[t], got = buckets.take(size - k)
                    else:  # an all-synthetic batch: its group is that of one policy pick over the whole pool
                        groups[t] = _synth_groups(pool)[pool.pick(policy, k_grp, starts[t:t + 1])[0]]
                        got = []
                    real_lists.append(got)
                syn_idx = np.empty(syn_pos.size, dtype=np.int64)
                syn_group = groups[syn_batch]
                for g in (LANDSCAPE, OTHER):
                    sel = syn_group == g
                    if sel.any():
                        syn_idx[sel] = _pick_in_group(pool, g, policy, k_syn, syn_pos[sel])
            syn_refs = [SampleRef(p, SYNTH, i, version) for p, i in zip(syn_pos.tolist(), syn_idx.tolist())]
            at = 0
            for t, (start, k) in enumerate(zip(starts.tolist(), ks.tolist())):
                batch = syn_refs[at:at + k]
                at += k
                batch.extend(SampleRef(start + k + s, REAL, i, version) for s, i in enumerate(real_lists[t]))
                yield j0 + t, batch
            j0 += nb

    def batches(self) -> Iterator[list[SampleRef]]:
        for _, batch in itertools.islice(self.global_batches(), self.rank, None, self.world_size):
            yield batch

    def replacement(self, ref: SampleRef, attempt: int) -> SampleRef:
        return self._replace(ref, attempt) if self._replace is not None else self.base.replacement(ref, attempt)


def build_batch_sampler(sampler: MixSampler, *, composition: str, batch_size: int,
                        real_groups: np.ndarray | None) -> torchdata.Sampler:
    """The sampler handed to detectron2's loader: ``sampler`` itself for ``stream`` without grouping (today's
    stream, batched by detectron2 as it comes), else a :class:`GroupedBatches` or an :class:`ExactBatches`.
    ``real_groups`` (the real images' aspect groups) turns aspect-ratio grouping on."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"ACP.BATCH_COMPOSITION = {composition!r}: must be one of {', '.join(COMPOSITIONS)}")
    if composition == "exact":
        return ExactBatches(sampler, batch_size, real_groups)
    if real_groups is not None:
        return GroupedBatches(sampler, batch_size, real_groups)
    return sampler
