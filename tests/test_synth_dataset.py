"""The lazy synthetic dataset: detectron2 dicts, box modes, registration and metadata checks, workers, inspect."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from cache_helpers import make_categories, write_cache

from acp_data.cache.reader import CacheReader, decode_image
from acp_data.cache.selection import ALL, Selection, select
from acp_data.categories import CategoryError
from acp_data.d2.datasets import SyntheticDataset, register_acp_synthetic
from acp_data.masks import rle_to_mask


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds") / "cache"
    written = write_cache(d, make_categories(), n_units=10, shard_max_samples=9, seed=11)
    return d, written


def _records(written):
    return {(r["key"], r["candidate_idx"]): r for v in written.values() for r in v}


def test_dicts_follow_detectron2(cache):
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.structures import BoxMode

    d, written = cache
    recs = _records(written)
    sel = Selection(select="clis", min_clis_i=50.0)
    ds = SyntheticDataset(d, sel)
    res = select(CacheReader(d), sel)
    assert len(ds) == len(res) > 0
    ids = set()
    for i in range(len(ds)):
        item = ds[i]
        reader = ds.readers[0]
        ci, row = item["acp_source"]
        assert ci == 0 and item["file_name"] == f"acp://{reader.cache_dir}/{row}"
        rec = recs[(reader.key(row), int(reader.value("candidate_idx", row)))]
        assert rec["selected"] and (item["height"], item["width"]) == (rec["height"], rec["width"])
        kept = [inst for inst in rec["instances"] if inst["clis_i"] >= 50.0]
        assert len(item["annotations"]) == len(kept)
        for a, inst in zip(item["annotations"], kept):
            assert a["category_id"] == inst["category_id"] - 1 and a["bbox_mode"] == BoxMode.XYWH_ABS
            assert a["bbox"] == inst["bbox"] and a["segmentation"] == inst["segmentation"]
            assert np.array_equal(rle_to_mask(a["segmentation"]), rle_to_mask(inst["segmentation"]))
        img = decode_image(item["acp_image_bytes"])
        assert img.shape == (rec["height"], rec["width"], 3)
        assert np.array_equal(img, ds.read_image(i))
        inst = annotations_to_instances(item["annotations"], img.shape[:2], mask_format="bitmask")
        assert len(inst) == len(kept) and inst.gt_masks.tensor.shape[1:] == img.shape[:2]
        ids.add(item["image_id"])
    assert len(ids) == len(ds)
    assert ds.category_image_counts().sum() == len(res.sample_category_pairs()[0])



def test_dropped_instances_travel_with_the_kept_image(cache):
    """Every stored instance of a kept image is either in ``annotations`` or in ``acp_dropped`` (same form, with the
    reason), in record order; the mapper applies ``ACP.DROPPED_INSTANCES`` to the latter."""
    d, written = cache
    recs = _records(written)
    ds = SyntheticDataset(d, Selection(select="clis", min_clis_i=50.0))
    n_dropped = 0
    for i in range(len(ds)):
        item = ds[i]
        reader = ds.readers[0]
        rec = recs[(reader.key(item["acp_source"][1]), int(reader.value("candidate_idx", item["acp_source"][1])))]
        below = [inst for inst in rec["instances"] if inst["clis_i"] < 50.0]
        assert len(item["acp_dropped"]) == len(below)
        for a, inst in zip(item["acp_dropped"], below):
            assert a["acp_drop_reason"] == "min_clis_i" and a["category_id"] == inst["category_id"] - 1
            assert a["bbox"] == inst["bbox"] and a["segmentation"] == inst["segmentation"]
            assert a["acp_clis_i"] == inst["clis_i"] and a["iscrowd"] == 0 and set(a) - {"acp_drop_reason"} == \
                set(item["annotations"][0])
        n_dropped += len(below)
    assert n_dropped > 0
    everything = SyntheticDataset(d, ALL)
    assert all(everything[i]["acp_dropped"] == [] for i in range(len(everything)))

def test_layout_box_mode(cache):
    d, written = cache
    recs = _records(written)
    ds = SyntheticDataset(d, ALL, box_mode="layout", include_image_bytes=False)
    item = ds[3]
    assert "acp_image_bytes" not in item
    rec = recs[(ds.readers[0].key(item["acp_source"][1]), int(ds.readers[0].value("candidate_idx",
                                                                                    item["acp_source"][1])))]
    assert [a["bbox"] for a in item["annotations"]] == [pytest.approx(i["layout_bbox"]) for i in rec["instances"]]
    with pytest.raises(ValueError, match="ACP.BOX"):
        SyntheticDataset(d, ALL, box_mode="tight")


def test_pickle_is_small_and_workers_share(cache):
    import torch

    d, _ = cache
    ds = SyntheticDataset(d, ALL)
    ds[0]  # opens maps and descriptors in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 64 * 1024
    again = pickle.loads(blob)
    assert again[5]["image_id"] == ds[5]["image_id"]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    got = sorted(item["image_id"] for item in loader)
    assert got == sorted(ds[i]["image_id"] for i in range(len(ds)))


def test_registration_and_metadata(cache):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    d, _ = cache
    name = register_acp_synthetic("unit_test", [d], selection=ALL)
    assert name == "acp_synth_unit_test"
    assert isinstance(DatasetCatalog.get(name), SyntheticDataset)
    assert MetadataCatalog.get(name).thing_classes == make_categories().names
    assert register_acp_synthetic("unit_test", [d], selection=Selection()) == name  # re-registering replaces
    assert len(DatasetCatalog.get(name)) == len(SyntheticDataset(d, Selection()))

    cats = make_categories()
    real = "acp_test_real_ok"
    for n in (real, "acp_test_real_bad"):
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
    DatasetCatalog.register(real, lambda: [])
    counts = [{"id": c.id, "image_count": 7} for c in cats]
    MetadataCatalog.get(real).set(thing_classes=cats.names, class_image_count=counts)
    name = register_acp_synthetic("with_real", [d], real_dataset_name=real)
    assert MetadataCatalog.get(name).class_image_count == counts

    bad = "acp_test_real_bad"
    DatasetCatalog.register(bad, lambda: [])
    MetadataCatalog.get(bad).set(thing_classes=[*cats.names[:3], "dog", *cats.names[4:]])
    with pytest.raises(CategoryError) as e:
        register_acp_synthetic("with_bad", [d], real_dataset_name=bad)
    msg = str(e.value)
    assert "manifest.json" in msg and bad in msg and "dog" in msg


def test_inspect_html(cache, tmp_path):
    from acp_data.cli import main as cli

    d, _ = cache
    out = tmp_path / "html"
    assert cli(["inspect", str(d), "--html", str(out), "--per-category", "4", "--thumb", "96"]) == 0
    index = (out / "index.html").read_text()
    cats = make_categories()
    for c in cats:
        assert c.name in index
    pages = sorted((out / "categories").glob("*.html"))
    assert len(pages) == len(cats)
    page = pages[0].read_text()
    assert "Kept (" in page and "Dropped (" in page and "CLIS-L" in page and "CLIS-I" in page
    imgs = [s.split("'")[0] for s in page.split("src='../thumbs/")[1:]]
    assert imgs and all((out / "thumbs" / i).is_file() for i in imgs)
