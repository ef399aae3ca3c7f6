"""``acp-data verify CACHE``: check every sample of every shard against its index and checksum, quarantine what is
broken and rewrite the shard without it.

A sample is good when the index row and the shard agree exactly (member names, byte ranges, crc32, key, candidate,
size and instance categories) and, unless ``--no-decode``, its image decodes to the recorded size. Anything else
(bit flips, truncation, an index that disagrees with its shard, members no index row points at) is copied to
``quarantine/<time>-<shard>/`` with ``reasons.json``; the shard is rewritten with the good samples (byte-identical
members) and a new index generation is published before the new shard replaces the old one, so an interrupted verify
leaves the previous, consistent pair in charge. Indexed shards that are missing are reported. Orphan shards are
indexed (their damaged samples quarantined the same way). Exit status 1 when anything was broken or missing.

``--repair`` makes a damaged cache resumable (docs/cache.md "Losing a shard"): the index entries of missing shards
are dropped and a unit that lost some candidates is removed whole (its intact candidates quarantined too), because
the unit is what prebuild resumes by: rerunning the same prebuild then regenerates exactly the units that are gone.
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
    QUARANTINE_STEM_RE,
    SAMPLE_COLUMNS,
    ShardSample,
    columns_from_entries,
    entries_from_samples,
    list_generations,
    load_columns,
    orphan_shards,
    publish_generation,
    quarantined_samples,
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
    kind: str = "sample"  # "sample" (one sample), "member" (a tar member of no sample), "shard" (the file's tail)

    @property
    def noise(self) -> bool:
        """A consequence of truncation or of stray members rather than damaged sample bytes (listed last)."""
        return self.kind != "sample" or self.reason.startswith(_NOT_FOUND)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0  # samples checked (index rows, or records of an orphan), never tar members
    good: int = 0  # samples that passed and stay
    problems: list[Problem] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    missing_samples: int = 0
    repaired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    orphans_indexed: list[str] = field(default_factory=list)
    stale_tmp: list[str] = field(default_factory=list)
    partial_units: list[str] = field(default_factory=list)  # lost some candidates, keep others (without --repair)
    removed_units: list[str] = field(default_factory=list)  # removed whole by --repair
    removed_with_unit: list[Problem] = field(default_factory=list)  # their intact candidates (quarantined)
    dropped_index: list[str] = field(default_factory=list)  # missing shards whose index --repair dropped

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing_shards

    @property
    def broken_samples(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "sample"]

    def ordered_problems(self) -> list[Problem]:
        """Damaged samples first (checksum, parse, decode, disagreeing index), then truncation and stray members."""
        return sorted(self.problems, key=lambda p: p.noise)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "good": self.good,
                "broken_samples": len(self.broken_samples),
                "broken": [{**p.__dict__} for p in self.ordered_problems()], "missing_shards": self.missing_shards,
                "missing_samples": self.missing_samples, "dropped_index": self.dropped_index,
                "repaired_shards": self.repaired, "removed_shards": self.removed,
                "partial_units": self.partial_units, "removed_units": self.removed_units,
                "removed_with_unit": [{**p.__dict__} for p in self.removed_with_unit],
                "orphans_indexed": self.orphans_indexed, "stale_tmp": self.stale_tmp}


_NOT_FOUND = "not found in the shard"
_KEY_OF_STEM = QUARANTINE_STEM_RE


def _check_row(cols: dict[str, np.ndarray], i: int, s: ShardSample | None) -> str | None:
    """Why index row ``i`` and its scanned sample ``s`` are not a good sample (None if they are)."""
    if s is None:
        return f"{_NOT_FOUND} (truncated, or the index disagrees with the shard)"
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
    base = cache_dir / QUARANTINE / f"{time.strftime('%Y%m%d-%H%M%S')}-{shard}"
    qdir, n = base, 1
    while qdir.exists():  # two runs in one second must not overwrite each other's reasons.json
        qdir, n = base.with_name(f"{base.name}-{n}"), n + 1
    qdir.mkdir(parents=True)
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


def _unit_key(stem: str) -> str | None:
    m = _KEY_OF_STEM.match(stem)
    return m["key"] if m else None


def _verify_shard(cache_dir: Path, shard: str, gens: list[int] | None, decode: bool, dry_run: bool,
                  report: VerifyReport, repair: bool = False,
                  quarantined: frozenset[tuple[str, int]] = frozenset()) -> None:
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
    _whole_units(shard, cols, samples, good, bad, quarantined, repair, report)
    for s in samples:
        if s.stem not in used and cols is not None:
            reason = "sample in the shard but not in its index"
            report.problems.append(Problem(shard, s.stem, reason, kind="member"))
            bad.append({"stem": s.stem, "row": None, "reason": reason,
                        "ranges": [(_safe(s.image_name), s.image_offset, s.image_size),
                                   (_safe(f"{s.stem}.json"), s.record_offset, s.record_size)]})
    for name, off, n, reason in stray:
        report.problems.append(Problem(shard, name, reason, kind="member"))
        bad.append({"stem": name, "row": None, "reason": reason, "ranges": [(_safe(name), off, n)]})
    if scan_error:
        report.problems.append(Problem(shard, "shard", scan_error, kind="shard"))
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


def _whole_units(shard: str, cols: dict[str, np.ndarray] | None, samples: list[ShardSample],
                 good: list[tuple[int, ShardSample]], bad: list[dict[str, Any]],
                 quarantined: frozenset[tuple[str, int]], repair: bool, report: VerifyReport) -> None:
    """Units of this shard that lost candidates (now, or quarantined by an earlier verify) but keep others. With
    ``repair`` their intact candidates move from ``good`` to ``bad`` (quarantined with the unit), so that the same
    prebuild run again regenerates each such unit whole; otherwise they are listed in ``report.partial_units``."""
    lost = {k for k in (_unit_key(b["stem"]) for b in bad if b["stem"] != "shard") if k}
    if cols is not None:
        pairs = {(k.decode(), int(c)) for k, c in zip(np.asarray(cols["key"]), np.asarray(cols["candidate_idx"]))}
    else:
        pairs = {(s.record["key"], int(s.record["candidate_idx"])) for s in samples if s.record is not None}
    keys = {k for k, _ in pairs}
    lost |= {k for k, c in quarantined if k in keys and (k, c) not in pairs}
    partial = sorted({_unit_key(s.stem) for _, s in good} & lost)
    if not partial:
        return
    if not repair:
        report.partial_units.extend(partial)
        return
    pset = set(partial)
    keep = []
    for i, s in good:
        if _unit_key(s.stem) not in pset:
            keep.append((i, s))
            continue
        reason = (f"intact candidate of unit {_unit_key(s.stem)}, which lost others: removed with its unit so that "
                  "the same prebuild run again regenerates the unit whole")
        report.removed_with_unit.append(Problem(shard, s.stem, reason, i if cols is not None else None, kind="unit"))
        bad.append({"stem": s.stem, "row": i if cols is not None else None, "reason": reason,
                    "ranges": [(_safe(s.image_name), s.image_offset, s.image_size),
                               (_safe(f"{s.stem}.json"), s.record_offset, s.record_size)]})
    report.good -= len(good) - len(keep)
    good[:] = keep
    report.removed_units.extend(partial)


def _drop_index(cache_dir: Path, shard: str) -> None:
    """Remove every index generation of a shard whose file is gone (its units are then simply not in the cache)."""
    for g in list_generations(cache_dir).get(shard, []):
        shutil.rmtree(generation_path(cache_dir, shard, g), ignore_errors=True)
    fsync_dir(index_dir(cache_dir))


def verify_cache(cache_dir: str | os.PathLike, decode: bool = True, dry_run: bool = False,
                 clean_tmp: bool = False, tmp_age_s: float = 3600.0, repair: bool = False) -> VerifyReport:
    """Verify (and unless ``dry_run`` fix) a cache; see the module docstring. ``repair`` also drops the index of
    missing shards and removes units that lost candidates whole, so that rerunning the same prebuild regenerates
    exactly what was lost."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    load_manifest(cache_dir)
    report = VerifyReport()
    gens = list_generations(cache_dir)
    present = set(list_shard_files(cache_dir))
    orphans = orphan_shards(cache_dir)
    quarantined = frozenset(quarantined_samples(cache_dir))
    for shard in tqdm(sorted(gens), desc="verify", unit="shard", disable=None):
        report.shards += 1
        if shard not in present:
            report.missing_shards.append(shard)
            n = int(read_meta(cache_dir, shard, gens[shard][-1]).get("num_samples", 0))
            report.missing_samples += n
            logger.error("shard %s is indexed (%d samples) but missing", shard_path(cache_dir, shard), n)
            if repair and not dry_run:
                _drop_index(cache_dir, shard)
                report.dropped_index.append(shard)
            continue
        _verify_shard(cache_dir, shard, gens[shard], decode, dry_run, report, repair, quarantined)
    for shard in orphans:
        report.shards += 1
        _verify_shard(cache_dir, shard, None, decode, dry_run, report, repair, quarantined)
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


def _print_report(rep: VerifyReport, cache: str, clean_tmp: bool, dry_run: bool, repair: bool) -> None:
    broken = rep.broken_samples
    other = [p for p in rep.problems if p.kind != "sample"]
    line = (f"{cache}: {rep.shards} shards, {rep.samples} samples checked, {rep.good} good, {len(broken)} broken, "
            f"{len(rep.missing_shards)} missing shard(s)")
    if rep.missing_shards:
        line += f" ({rep.missing_samples} samples)"
    if rep.removed_with_unit:
        line += f", {len(rep.removed_with_unit)} intact removed with {len(rep.removed_units)} unit(s)"
    if other:
        line += f"; {len(other)} other item(s): truncated tails, members of no sample"
    print(line)
    for pr in rep.ordered_problems()[:50]:
        print(f"  {'BROKEN' if pr.kind == 'sample' else 'EXTRA'} {pr.shard} {pr.what}: {pr.reason}")
    if len(rep.problems) > 50:
        print(f"  ... {len(rep.problems) - 50} more")
    for s in rep.missing_shards:
        print(f"  MISSING shard {shard_path(cache, s)} (indexed, file not found)"
              + ("; its index entries were dropped" if s in rep.dropped_index else ""))
    for s in rep.repaired:
        print(f"  REWROTE {s} without its broken samples (new index generation); bytes in {QUARANTINE}/")
    for s in rep.removed:
        print(f"  REMOVED {s}: no good sample left; moved to {QUARANTINE}/")
    for k in rep.removed_units:
        print(f"  {'WOULD REMOVE' if dry_run else 'REMOVED'} unit {k} whole (it had lost candidates); rerun the same "
              "prebuild to regenerate it")
    for s in rep.orphans_indexed:
        print(f"  INDEXED orphan shard {s}")
    if rep.stale_tmp:
        print(f"  {len(rep.stale_tmp)} stale temporary file(s) of interrupted writers"
              + (" removed" if clean_tmp and not dry_run else " (remove with --clean-tmp)"))
    hints = []
    if rep.missing_shards and not rep.dropped_index:
        hints.append("`--repair` drops the index entries of the missing shard(s)")
    if rep.partial_units:
        hints.append(f"{len(rep.partial_units)} unit(s) lost some candidates and keep others; `--repair` removes "
                     "them whole")
    if hints:
        print("  hint: " + "; ".join(hints) + "; then rerun the same prebuild command to regenerate what was lost")
    elif repair and (rep.dropped_index or rep.removed_units) and not dry_run:
        print("  the cache is consistent again; rerun the same prebuild command to regenerate what was lost")


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, fail

    p = argparse.ArgumentParser(prog="acp-data verify", formatter_class=HelpFormatter, description=(
        "Check every sample against its index and checksum; quarantine broken ones and rewrite their shards.\n"
        "Exit status: 0 all good; 1 something was broken or missing (and fixed unless --dry-run); 2 the cache\n"
        "cannot be read (one line on stderr). Run it while no job writes to or trains from the cache."))
    p.add_argument("cache", help="cache directory")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster; default: decode)")
    p.add_argument("--dry-run", action="store_true", help="report only; change nothing (default: fix)")
    p.add_argument("--repair", action="store_true",
                   help="also drop the index entries of missing shards and remove units that lost candidates whole "
                        "(their intact candidates are quarantined), so that rerunning the same prebuild "
                        "regenerates exactly what was lost (default: off)")
    p.add_argument("--clean-tmp", action="store_true",
                   help="delete temporary files of interrupted writers older than an hour (default: off)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON (default: text)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rep = verify_cache(a.cache, decode=not a.no_decode, dry_run=a.dry_run, clean_tmp=a.clean_tmp,
                           repair=a.repair)
    except CacheError as e:
        return fail("acp-data verify", e)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        _print_report(rep, a.cache, a.clean_tmp, a.dry_run, a.repair)
    return 0 if rep.ok else 1
