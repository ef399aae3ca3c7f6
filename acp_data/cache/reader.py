"""``CacheReader``: one cache seen through its memory-mapped index.

Rows are numbered over the visible shards (those with a complete index generation), in shard-name order; a sample is
read with one ``pread`` covering its image and record members, checked against the index's crc32, and decoded only on
request. Readers are cheap to pickle or fork into dataloader workers: they hold paths and small arrays; memory maps and
file descriptors are (re)opened lazily in each process, and mapped pages are shared through the page cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import CategoryError
from .index import INSTANCE_COLUMNS, SAMPLE_COLUMNS, checksum, choose_generation, list_generations, load_columns
from .layout import BrokenSampleError, CacheError, shard_path, shard_sort_key
from .manifest import Manifest, load_manifest

logger = logging.getLogger(__name__)

__all__ = ["CacheReader", "ShardInfo", "open_caches", "decode_image", "BrokenSampleError"]

_MAX_OPEN_FILES = 64
_READ_COLUMNS = ("image_offset", "image_size", "record_offset", "record_size", "checksum")


def decode_image(data: bytes | memoryview) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3); ``BrokenSampleError`` if they do not decode."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is not None:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types on damaged data
        raise BrokenSampleError(f"image does not decode: {e}") from e


def _none_if_nan(v: Any) -> float | None:
    f = float(v)
    return None if f != f else f


@dataclass(frozen=True)
class ShardInfo:
    """A visible shard: its index generation, row counts and where its rows start in the reader's numbering."""

    name: str
    generation: int
    num_samples: int
    num_instances: int
    sample_base: int
    inst_base: int
    size_matches: bool


class CacheReader:
    """Read-only view of one cache. ``len(reader)`` samples; ``reader.num_instances`` instances.

    ``shards``: pin the view to these ``(shard name, generation)`` pairs (a snapshot, e.g. for online mode or a replay);
    a pinned generation that no longer exists is a ``CacheError``. Unpinned readers see every indexed shard.
    """

    def __init__(self, cache_dir: str | os.PathLike, shards: Sequence[tuple[str, int]] | None = None) -> None:
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.manifest: Manifest = load_manifest(self.cache_dir)
        self._pinned = None if shards is None else {str(n): int(g) for n, g in shards}
        self.shards: list[ShardInfo] = []
        self.missing_shards: list[str] = []
        self._sample_bases = np.zeros(1, dtype=np.int64)
        self._reset_process_state()
        self.refresh()

    @property
    def categories(self):
        return self.manifest.categories

    # ----- shards ---------------------------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Pick up shards indexed since the last scan (appended after the known ones, so existing rows keep their
        numbers; generations published for known shards are not picked up: open a new reader for those)."""
        known = {s.name for s in self.shards}
        gens = list_generations(self.cache_dir)
        new = []
        n_s = self.shards[-1].sample_base + self.shards[-1].num_samples if self.shards else 0
        n_i = self.shards[-1].inst_base + self.shards[-1].num_instances if self.shards else 0
        missing = []
        if self._pinned is not None:
            lost = [f"{n}.{g}" for n, g in self._pinned.items() if g not in gens.get(n, ())]
            if lost:
                raise CacheError(f"{self.cache_dir}: pinned index generation(s) {', '.join(lost[:3])} no longer exist "
                                 "(pruned or the cache was rebuilt)")
        for name in sorted(gens if self._pinned is None else self._pinned, key=shard_sort_key):
            if name in known:
                continue
            p = shard_path(self.cache_dir, name)
            try:
                size = os.path.getsize(p)
            except FileNotFoundError:
                missing.append(name)
                continue
            if self._pinned is not None:
                g, meta, ok = choose_generation(self.cache_dir, name, [self._pinned[name]], size)
            else:
                g, meta, ok = choose_generation(self.cache_dir, name, gens[name], size)
            if not ok:
                logger.warning("shard %s is %d bytes but its index generations were written for another size; using "
                               "generation %d (its samples will be checked one by one). Run `acp-data verify %s`",
                               p, size, g, self.cache_dir)
            info = ShardInfo(name, g, int(meta["num_samples"]), int(meta["num_instances"]), n_s, n_i, ok)
            self.shards.append(info)
            new.append(name)
            n_s += info.num_samples
            n_i += info.num_instances
        fresh_missing = [m for m in missing if m not in self.missing_shards]
        if fresh_missing:
            logger.warning("%d shard(s) of %s are indexed but missing from shards/ (%s); their samples are skipped. "
                           "`acp-data verify --repair %s` drops them from the index; rerunning the prebuild that "
                           "made the cache regenerates them", len(fresh_missing), self.cache_dir,
                           ", ".join(fresh_missing[:3]) + (", ..." if len(fresh_missing) > 3 else ""), self.cache_dir)
            self.missing_shards.extend(fresh_missing)
        self._sample_bases = np.array([s.sample_base for s in self.shards] + [n_s], dtype=np.int64)
        self._num_instances = n_i
        return new

    def __len__(self) -> int:
        return int(self._sample_bases[-1])

    @property
    def num_instances(self) -> int:
        return self._num_instances

    def shard(self, name: str) -> ShardInfo:
        for s in self.shards:
            if s.name == name:
                return s
        raise CacheError(f"shard {name} is not visible in {self.cache_dir}")

    # ----- per-process state (file descriptors, memory maps) --------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's descriptors are shared with it; use our own
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds = OrderedDict()
            self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_fds"] = OrderedDict()
        d["_maps"] = {}
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._pid = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _fd(self, s: int) -> int:
        self._check_pid()
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        try:
            fd = os.open(shard_path(self.cache_dir, self.shards[s].name), os.O_RDONLY)
        except OSError as e:
            raise BrokenSampleError(f"shard {self.shards[s].name} of {self.cache_dir} cannot be opened: {e}") from e
        self._fds[s] = fd
        if len(self._fds) > _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def shard_columns(self, s: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Memory-mapped columns of visible shard ``s`` (opened once per process)."""
        maps = self._maps.setdefault(s, {})
        todo = [n for n in names if n not in maps]
        if todo:
            info = self.shards[s]
            maps.update(load_columns(self.cache_dir, info.name, info.generation, todo))
        return {n: maps[n] for n in names}

    def column(self, name: str) -> np.ndarray:
        """One column over all visible shards (a new array; ``inst_sample`` and ``inst_start`` are renumbered to the
        reader's global rows)."""
        if name not in SAMPLE_COLUMNS and name not in INSTANCE_COLUMNS:
            raise KeyError(f"unknown index column {name!r}")
        parts = [self.shard_columns(s, [name])[name] for s in range(len(self.shards))]
        if name == "inst_sample":
            parts = [p + s.sample_base for p, s in zip(parts, self.shards)]
        elif name == "inst_start":
            parts = [p + s.inst_base for p, s in zip(parts, self.shards)]
        if parts:
            return np.concatenate(parts)
        shape = (0, 4) if name in ("inst_bbox", "inst_layout_bbox") else (0,)
        return np.zeros(shape, dtype=SAMPLE_COLUMNS.get(name, INSTANCE_COLUMNS.get(name)).replace("S", "S1"))

    def locate(self, row: int) -> tuple[int, int]:
        """``(shard position, row within the shard)`` of a global row."""
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {self.cache_dir} ({len(self)} samples)")
        s = int(np.searchsorted(self._sample_bases, row, side="right")) - 1
        return s, row - self.shards[s].sample_base

    # ----- reading samples ------------------------------------------------------------------------------------------
    def read_raw(self, row: int) -> tuple[memoryview, memoryview]:
        """``(image bytes, record bytes)`` of a sample: one pread, checksum verified."""
        s, local = self.locate(row)
        c = self.shard_columns(s, _READ_COLUMNS)
        img_off, img_size = int(c["image_offset"][local]), int(c["image_size"][local])
        rec_off, rec_size = int(c["record_offset"][local]), int(c["record_size"][local])
        where = f"sample row {row} ({self.shards[s].name} #{local}) of {self.cache_dir}"
        end = rec_off + rec_size
        if not (img_off + img_size <= rec_off and end > img_off):
            raise BrokenSampleError(f"{where}: index byte ranges are inconsistent")
        try:
            buf = os.pread(self._fd(s), end - img_off, img_off)
        except OSError as e:
            raise BrokenSampleError(f"{where}: read failed: {e}") from e
        if len(buf) != end - img_off:
            raise BrokenSampleError(f"{where}: shard is truncated (wanted bytes {img_off}..{end}, got {len(buf)})")
        mv = memoryview(buf)
        img, rec = mv[:img_size], mv[rec_off - img_off:]
        if checksum(img, rec) != int(c["checksum"][local]):
            raise BrokenSampleError(f"{where}: checksum mismatch (damaged bytes, or an index that disagrees with "
                                    "the shard)")
        return img, rec

    def _parse_record(self, row: int, rec: memoryview) -> dict[str, Any]:
        s, local = self.locate(row)
        where = f"sample row {row} ({self.shards[s].name} #{local}) of {self.cache_dir}"
        try:
            record = json.loads(bytes(rec))
        except (ValueError, UnicodeDecodeError) as e:
            raise BrokenSampleError(f"{where}: record does not parse: {e}") from e
        c = self.shard_columns(s, ["key", "candidate_idx", *("clis_l", "clis_i", "selected", "inst_start",
                                                              "inst_count")])
        n = int(c["inst_count"][local])
        insts = record.get("instances") if isinstance(record, dict) else None
        if (not isinstance(insts, list) or record.get("key") != c["key"][local].decode()
                or record.get("candidate_idx") != int(c["candidate_idx"][local]) or len(insts) != n):
            raise BrokenSampleError(f"{where}: the index disagrees with the record stored in the shard")
        # Scores come from the index: rescoring publishes new generations without rewriting shards.
        record["clis_l"] = _none_if_nan(c["clis_l"][local])
        record["clis_i"] = _none_if_nan(c["clis_i"][local])
        record["selected"] = bool(c["selected"][local])
        if n:
            start = int(c["inst_start"][local])
            scores = self.shard_columns(s, ["inst_clis_i"])["inst_clis_i"][start:start + n]
            for inst, v in zip(insts, scores):
                inst["clis_i"] = _none_if_nan(v)
        return record

    def read_sample(self, row: int) -> tuple[dict[str, Any], bytes]:
        """``(record, encoded image bytes)`` with one read; scores in the record are the index's current ones."""
        img, rec = self.read_raw(row)
        return self._parse_record(row, rec), bytes(img)

    def read_record(self, row: int) -> dict[str, Any]:
        return self._parse_record(row, self.read_raw(row)[1])

    def read_image_bytes(self, row: int) -> bytes:
        return bytes(self.read_raw(row)[0])

    def read_image(self, row: int) -> np.ndarray:
        """Decoded RGB uint8 (H, W, 3)."""
        img = decode_image(self.read_raw(row)[0])
        s, local = self.locate(row)
        c = self.shard_columns(s, ["height", "width"])
        if img.shape[:2] != (int(c["height"][local]), int(c["width"][local])):
            raise BrokenSampleError(f"sample row {row} of {self.cache_dir}: image is {img.shape[1]}x{img.shape[0]}, "
                                    f"the index says {int(c['width'][local])}x{int(c['height'][local])}")
        return img

    def value(self, name: str, row: int) -> Any:
        """One index value of one sample (a sample column) without concatenating the column."""
        s, local = self.locate(row)
        return self.shard_columns(s, [name])[name][local]

    def key(self, row: int) -> str:
        return self.value("key", row).decode()

    def iter_shard(self, name: str) -> Iterator[tuple[int, dict[str, Any], bytes]]:
        """``(row within the shard, record, image bytes)`` for every sample of one shard, in order; a broken sample
        raises ``BrokenSampleError``."""
        info = self.shard(name)
        for local in range(info.num_samples):
            record, img = self.read_sample(info.sample_base + local)
            yield local, record, img

    def __repr__(self) -> str:
        return f"CacheReader({str(self.cache_dir)!r}, {len(self.shards)} shards, {len(self)} samples)"


def open_caches(cache_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CacheReader]:
    """Readers for several caches that must share one CategoryTable (a mismatch names both manifests)."""
    if isinstance(cache_dirs, (str, os.PathLike)):
        cache_dirs = [cache_dirs]
    readers = [CacheReader(d) for d in cache_dirs]
    if not readers:
        raise CacheError("no cache directories given")
    first = readers[0]
    for r in readers[1:]:
        try:
            first.categories.check_same(r.categories, f"cache manifest {first.manifest.path}",
                                        f"cache manifest {r.manifest.path}", names_only=True)
        except CategoryError as e:
            raise CacheError(f"caches cannot be mixed: {e}") from e
    return readers
