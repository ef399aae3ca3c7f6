"""The little of the tar format a shard needs: USTAR headers written by hand (so every member's data offset is known
exactly and the image and record members of a sample are adjacent) and a scanner that survives truncated or damaged
files. Shards stay plain tar files: ``tar tf`` and Python's ``tarfile`` read them.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def padded(size: int) -> int:
    """Size of a member's data area (data rounded up to whole 512-byte blocks)."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def header(name: str, size: int, mtime: int) -> bytes:
    """A 512-byte USTAR header for a regular file (``name`` ASCII, at most 100 characters), as ``tarfile`` writes it
    (built directly: ``TarInfo.tobuf`` costs more than the rest of writing a sample)."""
    if len(name) > 100 or not name.isascii():
        raise ValueError(f"tar member name {name!r} must be ASCII and at most 100 characters")
    if size >= 8**11 or mtime >= 8**11 or size < 0:
        raise ValueError(f"tar member {name!r}: size {size} or mtime {mtime} out of USTAR range")
    buf = bytearray(BLOCK)
    buf[0:len(name)] = name.encode("ascii")
    buf[100:108] = b"0000644\0"
    buf[108:116] = b"0000000\0"
    buf[116:124] = b"0000000\0"
    buf[124:136] = b"%011o\0" % size
    buf[136:148] = b"%011o\0" % max(0, int(mtime))
    buf[148:156] = b"        "
    buf[156:157] = tarfile.REGTYPE
    buf[257:265] = tarfile.POSIX_MAGIC
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


def member_bytes(name: str, data: bytes, mtime: int) -> bytes:
    """Header + data + zero padding of one member."""
    pad = padded(len(data)) - len(data)
    return header(name, len(data), mtime) + data + b"\0" * pad


@dataclass(frozen=True)
class Member:
    name: str
    header_offset: int
    data_offset: int
    size: int


def scan(path: str | os.PathLike) -> tuple[list[Member], str | None]:
    """Members of a tar file in order, and ``None`` or a description of where and why scanning stopped early
    (truncated data, a damaged header, a member type shards never contain)."""
    members: list[Member] = []
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        off = 0
        while True:
            if off + BLOCK > file_size:
                return members, f"truncated at byte {off} (no end-of-archive marker)"
            f.seek(off)
            block = f.read(BLOCK)
            if block == b"\0" * BLOCK:
                return members, None
            try:
                ti = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                return members, f"damaged tar header at byte {off}: {e}"
            if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                return members, f"unexpected tar member type {ti.type!r} ({ti.name!r}) at byte {off}"
            data_off = off + BLOCK
            if data_off + ti.size > file_size:
                return members, f"truncated inside member {ti.name!r} (needs {data_off + ti.size} bytes, file has " \
                                f"{file_size})"
            members.append(Member(ti.name, off, data_off, ti.size))
            off = data_off + padded(ti.size)
