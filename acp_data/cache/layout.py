"""Paths, names and errors of the cache layout (docs/design.md "Cache format (contract)"), and the crash-safe file
primitives every cache module writes through (temp name, fsync, rename, fsync the directory).

```
<cache>/manifest.json
<cache>/shards/<rank>-<uuid>-<n>.tar
<cache>/index/<rank>-<uuid>-<n>.<gen>/   (.npy columns + meta.json)
<cache>/crops/...
<cache>/summary/<rank>-<uuid>.json
<cache>/quarantine/...
```
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from ..fsio import TMP_SUFFIX, atomic_write_bytes, fsync_dir, tmp_name  # noqa: F401 (re-exported)
from ..fsio import atomic_write_json as _atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index"
CROPS = "crops"
SUMMARY = "summary"
QUARANTINE = "quarantine"
SHARD_SUFFIX = ".tar"

SHARD_NAME_RE = re.compile(r"^(?P<rank>\d+)-(?P<uuid>[0-9a-f]{8,32})-(?P<n>\d+)$")
INDEX_NAME_RE = re.compile(r"^(?P<shard>\d+-[0-9a-f]{8,32}-\d+)\.(?P<gen>\d+)$")
# Generation keys are hex digests in practice; anything else must still make a safe tar member name.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CacheError(RuntimeError):
    """A cache that cannot be used as asked; the message names the file or value at fault."""


class CacheFormatError(CacheError):
    """A manifest or index of another format version, or one that cannot be parsed."""


class BrokenSampleError(CacheError):
    """One sample whose bytes fail the index's checksum, cannot be read, parsed or decoded."""


def shard_name(rank: int, writer_uuid: str, n: int) -> str:
    return f"{int(rank)}-{writer_uuid}-{int(n)}"


def new_writer_uuid() -> str:
    return uuid.uuid4().hex[:16]


def shards_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / SHARDS


def index_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / INDEX


def shard_path(cache_dir: str | os.PathLike, shard: str) -> Path:
    return shards_dir(cache_dir) / f"{shard}{SHARD_SUFFIX}"


def generation_path(cache_dir: str | os.PathLike, shard: str, generation: int) -> Path:
    return index_dir(cache_dir) / f"{shard}.{int(generation)}"


def list_shard_files(cache_dir: str | os.PathLike) -> list[str]:
    """Names of the closed shards (``shards/*.tar`` with a valid name), sorted."""
    d = shards_dir(cache_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.name.endswith(SHARD_SUFFIX) and SHARD_NAME_RE.match(p.name[: -len(SHARD_SUFFIX)]):
            out.append(p.name[: -len(SHARD_SUFFIX)])
    return sorted(out, key=shard_sort_key)


def shard_sort_key(shard: str) -> tuple[int, str, int]:
    m = SHARD_NAME_RE.match(shard)
    if not m:
        return (1 << 62, shard, 0)
    return (int(m["rank"]), m["uuid"], int(m["n"]))


def member_stem(key: str, candidate_idx: int) -> str:
    """Tar member name stem of a sample: ``<key>.c<candidate_idx>`` (image ``.jpg``/``.png``/``.webp``, record
    ``.json``)."""
    return f"{key}.c{int(candidate_idx)}"


# ----- crash-safe writes: acp_data.fsio (re-exported for the cache modules) -----------------------------------------
def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Cache JSON never holds NaN (unscored values are null)."""
    _atomic_write_json(path, obj, allow_nan=False)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Load a json file; a missing or unparsable file is a ``CacheFormatError`` naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError as e:
        raise CacheFormatError(f"{what} {path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFormatError(f"{what} {path} cannot be read: {e}") from e
