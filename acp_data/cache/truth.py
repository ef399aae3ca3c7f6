"""The generator's truth of each sample, for ``ACP.SELECT oracle`` only (docs/design.md "The Shapes world").

The Shapes generator records which objects it drew wrong in the provenance field ``shapes_truth`` (one failure name
or null per scene-graph object; acp_data/cache/records.py checks it). The index has no column for it, so it is read
from the records, once per ``(cache, shards, index generations)`` for the process (a few thousand records of a Shapes
cache in about a second). No other rule reads it: it is ground truth a real generator does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import BrokenSampleError
from .records import SHAPES_TRUTH

if TYPE_CHECKING:
    from .reader import CacheReader

__all__ = ["NO_TRUTH", "record_truth", "sample_truth"]

NO_TRUTH = -1
_CACHE: dict[tuple[str, tuple[tuple[str, int], ...]], tuple[np.ndarray, np.ndarray]] = {}


def record_truth(record: dict[str, Any]) -> tuple[int, list[bool]] | None:
    """``(failed objects in the image, failed flag of each instance)`` of a parsed record, or None when it has no
    ``shapes_truth`` (or an instance names no scene object)."""
    truth = (record.get("provenance") or {}).get(SHAPES_TRUTH)
    failures = truth.get("failures") if isinstance(truth, dict) else None
    objects = (record.get("scene_graph") or {}).get("objects") or []
    if not isinstance(failures, list) or len(failures) != len(objects):
        return None
    position = {o.get("id"): i for i, o in enumerate(objects) if isinstance(o, dict)}
    flags = []
    for inst in record.get("instances") or []:
        i = position.get(inst.get("object_id"))
        if i is None:
            return None
        flags.append(failures[i] is not None)
    return sum(f is not None for f in failures), flags


def sample_truth(reader: CacheReader | Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sample row the number of failed objects (``NO_TRUTH`` where the record has no truth) and per instance row
    whether the generator drew it wrong (False where unknown). ``IndexColumns`` give them as the optional columns
    ``truth_failures`` and ``inst_failed``."""
    if hasattr(reader, "columns") and not hasattr(reader, "shards"):  # IndexColumns
        n, m = len(reader), reader.num_instances
        cols = reader.columns
        fails = np.asarray(cols["truth_failures"], dtype=np.int32) if "truth_failures" in cols else \
            np.full(n, NO_TRUTH, dtype=np.int32)
        flags = np.asarray(cols["inst_failed"], dtype=bool) if "inst_failed" in cols else np.zeros(m, dtype=bool)
        return fails, flags
    key = (str(reader.cache_dir), tuple((s.name, int(s.generation)) for s in reader.shards))
    if key in _CACHE:
        return _CACHE[key]
    count = reader.column("inst_count").astype(np.int64)
    fails = np.full(len(reader), NO_TRUTH, dtype=np.int32)
    flags = np.zeros(int(count.sum()), dtype=bool)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    for row in range(len(reader)):
        try:
            got = record_truth(reader.read_record(row))
        except (BrokenSampleError, KeyError, TypeError, ValueError):
            got = None
        if got is None or len(got[1]) != count[row]:
            continue
        fails[row] = got[0]
        flags[start[row]:start[row] + count[row]] = got[1]
    _CACHE[key] = (fails, flags)
    return fails, flags
