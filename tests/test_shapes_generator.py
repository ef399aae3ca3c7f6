"""The shapes generator (seeded, failures at the configured rates, visible in the pixels) and the shapes segmenter
(masks agree with what was drawn when nothing failed; bad generations give bad masks)."""

from __future__ import annotations

import numpy as np
import pytest

from acp_data.categories import Category, CategoryTable
from acp_data.registry import GENERATORS, SEGMENTERS
from acp_data.scene import SceneGraph, SceneObject
from acp_data.shapes.generator import FAILURES, ShapesGenerator
from acp_data.shapes.render import APPEARANCES
from acp_data.shapes.segmenter import ShapesSegmenter
from acp_data.shapes.world import world_category_table
from acp_data.stages import StageContext

TABLE = world_category_table("demo")
CTX = StageContext(TABLE)
NO_FAILURES = {f"p_{f}": 0.0 for f in FAILURES}


def random_scene(rng: np.random.Generator, n_objects: int, max_overlap: float = 1.0) -> SceneGraph:
    """``n_objects`` of random categories in boxes of sqrt(area) 0.18-0.4 of the image; each box's overlap with the
    others (as a fraction of the smaller box) stays at most ``max_overlap``."""
    boxes: list[tuple[float, float, float, float]] = []
    while len(boxes) < n_objects:
        s = rng.uniform(0.18, 0.4)
        w, h = s * np.exp(rng.normal(0, 0.15)), s * np.exp(rng.normal(0, 0.15))
        x, y = rng.uniform(0.01, 0.99 - w), rng.uniform(0.01, 0.99 - h)
        ok = True
        for bx, by, bw, bh in boxes:
            iw = max(0.0, min(x + w, bx + bw) - max(x, bx))
            ih = max(0.0, min(y + h, by + bh) - max(y, by))
            ok &= iw * ih <= max_overlap * min(w * h, bw * bh)
        if ok:
            boxes.append((x, y, w, h))
    cids = rng.integers(1, len(TABLE) + 1, size=n_objects)
    objs = [SceneObject(f"{TABLE[int(c)].name.replace(' ', '_')}-{k + 1}", int(c), [], b)
            for k, (c, b) in enumerate(zip(cids, boxes))]
    return SceneGraph(objs, caption="a photo")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def _box_iou(mask: np.ndarray, box: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    m = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    iw = max(0.0, min(m[2], box[2]) - max(m[0], box[0]))
    ih = max(0.0, min(m[3], box[3]) - max(m[1], box[1]))
    inter = iw * ih
    return inter / ((m[2] - m[0]) * (m[3] - m[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def test_registered_and_options():
    gen = GENERATORS.build("shapes", CTX, p_missing=0.2, width=96, height=64)
    assert isinstance(gen, ShapesGenerator)
    assert gen.settings()["p_missing"] == 0.2 and gen.settings()["p_smear"] == 0.05  # defaults are in the key
    img = gen.generate(random_scene(np.random.default_rng(0), 2), 1, 0)[0]
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8
    assert isinstance(SEGMENTERS.build("shapes", CTX), ShapesSegmenter)
    with pytest.raises(ValueError, match="unknown option.*p_blur"):
        ShapesGenerator(CTX, p_blur=0.1)
    with pytest.raises(ValueError, match="sum to 1.400"):
        ShapesGenerator(CTX, p_wrong_colour=0.6, p_wrong_shape=0.6)
    with pytest.raises(ValueError, match="p_missing = 1.5"):
        ShapesGenerator(CTX, p_missing=1.5)
    lvis_like = CategoryTable([Category(1, "red star"), Category(2, "aerosol can")], source="some.json")
    with pytest.raises(ValueError, match="id 2 of some.json.*aerosol can"):
        ShapesGenerator(StageContext(lvis_like))
    with pytest.raises(ValueError, match="unknown option"):
        ShapesSegmenter(CTX, threshold=3)


def test_same_seed_same_image():
    gen = ShapesGenerator(CTX)
    scene = random_scene(np.random.default_rng(1), 3)
    a = gen.generate(scene, 3, seed=7)
    b = gen.generate(scene, 3, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(gen.generate(scene, 1, seed=7)[0], a[0])  # candidate k does not depend on n
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(gen.generate(scene, 1, seed=8)[0], a[0])


def test_failure_rates_and_what_they_look_like():
    rates = {"p_wrong_colour": 0.10, "p_wrong_shape": 0.08, "p_missing": 0.06, "p_merged": 0.05,
             "p_offbox": 0.07, "p_smear": 0.04}
    gen = ShapesGenerator(CTX, **rates)
    rng = np.random.default_rng(2)
    counts = dict.fromkeys(FAILURES, 0)
    n = 0
    colour_checked = 0
    for draw in range(500):
        scene = random_scene(rng, int(rng.integers(2, 4)), max_overlap=0.1)
        boxes = scene.boxes_xyxy(160, 160)
        d = gen.generate_with_truth(scene, 1, seed=draw)[0]
        for i, (o, f) in enumerate(zip(scene.objects, d.failures)):
            n += 1
            asked_shape, asked_colour = TABLE[o.category_id].name.split(" ")[::-1]
            if f is None:
                assert d.drawn[i] == (asked_shape, asked_colour)
                continue
            counts[f] += 1
            if f == "missing":
                assert d.drawn[i] is None and not d.masks[i].any()
            elif f == "wrong_colour":
                assert d.drawn[i][0] == asked_shape and d.drawn[i][1] != asked_colour
                m, want = d.masks[i], d.drawn[i][1]
                if m.sum() >= 60 and not APPEARANCES[want].striped and not APPEARANCES[asked_colour].striped:
                    med = np.median(d.image[m].astype(np.float32), axis=0)
                    dist = {c: np.linalg.norm(med - np.array(a.colours[0])) for c, a in APPEARANCES.items()
                            if not a.striped}
                    assert dist[want] < dist[asked_colour]
                    colour_checked += 1
            elif f == "wrong_shape":
                assert d.drawn[i][0] != asked_shape and d.drawn[i][1] == asked_colour
            elif f == "offbox":
                assert _box_iou(d.masks[i], boxes[i]) < 0.75
    measured = {f: counts[f] / n for f in FAILURES}
    for f in FAILURES:
        assert abs(measured[f] - rates[f"p_{f}"]) <= 0.02, (f, measured[f], n)
    assert n >= 1000 and colour_checked >= 20


def test_segmenter_agrees_when_nothing_failed():
    gen = ShapesGenerator(CTX, **NO_FAILURES)
    seg = ShapesSegmenter(CTX)
    rng = np.random.default_rng(3)
    ious = []
    for draw in range(60):
        scene = random_scene(rng, int(rng.integers(1, 4)), max_overlap=0.15)
        d = gen.generate_with_truth(scene, 1, seed=draw)[0]
        masks = seg.segment(d.image, scene.boxes_xyxy(160, 160))
        assert all(m.shape == (160, 160) and m.dtype == bool for m in masks)
        ious += [_iou(m, t) for m, t in zip(masks, d.masks)]
    ious = np.asarray(ious)
    assert ious.mean() > 0.9 and np.median(ious) > 0.93, (ious.mean(), np.median(ious))


def test_bad_generations_give_bad_masks():
    seg = ShapesSegmenter(CTX)
    rng = np.random.default_rng(4)
    scenes = [random_scene(rng, 1) for _ in range(25)]

    def fit(gen: ShapesGenerator) -> np.ndarray:
        out = []
        for k, s in enumerate(scenes):
            img = gen.generate(s, 1, seed=k)[0]
            m = seg.segment(img, s.boxes_xyxy(160, 160))[0]
            out.append(_box_iou(m, s.boxes_xyxy(160, 160)[0]))
        return np.asarray(out)

    good = fit(ShapesGenerator(CTX, **NO_FAILURES))
    missing = fit(ShapesGenerator(CTX, **{**NO_FAILURES, "p_missing": 1.0}))
    offbox = fit(ShapesGenerator(CTX, **{**NO_FAILURES, "p_offbox": 1.0}))
    assert np.median(good) > 0.85
    assert (missing == 0).mean() >= 0.9  # nothing there: "not found"
    assert np.median(offbox) < 0.6


def test_segmenter_keeps_ring_holes_and_handles_edges():
    ring = TABLE.id_of("blue ring")
    scene = SceneGraph([SceneObject("blue_ring-1", ring, [], (0.3, 0.3, 0.4, 0.4))])
    d = ShapesGenerator(CTX, **NO_FAILURES).generate_with_truth(scene, 1, seed=0)[0]
    m = ShapesSegmenter(CTX).segment(d.image, scene.boxes_xyxy(160, 160))[0]
    assert not m[80, 80] and m.sum() > 0 and _iou(m, d.masks[0]) > 0.85
    img = np.full((40, 40, 3), 128, np.uint8)
    out = ShapesSegmenter(CTX).segment(img, np.array([[0, 0, 40, 40], [10, 10, 10.5, 30], [np.nan] * 4]))
    assert [x.any() for x in out] == [False, False, False]
    with pytest.raises(ValueError, match="uint8 RGB"):
        ShapesSegmenter(CTX).segment(img[..., 0], np.zeros((0, 4)))
