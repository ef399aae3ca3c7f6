"""Cache faults: killed and concurrent writers, damaged shards, disagreeing or missing pieces, bad manifests and
category ids, unsafe category names."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_sample, unit_key, write_cache

from acp_data.cache.index import (
    INSTANCE_COLUMNS,
    SAMPLE_COLUMNS,
    list_generations,
    load_columns,
    publish_generation,
)
from acp_data.cache.layout import BrokenSampleError, CacheError, CacheFormatError
from acp_data.cache.reader import CacheReader
from acp_data.cache.selection import ALL
from acp_data.cache.verify import verify_cache
from acp_data.cache.writer import CacheWriter
from acp_data.categories import Category, CategoryTable
from acp_data.cli import main as cli

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

WRITER = r"""
import sys, time
import numpy as np
from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit, unit_key
from acp_data.cache.writer import CacheWriter
cache, rank, world, n_units, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
cats = make_categories()
with CacheWriter(cache, cats, GENERATION_SETTINGS, rank=rank, shard_max_samples=6) as w:
    for u in range(n_units):
        if u % world != rank or w.is_done(unit_key(u)):
            continue
        recs, imgs = make_unit(u, 3, cats, np.random.default_rng(u))
        w.add_unit(recs, imgs)
        print(f"unit {u} closed {len(w.shards_closed)}", flush=True)
        time.sleep(sleep)
"""


def _writer(cache: Path, rank: int = 0, world: int = 1, n_units: int = 10, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(cache), str(rank), str(world), str(n_units), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _keys(reader: CacheReader) -> Counter:
    return Counter(zip((k.decode() for k in reader.column("key")), reader.column("candidate_idx").tolist()))


@pytest.fixture()
def cache(tmp_path):
    d = tmp_path / "cache"
    write_cache(d, make_categories(), n_units=8, shard_max_samples=6, seed=3)
    return d


def test_sigkill_mid_shard_then_resume(tmp_path):
    d = tmp_path / "cache"
    p = _writer(d, n_units=10, sleep=0.05)
    try:
        for line in p.stdout:
            # 6 samples per shard = 2 units: after unit 4 two shards are closed and the third holds one unit
            if line.startswith("unit 4 "):
                assert line.split()[-1] == "2"
                break
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert any(n.endswith(".tar.tmp") for n in os.listdir(d / "shards"))
    r = CacheReader(d)
    assert _keys(r) == Counter({(unit_key(u), c): 1 for u in range(4) for c in range(3)})
    for row in range(len(r)):
        r.read_record(row)
    p = _writer(d, n_units=10)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    r = CacheReader(d)
    assert _keys(r) == Counter({(unit_key(u), c): 1 for u in range(10) for c in range(3)})


def test_two_writers_at_once(tmp_path):
    d = tmp_path / "cache"
    procs = [_writer(d, rank=r, world=2, n_units=12, sleep=0.01) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r = CacheReader(d)
    assert _keys(r) == Counter({(unit_key(u), c): 1 for u in range(12) for c in range(3)})
    ranks = Counter(s.name.split("-")[0] for s in r.shards)
    assert set(ranks) == {"0", "1"} and len({s.name for s in r.shards}) == len(r.shards)


def test_orphan_shard_is_reindexed_identically(cache):
    gens = list_generations(cache)
    shard = sorted(gens)[1]
    before = load_columns(cache, shard, 0, mmap=False)
    shutil.rmtree(cache / "index" / f"{shard}.0")  # a crash between closing the shard and indexing it
    assert shard not in {s.name for s in CacheReader(cache).shards}
    with CacheWriter(cache, make_categories(), GENERATION_SETTINGS) as w:
        assert w.reindexed == [shard]
    after = load_columns(cache, shard, 0, mmap=False)
    for k in (*SAMPLE_COLUMNS, *INSTANCE_COLUMNS):
        assert np.array_equal(before[k], after[k], equal_nan=before[k].dtype.kind == "f"), k


def _dataset_broken_warnings(cache, caplog):
    from acp_data.d2.datasets import SyntheticDataset

    ds = SyntheticDataset(cache, ALL)
    with caplog.at_level(logging.WARNING, logger="acp_data.d2.datasets"):
        items = [ds[i] for i in range(len(ds))]
    warns = [r for r in caplog.records if r.name == "acp_data.d2.datasets"]
    return items, warns, ds


def test_truncated_shard(cache, caplog):
    r = CacheReader(cache)
    info = r.shards[1]
    path = cache / "shards" / f"{info.name}.tar"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * 0.6))
    items, warns, ds = _dataset_broken_warnings(cache, caplog)
    n_broken = sum(x is None for x in items)
    assert 0 < n_broken < info.num_samples and ds.broken == n_broken
    assert len(warns) == 1 and "broken sample" in warns[0].getMessage()
    assert cli(["verify", str(cache)]) == 1
    qdirs = list((cache / "quarantine").iterdir())
    assert len(qdirs) == 1
    reasons = json.loads((qdirs[0] / "reasons.json").read_text())
    assert sum(1 for it in reasons["items"] if it["stem"] != "shard") == n_broken
    assert any("truncated" in it["reason"] for it in reasons["items"])
    r2 = CacheReader(cache)
    assert len(r2) == len(r) - n_broken
    assert r2.shard(info.name).generation == info.generation + 1
    for row in range(len(r2)):
        r2.read_image(row)
        r2.read_record(row)
    assert verify_cache(cache).ok


def test_bit_flip_is_quarantined(cache, caplog):
    r = CacheReader(cache)
    row = r.shards[0].sample_base + 2
    key = r.key(row)
    s, local = r.locate(row)
    off = int(r.shard_columns(s, ["image_offset"])["image_offset"][local]) + 100
    path = cache / "shards" / f"{r.shards[s].name}.tar"
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x20]))
    with pytest.raises(BrokenSampleError, match="checksum"):
        r.read_image_bytes(row)
    items, warns, _ = _dataset_broken_warnings(cache, caplog)
    assert sum(x is None for x in items) == 1 and len(warns) == 1
    rep = verify_cache(cache)
    assert len(rep.problems) == 1 and "checksum" in rep.problems[0].reason and key in rep.problems[0].what
    q = next((cache / "quarantine").iterdir())
    assert len(list(q.glob("*.jpg"))) == 1 and len(list(q.glob("*.json"))) == 2  # image, record, reasons
    r2 = CacheReader(cache)
    assert len(r2) == len(r) - 1
    assert _keys(r2) == _keys(r) - Counter({(key, int(r.value("candidate_idx", row))): 1})
    assert verify_cache(cache).ok


def test_index_disagrees_with_shard(cache):
    r = CacheReader(cache)
    info = r.shards[0]
    cols = dict(load_columns(cache, info.name, info.generation, mmap=False))
    off = cols["image_offset"].copy()
    off[[0, 1]] = off[[1, 0]]
    cols["image_offset"] = off
    publish_generation(cache, info.name, cols, reason="test")
    r2 = CacheReader(cache)
    with pytest.raises(BrokenSampleError):
        r2.read_raw(info.sample_base)
    rep = verify_cache(cache, dry_run=True)
    assert [p.row for p in rep.problems] == [0, 1] and all("disagree" in p.reason for p in rep.problems)
    assert not (cache / "quarantine").exists()
    assert cli(["verify", str(cache), "--no-decode"]) == 1
    assert len(CacheReader(cache)) == len(r) - 2
    assert verify_cache(cache).ok


def test_missing_shard(cache, caplog):
    r = CacheReader(cache)
    info = r.shards[0]
    (cache / "shards" / f"{info.name}.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="acp_data.cache.reader"):
        r2 = CacheReader(cache)
    assert len(r2) == len(r) - info.num_samples and r2.missing_shards == [info.name]
    assert any("missing" in rec.getMessage() for rec in caplog.records)
    rep = verify_cache(cache)
    assert rep.missing_shards == [info.name] and not rep.ok
    assert cli(["verify", str(cache)]) == 1


def test_interrupted_verify_keeps_consistent_generation(cache):
    r = CacheReader(cache)
    info = r.shards[0]
    cols = load_columns(cache, info.name, info.generation, mmap=False)
    # a generation written for a rewritten shard that never replaced the old one
    publish_generation(cache, info.name, cols, reason="verify", shard_size=12345)
    r2 = CacheReader(cache)
    assert r2.shard(info.name).generation == info.generation and r2.shard(info.name).size_matches
    for row in range(len(r2)):
        r2.read_record(row)
    assert verify_cache(cache).ok


def test_manifest_errors(cache):
    m = cache / "manifest.json"
    d = json.loads(m.read_text())
    d["format_version"] = 99
    m.write_text(json.dumps(d))
    with pytest.raises(CacheFormatError, match=str(m).replace("\\", "\\\\") + ".*version 99"):
        CacheReader(cache)
    with pytest.raises(CacheFormatError, match="manifest.json"):
        CacheWriter(cache, make_categories(), GENERATION_SETTINGS)
    m.write_text("{ not json")
    with pytest.raises(CacheFormatError, match="manifest.json.*cannot be read"):
        CacheReader(cache)
    with pytest.raises(CacheFormatError, match="not an acp-data cache"):
        CacheReader(cache.parent / "nowhere")


def test_different_settings_refused(cache):
    other = json.loads(json.dumps(GENERATION_SETTINGS))
    other["generator"]["size"] = [64, 64]
    other["generator"]["steps"] = 50
    with pytest.raises(CacheError) as e:
        CacheWriter(cache, make_categories(), other)
    msg = str(e.value)
    assert "generator.size: cache has [96, 128], given [64, 64]" in msg
    assert "generator.steps: cache has (absent), given 50" in msg
    cats = make_categories()
    renamed = CategoryTable([Category(id=c.id, name=c.name + "x" if c.id == 2 else c.name, frequency=c.frequency)
                             for c in cats])
    with pytest.raises(CacheError, match="differ at id 2: cache manifest .*manifest.json"):
        CacheWriter(cache, renamed, GENERATION_SETTINGS)


def test_category_id_outside_table(tmp_path):
    cats = make_categories()
    d = tmp_path / "c"
    rec, img = make_sample(0, 0, cats, np.random.default_rng(0), category_ids=[1, 2])
    rec["instances"][0]["category_id"] = 99
    with CacheWriter(d, cats, GENERATION_SETTINGS) as w:
        with pytest.raises(CacheError, match=r"category_id 99 is outside 1\.\.8 .*manifest\.json"):
            w.add_unit([rec], [img])
        rec["instances"][0]["category_id"] = True
        with pytest.raises(CacheError, match="category_id True"):
            w.add_unit([rec], [img])
    assert len(CacheReader(d)) == 0 and not list((d / "shards").iterdir())


def test_bad_records_refused(tmp_path):
    cats = make_categories()
    rng = np.random.default_rng(1)
    with CacheWriter(tmp_path / "c", cats, GENERATION_SETTINGS) as w:
        rec, img = make_sample(0, 0, cats, rng, n_instances=1)
        bad = json.loads(json.dumps(rec))
        bad["instances"][0]["bbox"][2] += 3
        with pytest.raises(CacheError, match="not the tight box"):
            w.add_unit([bad], [img])
        bad = json.loads(json.dumps(rec))
        bad["width"] = 50
        with pytest.raises(CacheError, match="image is 128x96"):
            w.add_unit([bad], [img])
        bad = json.loads(json.dumps(rec))
        bad["key"] = "../x"
        with pytest.raises(CacheError, match="key must match"):
            w.add_unit([bad], [img])
        with pytest.raises(CacheError, match="not JPEG"):
            w.add_unit([rec], [b"GIF89a...."])
        rec2, img2 = make_sample(1, 0, cats, rng, n_instances=1)
        with pytest.raises(CacheError, match="share one key"):
            w.add_unit([rec, rec2], [img, img2])


def test_unsafe_category_names(tmp_path):
    from acp_data.cache.inspect import write_gallery

    names = [("../../evil", "r"), ("a/b\\c", "r"), ("<b>bold</b>", "c"), ("..", "f"), ("/etc/passwd", "f")]
    cats = CategoryTable([Category(id=i, name=n, frequency=f) for i, (n, f) in enumerate(names, start=1)])
    d = tmp_path / "cache"
    write_cache(d, cats, n_units=6, unit_kwargs={"category_ids": [1, 2, 3, 4, 5]})
    out = tmp_path / "site" / "html"
    write_gallery(d, out)
    inside = {p.resolve() for p in out.rglob("*")}
    everything = {p.resolve() for p in tmp_path.rglob("*")}
    assert everything - inside - {p.resolve() for p in d.rglob("*")} - {d.resolve(), out.parent.resolve(),
                                                                          out.resolve()} == set()
    pages = sorted(p.name for p in (out / "categories").iterdir())
    assert len(pages) == 5 and all("/" not in p and ".." not in p and "<" not in p for p in pages)
    index = (out / "index.html").read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in index and "<b>bold</b>" not in index
    assert cli(["crops", str(d)]) == 0 and cli(["export", str(d), "--out", str(tmp_path / "x.json")]) == 0


def test_shard_with_nothing_left_is_removed(cache):
    r = CacheReader(cache)
    info = r.shards[-1]
    path = cache / "shards" / f"{info.name}.tar"
    with open(path, "r+b") as f:
        f.truncate(300)
    rep = verify_cache(cache)
    assert rep.removed == [info.name] and len(rep.problems) == info.num_samples + 1
    assert not path.exists() and info.name not in list_generations(cache)
    assert len(CacheReader(cache)) == len(r) - info.num_samples
    assert verify_cache(cache).ok


def test_verify_indexes_healthy_orphans(cache):
    shard = sorted(list_generations(cache))[0]
    shutil.rmtree(cache / "index" / f"{shard}.0")
    rep = verify_cache(cache)
    assert rep.ok and rep.orphans_indexed == [shard]
    assert shard in {s.name for s in CacheReader(cache).shards}
