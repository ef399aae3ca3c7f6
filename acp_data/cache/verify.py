"""``acp-data verify CACHE``: check every sample of every shard against its index and checksum, quarantine what is
broken and rewrite the shard without it.

A sample is good when the index row and the shard agree exactly (member names, byte ranges, crc32, key, candidate,
size and instance categories) and, unless ``--no-decode``, its image decodes to the recorded size. Anything else
(bit flips, truncation, an index that disagrees with its shard, members no index row points at) is copied to
``quarantine/<time>-<shard>/`` with ``reasons.json``; the shard is rewritten with the good samples (byte-identical
members) and a new index generation is published before the new shard replaces the old one, so an interrupted verify
leaves the previous, consistent pair in charge. Indexed shards that are missing are reported. Orphan shards are
indexed (their damaged samples quarantined the same way). Exit status 1 when anything was broken or missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tarfmt
from .index import (
    INSTANCE_COLUMNS,
    SAMPLE_COLUMNS,
    ShardSample,
    columns_from_entries,
    entries_from_samples,
    list_generations,
    load_columns,
    orphan_shards,
    publish_generation,
    read_meta,
    scan_shard,
)
from .layout import (
    QUARANTINE,
    TMP_SUFFIX,
    CacheError,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    generation_path,
    index_dir,
    list_shard_files,
    member_stem,
    shard_path,
    shards_dir,
)
from .manifest import load_manifest

logger = logging.getLogger(__name__)


@dataclass
class Problem:
    shard: str
    what: str  # sample stem, member name or "shard"
    reason: str
    row: int | None = None


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    good: int = 0
    problems: list[Problem] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    orphans_indexed: list[str] = field(default_factory=list)
    stale_tmp: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing_shards

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "good": self.good,
                "broken": [p.__dict__ for p in self.problems], "missing_shards": self.missing_shards,
                "repaired_shards": self.repaired, "removed_shards": self.removed,
                "orphans_indexed": self.orphans_indexed, "stale_tmp": self.stale_tmp}


def _check_row(cols: dict[str, np.ndarray], i: int, s: ShardSample | None) -> str | None:
    """Why index row ``i`` and its scanned sample ``s`` are not a good sample (None if they are)."""
    if s is None:
        return "not found in the shard (truncated, or the index disagrees with the shard)"
    if (int(cols["image_offset"][i]), int(cols["image_size"][i]), int(cols["record_offset"][i]),
            int(cols["record_size"][i])) != (s.image_offset, s.image_size, s.record_offset, s.record_size):
        return "index byte ranges disagree with the shard's members"
    if s.checksum != int(cols["checksum"][i]):
        return "checksum mismatch (damaged bytes)"
    if s.error:
        return s.error
    rec = s.record
    got = (rec["key"], int(rec["candidate_idx"]), int(rec["unit"]), int(rec["width"]), int(rec["height"]),
           [int(x["category_id"]) for x in rec["instances"]])
    a, n = int(cols["inst_start"][i]), int(cols["inst_count"][i])
    want = (cols["key"][i].decode(), int(cols["candidate_idx"][i]), int(cols["unit"][i]), int(cols["width"][i]),
            int(cols["height"][i]), [int(x) for x in cols["inst_category_id"][a:a + n]])
    if got != want:
        return "index disagrees with the record stored in the shard"
    return None


def _decode_problem(path: Path, s: ShardSample) -> str | None:
    from .layout import BrokenSampleError
    from .reader import decode_image

    with open(path, "rb") as f:
        f.seek(s.image_offset)
        data = f.read(s.image_size)
    try:
        img = decode_image(data)
    except BrokenSampleError as e:
        return str(e)
    if img.shape[:2] != (int(s.record["height"]), int(s.record["width"])):
        return f"image is {img.shape[1]}x{img.shape[0]}, the record says {s.record['width']}x{s.record['height']}"
    return None


def _quarantine(cache_dir: Path, shard: str, path: Path, items: list[dict[str, Any]]) -> Path:
    """Copy the byte ranges of broken items (``ranges``: [(file name, offset, size)]) to the quarantine."""
    qdir = cache_dir / QUARANTINE / f"{time.strftime('%Y%m%d-%H%M%S')}-{shard}"
    qdir.mkdir(parents=True, exist_ok=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for it in items:
            files = []
            for name, off, n in it.pop("ranges"):
                if off >= size or n <= 0:
                    continue
                f.seek(off)
                atomic_write_bytes(qdir / name, f.read(min(n, size - off)))
                files.append(name)
            it["files"] = files
    atomic_write_json(qdir / "reasons.json", {"shard": shard, "source": str(path), "items": items})
    return qdir


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:120] or "member"


def _rewrite(cache_dir: Path, shard: str, path: Path, good: list[tuple[int, ShardSample]],
             cols: dict[str, np.ndarray] | None, generation: int | None) -> None:
    """Write the good samples to a new shard, publish its index generation, then replace the old shard."""
    tmp = path.with_name(path.name + ".verify" + TMP_SUFFIX)
    new_offsets = []
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for _, s in good:
            src.seek(s.image_offset)
            img = src.read(s.image_size)
            src.seek(s.record_offset)
            rec = src.read(s.record_size)
            start = dst.tell()
            mtime = int(time.time())
            dst.write(tarfmt.member_bytes(s.image_name, img, mtime))
            img_off = start + tarfmt.BLOCK
            rec_off = dst.tell() + tarfmt.BLOCK
            dst.write(tarfmt.member_bytes(f"{s.stem}.json", rec, mtime))
            new_offsets.append((img_off, rec_off))
        dst.write(tarfmt.END_OF_ARCHIVE)
        dst.flush()
        os.fsync(dst.fileno())
        size = dst.tell()
    try:
        if cols is None:  # orphan: index built from the records
            samples = []
            for (_, s), (io_, ro) in zip(good, new_offsets):
                s2 = ShardSample(**{**s.__dict__, "image_offset": io_, "record_offset": ro})
                samples.append(s2)
            new_cols = columns_from_entries(entries_from_samples(samples))
        else:  # keep the index's values (rescored scores included), new byte offsets
            rows = np.array([i for i, _ in good], dtype=np.int64)
            new_cols = {k: np.asarray(cols[k])[rows] for k in SAMPLE_COLUMNS}
            counts = new_cols["inst_count"].astype(np.int64)
            inst_rows = (np.concatenate([np.arange(int(cols["inst_start"][r]), int(cols["inst_start"][r]) + int(c))
                                         for r, c in zip(rows, counts)]) if len(rows) else np.zeros(0, np.int64))
            inst_rows = inst_rows.astype(np.int64)
            for k in INSTANCE_COLUMNS:
                new_cols[k] = np.asarray(cols[k])[inst_rows]
            new_cols["inst_sample"] = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
            starts = np.zeros(len(rows), dtype=np.int64)
            if len(rows):
                starts[1:] = np.cumsum(counts[:-1])
            new_cols["inst_start"] = starts
            new_cols["image_offset"] = np.array([o[0] for o in new_offsets], dtype=np.uint64)
            new_cols["record_offset"] = np.array([o[1] for o in new_offsets], dtype=np.uint64)
        publish_generation(cache_dir, shard, new_cols, reason="verify", shard_size=size,
                           base_generation=-1 if generation is None else None)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_shard(cache_dir: Path, shard: str, path: Path, qdir: Path | None) -> None:
    """No good sample left: move the shard file to the quarantine, then drop its index generations."""
    dest = (qdir or (cache_dir / QUARANTINE)) / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    fsync_dir(path.parent)
    for g in list_generations(cache_dir).get(shard, []):
        shutil.rmtree(generation_path(cache_dir, shard, g), ignore_errors=True)
    fsync_dir(index_dir(cache_dir))


def _verify_shard(cache_dir: Path, shard: str, gens: list[int] | None, decode: bool, dry_run: bool,
                  report: VerifyReport) -> None:
    path = shard_path(cache_dir, shard)
    samples, stray, scan_error = scan_shard(path)
    by_stem = {s.stem: s for s in samples}
    size = os.path.getsize(path)
    cols: dict[str, np.ndarray] | None = None
    generation: int | None = None
    if gens:
        # The generation written for this shard size; if none matches, the one that explains most samples.
        best: tuple[int, dict[str, np.ndarray], int] | None = None
        for g in sorted(gens, reverse=True):
            c = load_columns(cache_dir, shard, g, mmap=False)
            if int(read_meta(cache_dir, shard, g).get("shard_size", -1)) == size:
                best = (g, c, -1)
                break
            n_good = sum(_check_row(c, i, by_stem.get(member_stem(c["key"][i].decode(), int(c["candidate_idx"][i]))))
                         is None for i in range(len(c["key_hash"])))
            if best is None or n_good > best[2]:
                best = (g, c, n_good)
        generation, cols = best[0], best[1]
    bad: list[dict[str, Any]] = []
    good: list[tuple[int, ShardSample]] = []
    used: set[str] = set()
    rows = range(len(cols["key_hash"])) if cols is not None else range(len(samples))
    for i in rows:
        if cols is not None:
            stem = member_stem(cols["key"][i].decode(), int(cols["candidate_idx"][i]))
            s = by_stem.get(stem)
            reason = _check_row(cols, i, s)
        else:
            s = samples[i]
            stem, reason = s.stem, s.error
        if s is not None and s.stem == stem:
            used.add(stem)
        if reason is None and decode:
            reason = _decode_problem(path, s)
        report.samples += 1
        if reason is None:
            good.append((i, s))
            report.good += 1
            continue
        report.problems.append(Problem(shard, stem, reason, i if cols is not None else None))
        if s is not None:
            ranges = [(_safe(s.image_name), s.image_offset, s.image_size),
                      (_safe(f"{s.stem}.json"), s.record_offset, s.record_size)]
        else:
            io_, isz = int(cols["image_offset"][i]), int(cols["image_size"][i])
            ro, rsz = int(cols["record_offset"][i]), int(cols["record_size"][i])
            ranges = [(_safe(f"{stem}.image.bin"), io_, isz), (_safe(f"{stem}.json.bin"), ro, rsz)]
        bad.append({"stem": stem, "row": i if cols is not None else None, "reason": reason, "ranges": ranges})
    for s in samples:
        if s.stem not in used and cols is not None:
            reason = "sample in the shard but not in its index"
            report.problems.append(Problem(shard, s.stem, reason))
            bad.append({"stem": s.stem, "row": None, "reason": reason,
                        "ranges": [(_safe(s.image_name), s.image_offset, s.image_size),
                                   (_safe(f"{s.stem}.json"), s.record_offset, s.record_size)]})
    for name, off, n, reason in stray:
        report.problems.append(Problem(shard, name, reason))
        bad.append({"stem": name, "row": None, "reason": reason, "ranges": [(_safe(name), off, n)]})
    if scan_error:
        report.problems.append(Problem(shard, "shard", scan_error))
        end = max([s.record_offset + tarfmt.padded(s.record_size) for s in samples] + [0])
        bad.append({"stem": "shard", "row": None, "reason": scan_error,
                    "ranges": [("tail.bin", end, size - end)] if size > end else []})
    if dry_run:
        return
    if not bad:
        if cols is None:  # a healthy orphan: index it as it is
            publish_generation(cache_dir, shard, columns_from_entries(entries_from_samples(samples)),
                               reason="reindex", base_generation=-1, shard_size=size)
            report.orphans_indexed.append(shard)
        return
    qdir = _quarantine(cache_dir, shard, path, bad)
    logger.warning("shard %s: %d broken item(s) quarantined in %s", path, len(bad), qdir)
    if good:
        _rewrite(cache_dir, shard, path, good, cols, generation)
        report.repaired.append(shard)
        if cols is None:
            report.orphans_indexed.append(shard)
    else:
        _remove_shard(cache_dir, shard, path, qdir)
        report.removed.append(shard)


def verify_cache(cache_dir: str | os.PathLike, decode: bool = True, dry_run: bool = False,
                 clean_tmp: bool = False, tmp_age_s: float = 3600.0) -> VerifyReport:
    """Verify (and unless ``dry_run`` repair) a cache; see the module docstring."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    load_manifest(cache_dir)
    report = VerifyReport()
    gens = list_generations(cache_dir)
    present = set(list_shard_files(cache_dir))
    orphans = orphan_shards(cache_dir)
    for shard in tqdm(sorted(gens), desc="verify", unit="shard", disable=None):
        report.shards += 1
        if shard not in present:
            report.missing_shards.append(shard)
            n = int(read_meta(cache_dir, shard, gens[shard][-1]).get("num_samples", 0))
            logger.error("shard %s is indexed (%d samples) but missing", shard_path(cache_dir, shard), n)
            continue
        _verify_shard(cache_dir, shard, gens[shard], decode, dry_run, report)
    for shard in orphans:
        report.shards += 1
        _verify_shard(cache_dir, shard, None, decode, dry_run, report)
    now = time.time()
    for d in (shards_dir(cache_dir), index_dir(cache_dir)):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if (p.name.endswith(TMP_SUFFIX) or p.name.startswith(".tmp-")) and now - p.stat().st_mtime > tmp_age_s:
                report.stale_tmp.append(str(p))
                if clean_tmp and not dry_run:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    return report


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="acp-data verify", description="Check every sample against its index and "
                                "checksum; quarantine broken ones and rewrite their shards (exit 1 if anything was "
                                "broken or missing). Run it while no job writes or trains from the cache.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    p.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    p.add_argument("--clean-tmp", action="store_true",
                   help="delete temporary files of interrupted writers older than an hour")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rep = verify_cache(a.cache, decode=not a.no_decode, dry_run=a.dry_run, clean_tmp=a.clean_tmp)
    except CacheError as e:
        print(f"acp-data verify: {e}")
        return 1
    if a.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(f"{a.cache}: {rep.shards} shards, {rep.samples} samples checked, {rep.good} good, "
              f"{len(rep.problems)} broken, {len(rep.missing_shards)} missing shards")
        for pr in rep.problems[:50]:
            print(f"  BROKEN {pr.shard} {pr.what}: {pr.reason}")
        if len(rep.problems) > 50:
            print(f"  ... {len(rep.problems) - 50} more")
        for s in rep.missing_shards:
            print(f"  MISSING shard {shard_path(a.cache, s)} (indexed, file not found)")
        for s in rep.repaired:
            print(f"  REWROTE {s} without its broken samples (new index generation); bytes in {QUARANTINE}/")
        for s in rep.removed:
            print(f"  REMOVED {s}: no good sample left; moved to {QUARANTINE}/")
        for s in rep.orphans_indexed:
            print(f"  INDEXED orphan shard {s}")
        if rep.stale_tmp:
            print(f"  {len(rep.stale_tmp)} stale temporary file(s) of interrupted writers"
                  + (" removed" if a.clean_tmp and not a.dry_run else " (remove with --clean-tmp)"))
    return 0 if rep.ok else 1
