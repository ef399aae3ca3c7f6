"""Cache benchmark (``make bench``): index open time, memory per dataloader worker, sample read+decode and crop-store
reads, each next to a baseline measured in the same run.

1. Index: 1M instance records (10 per sample, 64x48 JPEG images). A tenth is written through ``CacheWriter`` by
   two writer processes (ranks 0 and 1, as a two-rank prebuild would; its throughput is reported); the rest is
   written in bulk from record templates (same tar members, checksums and index columns, built with the cache's own
   ``tarfmt``/``index`` functions, skipping per-record validation and JSON encoding), because the Python writer would
   take minutes for 1M records. Every sample is real and readable. Open = ``CacheReader`` + the default selection +
   ``SyntheticDataset``; baseline = parsing the records of the same kept rows (the selected candidates) into a list
   of dicts (what a DatasetFromList-style loader does at start), measured on ``--baseline-records`` of them and
   scaled linearly to all kept rows.
2. Worker memory, measured the same way for both: a child process imports torch + detectron2 and builds the dataset,
   then a torch ``DataLoader`` forks ``--workers`` workers (copy-on-write as it is) that each read every sample of
   their share; each worker reports its USS after the reads. Ours: ``SyntheticDataset`` with the default selection.
   Baseline: the same kept rows as detectron2 dataset dicts in detectron2's ``DatasetFromList(serialize=True)`` (one
   pickled buffer, as ``build_detection_train_loader`` holds them). The parent's USS for the dataset is reported too.
3. Decode: 512 px JPEG samples read+decoded from the cache vs the same JPEG bytes read from plain files and decoded
   with the same decoder (and with detectron2's ``read_image``).
4. Crops: ``CropStore.read`` vs X-Paste's layout (one RGBA PNG per instance + one JSON index).

Targets: open <= 2 s; <= 150 MB USS per worker; read+decode >= 0.8x plain JPEG files; crops >= 3x the PNG
folder. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import gc, json, sys, psutil
def uss():
    return psutil.Process().memory_full_info().uss / 2**20
import torch, detectron2.data, detectron2.structures  # what every dataloader worker has loaded
torch.set_num_threads(1)
from acp_data.cache.selection import Selection
from acp_data.d2.datasets import SyntheticDataset
mode, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
gc.collect()
base = uss()
if mode == "acp":
    ds = SyntheticDataset(cache, Selection())
else:  # the same kept rows as detectron2 dataset dicts, serialized as detectron2's DatasetFromList does
    from detectron2.data.common import DatasetFromList
    src = SyntheticDataset(cache, Selection(), include_image_bytes=False)
    dicts = [src[i] for i in range(len(src))]
    del src
    ds = DatasetFromList(dicts, copy=False, serialize=True)
    del dicts
gc.collect()
parent_mb = uss() - base


class Touch(torch.utils.data.IterableDataset):
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start = uss()
        n = 0
        for i in range(info.id, len(ds), info.num_workers):
            ds[i]
            n += 1
        yield {"worker": info.id, "start_mb": start, "end_mb": uss(), "touched": n}


out = list(torch.utils.data.DataLoader(Touch(), batch_size=None, num_workers=workers))  # fork, as on Linux
print(json.dumps({"base_mb": base, "parent_dataset_mb": parent_mb, "samples": len(ds), "workers": out}))
"""


def _templates(n: int, per: int, size: tuple[int, int]) -> list[tuple[dict, bytes]]:
    from cache_helpers import make_categories, make_sample

    cats = make_categories()
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        rec, img = make_sample(0, 0, cats, rng, size=size, n_instances=per)
        if len(rec["instances"]) == per:
            out.append((rec, img))
    return out


def _write_rank(cache: str, rank: int, world: int, n_units: int, n_cand: int, per: int) -> None:
    from cache_helpers import GENERATION_SETTINGS, make_categories

    from acp_data.cache.writer import CacheWriter

    pool = _templates(64, per, (48, 64))
    with CacheWriter(cache, make_categories(), GENERATION_SETTINGS, rank=rank, shard_max_samples=4096) as w:
        for u in range(rank, n_units, world):
            recs, imgs = [], []
            for c in range(n_cand):
                rec, img = pool[(u * 7 + c) % len(pool)]
                recs.append(dict(rec, key=f"{u:032x}", unit=u, candidate_idx=c, selected=c == u % n_cand))
                imgs.append(img)
            w.add_unit(recs, imgs)


def _child(mode: str, cache: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(cache), str(workers)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"USS child ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rates(fns: dict, n: int, rounds: int = 5) -> dict:
    """Best items/s of each ``fn(i)`` (i < n) over ``rounds``, the functions interleaved round by round so a change
    in machine load hits all of them alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def _bulk_write(cache: Path, first_unit: int, n_units: int, n_cand: int, per: int, shard_samples: int = 4096) -> int:
    """Write units from record templates straight into shards + index generations (see the module docstring)."""
    from acp_data.cache import tarfmt
    from acp_data.cache.index import checksum, columns_from_entries, publish_generation
    from acp_data.cache.layout import fsync_dir, member_stem, new_writer_uuid, shard_name, shard_path
    from acp_data.cache.records import index_entry, record_bytes

    pool = _templates(64, per, (48, 64))
    tpl = []
    for rec, img in pool:
        blobs = {}
        for sel in (False, True):
            b = record_bytes(dict(rec, key="@@KEY@@", unit=-7777777, candidate_idx=-8888888, selected=sel))
            blobs[sel] = b.split(b'"@@KEY@@"')
        tpl.append((rec, img, blobs))
    writer, n, written = new_writer_uuid(), 0, 0
    units = list(range(first_unit, first_unit + n_units))
    per_shard = max(1, shard_samples // n_cand)
    mtime = int(time.time())
    for start in range(0, len(units), per_shard):
        name = shard_name(9, writer, n)
        n += 1
        path = shard_path(cache, name)
        tmp = path.with_name(path.name + ".tmp")
        entries, off = [], 0
        with open(tmp, "wb") as f:
            for u in units[start:start + per_shard]:
                key = f"{u:032x}"
                for c in range(n_cand):
                    rec, img, blobs = tpl[(u * 7 + c) % len(tpl)]
                    sel = c == u % n_cand
                    head, tail = blobs[sel]
                    blob = (head + b'"' + key.encode() + b'"' + tail).replace(
                        b'"unit":-7777777', b'"unit":%d' % u).replace(b'"candidate_idx":-8888888',
                                                                     b'"candidate_idx":%d' % c)
                    stem = member_stem(key, c)
                    im = tarfmt.member_bytes(f"{stem}.jpg", img, mtime)
                    rm = tarfmt.member_bytes(f"{stem}.json", blob, mtime)
                    f.write(im)
                    f.write(rm)
                    entries.append(index_entry(dict(rec, key=key, unit=u, candidate_idx=c, selected=sel),
                                               off + tarfmt.BLOCK, len(img), off + len(im) + tarfmt.BLOCK, len(blob),
                                               checksum(img, blob)))
                    off += len(im) + len(rm)
            f.write(tarfmt.END_OF_ARCHIVE)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
        fsync_dir(path.parent)
        publish_generation(cache, name, columns_from_entries(entries), reason="write", base_generation=-1,
                           shard_size=size)
        written += len(entries)
    return written


def bench_index(work: Path, instances: int, per: int, n_cand: int, workers: int, baseline_records: int,
                writer_fraction: float) -> dict:
    from acp_data.cache.reader import CacheReader
    from acp_data.cache.selection import Selection, select
    from acp_data.d2.datasets import SyntheticDataset

    cache = work / "index_cache"
    n_units = -(-instances // (per * n_cand))
    n_writer = max(2, int(n_units * writer_fraction))
    t = time.perf_counter()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_rank, args=(str(cache), r, 2, n_writer, n_cand, per)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("a writer process failed")
    write_s = time.perf_counter() - t
    writer_rate = n_writer * n_cand / write_s
    t = time.perf_counter()
    bulk = _bulk_write(cache, n_writer, n_units - n_writer, n_cand, per)
    bulk_s = time.perf_counter() - t
    r = CacheReader(cache)
    assert r.num_instances == n_units * n_cand * per
    print(f"index cache: {len(r)} samples, {r.num_instances} instance records in {len(r.shards)} shards; "
          f"{n_writer * n_cand} samples written through CacheWriter by 2 processes at {writer_rate:.0f} samples/s, "
          f"{bulk} written in bulk from templates in {bulk_s:.1f} s (real tar members and index columns)", flush=True)
    index_mb = sum(f.stat().st_size for f in (cache / "index").rglob("*") if f.is_file()) / 2**20

    t = time.perf_counter()
    ds = SyntheticDataset(cache, Selection())
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    select(CacheReader(cache), Selection(select="random", min_clis_i=60.0, category_ids=(1, 2, 3)))
    select_s = time.perf_counter() - t
    kept = np.asarray(ds.result.sample_row)  # the same rows as ours: the selected candidates
    nb = min(baseline_records, kept.size)
    rows = kept[np.linspace(0, kept.size - 1, nb).astype(np.int64)]
    t = time.perf_counter()
    records = [json.loads(bytes(r.read_raw(int(i))[1])) for i in rows]
    baseline_s = (time.perf_counter() - t) * kept.size / nb
    del records
    print(f"open (reader + default selection + dataset, {len(ds)} kept images): {open_s:.3f} s; another selection "
          f"over the same index: {select_s:.3f} s; baseline, parsing the kept records: {baseline_s:.1f} s (measured "
          f"on {nb} records, scaled to {kept.size}); index {index_mb:.0f} MB on disk", flush=True)

    acp = _child("acp", cache, workers)
    base = _child("list", cache, workers)

    def worker_mb(res: dict) -> tuple[float, float]:
        return (float(np.mean([w["end_mb"] for w in res["workers"]])),
                float(np.mean([w["end_mb"] - w["start_mb"] for w in res["workers"]])))

    (acp_mb, acp_touch), (base_mb, base_touch) = worker_mb(acp), worker_mb(base)
    print(f"per-worker USS after each of {workers} forked workers read its share of the {acp['samples']} kept samples: "
          f"{acp_mb:.1f} MB ({acp_touch:+.1f} MB from the reads; parent holds {acp['parent_dataset_mb']:.1f} MB) vs "
          f"{base_mb:.1f} MB ({base_touch:+.1f} MB; parent {base['parent_dataset_mb']:.1f} MB) for detectron2's "
          f"DatasetFromList(serialize=True) of the same {base['samples']} rows; torch + detectron2 import alone: "
          f"{acp['base_mb']:.0f} MB USS", flush=True)
    return {"samples": len(r), "kept_samples": len(ds), "instances": r.num_instances,
            "writer_samples": n_writer * n_cand, "writer_samples_per_s": round(writer_rate, 1), "bulk_samples": bulk,
            "index_mb": round(index_mb, 1), "open_s": round(open_s, 3), "select_s": round(select_s, 3),
            "open_baseline_s": round(baseline_s, 2), "workers": workers,
            "worker_uss_mb": round(acp_mb, 1), "worker_uss_baseline_mb": round(base_mb, 1),
            "worker_uss_from_reads_mb": round(acp_touch, 1), "worker_uss_from_reads_baseline_mb": round(base_touch, 1),
            "parent_dataset_mb": round(acp["parent_dataset_mb"], 1),
            "parent_dataset_baseline_mb": round(base["parent_dataset_mb"], 1),
            "torch_d2_import_uss_mb": round(acp["base_mb"], 1)}


def bench_decode_and_crops(work: Path, n_images: int) -> dict:
    import cv2
    from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    from acp_data.cache.crops import CropStore, build_crops
    from acp_data.cache.reader import CacheReader, decode_image
    from acp_data.cache.writer import CacheWriter

    cache = work / "decode_cache"
    cats = make_categories()
    rng = np.random.default_rng(1)
    blobs = []
    with CacheWriter(cache, cats, GENERATION_SETTINGS) as w:
        for u in range(n_images):
            recs, imgs = make_unit(u, 1, cats, rng, size=(512, 512), n_instances=4)
            w.add_unit(recs, imgs)
            blobs.append(imgs[0])
    r = CacheReader(cache)
    plain = work / "plain_jpeg"
    plain.mkdir()
    paths = []
    for row in range(len(r)):
        p = plain / f"{row:06d}.jpg"
        p.write_bytes(r.read_image_bytes(row))
        paths.append(str(p))
    jpeg_kb = np.mean([len(b) for b in blobs]) / 1024

    def plain_same_decoder(i: int) -> np.ndarray:
        with open(paths[i], "rb") as f:
            return decode_image(f.read())

    def plain_pil(i: int) -> np.ndarray:
        return read_image(paths[i], format="RGB")

    cv2.setNumThreads(1)
    n = len(r)
    for i in range(n):  # warm the page cache for both
        r.read_image_bytes(i)
        plain_same_decoder(i)
    rates = _rates({"cache": r.read_image, "plain": plain_same_decoder, "d2": plain_pil}, n)
    ours, base, d2 = rates["cache"], rates["plain"], rates["d2"]
    print(f"read+decode 512 px JPEG ({jpeg_kb:.0f} KB): cache {ours:.0f}/s vs plain files {base:.0f}/s with the same "
          f"decoder ({ours / base:.2f}x) and {d2:.0f}/s with detectron2 read_image ({ours / d2:.2f}x)", flush=True)

    build_crops(cache, min_area=16)
    store = CropStore(cache)
    xp = work / "xpaste"
    index = []
    for i in range(len(store)):
        rgba, cid = store.read(i)
        d = xp / f"c{cid:04d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:07d}.png"
        Image.fromarray(rgba, "RGBA").save(p)
        index.append({"path": str(p), "category_id": cid})
    (xp / "index.json").write_text(json.dumps(index))
    t = time.perf_counter()
    xindex = json.loads((xp / "index.json").read_text())
    xindex_s = time.perf_counter() - t

    def png(i: int) -> np.ndarray:
        with Image.open(xindex[i]["path"]) as im:
            return np.asarray(im.convert("RGBA"))

    m = len(store)
    crop_px = float(np.mean(store.column("height").astype(np.int64) * store.column("width")))
    zcache = work / "decode_cache_zlib"
    shutil.copytree(cache, zcache)
    build_crops(zcache, min_area=16, codec="zlib")
    zstore = CropStore(zcache)
    for i in range(m):
        store.read(i)
        zstore.read(i)
        png(i)
    rates = _rates({"raw": store.read, "zlib": zstore.read, "png": png}, m)
    crops, zcrops, pngs = rates["raw"], rates["zlib"], rates["png"]
    print(f"crops ({m} cut-outs, mean {crop_px:.0f} px): store {crops:.0f}/s vs PNG folder {pngs:.0f}/s "
          f"({crops / pngs:.1f}x; zlib codec {zcrops:.0f}/s, {zcrops / pngs:.1f}x; PNG json index load "
          f"{xindex_s * 1e3:.1f} ms)", flush=True)
    return {"decode_per_s": round(ours, 1), "decode_plain_per_s": round(base, 1), "decode_d2_per_s": round(d2, 1),
            "decode_vs_jpeg": round(ours / base, 3), "decode_vs_d2_read_image": round(ours / d2, 3),
            "crops": m, "crops_per_s": round(crops, 1), "crops_png_per_s": round(pngs, 1),
            "crops_vs_png": round(crops / pngs, 2), "crops_zlib_vs_png": round(zcrops / pngs, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1_000_000, help="instance records in the index cache")
    p.add_argument("--per-sample", type=int, default=10, help="instances per sample")
    p.add_argument("--candidates", type=int, default=4, help="candidates per work unit")
    p.add_argument("--decode-images", type=int, default=200, help="512 px images for the decode/crop part")
    p.add_argument("--workers", type=int, default=2, help="forked dataloader workers in the memory part")
    p.add_argument("--baseline-records", type=int, default=10_000, help="records the open-time baseline parses")
    p.add_argument("--writer-fraction", type=float, default=0.1, help="share of units written through CacheWriter")
    p.add_argument("--workdir", default=None, help="keep the caches here (default: a temp dir, removed)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="acp_cache_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        res = bench_index(work, a.instances, a.per_sample, a.candidates, a.workers, a.baseline_records,
                          a.writer_fraction)
        res.update(bench_decode_and_crops(work, a.decode_images))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["targets_met"] = {"open_s<=2": res["open_s"] <= 2.0, "worker_uss_mb<=150": res["worker_uss_mb"] <= 150,
                          "decode_vs_jpeg>=0.8": res["decode_vs_jpeg"] >= 0.8, "crops_vs_png>=3": res["crops_vs_png"] >= 3}
    res["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
