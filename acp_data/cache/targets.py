"""The target concept of each sample: the category its work unit was drawn for (``ACP.CATEGORIES`` chooses samples by
it; docs/cache.md "Python API").

The index has no target column, so it is read from the records, cheaply: records are compact JSON with sorted keys
(docs/design.md "A sample"), so a record written by prebuild ends with ``"target":T,"unit":U,"width":W}`` and the
last 96 bytes of one candidate per unit (all candidates of a unit share the target and sit in one shard) give it
with one small ``pread``: 17 microseconds per unit on the 2-core test machine (10K units in 0.17 s; a record
without that tail, parsed in full, 270 microseconds). A record without the tail (written before ``target`` was
recorded, or by another writer) is parsed in full: its ``target``, else the first object of its scene graph (every
planner lists the target first), else its first instance's category; a damaged one gets -1 (no target: never
chosen). Results are kept per ``(cache, shard, index generation)`` for the process.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import BrokenSampleError, shard_path

if TYPE_CHECKING:
    from .reader import CacheReader

__all__ = ["sample_targets", "record_target", "UNKNOWN_TARGET"]

UNKNOWN_TARGET = -1
_TAIL_BYTES = 96
_TAIL = re.compile(rb'"target":(\d+),"unit":-?\d+,"width":\d+\}\s*$')
_CACHE: dict[tuple[str, str, int], np.ndarray] = {}


def record_target(record: dict[str, Any]) -> int:
    """The target concept of a parsed record (see the module docstring for records without ``target``)."""
    t = record.get("target")
    if isinstance(t, int) and not isinstance(t, bool):
        return t
    objects = (record.get("scene_graph") or {}).get("objects") or []
    if objects and isinstance(objects[0], dict) and isinstance(objects[0].get("category_id"), int):
        return int(objects[0]["category_id"])
    insts = record.get("instances") or []
    return int(insts[0]["category_id"]) if insts else UNKNOWN_TARGET


def _shard_targets(reader: CacheReader, s: int) -> np.ndarray:
    info = reader.shards[s]
    cached = _CACHE.get((str(reader.cache_dir), info.name, info.generation))
    if cached is not None:
        return cached
    c = reader.shard_columns(s, ["key_hash", "record_offset", "record_size"])
    units, first, inverse = np.unique(np.asarray(c["key_hash"]), return_index=True, return_inverse=True)
    per_unit = np.full(len(units), UNKNOWN_TARGET, dtype=np.int32)
    if len(units):
        try:
            fd = os.open(shard_path(reader.cache_dir, info.name), os.O_RDONLY)
        except OSError:  # the reader reports an unreadable shard when a sample of it is read
            return per_unit[np.asarray(inverse).reshape(-1)]
        try:
            for u, local in enumerate(first.tolist()):
                off, size = int(c["record_offset"][local]), int(c["record_size"][local])
                n = min(size, _TAIL_BYTES)
                m = _TAIL.search(os.pread(fd, n, off + size - n))
                if m:
                    per_unit[u] = int(m[1])
                    continue
                try:
                    per_unit[u] = record_target(reader.read_record(info.sample_base + local))
                except (BrokenSampleError, KeyError, TypeError, ValueError):
                    per_unit[u] = UNKNOWN_TARGET
        finally:
            os.close(fd)
    out = per_unit[np.asarray(inverse).reshape(-1)]
    _CACHE[(str(reader.cache_dir), info.name, info.generation)] = out
    return out


def sample_targets(reader: CacheReader) -> np.ndarray:
    """Target category id of every sample row of ``reader`` (int32, ``UNKNOWN_TARGET`` where it cannot be read)."""
    parts = [_shard_targets(reader, s) for s in range(len(reader.shards))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
