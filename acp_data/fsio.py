"""Crash-safe file writes shared by the cache, priors, evaluation and training outputs: write to a temporary name
in the target directory, fsync, rename, fsync the directory. A crash leaves the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write and fsync one file inside a temporary directory that is published later by renaming the directory."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def build_lock(target: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for building ``target`` (the sibling file ``.NAME.lock``), so concurrent builders build it once:
    the second waits, then finds it built."""
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tmp_name(path: str | os.PathLike) -> Path:
    """A unique hidden temporary name beside ``path``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(binary file object)`` to a temporary file beside ``path``, then publish it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """JSON with ``indent=1, sort_keys=True`` unless overridden (e.g. ``allow_nan=False``, ``default=str``)."""
    kw: dict[str, Any] = {"indent": 1, "sort_keys": True, **dumps_kwargs}
    atomic_write_text(path, json.dumps(obj, **kw) + "\n")


def load_json_arg(data: str | os.PathLike | dict[str, Any], error: type[Exception],
                  what: str) -> tuple[dict[str, Any], str]:
    """``data`` (a json path or an already-loaded dict) as a dict, and its source for messages ("json" for a dict). A
    file that cannot be read or parsed raises ``error`` naming ``what`` and the path."""
    if isinstance(data, dict):
        return data, "json"
    source = str(data)
    try:
        with open(data) as f:
            return json.load(f), source
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"cannot read {what} {source!r}: {e}") from e
