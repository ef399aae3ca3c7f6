"""The ``gligen`` generator and ``sam`` segmenter on tiny random-init models loaded by path, and the mask helpers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from tiny_models_gen import make_tiny_gligen, make_tiny_sam, make_tiny_sd, synthetic_lvis

from acp_data.categories import CategoryTable
from acp_data.generate.common import BackendOptionError, TooManyBoxes, plain_caption
from acp_data.masks import (
    clip_mask_to_box,
    largest_component,
    mask_to_polygons,
    mask_to_rle,
    polygons_to_mask,
    rle_area,
    rle_to_mask,
    tight_box_xywh,
)
from acp_data.registry import GENERATORS, SEGMENTERS
from acp_data.scene import SceneGraph, SceneObject
from acp_data.stages import StageContext

CTX = StageContext(CategoryTable.from_lvis_json(synthetic_lvis()))


def _scene(n: int = 2) -> SceneGraph:
    objs = [SceneObject("dog-1", 2, ["brown"], (0.1, 0.1, 0.4, 0.5)),
            SceneObject("frisbee-2", 3, ["red"], (0.55, 0.5, 0.3, 0.2))]
    for k in range(3, n + 1):
        objs.append(SceneObject(f"teapot-{k}", 10, [], (0.02 * (k % 40), 0.02 * (k % 40), 0.1, 0.1)))
    return SceneGraph(objs[:n], caption="A brown dog(dog-1) jumps for a red frisbee(frisbee-2).")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_gen")
    return {"gligen": make_tiny_gligen(root / "gligen"), "sd": make_tiny_sd(root / "sd"),
            "sam": make_tiny_sam(root / "sam")}


# ----- GLIGEN -------------------------------------------------------------------------------------------------------
def test_gligen_candidates_from_path(models) -> None:
    gen = GENERATORS.build("gligen", CTX, model=models["gligen"], steps=2, height=64, width=96)
    scene = _scene()
    ims = gen.generate(scene, n=3, seed=5)
    assert len(ims) == 3
    assert all(im.shape == (64, 96, 3) and im.dtype == np.uint8 for im in ims)
    assert not np.array_equal(ims[0], ims[1])  # N different candidates
    again = gen.generate(scene, n=3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(ims, again))  # same seed, same images
    other = gen.generate(scene, n=1, seed=6)
    assert not np.array_equal(other[0], ims[0])
    # a phrase longer than the text encoder's 77 tokens is shortened, not a crash inside the pipeline
    long = _scene()
    long.objects[0].attributes = ["very"] * 120
    assert gen.generate(long, n=1, seed=5)[0].shape == (64, 96, 3)


def test_gligen_settings_scheduler_and_refiner(models) -> None:
    gen = GENERATORS.build("gligen", CTX, model=models["gligen"], steps=3, height=64, width=64, scheduler="ddim",
                           beta=0.5, guidance=4.0, refiner={"model": models["sd"], "steps": 4, "strength": 0.5},
                           device="cpu")
    s = gen.settings()
    assert s["model"] == models["gligen"] and s["revision"] is None and s["steps"] == 3 and s["guidance"] == 4.0
    assert s["height"] == 64 and s["scheduler"] == "ddim" and s["beta"] == 0.5
    assert s["refiner"]["model"] == models["sd"] and s["refiner"]["strength"] == 0.5
    assert "device" not in s
    ims = gen.generate(_scene(), n=2, seed=1)
    assert type(gen._pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(gen._refiner).__name__ == "StableDiffusionImg2ImgPipeline"
    assert [im.shape for im in ims] == [(64, 64, 3)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(ims, gen.generate(_scene(), n=2, seed=1)))
    plain = GENERATORS.build("gligen", CTX, model=models["gligen"], steps=3, height=64, width=64, scheduler="ddim",
                             beta=0.5, guidance=4.0)
    assert not np.array_equal(plain.generate(_scene(), n=1, seed=1)[0], ims[0])  # the refiner changed the image


def test_gligen_bad_input(models, tmp_path) -> None:
    gen = GENERATORS.build("gligen", CTX, model=models["gligen"], steps=1, height=64, width=64)
    assert gen.max_boxes == 30
    with pytest.raises(TooManyBoxes) as e:
        gen.generate(_scene(31), n=1, seed=0)
    assert e.value.reason == "too_many_boxes" and e.value.n == 31
    assert gen._pipe is None  # refused before any model loaded
    small = GENERATORS.build("gligen", CTX, model=models["gligen"], max_boxes=2)
    with pytest.raises(TooManyBoxes):
        small.check_scene(_scene(3))
    with pytest.raises(BackendOptionError, match="does not exist"):
        GENERATORS.build("gligen", CTX, model=str(tmp_path / "missing"))
    with pytest.raises(BackendOptionError, match="unknown scheduler"):
        GENERATORS.build("gligen", CTX, model=models["gligen"], scheduler="nope")
    with pytest.raises(BackendOptionError, match="max_boxes"):
        GENERATORS.build("gligen", CTX, model=models["gligen"], max_boxes=31)
    with pytest.raises(BackendOptionError, match="unknown option"):
        GENERATORS.build("gligen", CTX, model=models["gligen"], stpes=3)
    with pytest.raises(BackendOptionError, match="not a GLIGEN checkpoint"):
        GENERATORS.build("gligen", CTX, model=models["sd"], steps=1, height=64, width=64).generate(_scene(), 1, 0)


def test_plain_caption() -> None:
    s = SceneGraph([SceneObject("bow_weapon-1", 5), SceneObject("dog-2", 2)],
                   caption="A bow weapon(bow_weapon-1) next to a dog(dog-2) .")
    assert plain_caption(s) == "A bow weapon next to a dog."
    assert plain_caption(SceneGraph([SceneObject("dog-1", 2, ["brown"])])) == "a photo of brown dog"


# ----- SAM ----------------------------------------------------------------------------------------------------------
def test_sam_masks_inside_boxes(models) -> None:
    seg = SEGMENTERS.build("sam", CTX, model=models["sam"])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.circle(img, (40, 40), 20, (255, 0, 0), -1)
    boxes = np.array([[10, 10, 70, 70], [70.5, 20.2, 120.7, 90.1], [0, 0, 128, 96], [50, 50, 50, 60]], dtype=float)
    masks = seg.segment(img, boxes)
    assert len(masks) == 4 and all(m.shape == (96, 128) and m.dtype == bool for m in masks)
    assert not masks[3].any()  # a zero-width box gives an empty mask
    found = 0
    for m, (x0, y0, x1, y1) in zip(masks[:3], boxes[:3]):
        if not m.any():
            continue
        found += 1
        ys, xs = np.nonzero(m)
        assert xs.min() + 0.5 >= x0 and xs.max() + 0.5 <= x1 and ys.min() + 0.5 >= y0 and ys.max() + 0.5 <= y1
        n, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        assert n == 2  # background + the one component kept
    assert found >= 1
    batch = seg.segment_batch([img, img[:, ::-1].copy()], [boxes, boxes[:2]])
    assert [len(b) for b in batch] == [4, 2]
    assert all(np.array_equal(a, b) for a, b in zip(batch[0], masks))
    assert seg.segment(img, np.zeros((0, 4))) == []
    assert set(seg.settings()) >= {"model", "revision", "multimask", "clip_to_box", "largest_component"}


# ----- mask helpers -------------------------------------------------------------------------------------------------
def test_rle_round_trip() -> None:
    rng = np.random.default_rng(0)
    for m in (rng.random((37, 53)) > 0.6, np.zeros((10, 12), bool), np.ones((7, 5), bool)):
        rle = mask_to_rle(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        assert np.array_equal(rle_to_mask(rle), m) and rle_area(rle) == int(m.sum())
    # uncompressed RLE (list counts) is accepted too
    # column-major runs: 1 zero, 2 ones, 3 zeros
    assert np.array_equal(rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]}), [[False, True, False],
                                                                               [True, False, False]])
    with pytest.raises(ValueError, match="size"):
        rle_to_mask({"counts": "abc"})


def test_polygons_with_hole_round_trip() -> None:
    m = np.zeros((80, 100), np.uint8)
    cv2.circle(m, (40, 40), 30, 1, -1)
    cv2.circle(m, (40, 40), 12, 0, -1)  # a ring
    cv2.rectangle(m, (80, 5), (95, 30), 1, -1)
    cv2.rectangle(m, (84, 12), (90, 20), 0, -1)  # a square frame: another hole
    m[70, 90] = 1  # a single pixel
    m = m.astype(bool)
    polys = mask_to_polygons(m)
    assert len(polys) == 3 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    back = polygons_to_mask(polys, 80, 100)
    assert (back ^ m).sum() <= 8  # within a few pixels (exact in practice)
    assert not back[40, 40] and not back[16, 87]  # the holes stay holes
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_box_and_component_helpers() -> None:
    m = np.zeros((20, 30), bool)
    m[2:6, 3:9] = True  # 24 px
    m[10:18, 12:20] = True  # 64 px
    assert tight_box_xywh(m) == (3.0, 2.0, 17.0, 16.0)
    assert tight_box_xywh(np.zeros((4, 4), bool)) is None
    big = largest_component(m)
    assert big.sum() == 64 and tight_box_xywh(big) == (12.0, 10.0, 8.0, 8.0)
    assert not largest_component(np.zeros((3, 3), bool)).any()
    clipped = clip_mask_to_box(m, [0, 0, 10, 10])
    assert clipped.sum() == 24 and not clipped[10:, :].any()
    # kept: pixels whose centre lies in the box (columns 5, 6 with centres 5.5, 6.5; rows 2, 3)
    assert np.array_equal(np.argwhere(clip_mask_to_box(m, [4.6, 2, 6.6, 4])), [[2, 5], [2, 6], [3, 5], [3, 6]])
