"""The Shapes world: LVIS frequency groups, exact masks that match the pixels, exhaustive negatives, byte-level
determinism, caching, and loading through lvis-api and detectron2."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from acp_data.categories import frequency_from_count
from acp_data.masks import polygons_to_mask
from acp_data.shapes.render import APPEARANCES
from acp_data.shapes.world import (
    SIZES,
    assign_categories,
    build_world,
    load_world,
    parse_category,
    world_categories,
    world_category_table,
)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("shapes") / "world", seed=0, size="small", progress=False)


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def _train_image_counts(data: dict) -> dict[int, int]:
    imgs = defaultdict(set)
    for a in data["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
    return {cid: len(s) for cid, s in imgs.items()}


def _check_groups(data: dict, size: str) -> None:
    counts = _train_image_counts(data)
    expected = {c.id: c for c in world_categories(size)}
    assert [c["id"] for c in data["categories"]] == list(range(1, 31))
    for c in data["categories"]:
        n = counts.get(c["id"], 0)
        assert c["image_count"] == n == expected[c["id"]].image_count, c["name"]
        # LVIS: rare 1-10 training images, common 11-100, frequent > 100
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f"), (c["name"], n)
        assert c["frequency"] == frequency_from_count(n) == expected[c["id"]].frequency
        assert n >= 1


def test_category_definition():
    cats = world_categories("demo")
    assert len(cats) == 30 and len({c.name for c in cats}) == 30
    groups = {g: [c for c in cats if c.frequency == g] for g in "rcf"}
    assert (len(groups["r"]), len(groups["c"]), len(groups["f"])) == (8, 11, 11)
    assert all(1 <= c.image_count <= 10 for c in groups["r"])
    assert all(11 <= c.image_count <= 100 for c in groups["c"])
    assert all(c.image_count > 100 for c in groups["f"])
    # every shape and every colour has a rare member (rare categories can be learned from their parts)
    assert {c.shape for c in groups["r"]} == {c.shape for c in cats}
    assert {c.colour for c in groups["r"]} == set(APPEARANCES)
    assert parse_category("Red_Star") == ("star", "red") and parse_category("striped ring") == ("ring", "striped")
    with pytest.raises(ValueError, match="not a Shapes world category"):
        parse_category("purple star")
    assert world_category_table("demo").counts() == {"r": 8, "c": 11, "f": 11}


def test_assignment_exact_counts():
    rng = np.random.default_rng(3)
    counts = {1: 50, 2: 7, 3: 1, 4: 33}
    layout = assign_categories(rng, counts, 60, max_per_image=3)
    got = defaultdict(int)
    for cids in layout:
        assert 1 <= len(cids) <= 3 and len(set(cids)) == len(cids)
        for c in cids:
            got[c] += 1
    assert dict(got) == counts
    with pytest.raises(ValueError, match="needs 70 images"):
        assign_categories(rng, {1: 70}, 60, max_per_image=3)


def test_frequency_groups_match_definition(small_world):
    train = _load(small_world.train_json)
    _check_groups(train, "small")
    assert len(train["images"]) == SIZES["small"].train_images
    val = _load(small_world.val_json)
    assert [c["frequency"] for c in val["categories"]] == [c["frequency"] for c in train["categories"]]
    assert small_world.categories() == world_category_table("small")


def test_negatives_exhaustive(small_world):
    for split in ("train", "val"):
        data = _load(small_world.root / f"{split}.json")
        present = defaultdict(set)
        for a in data["annotations"]:
            present[a["image_id"]].add(a["category_id"])
        for im in data["images"]:
            neg = set(im["neg_category_ids"])
            assert im["not_exhaustive_category_ids"] == []
            assert present[im["id"]], f"{split} image {im['id']} has no object"
            assert not neg & present[im["id"]]
            assert neg | present[im["id"]] == set(range(1, 31))
    val = _load(small_world.val_json)
    per_cat = _train_image_counts(val)
    assert all(per_cat[c] == SIZES["small"].val_images_per_category for c in range(1, 31))


def _mask_colour_ok(pixels: np.ndarray, colour: str) -> bool:
    """Most pixels look like the category's colour: nearest palette colour (solid) or black/white (stripes)."""
    if colour == "striped":
        p = pixels.astype(np.float32)
        grey = (p.max(axis=1) - p.min(axis=1)) < 60
        return float((grey & ((p.mean(axis=1) < 90) | (p.mean(axis=1) > 170))).mean()) > 0.8
    solid = {n: np.array(a.colours[0], np.float32) for n, a in APPEARANCES.items() if not a.striped}
    med = np.median(pixels.astype(np.float32), axis=0)
    return min(solid, key=lambda n: float(np.linalg.norm(med - solid[n]))) == colour


def test_masks_match_images(small_world):
    for split in ("train", "val"):
        data = _load(small_world.root / f"{split}.json")
        cats = {c["id"]: c for c in data["categories"]}
        by_image = defaultdict(list)
        for a in data["annotations"]:
            by_image[a["image_id"]].append(a)
        for im in data["images"]:
            img = np.asarray(Image.open(small_world.image_root / im["file_name"]).convert("RGB"))
            assert img.shape == (im["height"], im["width"], 3)
            union = np.zeros(img.shape[:2], dtype=np.int32)
            for a in by_image[im["id"]]:
                m = polygons_to_mask(a["segmentation"], im["height"], im["width"])
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
                assert m.sum() == a["area"] > 0
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                union += m
                core = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                if core.sum() >= 20:  # away from JPEG-blurred edges
                    assert _mask_colour_ok(img[core], cats[a["category_id"]]["colour"]), (split, im["id"], a["id"])
            assert union.max() <= 1, "visible masks of one image overlap"


def test_ring_masks_have_holes(small_world):
    data = _load(small_world.train_json)
    rings = {c["id"] for c in data["categories"] if c["shape"] == "ring"}
    ims = {im["id"]: im for im in data["images"]}
    holes = 0
    for a in data["annotations"]:
        if a["category_id"] in rings:
            im = ims[a["image_id"]]
            m = polygons_to_mask(a["segmentation"], im["height"], im["width"]).astype(np.uint8)
            _, hier = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            holes += int((hier.reshape(-1, 4)[:, 3] >= 0).any())
    assert holes >= 5


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_same_seed_same_bytes_and_cache(small_world, tmp_path):
    again = build_world(tmp_path / "again", seed=0, size="small", progress=False)
    assert _digest(again.root) == _digest(small_world.root)
    # cached: a second call does not rewrite anything
    mtime = os.stat(again.train_json).st_mtime_ns
    assert build_world(tmp_path / "again", seed=0, size="small", progress=False).root == again.root
    assert os.stat(again.train_json).st_mtime_ns == mtime
    # another seed gives other images and replaces the world in place
    other = build_world(tmp_path / "again", seed=1, size="small", progress=False)
    assert other.stamp_data()["seed"] == 1
    assert _digest(other.root)["train.json"] != _digest(small_world.root)["train.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".again.")  and not p.name.endswith(".lock")]


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no Shapes world"):
        build_world(tmp_path / "mine", size="small", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="acp-data shapes build"):
        load_world(tmp_path / "mine")
    with pytest.raises(ValueError, match="unknown Shapes world size"):
        build_world(tmp_path / "x", size="huge", progress=False)


def test_lvis_api_and_detectron2_load(small_world):
    if not hasattr(np, "float"):
        np.float = float  # lvis 0.5.3 uses np.float (removed in numpy 2)
    from lvis import LVIS

    for p in (small_world.train_json, small_world.val_json):
        api = LVIS(str(p))
        assert len(api.cats) == 30 and len(api.imgs) > 0
        ann = api.load_anns(api.get_ann_ids()[:5])
        assert all(api.ann_to_mask(a).sum() == a["area"] for a in ann)
    from detectron2.data.datasets.lvis import load_lvis_json

    # detectron2 joins image_root + the coco_url's folder + its file name
    dicts = load_lvis_json(str(small_world.val_json), str(small_world.image_root) + os.sep)
    assert len(dicts) == SIZES["small"].val_images
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    assert all(0 <= o["category_id"] < 30 for d in dicts for o in d["annotations"])


def test_cli_build(tmp_path, capsys):
    from acp_data.cli import main

    assert main(["shapes", "build", "--out", str(tmp_path / "w"), "--size", "small", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["groups"] == {"r": 19, "c": 11, "f": 0} and Path(out["train_json"]).is_file()
    (tmp_path / "f").write_text("x")
    assert main(["shapes", "build", "--out", str(tmp_path / "f"), "--size", "small"]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_world(tmp_path):
    world = build_world(tmp_path / "demo", seed=0, size="demo", progress=False)
    train = _load(world.train_json)
    _check_groups(train, "demo")
    groups = world.categories().counts()
    assert groups == {"r": 8, "c": 11, "f": 11}
    val = _load(world.val_json)
    assert len(val["images"]) == 300
    assert min(_train_image_counts(val).values()) >= 20  # APr is not noise
    assert 1500 <= len(train["images"]) <= 2000
