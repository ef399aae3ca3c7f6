"""LVIS-format loading and registration: paths, ids, RLE -> polygons with holes, metadata, re-registration."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from acp_data.categories import CategoryTable
from acp_data.d2.lvis_format import (
    DatasetFormatError,
    load_lvis_format_json,
    metadata_category_table,
    register_from_config,
    register_lvis_format,
    rle_to_polygons,
)


def rasterize(polys, h, w) -> np.ndarray:
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w)))


def masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:64, :80]
    d2 = (yy - 32) ** 2 + (xx - 30) ** 2
    rng = np.random.default_rng(0)
    return {
        "ring": (d2 < 20 ** 2) & (d2 >= 8 ** 2),
        "two_holes": ((yy >= 5) & (yy < 60) & (xx >= 5) & (xx < 75)) & ~((yy >= 10) & (yy < 20) & (xx >= 10)
                                                                        & (xx < 20)) & ~(d2 < 49),
        "nested": ((d2 < 28 ** 2) & (d2 >= 20 ** 2)) | (d2 < 8 ** 2),  # a disk inside a ring: two components
        "single_pixel": (yy == 3) & (xx == 77),
        "one_pixel_line": (yy == 60) & (xx > 5) & (xx < 50),
        "noise": rng.random((64, 80)) > 0.6,
    }


def compressed_rle(m: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(m.shape), "counts": rle["counts"].decode("ascii")}


@pytest.mark.parametrize("name", list(masks()))
def test_rle_to_polygons_round_trips_exactly(name):
    m = masks()[name].astype(np.uint8)
    polys = rle_to_polygons(compressed_rle(m))
    assert polys and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    np.testing.assert_array_equal(rasterize(polys, *m.shape), m)


def test_hole_is_joined_not_dropped():
    m = masks()["ring"].astype(np.uint8)
    polys = rle_to_polygons(compressed_rle(m))
    assert len(polys) == 1  # outer contour and hole in one polygon (the slit)
    assert rasterize(polys, *m.shape)[32, 30] == 0  # the centre stays empty


def test_empty_rle_gives_no_polygon():
    assert rle_to_polygons(compressed_rle(np.zeros((8, 8), np.uint8))) == []


def test_uncompressed_rle():
    m = masks()["ring"].astype(np.uint8)
    runs, prev, n = [], 0, 0
    for v in m.flatten(order="F"):  # uncompressed RLE: run lengths starting with zeros, column-major
        if v != prev:
            runs.append(n)
            prev, n = v, 0
        n += 1
    runs.append(n)
    np.testing.assert_array_equal(rasterize(rle_to_polygons({"size": list(m.shape), "counts": runs}), *m.shape), m)


def test_load_tiny_dataset(tiny_lvis):
    dicts = load_lvis_format_json(tiny_lvis["train_json"], tiny_lvis["image_dir"])
    data = tiny_lvis["train"]
    assert [d["image_id"] for d in dicts] == sorted(i["id"] for i in data["images"])
    first = dicts[0]
    assert first["file_name"].startswith(tiny_lvis["image_dir"]) and first["file_name"].endswith("train_000001.jpg")
    assert first["neg_category_ids"] == data["images"][0]["neg_category_ids"]
    assert first["not_exhaustive_category_ids"] == []
    from detectron2.structures import BoxMode

    anns = [a for d in dicts for a in d["annotations"]]
    assert len(anns) == len(data["annotations"])
    assert {a["category_id"] for a in anns} == set(range(6))  # contiguous 0..5
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in anns)
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in anns)
    # the ring was stored as RLE: its polygons give back the exact mask
    ring_src = next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))
    ring = next(a for d in dicts for a in d["annotations"] if d["image_id"] == ring_src["image_id"]
                and a["category_id"] == ring_src["category_id"] - 1)
    h, w = ring_src["segmentation"]["size"]
    np.testing.assert_array_equal(rasterize(ring["segmentation"], h, w), mask_util.decode(
        {"size": [h, w], "counts": ring_src["segmentation"]["counts"].encode()}))


def test_file_name_falls_back_to_coco_url(tiny_lvis, tmp_path):
    data = copy.deepcopy(tiny_lvis["train"])
    for img in data["images"]:
        del img["file_name"]
        img["coco_url"] = "http://images.cocodataset.org/train2017/000000000042.jpg"
    p = tmp_path / "a.json"
    p.write_text(json.dumps(data))
    d = load_lvis_format_json(p, "/data/coco/train2017")
    assert d[0]["file_name"] == "/data/coco/train2017/000000000042.jpg"
    del data["images"][0]["coco_url"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match="neither 'file_name' nor 'coco_url'"):
        load_lvis_format_json(p, "/x")


@pytest.mark.parametrize("breakage, match", [
    (lambda d: d["annotations"][0].update(category_id=7), r"category_id 7, outside the 1\.\.6"),
    (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), "appears more than once"),
    (lambda d: d["annotations"][0].update(image_id=999), "image ids not in 'images'"),
    (lambda d: d["categories"][5].update(id=9), "contiguous"),
    (lambda d: d["annotations"][0].update(segmentation="oops"), "segmentation of type str"),
    (lambda d: d.pop("images"), "needs 'images' and 'categories'"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "x"}), "bad RLE"),
])
def test_bad_json_errors_name_file_and_entry(tiny_lvis, tmp_path, breakage, match):
    data = copy.deepcopy(tiny_lvis["train"])
    breakage(data)
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_lvis_format_json(p, "/x")
    assert "broken.json" in str(e.value)


def test_invalid_polygons_dropped_and_counted(tiny_lvis, tmp_path, caplog):
    data = copy.deepcopy(tiny_lvis["train"])
    poly_ann = next(a for a in data["annotations"] if isinstance(a["segmentation"], list))
    poly_ann["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # two points
    p = tmp_path / "a.json"
    p.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        dicts = load_lvis_format_json(p, "/x")
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"]) - 1
    assert "dropped 1 annotations" in caplog.text


def test_register_metadata_and_replacement(tiny_lvis, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    table = register_lvis_format("acp_test_tiny", tiny_lvis["train_json"], tiny_lvis["image_dir"])
    meta = MetadataCatalog.get("acp_test_tiny")
    assert meta.thing_classes == [c["name"] for c in tiny_lvis["train"]["categories"]]
    assert meta.class_image_count == [{"id": c["id"], "image_count": c["image_count"]}
                                      for c in tiny_lvis["train"]["categories"]]
    assert meta.json_file == tiny_lvis["train_json"] and meta.image_root == tiny_lvis["image_dir"]
    assert meta.evaluator_type == "lvis"
    assert meta.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 7)}
    assert meta.category_table == table == CategoryTable.from_lvis_json(tiny_lvis["train_json"])
    assert [c.frequency for c in table] == ["r", "r", "c", "c", "f", "f"]
    assert metadata_category_table("acp_test_tiny") is table
    assert len(DatasetCatalog.get("acp_test_tiny")) == len(tiny_lvis["train"]["images"])
    # registering the name again replaces data and metadata
    small = copy.deepcopy(tiny_lvis["train"])
    small["categories"] = small["categories"][:2]
    small["annotations"] = [a for a in small["annotations"] if a["category_id"] <= 2]
    p = tmp_path / "small.json"
    p.write_text(json.dumps(small))
    register_lvis_format("acp_test_tiny", p, tiny_lvis["image_dir"])
    assert MetadataCatalog.get("acp_test_tiny").thing_classes == ["red_disk", "blue_ring"]
    assert len(metadata_category_table("acp_test_tiny")) == 2
    assert sum(len(d["annotations"]) for d in DatasetCatalog.get("acp_test_tiny")) == len(small["annotations"])


def test_builtin_lvis_v1_category_table():
    t = metadata_category_table("lvis_v1_val")
    assert len(t) == 1203 and t.counts() == {"r": 337, "c": 461, "f": 405}
    with pytest.raises(KeyError, match="not registered"):
        metadata_category_table("acp_test_no_such_dataset")


def test_register_from_config_resolves_under_detectron2_datasets(tiny_lvis, monkeypatch):
    from detectron2.data import MetadataCatalog

    from acp_data.d2.config import get_acp_cfg

    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_lvis["root"])
    cfg = get_acp_cfg()
    cfg.ACP.REGISTER_LVIS = [["acp_test_cfg_train", tiny_lvis["train_json_rel"], tiny_lvis["image_dir_rel"]],
                             ["acp_test_cfg_val", tiny_lvis["val_json"], tiny_lvis["image_dir"]]]  # absolute kept
    assert register_from_config(cfg) == ["acp_test_cfg_train", "acp_test_cfg_val"]
    assert MetadataCatalog.get("acp_test_cfg_train").json_file == tiny_lvis["train_json"]
    assert MetadataCatalog.get("acp_test_cfg_val").image_root == tiny_lvis["image_dir"]
    assert register_from_config(cfg) == ["acp_test_cfg_train", "acp_test_cfg_val"]  # idempotent


def test_records_feed_detectron2_mapper(tiny_lvis):
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    dicts = load_lvis_format_json(tiny_lvis["train_json"], tiny_lvis["image_dir"])
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(64, 96)], image_format="BGR",
                           use_instance_mask=True, instance_mask_format="polygon")
    out = mapper(dicts[0])
    inst = out["instances"]
    assert len(inst) == len(dicts[0]["annotations"]) and inst.gt_masks.polygons
    assert out["image"].shape[1] == 64
