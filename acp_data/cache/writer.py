"""``CacheWriter``: appends samples to per-writer tar shards, closes them atomically and publishes their index.

A shard is written as ``shards/<rank>-<uuid>-<n>.tar.tmp`` (never read), then fsynced, renamed and the directory
fsynced; only then is its index generation 0 published. A crash leaves either nothing visible or an orphan shard
that the next writer re-indexes. The candidates of a work unit always land in one shard, and a resuming writer
skips units whose samples are all present and intact (``unit_status``), so rerunning after a crash yields every key
once and rerunning after a shard was lost regenerates its units.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..categories import CategoryTable
from . import tarfmt
from .index import (
    UnitStatus,
    checksum,
    columns_from_entries,
    done_keys,
    publish_generation,
    reindex_orphans,
    unit_status,
)
from .layout import (
    SHARDS,
    SUMMARY,
    TMP_SUFFIX,
    CacheError,
    atomic_write_json,
    fsync_dir,
    member_stem,
    new_writer_uuid,
    shard_name,
    shard_path,
)
from .manifest import ensure_manifest
from .records import IndexEntry, image_format, index_entry, record_bytes, validate_record

logger = logging.getLogger(__name__)

__all__ = ["CacheWriter", "done_keys", "reindex_orphans"]


class _OpenShard:
    def __init__(self, cache_dir: Path, name: str) -> None:
        self.name = name
        self.final = shard_path(cache_dir, name)
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
        self.f = open(self.tmp, "wb")
        self.offset = 0
        self.entries: list[IndexEntry] = []


class CacheWriter:
    """Write samples into ``cache_dir`` as rank ``rank``.

    ``add_unit(records, images)`` writes all stored candidates of one work unit (never split across shards);
    ``add(record, image_bytes)`` buffers candidates and writes a unit when the next key arrives or on ``flush``/
    ``close``. Shards roll at unit boundaries once they hold ``shard_max_samples`` samples or ``shard_max_bytes``
    bytes. Use as a context manager; an exception discards only the unit in flight.
    """

    def __init__(self, cache_dir: str | os.PathLike, categories: CategoryTable, generation_settings: dict[str, Any],
                 rank: int = 0, *, scoring_settings: dict[str, Any] | None = None, shard_max_samples: int = 1024,
                 shard_max_bytes: int = 1 << 30, fsync: bool = True) -> None:
        if shard_max_samples < 1 or shard_max_bytes < 1:
            raise ValueError("shard_max_samples and shard_max_bytes must be positive")
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.cache_dir = Path(cache_dir)
        self.manifest = ensure_manifest(self.cache_dir, categories, generation_settings, scoring_settings)
        self.categories = self.manifest.categories
        self.rank = int(rank)
        self.uuid = new_writer_uuid()
        self.shard_max_samples = int(shard_max_samples)
        self.shard_max_bytes = int(shard_max_bytes)
        self.fsync = fsync
        for sub in (SHARDS, "index", SUMMARY):
            (self.cache_dir / sub).mkdir(exist_ok=True)
        self.reindexed = reindex_orphans(self.cache_dir)
        self.unit_status = unit_status(self.cache_dir)
        self._done = set(self.unit_status.done)
        self._log_resume_state(self.unit_status)
        self._n = 0
        self._shard: _OpenShard | None = None
        self._pending: list[tuple[dict[str, Any], bytes]] = []
        self._closed = False
        self.shards_closed: list[str] = []
        self.units_written = 0
        self.units_skipped = 0
        self.samples_written = 0
        self.bytes_written = 0

    # ----- resume ---------------------------------------------------------------------------------------------------
    @property
    def done_keys(self) -> set[str]:
        """Keys of the units whose samples are all present and intact (at start), or written by this writer."""
        return self._done

    @property
    def damaged_keys(self) -> set[str]:
        """Keys of the units that lost some candidates and keep others (at start): skipped, so their intact
        candidates are not stored twice, until ``acp-data verify --repair`` removes them whole."""
        return self.unit_status.damaged

    def is_done(self, key: str) -> bool:
        """True for a unit to skip: done, or damaged (see ``damaged_keys``)."""
        return key in self._done or key in self.unit_status.damaged

    def _log_resume_state(self, st: UnitStatus) -> None:
        if st.lost:
            logger.warning("%s: %d unit(s) have no intact sample left (missing shards: %d, damaged shards: %d); they "
                           "are not counted as done and a rerun regenerates them", self.cache_dir, len(st.lost),
                           len(st.missing_shards), len(st.damaged_shards))
        if st.damaged:
            logger.warning("%s: %d unit(s) lost some of their candidates and keep the others; they are skipped. "
                           "`acp-data verify --repair %s` removes them whole, then a rerun regenerates them",
                           self.cache_dir, len(st.damaged), self.cache_dir)

    # ----- writing --------------------------------------------------------------------------------------------------
    def add(self, record: dict[str, Any], image_bytes: bytes) -> None:
        """Buffer one candidate; the unit is written when a candidate with another key arrives, or on
        ``flush``/``close``."""
        self._check_open()
        if self._pending and self._pending[0][0].get("key") != record.get("key"):
            self.flush()
        self._pending.append((record, bytes(image_bytes)))

    def flush(self) -> None:
        """Write the buffered unit (if any)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.add_unit([r for r, _ in pending], [b for _, b in pending])

    def add_unit(self, records: Sequence[dict[str, Any]], images: Sequence[bytes]) -> bool:
        """Write all candidates of one unit (same ``key``); False when the unit is skipped (``is_done``)."""
        self._check_open()
        if len(records) != len(images) or not records:
            raise CacheError(f"add_unit needs as many images as records (>= 1), got {len(records)} records and "
                             f"{len(images)} images")
        key = records[0].get("key")
        if any(r.get("key") != key for r in records):
            raise CacheError(f"add_unit: all candidates of a unit must share one key, got "
                             f"{sorted({str(r.get('key')) for r in records})}")
        if self.is_done(key):
            self.units_skipped += 1
            return False
        where = f"cache manifest {self.manifest.path}"
        checked = [validate_record(r, b, self.categories, where) for r, b in zip(records, images)]
        cands = [r["candidate_idx"] for r in checked]
        if len(set(cands)) != len(cands):
            raise CacheError(f"unit key={key!r}: candidate_idx values repeat: {cands}")
        blobs = [record_bytes(r) for r in checked]
        size = sum(tarfmt.padded(len(b)) + tarfmt.padded(len(i)) + 2 * tarfmt.BLOCK for b, i in zip(blobs, images))
        sh = self._shard
        if sh is not None and sh.entries and (len(sh.entries) + len(checked) > self.shard_max_samples
                                              or sh.offset + size > self.shard_max_bytes):
            self.close_shard()
        sh = self._shard or self._open_shard()
        start = sh.offset
        try:
            for rec, img, blob in zip(checked, images, blobs):
                self._write_sample(sh, rec, bytes(img), blob)
        except BaseException:
            sh.f.seek(start)
            sh.f.truncate(start)
            sh.offset = start
            sh.entries = [e for e in sh.entries if e.image_offset < start]
            raise
        self._done.add(key)
        self.units_written += 1
        return True

    def _write_sample(self, sh: _OpenShard, rec: dict[str, Any], img: bytes, blob: bytes) -> None:
        stem = member_stem(rec["key"], rec["candidate_idx"])
        mtime = int(time.time())
        img_member = tarfmt.member_bytes(f"{stem}.{image_format(img)}", img, mtime)
        rec_member = tarfmt.member_bytes(f"{stem}.json", blob, mtime)
        img_off = sh.offset + tarfmt.BLOCK
        rec_off = sh.offset + len(img_member) + tarfmt.BLOCK
        sh.f.write(img_member)
        sh.f.write(rec_member)
        sh.offset += len(img_member) + len(rec_member)
        sh.entries.append(index_entry(rec, img_off, len(img), rec_off, len(blob), checksum(img, blob)))
        self.samples_written += 1
        self.bytes_written += len(img_member) + len(rec_member)

    def _open_shard(self) -> _OpenShard:
        self._shard = _OpenShard(self.cache_dir, shard_name(self.rank, self.uuid, self._n))
        self._n += 1
        return self._shard

    def close_shard(self) -> str | None:
        """Close the current shard (end marker, fsync, rename, fsync dir) and publish its index; returns its name."""
        sh, self._shard = self._shard, None
        if sh is None:
            return None
        if not sh.entries:
            sh.f.close()
            sh.tmp.unlink(missing_ok=True)
            return None
        sh.f.write(tarfmt.END_OF_ARCHIVE)
        sh.f.flush()
        if self.fsync:
            os.fsync(sh.f.fileno())
        size = sh.f.tell()
        sh.f.close()
        os.replace(sh.tmp, sh.final)
        if self.fsync:
            fsync_dir(sh.final.parent)
        publish_generation(self.cache_dir, sh.name, columns_from_entries(sh.entries), reason="write",
                           scoring=self.manifest.scoring or None, base_generation=-1, shard_size=size)
        self.shards_closed.append(sh.name)
        logger.debug("closed shard %s (%d samples, %d bytes)", sh.name, len(sh.entries), size)
        return sh.name

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary/<rank>-<uuid>.json`` atomically (replacing this writer's previous summary); the writer's
        own counts are added under ``"writer"``."""
        path = self.cache_dir / SUMMARY / f"{self.rank}-{self.uuid}.json"
        atomic_write_json(path, {**summary, "writer": self.stats()})
        return path

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "uuid": self.uuid, "units_written": self.units_written,
                "units_skipped": self.units_skipped, "samples_written": self.samples_written,
                "bytes_written": self.bytes_written, "shards": list(self.shards_closed),
                "reindexed_orphans": list(self.reindexed)}

    def close(self) -> None:
        """Write the buffered unit and close the current shard. Idempotent."""
        if self._closed:
            return
        self.flush()
        self.close_shard()
        self._closed = True

    def abort(self) -> None:
        """Drop the buffered unit and the open shard's unpublished samples (closed shards stay)."""
        self._pending = []
        sh, self._shard = self._shard, None
        if sh is not None:
            sh.f.close()
            sh.tmp.unlink(missing_ok=True)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"the CacheWriter of {self.cache_dir} is closed")

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Units already written are complete; keep them, lose only the buffered (possibly partial) unit.
            self._pending = []
            self.close_shard()
            self._closed = True


def read_summaries(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All writers' summary files of a cache (sorted by name)."""
    from .layout import read_json

    d = Path(cache_dir) / SUMMARY
    return [read_json(p, "summary") for p in sorted(d.glob("*.json"))] if d.is_dir() else []
