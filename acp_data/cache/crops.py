"""The crop store: per-instance cut-outs (RGB pixels of the tight box + alpha from the mask) for X-Paste-style paste
mode, built from the shards by ``acp-data crops CACHE`` and rebuildable at any time.

```
<cache>/crops/current.json            {"build": "<id>"}  (replaced atomically when a build completes)
<cache>/crops/<id>/meta.json          codec, selection, shard generations it was built from, count
<cache>/crops/<id>/packs/<shard>.bin  crops packed back to back
<cache>/crops/<id>/index/*.npy        per crop: category_id, height, width, pack, offset, size, checksum,
                                      key_hash, candidate_idx, instance, clis_i, selected
```
A crop is one ``pread`` and, with the default ``raw`` codec, no decoding at all (RGBA bytes); ``zlib`` trades read
speed for about half the disk. ``CropStore(cache).read(i) -> (rgba uint8 H x W x 4, category_id)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .layout import CROPS, FORMAT_VERSION, CacheError, CacheFormatError, atomic_write_json, fsync_dir, read_json

logger = logging.getLogger(__name__)

CODECS = ("raw", "zlib")
COLUMNS = {"category_id": "<i4", "height": "<i4", "width": "<i4", "pack": "<i4", "offset": "<u8", "size": "<u8",
           "checksum": "<u4", "key_hash": "<u8", "candidate_idx": "<i4", "instance": "<i4", "clis_i": "<f8",
           "selected": "|b1"}
_MAX_OPEN = 32


def cut_out(image: np.ndarray, mask: np.ndarray, bbox_xywh: Sequence[float]) -> np.ndarray | None:
    """RGBA crop of the tight box (pixels covering ``bbox``) with alpha 255 inside the mask, 0 outside."""
    h, w = mask.shape
    x0, y0 = max(0, int(np.floor(bbox_xywh[0]))), max(0, int(np.floor(bbox_xywh[1])))
    x1 = min(w, int(np.ceil(bbox_xywh[0] + bbox_xywh[2])))
    y1 = min(h, int(np.ceil(bbox_xywh[1] + bbox_xywh[3])))
    if x1 <= x0 or y1 <= y0:
        return None
    out = np.empty((y1 - y0, x1 - x0, 4), dtype=np.uint8)
    out[..., :3] = image[y0:y1, x0:x1]
    out[..., 3] = mask[y0:y1, x0:x1] * np.uint8(255)
    return out


def _encode(rgba: np.ndarray, codec: str) -> bytes:
    raw = np.ascontiguousarray(rgba).tobytes()
    return raw if codec == "raw" else zlib.compress(raw, 1)


def build_crops(cache_dir: str | os.PathLike, selection: Any = None, min_area: int = 16, codec: str = "raw",
                keep_old: bool = False) -> Path:
    """Build the crop store of ``cache_dir`` from its visible shards and make it current; returns its directory.

    ``selection`` (an ``acp_data.cache.selection.Selection``; default: every instance) chooses which instances get
    a crop; instances with fewer than ``min_area`` mask pixels are skipped. Broken samples are skipped with a warning.
    """
    from tqdm import tqdm

    from ..masks import rle_to_mask
    from .layout import BrokenSampleError
    from .reader import CacheReader, decode_image
    from .selection import ALL, select

    if codec not in CODECS:
        raise ValueError(f"crop codec {codec!r} is not one of {', '.join(CODECS)}")
    reader = CacheReader(cache_dir)
    sel = selection or ALL
    result = select(reader, sel, return_masks=True)
    sample_keep, inst_keep = result.sample_mask[0], result.inst_mask[0]
    root = Path(cache_dir) / CROPS
    root.mkdir(exist_ok=True)
    build_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tmp = root / f".tmp-{build_id}"
    (tmp / "packs").mkdir(parents=True)
    (tmp / "index").mkdir()
    cols: dict[str, list] = {k: [] for k in COLUMNS}
    packs: list[str] = []
    broken = 0
    try:
        inst_start = reader.column("inst_start")
        key_hash = reader.column("key_hash")
        bar = tqdm(total=int(sample_keep.sum()), desc="crops", unit="img", disable=None)
        for info in reader.shards:
            rows = np.flatnonzero(sample_keep[info.sample_base:info.sample_base + info.num_samples])
            if not len(rows):
                continue
            pack_id = len(packs)
            packs.append(f"{info.name}.bin")
            with open(tmp / "packs" / packs[-1], "wb") as f:
                offset = 0
                for local in rows:
                    row = info.sample_base + int(local)
                    bar.update(1)
                    try:
                        record, img_bytes = reader.read_sample(row)
                        image = decode_image(img_bytes)
                    except BrokenSampleError as e:
                        broken += 1
                        logger.warning("crops: skipping broken sample: %s", e)
                        continue
                    for j, inst in enumerate(record["instances"]):
                        if not inst_keep[inst_start[row] + j] or inst["area"] < min_area:
                            continue
                        crop = cut_out(image, rle_to_mask(inst["segmentation"]), inst["bbox"])
                        if crop is None:
                            continue
                        payload = _encode(crop, codec)
                        f.write(payload)
                        for k, v in (("category_id", inst["category_id"]), ("height", crop.shape[0]),
                                     ("width", crop.shape[1]), ("pack", pack_id), ("offset", offset),
                                     ("size", len(payload)), ("checksum", zlib.crc32(payload)),
                                     ("key_hash", key_hash[row]), ("candidate_idx", record["candidate_idx"]),
                                     ("instance", j), ("clis_i", np.nan if inst["clis_i"] is None else inst["clis_i"]),
                                     ("selected", record["selected"])):
                            cols[k].append(v)
                        offset += len(payload)
                f.flush()
                os.fsync(f.fileno())
        bar.close()
        for k, dt in COLUMNS.items():
            with open(tmp / "index" / f"{k}.npy", "wb") as f:
                np.save(f, np.array(cols[k], dtype=dt), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        meta = {"format_version": FORMAT_VERSION, "codec": codec, "count": len(cols["category_id"]),
                "packs": packs, "selection": sel.to_dict(), "min_area": int(min_area), "broken_skipped": broken,
                "built_from": {s.name: s.generation for s in reader.shards}, "created": time.time()}
        atomic_write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        final = root / build_id
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / "current.json", {"build": build_id})
    if not keep_old:
        for p in root.iterdir():
            if p.is_dir() and p.name != build_id and not p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
    logger.info("crop store of %s: %d crops from %d shards (%s codec)", cache_dir, meta["count"], len(packs), codec)
    return final


class CropStore:
    """Read side of the crop store (memory-mapped index, one pread per crop). Cheap to pickle into workers."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(os.path.abspath(cache_dir))
        root = self.cache_dir / CROPS
        cur = root / "current.json"
        if not cur.is_file():
            raise CacheError(f"{self.cache_dir} has no crop store ({cur} missing); build it with "
                             f"`acp-data crops {self.cache_dir}`")
        build = str(read_json(cur, "crop store pointer").get("build", ""))
        if not build or "/" in build or build.startswith("."):
            raise CacheFormatError(f"{cur} names no valid build")
        self.root = root / build
        self.meta = read_json(self.root / "meta.json", "crop store metadata")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(f"{self.root / 'meta.json'} has format version {self.meta.get('format_version')!r}"
                                   f"; this acp-data reads {FORMAT_VERSION}: rebuild with `acp-data crops`")
        self.codec = self.meta["codec"]
        self.packs = list(self.meta["packs"])
        self._cols: dict[str, np.ndarray] = {}
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()

    def column(self, name: str) -> np.ndarray:
        if name not in COLUMNS:
            raise KeyError(f"unknown crop column {name!r}")
        if name not in self._cols:
            p = self.root / "index" / f"{name}.npy"
            try:  # a plain ndarray over the mapping: memmap's per-item indexing costs ~2 us, read() does it 7 times
                self._cols[name] = np.asarray(np.load(p, mmap_mode="r", allow_pickle=False))
            except ValueError:
                self._cols[name] = np.load(p, allow_pickle=False)
        return self._cols[name]

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cols"], d["_fds"] = {}, OrderedDict()
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._pid = os.getpid()

    def _fd(self, pack: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(pack)
        if fd is None:
            fd = os.open(self.root / "packs" / self.packs[pack], os.O_RDONLY)
            self._fds[pack] = fd
            if len(self._fds) > _MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, i: int) -> tuple[np.ndarray, int]:
        """``(rgba uint8 H x W x 4 (writable), category_id)`` of crop ``i``; ``CacheError`` if its bytes are damaged."""
        i = int(i)
        col = self.column
        h, w = int(col("height")[i]), int(col("width")[i])
        size, off = int(col("size")[i]), int(col("offset")[i])
        buf = np.empty(size, dtype=np.uint8)
        n = os.preadv(self._fd(int(col("pack")[i])), [buf], off)
        if n != size or zlib.crc32(buf) != int(col("checksum")[i]):
            raise CacheError(f"crop {i} of {self.root} is damaged (rebuild with `acp-data crops {self.cache_dir}`)")
        if self.codec == "zlib":
            buf = np.frombuffer(bytearray(zlib.decompress(buf)), dtype=np.uint8)
        return buf.reshape(h, w, 4), int(col("category_id")[i])

    def indices(self, category_ids: Sequence[int] | None = None, min_clis_i: float = 0.0,
                selected_only: bool = False) -> np.ndarray:
        """Crop ids passing the filters (unscored crops pass only ``min_clis_i`` 0)."""
        keep = np.ones(len(self), dtype=bool)
        if category_ids is not None:
            keep &= np.isin(self.column("category_id"), np.asarray(list(category_ids), dtype=np.int32))
        if min_clis_i > 0:
            with np.errstate(invalid="ignore"):
                keep &= np.asarray(self.column("clis_i")) >= min_clis_i
        if selected_only:
            keep &= np.asarray(self.column("selected"))
        return np.flatnonzero(keep)

    def by_category(self, ids: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """category id -> crop ids (of ``ids``, default all), each sorted."""
        ids = np.arange(len(self)) if ids is None else np.asarray(ids)
        cats = np.asarray(self.column("category_id"))[ids]
        order = np.argsort(cats, kind="stable")
        cats_sorted = cats[order]
        uniq, starts = np.unique(cats_sorted, return_index=True)
        bounds = [*starts[1:], len(order)]
        return {int(c): ids[order[s:e]] for c, s, e in zip(uniq, starts, bounds)}

    def is_stale(self) -> bool:
        """True when the cache's visible shards or their generations differ from what the store was built from."""
        from .reader import CacheReader

        now = {s.name: s.generation for s in CacheReader(self.cache_dir).shards}
        return now != self.meta.get("built_from")


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, fail
    from .selection import SELECT_MODES, Selection

    p = argparse.ArgumentParser(prog="acp-data crops", description="Build the per-instance crop store of a cache "
                                "(cut-outs for paste mode); replaces the previous build when complete.",
                                formatter_class=HelpFormatter)
    p.add_argument("cache", help="cache directory")
    p.add_argument("--select", default="all", choices=SELECT_MODES, help="candidates to take crops from")
    p.add_argument("--min-clis-i", type=float, default=0.0, help="skip instances below this CLIS-I (0 = keep all)")
    p.add_argument("--min-clis-l", type=float, default=0.0, help="skip images below this CLIS-L")
    p.add_argument("--categories", default="all", help="'all', 'rare', 'rare+common', names, or @FILE")
    p.add_argument("--min-area", type=int, default=16, help="skip instances with fewer mask pixels")
    p.add_argument("--codec", default="raw", choices=CODECS, help="raw: fastest reads; zlib: about half the disk")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import load_manifest

    try:
        cats = load_manifest(a.cache).categories
        ids = None if a.categories.strip().lower() == "all" else tuple(cats.select(a.categories))
        sel = Selection(select=a.select, min_clis_i=a.min_clis_i, min_clis_l=a.min_clis_l, category_ids=ids,
                        categories_apply_to="instances")  # a crop per instance of the chosen categories
        out = build_crops(a.cache, sel, min_area=a.min_area, codec=a.codec)
    except (CacheError, ValueError) as e:
        return fail("acp-data crops", e)
    print(json.dumps({"crops": str(out), "count": read_json(out / "meta.json")["count"]}))
    return 0
