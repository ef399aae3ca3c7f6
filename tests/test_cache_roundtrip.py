"""Cache round trip: write -> read -> export -> lvis.LVIS is exact; rescoring generations; crops; resume."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit, unit_key, write_cache

from acp_data.cache.crops import CropStore, build_crops
from acp_data.cache.export import export_lvis
from acp_data.cache.index import (
    SAMPLE_COLUMNS,
    StaleGenerationError,
    done_keys,
    list_generations,
    shard_scores,
    update_scores,
)
from acp_data.cache.reader import CacheReader, decode_image
from acp_data.cache.selection import Selection, select
from acp_data.cache.writer import CacheWriter, read_summaries
from acp_data.cli import main as cli
from acp_data.masks import polygons_to_mask, rle_to_mask

if not hasattr(np, "float"):
    np.float = float  # lvis 0.5.3 under numpy 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """12 scored units + 3 unscored units, 3 candidates each, small shards; returns (dir, key -> records, images)."""
    d = tmp_path_factory.mktemp("rt") / "cache"
    cats = make_categories()
    rng = np.random.default_rng(7)
    written, images = {}, {}
    with CacheWriter(d, cats, GENERATION_SETTINGS, shard_max_samples=7) as w:
        for u in range(15):
            recs, imgs = make_unit(u, 3, cats, rng, scored=u < 12, image_format="png" if u == 3 else "jpg")
            assert w.add_unit(recs, imgs)
            written[recs[0]["key"]] = recs
            images[recs[0]["key"]] = imgs
        w.write_summary({"units": 15, "rejections": {"box_out_of_range": 2}})
    return d, written, images


def _by_key(reader):
    out = {}
    for row in range(len(reader)):
        rec = reader.read_record(row)
        out[(rec["key"], rec["candidate_idx"])] = (row, rec)
    return out


def test_read_back_exact(cache):
    d, written, images = cache
    r = CacheReader(d)
    assert len(r) == 45 and r.num_instances == sum(len(x["instances"]) for v in written.values() for x in v)
    got = _by_key(r)
    for key, recs in written.items():
        for c, rec in enumerate(recs):
            row, back = got[(key, c)]
            assert back == json.loads(json.dumps(rec))  # every field, scores and nulls included
            assert r.read_image_bytes(row) == images[key][c]
            assert np.array_equal(r.read_image(row), decode_image(images[key][c]))
            assert r.key(row) == key
    # units are never split across shards, and shards are plain tar files
    shard_keys = []
    for info in r.shards:
        keys = {rec["key"] for _, rec, _ in r.iter_shard(info.name)}
        shard_keys.append(keys)
        with tarfile.open(d / "shards" / f"{info.name}.tar") as t:
            names = t.getnames()
        assert len(names) == 2 * info.num_samples and names[1].endswith(".json")
    for i, a in enumerate(shard_keys):
        for b in shard_keys[i + 1:]:
            assert not a & b
    assert len(r.shards) > 1
    assert done_keys(d) == set(written)
    summ = read_summaries(d)
    assert summ[0]["rejections"] == {"box_out_of_range": 2} and summ[0]["writer"]["units_written"] == 15


def test_unscored_are_nan_in_index(cache):
    d, written, _ = cache
    r = CacheReader(d)
    clis = r.column("clis_i")
    keys = [k.decode() for k in r.column("key")]
    unscored = {k for k, v in written.items() if v[0]["clis_i"] is None}
    assert len(unscored) == 3
    for k, v in zip(keys, clis):
        assert np.isnan(v) == (k in unscored)


def test_export_lvis_exact(cache, tmp_path):
    from lvis import LVIS

    d, written, images = cache
    out = tmp_path / "synth.json"
    assert cli(["export", str(d), "--out", str(out), "--images", str(tmp_path / "imgs")]) == 0
    lv = LVIS(str(out))
    assert len(lv.imgs) == 45
    cats = make_categories()
    assert [c["name"] for c in lv.dataset["categories"]] == cats.names
    assert [c["frequency"] for c in lv.dataset["categories"]] == [c.frequency for c in cats]
    by_cand = {(im["acp_key"], im["acp_candidate_idx"]): im for im in lv.dataset["images"]}
    for key, recs in written.items():
        for c, rec in enumerate(recs):
            im = by_cand[(key, c)]
            assert (im["width"], im["height"]) == (rec["width"], rec["height"])
            for f in ("clis_l", "clis_i", "selected", "unit", "seed", "scene_graph", "provenance"):
                assert im[f"acp_{f}"] == rec[f]
            with open(tmp_path / "imgs" / im["file_name"], "rb") as f:
                assert f.read() == images[key][c]
            assert im["coco_url"].startswith("file://") and im["coco_url"].endswith(im["file_name"])
            anns = sorted(lv.load_anns(lv.get_ann_ids(img_ids=[im["id"]])), key=lambda a: a["acp_instance"])
            assert len(anns) == len(rec["instances"])
            for a, inst in zip(anns, rec["instances"]):
                assert a["category_id"] == inst["category_id"]
                assert a["bbox"] == inst["bbox"] and a["acp_layout_bbox"] == inst["layout_bbox"]
                assert a["area"] == inst["area"] and a["acp_clis_i"] == inst["clis_i"]
                assert np.array_equal(lv.ann_to_mask(a).astype(bool), rle_to_mask(inst["segmentation"]))
    counts = {c["id"]: c["image_count"] for c in lv.dataset["categories"]}
    for cid in counts:
        assert counts[cid] == len(set(lv.cat_img_map[cid]))


def test_export_selection_and_polygons(cache, tmp_path):
    from lvis import LVIS

    d, written, _ = cache
    out = tmp_path / "sel.json"
    sel = Selection(select="clis", min_clis_i=60)
    data = export_lvis(d, out, sel, polygons=True)
    res = select(CacheReader(d), sel)
    assert len(data["images"]) == len(res) and len(data["annotations"]) == len(res.inst_row)
    assert all(im["acp_selected"] for im in data["images"])
    assert all(a["acp_clis_i"] >= 60 for a in data["annotations"])
    lv = LVIS(str(out))
    recs = {(r["key"], r["candidate_idx"]): r for v in written.values() for r in v}
    for a in lv.dataset["annotations"]:
        im = lv.imgs[a["image_id"]]
        inst = recs[(im["acp_key"], im["acp_candidate_idx"])]["instances"][a["acp_instance"]]
        assert isinstance(a["segmentation"], list)
        m = polygons_to_mask(a["segmentation"], im["height"], im["width"])
        ref = rle_to_mask(inst["segmentation"])
        assert (m & ref).sum() / (m | ref).sum() > 0.97


def test_rescore_generation(cache, tmp_path):
    import shutil

    d0, written, _ = cache
    d = tmp_path / "cache"
    shutil.copytree(d0, d)
    r = CacheReader(d)
    info = r.shards[0]
    sc = shard_scores(d, info.name)
    sc.clis_i[:] = 11.0
    sc.inst_clis_i[:] = np.nan
    sc.selected[:] = False
    sc.selected[0] = True
    g = update_scores(d, sc, scoring={"name": "test-rescore"})
    assert g == info.generation + 1 and list_generations(d)[info.name][-1] == g
    with pytest.raises(StaleGenerationError):
        update_scores(d, sc)  # built from the old generation
    r2 = CacheReader(d)
    assert r2.shard(info.name).generation == g
    rec = r2.read_record(info.sample_base)
    assert rec["clis_i"] == 11.0 and rec["selected"] and all(i["clis_i"] is None for i in rec["instances"])
    # other columns are unchanged
    for col in SAMPLE_COLUMNS:
        if col not in ("clis_i", "selected"):
            assert np.array_equal(r.column(col), r2.column(col), equal_nan=col.startswith("clis")), col
    res = select(r2, Selection(select="stored", min_clis_i=0.0))  # the rescored flag
    rows = set(res.sample_row.tolist())
    assert info.sample_base in rows and not any(info.sample_base < x < info.sample_base + info.num_samples
                                                for x in rows)
    # an instance threshold > 0 now drops every instance of that shard (unscored)
    res = select(r2, Selection(select="all", min_clis_i=1.0))
    assert not any(info.sample_base <= x < info.sample_base + info.num_samples for x in res.sample_row)
    data = export_lvis(d, tmp_path / "x.json")
    assert sum(1 for im in data["images"] if im["acp_clis_i"] == 11.0) == info.num_samples


def test_resume_skips_done_units(tmp_path):
    cats = make_categories()
    d = tmp_path / "c"
    first = write_cache(d, cats, n_units=4, shard_max_samples=5)
    rng = np.random.default_rng(1)
    with CacheWriter(d, cats, GENERATION_SETTINGS, shard_max_samples=5) as w:
        assert w.done_keys == set(first)
        for u in range(6):
            recs, imgs = make_unit(u, 3, cats, rng)
            assert w.add_unit(recs, imgs) == (u >= 4)
        assert w.units_skipped == 4 and w.units_written == 2
    r = CacheReader(d)
    keys = [k.decode() for k in r.column("key")]
    assert sorted(set(keys)) == sorted(unit_key(u) for u in range(6)) and len(keys) == 18


def test_add_buffers_units(tmp_path):
    cats = make_categories()
    rng = np.random.default_rng(3)
    d = tmp_path / "c"
    with CacheWriter(d, cats, GENERATION_SETTINGS, shard_max_samples=4) as w:
        for u in range(5):
            recs, imgs = make_unit(u, 3, cats, rng)
            for rec, img in zip(recs, imgs):
                w.add(rec, img)
    r = CacheReader(d)
    assert len(r) == 15
    for info in r.shards:  # 3 candidates per unit: a 4-sample cap rolls after each unit
        assert info.num_samples == 3


def test_crop_store(cache, tmp_path):
    import shutil

    d0, written, _ = cache
    d = tmp_path / "cache"
    shutil.copytree(d0, d)
    build_crops(d, min_area=1)
    st = CropStore(d)
    r = CacheReader(d)
    assert len(st) == r.num_instances and not st.is_stale()
    recs = {(r.value("key_hash", row), rec["candidate_idx"]): (row, rec) for (k, c), (row, rec) in _by_key(r).items()}
    for i in range(0, len(st), 7):
        rgba, cid = st.read(i)
        row, rec = recs[(st.column("key_hash")[i], int(st.column("candidate_idx")[i]))]
        inst = rec["instances"][int(st.column("instance")[i])]
        assert cid == inst["category_id"]
        x, y, w, h = (int(v) for v in inst["bbox"])
        mask = rle_to_mask(inst["segmentation"])[y:y + h, x:x + w]
        assert rgba.shape == (h, w, 4)
        assert np.array_equal(rgba[..., 3] > 0, mask)
        assert np.array_equal(rgba[..., :3], r.read_image(row)[y:y + h, x:x + w])
        rgba[0, 0, 0] = 1  # writable
    groups = st.by_category()
    assert sum(len(v) for v in groups.values()) == len(st)
    for cid, ids in groups.items():
        assert all(st.read(int(i))[1] == cid for i in ids[:3])
    assert set(st.indices(category_ids=[1]).tolist()) == set(groups.get(1, []).tolist())
    sel = st.indices(min_clis_i=60.0)
    assert all(st.column("clis_i")[i] >= 60 for i in sel)
    # zlib codec reads back the same pixels; rebuilding replaces the store
    assert cli(["crops", str(d), "--codec", "zlib", "--min-area", "1", "--select", "clis"]) == 0
    st2 = CropStore(d)
    assert st2.codec == "zlib" and len(st2) < len(st)
    rgba2, _ = st2.read(0)
    assert rgba2.dtype == np.uint8 and rgba2.shape[2] == 4
    assert len([p for p in os.listdir(d / "crops") if not p.endswith(".json")]) == 1
    write_cache(d, make_categories(), n_units=1, first_unit=100, shard_max_samples=7)
    assert st2.is_stale()


def test_tar_headers_match_tarfile():
    from acp_data.cache import tarfmt

    for name, size, mtime in [("abc.c0.jpg", 1234, 1_700_000_000), ("x" * 100, 0, 0), ("k.c12.json", 8**10, 5)]:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.type = size, mtime, 0o644, tarfile.REGTYPE
        assert tarfmt.header(name, size, mtime) == ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii")
    with pytest.raises(ValueError):
        tarfmt.header("é.jpg", 1, 1)
