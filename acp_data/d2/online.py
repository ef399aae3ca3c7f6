"""``ACP.ONLINE``: train on shards that a running prebuild closes, reproducibly.

Rank 0 snapshots the list of closed shards (with their index generations) every ``ONLINE_REFRESH_ITERS`` iterations
and publishes snapshot ``k`` as ``OUTPUT_DIR/acp_online/run-<n>/snapshot-<k>.json`` (temp name, fsync, rename),
stating the global sample position from which it applies::

    apply_from(0) = 0,   apply_from(k) = (k * ONLINE_REFRESH_ITERS + lag) * SOLVER.IMS_PER_BATCH

The lag (:func:`online_lag_iters`) exceeds how far the data pipeline can run ahead of training (prefetching and
aspect-ratio buckets), so no position at or after ``apply_from(k)`` has been sampled anywhere when snapshot ``k`` is
published. Every sampler (all ranks, all dataloader workers) knows the boundaries in advance; when its position
reaches one it reads that snapshot (waiting for the file if it is not there yet) and switches. The files stay in the
output directory, so the run can be replayed exactly with ``ACP_ONLINE_REPLAY=<run dir>`` (or ``ACP.ONLINE_REPLAY``
where the config has it): the sampler then reads the recorded snapshots and never waits.
See docs/design.md "The stream contract".
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_json
from .sampler import PoolSchedule, SynthPool

logger = logging.getLogger(__name__)

ONLINE_DIR = "acp_online"
REPLAY_ENV = "ACP_ONLINE_REPLAY"
_SNAP_RE = re.compile(r"^snapshot-(\d{6,})\.json$")
_RUN_RE = re.compile(r"^run-(\d{3,})$")

ShardRef = tuple[str, str, int]  # (cache dir, shard name, index generation)


class OnlineError(RuntimeError):
    """A snapshot that is missing, corrupt or inconsistent with the run."""


@dataclass(frozen=True)
class Snapshot:
    """The closed shards in use from global position ``apply_from`` on; ``num_samples`` counts the synthetic samples
    they hold after load-time selection (informational)."""

    index: int
    apply_from: int
    shards: tuple[ShardRef, ...]
    num_samples: int = -1
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "apply_from": self.apply_from, "num_samples": self.num_samples,
                "created": self.created, "shards": [list(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "snapshot") -> Snapshot:
        try:
            return cls(index=int(d["index"]), apply_from=int(d["apply_from"]),
                       shards=tuple((str(c), str(s), int(g)) for c, s, g in d["shards"]),
                       num_samples=int(d.get("num_samples", -1)), created=float(d.get("created", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise OnlineError(f"{where} is not an online snapshot: {type(e).__name__}: {e}") from e


def online_lag_iters(num_workers: int) -> int:
    """Iterations between publishing a snapshot and the position it applies from: more than the pipeline's lead
    (two aspect-ratio buckets plus ``prefetch_factor`` (2) items or batches per worker, per rank)."""
    return 4 + 2 * max(int(num_workers), 1)


def boundary(k: int, refresh_iters: int, lag_iters: int, total_batch_size: int) -> int:
    """Global position from which snapshot ``k`` applies."""
    return 0 if k <= 0 else (k * refresh_iters + lag_iters) * total_batch_size




class SnapshotStore:
    """The snapshot files of one online run directory."""

    def __init__(self, run_dir: str | os.PathLike, poll_interval: float = 0.2, warn_after: float = 60.0):
        self.run_dir = Path(run_dir)
        self.poll_interval = poll_interval
        self.warn_after = warn_after

    def path(self, k: int) -> Path:
        return self.run_dir / f"snapshot-{int(k):06d}.json"

    def write(self, snap: Snapshot) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        p = self.path(snap.index)
        if p.exists():
            raise OnlineError(f"online snapshot {p} already exists; snapshots are written once")
        atomic_write_json(p, snap.to_dict())
        return p

    def read(self, k: int, wait: bool) -> Snapshot | None:
        """Snapshot ``k``; with ``wait``, poll until it is published (logging while it takes long), else ``None``
        when absent."""
        p = self.path(k)
        start = last_warn = time.monotonic()
        while not p.is_file():
            if not wait:
                return None
            time.sleep(self.poll_interval)
            now = time.monotonic()
            if now - last_warn >= self.warn_after:
                logger.warning("waiting %.0f s for online snapshot %s (published by rank 0 every "
                               "ACP.ONLINE_REFRESH_ITERS iterations)", now - start, p)
                last_warn = now
        try:
            snap = Snapshot.from_dict(json.loads(p.read_text()), where=str(p))
        except (OSError, json.JSONDecodeError) as e:
            raise OnlineError(f"online snapshot {p} cannot be read: {e}") from e
        if snap.index != k:
            raise OnlineError(f"online snapshot {p} says index {snap.index}, expected {k}")
        return snap

    def recorded(self) -> list[Snapshot]:
        """All snapshots in the directory, in order; they must be numbered 0, 1, 2, ... without gaps."""
        if not self.run_dir.is_dir():
            raise OnlineError(f"online replay directory {self.run_dir} does not exist")
        ks = sorted(int(m.group(1)) for p in self.run_dir.iterdir() if (m := _SNAP_RE.match(p.name)))
        if not ks:
            raise OnlineError(f"online replay directory {self.run_dir} holds no snapshot-*.json")
        if ks != list(range(len(ks))):
            raise OnlineError(f"online snapshots in {self.run_dir} are not numbered 0..{len(ks) - 1}: {ks[:10]}")
        snaps = [self.read(k, wait=False) for k in ks]
        for a, b in zip(snaps, snaps[1:]):
            if b.apply_from <= a.apply_from:
                raise OnlineError(f"online snapshots in {self.run_dir}: snapshot {b.index} applies from "
                                  f"{b.apply_from}, not after snapshot {a.index} ({a.apply_from})")
        return snaps


def new_run_dir(output_dir: str | os.PathLike) -> Path:
    """``OUTPUT_DIR/acp_online/run-<n>`` with the next free ``n`` (a resumed or repeated run never overwrites the
    snapshots of an earlier one)."""
    base = Path(output_dir) / ONLINE_DIR
    base.mkdir(parents=True, exist_ok=True)
    used = [int(m.group(1)) for p in base.iterdir() if (m := _RUN_RE.match(p.name))]
    n = max(used, default=-1) + 1
    while True:
        d = base / f"run-{n:03d}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1


def list_closed_shards(cache_dirs: Iterable[str]) -> tuple[ShardRef, ...]:
    """The shards a fresh reader sees now (closed and indexed), with the index generation it would use."""
    from ..cache.reader import CacheReader

    return tuple((str(d), s.name, int(s.generation)) for d in cache_dirs for s in CacheReader(d).shards)


def pinned_readers(cache_dirs: Iterable[str], shards: tuple[ShardRef, ...]) -> list[Any]:
    """One ``CacheReader`` per cache pinned to the snapshot's shards at the snapshot's index generations, so every
    process builds the same synthetic dataset from one snapshot."""
    from ..cache.layout import CacheError
    from ..cache.reader import CacheReader

    readers = []
    for d in cache_dirs:
        mine = [(name, int(gen)) for c, name, gen in shards if c == str(d)]
        try:
            readers.append(CacheReader(d, shards=mine))
        except CacheError as e:
            raise OnlineError(f"online snapshot of {d} cannot be opened: {e}") from e
    return readers


class SyntheticVersions:
    """Synthetic pools by content: ``get(shards)`` builds (once, keeping the last few) the dataset of a shard list and
    its :class:`SynthPool`. Shared by the sampler's schedule and the dataset wrapper of one process."""

    def __init__(self, build: Callable[[tuple[ShardRef, ...]], Any],
                 pool_of: Callable[[Any], SynthPool], keep: int = 3):
        self._build = build
        self._pool_of = pool_of
        self._keep = keep
        self._cache: OrderedDict[tuple[ShardRef, ...], tuple[SynthPool, Any]] = OrderedDict()

    def get(self, shards: tuple[ShardRef, ...]) -> tuple[SynthPool, Any]:
        hit = self._cache.get(shards)
        if hit is None:
            ds = self._build(shards)
            pool = self._pool_of(ds)
            pool.ident = shards
            hit = (pool, ds)
            self._cache[shards] = hit
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shards)
        return hit


class OnlineSchedule(PoolSchedule):
    """The pool at each position from the published (live) or recorded (replay) snapshots."""

    def __init__(self, store: SnapshotStore, versions: SyntheticVersions, *, refresh_iters: int, lag_iters: int,
                 total_batch_size: int, replay: bool):
        self.store = store
        self.versions = versions
        self.refresh_iters, self.lag_iters, self.total_batch_size = refresh_iters, lag_iters, total_batch_size
        self.replay = replay
        self._snaps: dict[int, Snapshot] = {}
        self._recorded: list[Snapshot] | None = store.recorded() if replay else None

    # -- which snapshot where --
    def _index_at(self, position: int) -> int:
        if self._recorded is not None:
            k = 0
            for s in self._recorded:
                if s.apply_from <= position:
                    k = s.index
            return k
        r, lag, t = self.refresh_iters, self.lag_iters, self.total_batch_size
        if position < boundary(1, r, lag, t):
            return 0
        return (position // t - lag) // r

    def boundary_after(self, position: int) -> int | None:
        if self._recorded is not None:
            nxt = [s.apply_from for s in self._recorded if s.apply_from > position]
            return min(nxt) if nxt else None
        return boundary(self._index_at(position) + 1, self.refresh_iters, self.lag_iters, self.total_batch_size)

    def snapshot(self, k: int) -> Snapshot:
        snap = self._snaps.get(k)
        if snap is None:
            if self._recorded is not None:
                snap = self._recorded[k]
            else:
                snap = self.store.read(k, wait=True)
                expected = boundary(k, self.refresh_iters, self.lag_iters, self.total_batch_size)
                if snap.apply_from != expected:
                    raise OnlineError(f"online snapshot {self.store.path(k)} applies from {snap.apply_from}, but "
                                      f"this run's settings put snapshot {k} at {expected} (ONLINE_REFRESH_ITERS, "
                                      "SOLVER.IMS_PER_BATCH or DATALOADER.NUM_WORKERS differ from the publisher's)")
            self._snaps[k] = snap
        return snap

    def pool_at(self, position: int) -> tuple[int, SynthPool]:
        k = self._index_at(position)
        return k, self.versions.get(self.snapshot(k).shards)[0]

    def dataset(self, version: int) -> Any:
        """The synthetic dataset of snapshot ``version`` (for the dataset wrapper)."""
        return self.versions.get(self.snapshot(version).shards)[1]


class OnlinePublisher:
    """Rank 0: snapshot the closed shards every ``refresh_iters`` consumed batches and publish them."""

    def __init__(self, store: SnapshotStore, list_shards: Callable[[], tuple[ShardRef, ...]],
                 count_samples: Callable[[tuple[ShardRef, ...]], int], *, refresh_iters: int, lag_iters: int,
                 total_batch_size: int):
        self.store = store
        self.list_shards = list_shards
        self.count_samples = count_samples
        self.refresh_iters, self.lag_iters, self.total_batch_size = refresh_iters, lag_iters, total_batch_size
        self._last: Snapshot | None = None

    def publish(self, k: int, shards: tuple[ShardRef, ...] | None = None) -> Snapshot:
        shards = self.list_shards() if shards is None else tuple(shards)
        same = self._last is not None and self._last.shards == shards
        n = self._last.num_samples if same else self.count_samples(shards)
        snap = Snapshot(index=k, apply_from=boundary(k, self.refresh_iters, self.lag_iters, self.total_batch_size),
                        shards=shards, num_samples=n, created=time.time())
        self.store.write(snap)
        if k == 0:
            logger.info("ACP online: snapshot 0 with %d shards, %d synthetic samples (%s)", len(shards), n,
                        self.store.run_dir)
        else:
            prev = self._last
            new_shards = len(set(shards) - set(prev.shards)) if prev else len(shards)
            logger.info("ACP online: snapshot %d: %d new shards, %+d synthetic samples (now %d), from sample %d "
                        "(iteration %d)", k, new_shards, n - (prev.num_samples if prev else 0), n, snap.apply_from,
                        k * self.refresh_iters + self.lag_iters)
        self._last = snap
        return snap


class OnlineLoader:
    """Wraps a train loader: after every ``refresh_iters`` batches handed to the trainer, rank 0 publishes the next
    snapshot. Iterating is otherwise the inner loader's iteration."""

    def __init__(self, loader: Iterable, publisher: OnlinePublisher | None):
        self.loader = loader
        self.publisher = publisher

    def __iter__(self) -> Iterator:
        consumed = 0
        k = 0
        for batch in self.loader:
            yield batch
            consumed += 1
            if self.publisher is not None and consumed % self.publisher.refresh_iters == 0:
                k += 1
                self.publisher.publish(k)
