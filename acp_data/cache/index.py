"""The columnar index of a shard and its generations.

``index/<shard>.<gen>/`` holds one ``.npy`` file per column (memory-mapped by readers) and ``meta.json`` (row counts,
the shard's byte size, why and with which scoring settings the generation was written). A generation is published by
writing a hidden temp directory and renaming it into place, so it is either absent or complete. Readers use the
newest generation whose recorded shard size matches the shard file (an interrupted ``verify`` leaves the previous,
consistent one in charge).

Sample columns (one row per sample, in shard order): ``key_hash`` (u64), ``key`` (bytes), ``image_offset``,
``image_size``, ``record_offset``, ``record_size`` (u64, data offsets inside the tar; the record member follows the
image member, so one read covers both), ``checksum`` (u32, crc32 of image bytes then record bytes), ``width``,
``height``, ``unit``, ``candidate_idx``, ``selected``, ``clis_l``, ``clis_i`` (f64, NaN = unscored), ``inst_start``,
``inst_count`` (the sample's rows in the instance columns). Instance columns: ``inst_sample`` (row of its sample),
``inst_category_id``, ``inst_clis_i``, ``inst_area``, ``inst_bbox`` and ``inst_layout_bbox`` (N x 4 XYWH absolute).

Rescoring (``acp-data rescore``) API::

    reader = CacheReader(cache)
    for shard in reader.shards:
        scores = shard_scores(cache, shard.name)          # copies of the current score columns + generation
        for local, record, image_bytes in reader.iter_shard(shard.name):
            scores.clis_i[local] = ...                    # NaN = unscored
            scores.inst_clis_i[scores.inst_start[local] + j] = ...
            scores.selected[local] = ...
        update_scores(cache, scores, scoring={...})       # publishes generation n+1; refused if n changed meanwhile
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import (
    FORMAT_VERSION,
    INDEX_NAME_RE,
    QUARANTINE,
    CacheError,
    CacheFormatError,
    fsync_dir,
    generation_path,
    index_dir,
    list_shard_files,
    member_stem,
    read_json,
    shard_path,
)
from .records import IMAGE_FORMATS, IndexEntry, index_entry
from .tarfmt import scan

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS: dict[str, str] = {
    "key_hash": "<u8", "key": "S", "image_offset": "<u8", "image_size": "<u8", "record_offset": "<u8",
    "record_size": "<u8", "checksum": "<u4", "width": "<i4", "height": "<i4", "unit": "<i8",
    "candidate_idx": "<i4", "selected": "|b1", "clis_l": "<f8", "clis_i": "<f8", "inst_start": "<i8",
    "inst_count": "<i4",
}
INSTANCE_COLUMNS: dict[str, str] = {
    "inst_sample": "<i8", "inst_category_id": "<i4", "inst_clis_i": "<f8", "inst_area": "<f8", "inst_bbox": "<f4",
    "inst_layout_bbox": "<f4",
}
SCORE_COLUMNS = ("clis_l", "clis_i", "selected", "inst_clis_i")
_READ_COLUMNS = ("image_offset", "image_size", "record_offset", "record_size", "checksum")
META = "meta.json"


class StaleGenerationError(CacheError):
    """Someone published a newer index generation of the shard since it was read."""


def key_hash(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of generation keys (blake2b; stable across processes and machines)."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def checksum(image_bytes: bytes | memoryview, record_bytes: bytes | memoryview) -> int:
    return zlib.crc32(record_bytes, zlib.crc32(image_bytes)) & 0xFFFFFFFF


# ----- building columns ----------------------------------------------------------------------------------------------
def columns_from_entries(entries: Sequence[IndexEntry]) -> dict[str, np.ndarray]:
    """Sample and instance columns of a shard from its entries (shard order)."""
    n = len(entries)
    counts = np.array([len(e.inst_category_id) for e in entries], dtype=np.int32)
    starts = np.zeros(n, dtype=np.int64)
    if n:
        starts[1:] = np.cumsum(counts[:-1], dtype=np.int64)
    keys = [e.key for e in entries]
    cols: dict[str, np.ndarray] = {
        "key_hash": key_hash(keys),
        "key": np.array([k.encode() for k in keys], dtype="S") if n else np.zeros(0, dtype="S1"),
        "image_offset": np.array([e.image_offset for e in entries], dtype=np.uint64),
        "image_size": np.array([e.image_size for e in entries], dtype=np.uint64),
        "record_offset": np.array([e.record_offset for e in entries], dtype=np.uint64),
        "record_size": np.array([e.record_size for e in entries], dtype=np.uint64),
        "checksum": np.array([e.checksum for e in entries], dtype=np.uint32),
        "width": np.array([e.width for e in entries], dtype=np.int32),
        "height": np.array([e.height for e in entries], dtype=np.int32),
        "unit": np.array([e.unit for e in entries], dtype=np.int64),
        "candidate_idx": np.array([e.candidate_idx for e in entries], dtype=np.int32),
        "selected": np.array([e.selected for e in entries], dtype=bool),
        "clis_l": np.array([e.clis_l for e in entries], dtype=np.float64),
        "clis_i": np.array([e.clis_i for e in entries], dtype=np.float64),
        "inst_start": starts,
        "inst_count": counts,
        "inst_sample": np.repeat(np.arange(n, dtype=np.int64), counts),
    }

    def cat(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        parts = [getattr(e, name) for e in entries]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype=dtype)

    cols["inst_category_id"] = cat("inst_category_id", np.int32, (0,))
    cols["inst_clis_i"] = cat("inst_clis_i", np.float64, (0,))
    cols["inst_area"] = cat("inst_area", np.float64, (0,))
    cols["inst_bbox"] = cat("inst_bbox", np.float32, (0, 4))
    cols["inst_layout_bbox"] = cat("inst_layout_bbox", np.float32, (0, 4))
    return cols


def check_columns(columns: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Columns cast to their dtypes, with every column present and consistent lengths; ``CacheError`` otherwise."""
    missing = [c for c in (*SAMPLE_COLUMNS, *INSTANCE_COLUMNS) if c not in columns]
    if missing:
        raise CacheError(f"{where}: index columns missing: {', '.join(missing)}")
    out = {}
    for name, dt in {**SAMPLE_COLUMNS, **INSTANCE_COLUMNS}.items():
        a = np.asarray(columns[name])
        out[name] = a if dt == "S" and a.dtype.kind == "S" else a.astype(dt if dt != "S" else "S", copy=False)
    n, m = len(out["key_hash"]), len(out["inst_category_id"])
    bad = [c for c in SAMPLE_COLUMNS if len(out[c]) != n] + [c for c in INSTANCE_COLUMNS if len(out[c]) != m]
    if bad:
        raise CacheError(f"{where}: index columns of inconsistent length: {', '.join(bad)} "
                         f"({n} samples, {m} instances)")
    for c in ("inst_bbox", "inst_layout_bbox"):
        if out[c].shape != (m, 4):
            raise CacheError(f"{where}: {c} must have shape ({m}, 4), got {out[c].shape}")
    if int(out["inst_count"].sum()) != m or (n and (out["inst_start"][0] != 0 or np.any(
            out["inst_start"][1:] != np.cumsum(out["inst_count"][:-1])))):
        raise CacheError(f"{where}: inst_start/inst_count do not tile the {m} instance rows")
    return out


# ----- generations ---------------------------------------------------------------------------------------------------
def list_generations(cache_dir: str | os.PathLike) -> dict[str, list[int]]:
    """shard name -> sorted complete index generations (directories with a ``meta.json``)."""
    d = index_dir(cache_dir)
    out: dict[str, list[int]] = {}
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = INDEX_NAME_RE.match(p.name)
        if m and (p / META).is_file():
            out.setdefault(m["shard"], []).append(int(m["gen"]))
    for v in out.values():
        v.sort()
    return out


def read_meta(cache_dir: str | os.PathLike, shard: str, generation: int) -> dict[str, Any]:
    path = generation_path(cache_dir, shard, generation) / META
    meta = read_json(path, "index metadata")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CacheFormatError(f"{path} has index format version {meta.get('format_version') if isinstance(meta, dict) else None!r}; "
                               f"this acp-data reads version {FORMAT_VERSION}")
    return meta


def choose_generation(cache_dir: str | os.PathLike, shard: str, generations: Sequence[int],
                      shard_size: int | None) -> tuple[int, dict[str, Any], bool]:
    """``(generation, meta, size_matches)``: the newest generation recorded for the shard's current size, else the
    newest one (its samples will fail their checks where the shard changed under it)."""
    newest: tuple[int, dict[str, Any]] | None = None
    for g in sorted(generations, reverse=True):
        meta = read_meta(cache_dir, shard, g)
        if newest is None:
            newest = (g, meta)
        if shard_size is not None and int(meta.get("shard_size", -1)) == shard_size:
            return g, meta, True
    if newest is None:
        raise CacheError(f"shard {shard} of {cache_dir} has no index generation")
    return newest[0], newest[1], False


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        if mmap:
            try:  # a plain ndarray view of the map: indexing it is several times cheaper than a np.memmap
                return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
            except ValueError:  # zero-length arrays cannot be memory-mapped
                return np.load(path, allow_pickle=False)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CacheFormatError(f"index column {path} cannot be read: {e}") from e


def load_columns(cache_dir: str | os.PathLike, shard: str, generation: int, names: Iterable[str] | None = None,
                 mmap: bool = True) -> dict[str, np.ndarray]:
    """Columns of one generation (memory-mapped read-only unless ``mmap=False``)."""
    d = generation_path(cache_dir, shard, generation)
    names = list(names) if names is not None else [*SAMPLE_COLUMNS, *INSTANCE_COLUMNS]
    return {n: _load(d / f"{n}.npy", mmap) for n in names}


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def publish_generation(cache_dir: str | os.PathLike, shard: str, columns: dict[str, np.ndarray], *, reason: str,
                       scoring: dict[str, Any] | None = None, base_generation: int | None = None,
                       shard_size: int | None = None) -> int:
    """Publish the next index generation of ``shard`` and return its number.

    ``base_generation``: the generation the columns were derived from (-1 for a first index); if a newer one was
    published meanwhile, ``StaleGenerationError`` is raised instead of overwriting someone else's work. Without it,
    a concurrent publisher just makes this one take the following number. ``shard_size`` defaults to the shard file's
    current size.
    """
    cols = check_columns(columns, f"index of shard {shard} in {cache_dir}")
    if shard_size is None:
        shard_size = os.path.getsize(shard_path(cache_dir, shard))
    idir = index_dir(cache_dir)
    idir.mkdir(parents=True, exist_ok=True)
    gens = list_generations(cache_dir).get(shard, [])
    newest = gens[-1] if gens else -1
    if base_generation is not None and newest != base_generation:
        raise StaleGenerationError(f"shard {shard} of {cache_dir}: generation {newest} was published after "
                                   f"generation {base_generation} was read; redo the update from the new one")
    gen = newest + 1
    tmp = idir / f".tmp-{shard}.{gen}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, arr in cols.items():
            _save(tmp / f"{name}.npy", arr)
        meta = {"format_version": FORMAT_VERSION, "shard": shard, "shard_size": int(shard_size),
                "num_samples": len(cols["key_hash"]), "num_instances": len(cols["inst_category_id"]),
                "reason": reason, "scoring": scoring, "created": time.time()}
        while True:
            meta["generation"] = gen
            with open(tmp / META, "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, generation_path(cache_dir, shard, gen))
                break
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if base_generation is not None:
                    raise StaleGenerationError(f"shard {shard} of {cache_dir}: generation {gen} was published "
                                               "concurrently") from e
                gen += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(idir)
    return gen


def prune_generations(cache_dir: str | os.PathLike, keep: int = 2) -> int:
    """Remove all but the newest ``keep`` generations of every shard; returns how many were removed. Readers that
    already mapped an old generation keep working (the files live until unmapped)."""
    removed = 0
    for shard, gens in list_generations(cache_dir).items():
        for g in gens[: max(0, len(gens) - max(1, keep))]:
            shutil.rmtree(generation_path(cache_dir, shard, g), ignore_errors=True)
            removed += 1
    return removed


# ----- indexing a shard from its bytes -------------------------------------------------------------------------------
@dataclass
class ShardSample:
    """A sample found by scanning a shard: member names, data ranges and (when it parses) its record."""

    stem: str
    image_name: str
    image_offset: int
    image_size: int
    record_offset: int
    record_size: int
    checksum: int
    record: dict[str, Any] | None
    error: str | None = None


def scan_shard(path: str | os.PathLike) -> tuple[list[ShardSample], list[tuple[str, int, int, str]], str | None]:
    """Read a shard member by member: ``(samples, stray, scan_error)``.

    ``samples`` pairs each record member with the image member just before it (``error`` set when the record does not
    parse or does not match its names); ``stray`` lists ``(name, offset, size, reason)`` of members that belong to no
    sample; ``scan_error`` says why the scan stopped early (truncation, a damaged header).
    """
    members, scan_error = scan(path)
    samples: list[ShardSample] = []
    stray: list[tuple[str, int, int, str]] = []
    i = 0
    with open(path, "rb") as f:
        while i < len(members):
            m = members[i]
            stem, _, ext = m.name.rpartition(".")
            nxt = members[i + 1] if i + 1 < len(members) else None
            if ext not in IMAGE_FORMATS or nxt is None or nxt.name != f"{stem}.json":
                stray.append((m.name, m.data_offset, m.size, "member without its pair (image then record)"))
                i += 1
                continue
            f.seek(m.data_offset)
            img = f.read(m.size)
            f.seek(nxt.data_offset)
            rec_b = f.read(nxt.size)
            s = ShardSample(stem, m.name, m.data_offset, m.size, nxt.data_offset, nxt.size, checksum(img, rec_b), None)
            try:
                rec = json.loads(rec_b)
                if not isinstance(rec, dict) or member_stem(rec["key"], rec["candidate_idx"]) != stem:
                    raise ValueError(f"record key/candidate_idx do not match member name {stem!r}")
                index_entry(rec, 0, 0, 0, 0, 0)  # the fields the index needs are there and typed
                s.record = rec
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                s.error = f"record does not parse: {type(e).__name__}: {e}"
            samples.append(s)
            i += 2
    return samples, stray, scan_error


def entries_from_samples(samples: Sequence[ShardSample]) -> list[IndexEntry]:
    return [index_entry(s.record, s.image_offset, s.image_size, s.record_offset, s.record_size, s.checksum)
            for s in samples if s.record is not None]


def index_shard(cache_dir: str | os.PathLike, shard: str) -> dict[str, np.ndarray]:
    """Columns of a healthy shard rebuilt from its bytes; ``CacheError`` naming the shard if anything is wrong."""
    path = shard_path(cache_dir, shard)
    samples, stray, err = scan_shard(path)
    problems = ([err] if err else []) + [f"{n}: {r}" for n, _, _, r in stray] + [
        f"{s.stem}: {s.error}" for s in samples if s.error]
    if problems:
        raise CacheError(f"shard {path} is damaged ({'; '.join(problems[:3])}"
                         f"{'; ...' if len(problems) > 3 else ''}); run `acp-data verify {cache_dir}`")
    return columns_from_entries(entries_from_samples(samples))


def orphan_shards(cache_dir: str | os.PathLike) -> list[str]:
    """Closed shards without any index generation (a writer died between closing the shard and indexing it)."""
    gens = list_generations(cache_dir)
    return [s for s in list_shard_files(cache_dir) if s not in gens]


def reindex_orphans(cache_dir: str | os.PathLike) -> list[str]:
    """Index every orphan shard (generation 0); returns the shards indexed. A damaged orphan is logged and left for
    ``acp-data verify``; one indexed concurrently by another process is skipped."""
    done = []
    for shard in orphan_shards(cache_dir):
        try:
            cols = index_shard(cache_dir, shard)
            publish_generation(cache_dir, shard, cols, reason="reindex", base_generation=-1)
        except StaleGenerationError:
            continue
        except CacheError as e:
            logger.error("orphan shard not indexed: %s", e)
            continue
        logger.info("re-indexed orphan shard %s of %s (%d samples)", shard, cache_dir, len(cols["key_hash"]))
        done.append(shard)
    return done


QUARANTINE_STEM_RE = re.compile(r"^(?P<key>[A-Za-z0-9_-]{1,64})\.c(?P<cand>\d+)$")


@dataclass
class UnitStatus:
    """What a resumed prebuild finds in a cache, unit by unit (the unit is the atom of resume: all its candidates are
    written together, so it is either done or redone whole).

    ``done``: every indexed sample of the unit is present and intact; ``lost``: indexed, but no intact sample is left
    (a missing shard, a shard cut before them): a rerun regenerates it; ``damaged``: some candidates intact, others
    lost (or quarantined by an earlier ``verify``): left alone until ``acp-data verify --repair`` removes the unit
    whole, so that a rerun regenerates it whole instead of storing its intact candidates twice.
    """

    done: set[str]
    lost: set[str]
    damaged: set[str]
    missing_shards: list[str]
    damaged_shards: list[str]


def intact_rows(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per index row of a shard whose size differs from its index: are its byte ranges inside the file and its crc32
    right? (A shard of the recorded size is trusted without reading it: bit flips are ``verify``'s job.)"""
    n = len(columns["key"])
    ok = np.zeros(n, dtype=bool)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for i in range(n):
            io_, isz = int(columns["image_offset"][i]), int(columns["image_size"][i])
            ro, rsz = int(columns["record_offset"][i]), int(columns["record_size"][i])
            if not (io_ + isz <= ro and ro + rsz <= size):
                continue
            buf = os.pread(f.fileno(), ro + rsz - io_, io_)
            ok[i] = checksum(buf[:isz], buf[ro - io_:]) == int(columns["checksum"][i])
    return ok


def quarantined_samples(cache_dir: str | os.PathLike) -> set[tuple[str, int]]:
    """``(key, candidate_idx)`` of the samples ``verify`` moved to ``quarantine/`` (from its ``reasons.json`` files);
    a key that still has other candidates in the index lost these ones."""
    out: set[tuple[str, int]] = set()
    qdir = Path(cache_dir) / QUARANTINE
    if not qdir.is_dir():
        return out
    for p in sorted(qdir.glob("*/reasons.json")):
        try:
            items = read_json(p, "quarantine reasons").get("items", [])
        except (CacheError, AttributeError) as e:
            logger.warning("%s cannot be read (%s); units it lists are not known to be partial", p, e)
            continue
        for it in items:
            m = QUARANTINE_STEM_RE.match(str(it.get("stem", ""))) if isinstance(it, dict) else None
            if m:
                out.add((m["key"], int(m["cand"])))
    return out


def unit_status(cache_dir: str | os.PathLike) -> UnitStatus:
    """Which units of the cache are done, lost or damaged (see ``UnitStatus``), by candidate: a unit is done when
    every candidate indexed for it has an intact copy somewhere (so a unit regenerated into a new shard is done even
    while a missing shard's stale index still lists it). Orphans are not looked at (run ``reindex_orphans`` first).
    Reads the key and candidate columns of every shard, and the bytes of shards whose size differs from the one their
    index was written for."""
    indexed: dict[str, set[int]] = {}  # key -> candidates indexed anywhere
    intact: dict[str, set[int]] = {}  # key -> candidates with at least one intact copy
    missing, damaged_shards = [], []
    for shard, gens in sorted(list_generations(cache_dir).items()):
        path = shard_path(cache_dir, shard)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = None
        g, _, size_ok = choose_generation(cache_dir, shard, gens, size)
        names = ["key", "candidate_idx"] if size_ok else ["key", "candidate_idx", *_READ_COLUMNS]
        cols = load_columns(cache_dir, shard, g, names, mmap=False)
        if size is None:
            missing.append(shard)
            ok = np.zeros(len(cols["key"]), dtype=bool)
        elif size_ok:
            ok = np.ones(len(cols["key"]), dtype=bool)
        else:
            damaged_shards.append(shard)
            ok = intact_rows(path, cols)
        for k, c, good in zip(np.asarray(cols["key"]).tolist(), np.asarray(cols["candidate_idx"]).tolist(),
                              ok.tolist()):
            k = k.decode()
            indexed.setdefault(k, set()).add(int(c))
            if good:
                intact.setdefault(k, set()).add(int(c))
    for k, c in quarantined_samples(cache_dir):  # candidates an earlier verify removed, not regenerated since
        if k in indexed and c not in intact.get(k, ()):
            indexed[k].add(c)
    done = {k for k, cands in indexed.items() if cands <= intact.get(k, set())}
    lost = {k for k in indexed if k not in intact}
    return UnitStatus(done=done, lost=lost, damaged=set(indexed) - done - lost, missing_shards=missing,
                      damaged_shards=damaged_shards)


def done_keys(cache_dir: str | os.PathLike) -> set[str]:
    """Generation keys of the units whose samples are all present and intact (``unit_status(...).done``; indexed
    shards only: run ``reindex_orphans`` first to include orphans)."""
    return unit_status(cache_dir).done


# ----- rescoring -----------------------------------------------------------------------------------------------------
@dataclass
class ShardScores:
    """Writable copies of one shard's score columns at ``generation`` (rows in shard order; NaN = unscored).
    ``inst_start``/``inst_count`` locate a sample's instances."""

    shard: str
    generation: int
    clis_l: np.ndarray
    clis_i: np.ndarray
    selected: np.ndarray
    inst_clis_i: np.ndarray
    inst_start: np.ndarray
    inst_count: np.ndarray


def shard_scores(cache_dir: str | os.PathLike, shard: str) -> ShardScores:
    gens = list_generations(cache_dir).get(shard)
    if not gens:
        raise CacheError(f"shard {shard} of {cache_dir} has no index")
    g = gens[-1]
    c = load_columns(cache_dir, shard, g, [*SCORE_COLUMNS, "inst_start", "inst_count"])
    return ShardScores(shard, g, *(np.array(c[n]) for n in (*SCORE_COLUMNS, "inst_start", "inst_count")))


def update_scores(cache_dir: str | os.PathLike, scores: ShardScores, scoring: dict[str, Any] | None = None) -> int:
    """Publish a generation of ``scores.shard`` with these score columns (all other columns unchanged); refused with
    ``StaleGenerationError`` if the shard's index changed since ``scores`` was read."""
    cols = dict(load_columns(cache_dir, scores.shard, scores.generation))
    for name in SCORE_COLUMNS:
        new = np.asarray(getattr(scores, name))
        if new.shape != cols[name].shape:
            raise CacheError(f"shard {scores.shard}: {name} has shape {new.shape}, the index has {cols[name].shape}")
        cols[name] = new
    meta = read_meta(cache_dir, scores.shard, scores.generation)
    return publish_generation(cache_dir, scores.shard, cols, reason="rescore", scoring=scoring,
                              base_generation=scores.generation, shard_size=int(meta["shard_size"]))
