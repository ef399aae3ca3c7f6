"""Paste core: pasted pixels, occlusion, dropping, boxes, and agreement of the polygon and bitmask paths."""

from __future__ import annotations

import numpy as np
import pytest

from acp_data.d2.paste import (
    SOURCE_PASTED,
    SOURCE_REAL,
    Annot,
    PasteParams,
    Placement,
    annots_to_d2,
    make_placement,
    paste_instances,
    plan_pastes,
    target_size,
)
from acp_data.masks import mask_to_polygons, polygons_to_mask

H, W = 120, 160


def _square_poly(x0, y0, x1, y1):
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


def _real(cat, x0, y0, x1, y1):
    return Annot(category_id=cat, box=np.array([x0, y0, x1, y1], np.float64), segmentation=_square_poly(x0, y0, x1, y1))


def _placement(cat, x0, y0, mask, colour):
    rgb = np.empty(mask.shape + (3,), np.uint8)
    rgb[:] = colour
    return Placement(rgb=rgb, mask=mask, x0=x0, y0=y0, category_id=cat)


def _full_mask(a: Annot) -> np.ndarray:
    """The final mask of an instance on the whole canvas."""
    if a.occluded:
        m = np.zeros((H, W), bool)
        m[a.y0:a.y0 + a.local.shape[0], a.x0:a.x0 + a.local.shape[1]] = a.local
        return m
    return polygons_to_mask([p.tolist() for p in a.segmentation], H, W)


def _disc(r):
    yy, xx = np.mgrid[: 2 * r, : 2 * r]
    return (xx - r + 0.5) ** 2 + (yy - r + 0.5) ** 2 <= r * r


def _scene(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    annots = []
    for k in range(6):
        x0, y0 = int(rng.integers(0, W - 40)), int(rng.integers(0, H - 40))
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        annots.append(_real(k, x0, y0, x0 + w, y0 + h))
    places = []
    for j in range(8):
        r = int(rng.integers(5, 25))
        m = _disc(r)
        m[r - 2: r + 2, r - 2: r + 2] = False  # a hole
        places.append(_placement(100 + j, int(rng.integers(-r, W - r)), int(rng.integers(-r, H - r)), m,
                                 (10 * j + 5, 200 - 10 * j, 37 * j % 255)))
    return image, annots, places


@pytest.mark.parametrize("seed", range(6))
def test_pasted_masks_show_pasted_pixels_and_boxes_contain_masks(seed):
    image, annots, places = _scene(seed)
    colour = {p.category_id: p.rgb[0, 0] for p in places}
    out = paste_instances(image, annots, places, min_visible_frac=0.0, min_visible_pixels=1)
    assert any(a.source == SOURCE_PASTED for a in out)
    for a in out:
        m = _full_mask(a)
        assert m.any()
        if a.source == SOURCE_PASTED:
            assert (image[m] == colour[a.category_id]).all()
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = a.box
        assert x0 <= xs.min() and xs.max() + 1 <= x1 and y0 <= ys.min() and ys.max() + 1 <= y1
        if a.occluded:  # recomputed boxes are tight
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # no two final masks overlap where a later paste lies on top of an earlier object
    masks = [_full_mask(a) for a in out if a.source == SOURCE_PASTED]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not (masks[i] & masks[j]).any()


def test_fully_covered_object_is_dropped():
    image = np.zeros((H, W, 3), np.uint8)
    annots = [_real(1, 20, 20, 40, 40), _real(2, 100, 60, 120, 90)]
    cover = np.ones((40, 40), bool)
    out = paste_instances(image, annots, [_placement(7, 10, 10, cover, (255, 0, 0))],
                          min_visible_frac=0.0, min_visible_pixels=1)
    cats = sorted(a.category_id for a in out)
    assert cats == [2, 7]
    untouched = next(a for a in out if a.category_id == 2)
    assert not untouched.occluded and untouched.box.tolist() == [100, 60, 120, 90]


def test_partly_covered_object_gets_box_from_remaining_mask():
    image = np.zeros((H, W, 3), np.uint8)
    annots = [_real(1, 10, 10, 50, 50)]
    cover = np.ones((60, 60), bool)  # covers x >= 30
    out = paste_instances(image, annots, [_placement(7, 30, 0, cover, (0, 255, 0))],
                          min_visible_frac=0.25, min_visible_pixels=1)
    a = next(a for a in out if a.category_id == 1)
    assert a.source == SOURCE_REAL and a.occluded
    assert a.box.tolist() == [10, 10, 30, 50]
    assert int(_full_mask(a).sum()) == 20 * 40


@pytest.mark.parametrize("frac,pixels,kept", [(0.25, 1, True), (0.6, 1, False), (0.0, 801, False), (0.0, 800, True)])
def test_visibility_thresholds(frac, pixels, kept):
    image = np.zeros((H, W, 3), np.uint8)
    annots = [_real(1, 10, 10, 50, 50)]  # 1600 px, 800 remain after the paste
    out = paste_instances(image, annots, [_placement(7, 30, 0, np.ones((60, 60), bool), (0, 255, 0))],
                          min_visible_frac=frac, min_visible_pixels=pixels)
    assert any(a.category_id == 1 for a in out) == kept


def test_paste_outside_image_is_skipped_and_image_untouched():
    image = np.zeros((H, W, 3), np.uint8)
    out = paste_instances(image, [], [_placement(7, W - 2, H - 2, np.ones((40, 40), bool), (9, 9, 9))],
                          min_visible_frac=0.25, min_visible_pixels=1)
    assert out == [] and not image.any()


def test_occluded_ring_keeps_its_hole_in_polygons():
    image = np.zeros((H, W, 3), np.uint8)
    ring = _disc(30)
    ring[20:40, 20:40] = False
    ring_polys = mask_to_polygons(np.pad(ring, ((10, H - 70), (10, W - 70))))
    annots = [Annot(category_id=1, box=np.array([10, 10, 70, 70], np.float64),
                    segmentation=[np.asarray(p) for p in ring_polys])]
    out = paste_instances(image, annots, [_placement(7, 60, 10, np.ones((30, 30), bool), (1, 2, 3))],
                          min_visible_frac=0.1, min_visible_pixels=1)
    a = next(a for a in out if a.category_id == 1)
    d = annots_to_d2([a], (H, W), "polygon")[0]
    m = polygons_to_mask([np.asarray(p).tolist() for p in d["segmentation"]], H, W)
    assert not m[40, 40]  # the hole
    assert m[12 + 28, 12] and not m[20, 65]  # left part kept, covered part gone


@pytest.mark.parametrize("seed", range(4))
def test_polygon_and_bitmask_paths_agree(seed):
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.structures import BitMasks

    outs = {}
    for fmt in ("polygon", "bitmask"):
        image, annots, places = _scene(seed)
        res = paste_instances(image, annots, places, min_visible_frac=0.25, min_visible_pixels=16)
        d2 = annots_to_d2(res, (H, W), fmt)
        inst = annotations_to_instances(d2, (H, W), mask_format=fmt)
        masks = inst.gt_masks
        if fmt == "polygon":
            masks = BitMasks.from_polygon_masks(masks, H, W)
        outs[fmt] = (image, inst.gt_boxes.tensor.numpy(), inst.gt_classes.numpy(), masks.tensor.numpy())
    (ia, ba, ca, ma), (ib, bb, cb, mb) = outs["polygon"], outs["bitmask"]
    assert (ia == ib).all()
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(ba, bb)
    np.testing.assert_array_equal(ma, mb)


@pytest.mark.parametrize("seed", range(5))
def test_fast_polygons_rasterise_to_the_mask(seed):
    from acp_data.d2.paste import local_mask_to_polygons

    rng = np.random.default_rng(seed)
    m = _disc(20) & (rng.random((40, 40)) > 0.1)  # speckled: many holes
    m[15:25, 15:25] = False
    fast = local_mask_to_polygons(m, 7, 3)
    assert len(fast) == len(mask_to_polygons(m))  # one polygon per outer contour, as the masks module
    back = polygons_to_mask([p.tolist() for p in fast], 50, 50)
    assert (back[3:43, 7:47] == m).all() and back.sum() == m.sum()


def test_plan_is_a_function_of_the_key():
    params = PasteParams(prob=1.0, max_instances=10)
    a, b = plan_pastes(123, 5, params), plan_pastes(123, 5, params)
    assert a == b and 1 <= len(a) <= 10
    assert plan_pastes(124, 5, params) != a
    assert all(0 <= p.category_slot < 5 and 0 <= p.cx < 1 and 0 <= p.cy < 1 for p in a)
    assert plan_pastes(123, 5, PasteParams(prob=0.0)) == []
    counts = [len(plan_pastes(k, 5, PasteParams(prob=0.5, max_instances=3))) for k in range(2000)]
    assert 0.45 < np.mean([c > 0 for c in counts]) < 0.55
    assert set(counts) == {0, 1, 2, 3}


def test_target_size_follows_priors_and_aspect():
    plan = plan_pastes(5, 1, PasteParams(prob=1.0, max_instances=1, aspect_jitter=0.0))[0]
    w, h = target_size(plan, crop_hw=(50, 100), image_hw=(400, 600), size_stats=(0.2, 0.0, 0.0, 0.0),
                       scale_range=(0.1, 0.5))
    assert abs(w * h - 0.04 * 400 * 600) / (0.04 * 400 * 600) < 0.02
    assert abs(w / h - 2.0) < 0.05
    w, h = target_size(plan, crop_hw=(50, 100), image_hw=(400, 600), size_stats=(3.0, 0.0, 0.0, 0.0),
                       scale_range=(0.1, 0.5))
    assert w <= 600 and h <= 400
    rgba = np.zeros((50, 100, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[10:40, 20:80, 3] = 200, 7, 255
    pl = make_placement(rgba, (w, h), plan, (400, 600), 3, bgr=True)
    assert pl.mask.shape == (h, w) and pl.rgb.shape == (h, w, 3) and pl.category_id == 3
    assert (pl.rgb[..., 0] == 7).all() and (pl.rgb[..., 2] == 200).all()  # BGR order
    frac = pl.mask.mean()
    assert abs(frac - 0.6 * 0.6) < 0.05  # the alpha box covers 60 % x 60 % of the cut-out


def test_paste_into_a_flipped_view_of_the_image():
    base = np.zeros((H, W, 3), np.uint8)
    view = base[:, ::-1]  # what a horizontal flip augmentation hands over
    out = paste_instances(view, [], [_placement(7, 10, 20, _disc(10), (1, 2, 3))],
                          min_visible_frac=0.0, min_visible_pixels=1)
    m = _full_mask(out[0])
    assert (view[m] == (1, 2, 3)).all() and not view[~m].any()


# ----- through the mapper -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_loader_errors import build_mixing_world

    return build_mixing_world(tmp_path_factory.mktemp("pasteworld"), n_units=6)


def _mapper(world, tmp_path, fmt, mode="ratio+paste"):
    from test_loader_errors import world_cfg

    from acp_data.d2.loader import _prepare_synthetic
    from acp_data.d2.mapper import ACPDatasetMapper

    cfg = world_cfg(world, tmp_path, mode, **{"PASTE.PROB": 1.0})
    cfg.INPUT.MASK_FORMAT = fmt
    _, _, synth, source = _prepare_synthetic(cfg)
    return ACPDatasetMapper(cfg, True, paste_source=source), synth


def _as_bitmasks(inst, h, w):
    from detectron2.structures import BitMasks, PolygonMasks

    m = inst.gt_masks
    return (BitMasks.from_polygon_masks(m, h, w) if isinstance(m, PolygonMasks) else m).tensor.numpy()


def test_mapper_polygon_and_bitmask_paths_agree_and_mark_sources(world, tmp_path):
    from detectron2.data import DatasetCatalog
    from test_loader_errors import TINY_TRAIN

    poly, synth = _mapper(world, tmp_path / "p", "polygon")
    bit, _ = _mapper(world, tmp_path / "b", "bitmask")
    real = DatasetCatalog.get(TINY_TRAIN)
    for k, rec in enumerate([*real[:4], *(synth[i] for i in range(3))]):
        outs = []
        for mapper in (poly, bit):
            np.random.seed(k)
            outs.append(mapper(dict(rec), sample_key=1000 + k))
        a, b = outs
        assert (a["image"] == b["image"]).all()
        ia, ib = a["instances"], b["instances"]
        h, w = a["image"].shape[1:]
        assert ia.gt_classes.tolist() == ib.gt_classes.tolist()
        assert ia.gt_sources.tolist() == ib.gt_sources.tolist()
        np.testing.assert_allclose(ia.gt_boxes.tensor.numpy(), ib.gt_boxes.tensor.numpy())
        ma, mb = _as_bitmasks(ia, h, w), _as_bitmasks(ib, h, w)
        if "acp_source" in rec:  # synthetic image, never pasted onto
            assert set(ia.gt_sources.tolist()) == {2}
            # RLE -> polygons is exact, but detectron2 resizes polygons geometrically and bitmasks by nearest
            # neighbour, so the two formats differ by a few boundary pixels after the resize augmentation
            inter = (ma & mb).sum((1, 2))
            union = (ma | mb).sum((1, 2))
            assert (inter / union > 0.9).all()
        else:
            assert 1 in ia.gt_sources.tolist()  # PROB 1: every real image gets pastes
            # pasted and occluded masks are exact; untouched real polygons rasterise alike on both paths
            np.testing.assert_array_equal(ma, mb)
        boxes = ia.gt_boxes.tensor.numpy()
        for m, (x0, y0, x1, y1) in zip(ma, boxes):
            ys, xs = np.nonzero(m)
            assert xs.min() >= np.floor(x0) and xs.max() + 1 <= np.ceil(x1) + 1e-6
            assert ys.min() >= np.floor(y0) and ys.max() + 1 <= np.ceil(y1) + 1e-6


def test_mapper_is_a_function_of_the_sample_key(world, tmp_path):
    from detectron2.data import DatasetCatalog
    from test_loader_errors import TINY_TRAIN

    mapper, _ = _mapper(world, tmp_path, "polygon", mode="paste")
    rec = DatasetCatalog.get(TINY_TRAIN)[0]
    runs = []
    for key in (5, 5, 6):
        np.random.seed(0)
        out = mapper(dict(rec), sample_key=key)
        runs.append((out["image"].clone(), out["instances"].gt_classes.tolist()))
    assert (runs[0][0] == runs[1][0]).all() and runs[0][1] == runs[1][1]
    assert not (runs[0][0] == runs[2][0]).all()
    assert mapper(None) is None


# ----- region-local paste == a plain full-canvas paste ------------------------------------------------------------------
def _raster_full(seg, box, h, w) -> np.ndarray:
    """An original segmentation on the whole canvas: polygons as pycocotools rasterises them, a bitmask as it is, no
    mask as its box (pixel corners rounded outwards, clipped)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, np.ndarray):
        return seg.astype(bool).copy()
    if isinstance(seg, list):
        polys = [np.asarray(p, np.float64).reshape(-1).tolist() for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    m = np.zeros((h, w), bool)
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    m[y0:y1, x0:x1] = True
    return m


def _full_canvas_paste(image, annots, placements, *, min_visible_frac, min_visible_pixels):
    """The plain reference: every paste blended on the whole canvas, every mask updated on the whole canvas (what
    X-Paste does), with paste_instances' skip and drop rules. Returns the survivors as (key, box, full mask,
    occluded) and the number of pastes skipped."""
    h, w = image.shape[:2]
    insts = []  # [key, box, mask, area0, occluded]
    skipped = 0
    for a in annots:
        m = _raster_full(a.segmentation, a.box, h, w)
        insts.append([a.extra["key"], a.box.copy(), m, int(m.sum()), False])
    for pl in placements:
        full = np.zeros((h, w), bool)
        ph, pw = pl.mask.shape
        ys, xs = np.nonzero(pl.mask)
        ys, xs = ys + pl.y0, xs + pl.x0
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        full[ys[inside], xs[inside]] = True
        visible = int(full.sum())
        if visible == 0 or visible < min_visible_pixels or visible < min_visible_frac * int(pl.mask.sum()):
            skipped += 1
            continue
        canvas_rgb = np.zeros_like(image)
        py, px = np.nonzero(np.ones((ph, pw), bool))
        ok = (py + pl.y0 >= 0) & (py + pl.y0 < h) & (px + pl.x0 >= 0) & (px + pl.x0 < w)
        canvas_rgb[py[ok] + pl.y0, px[ok] + pl.x0] = pl.rgb[py[ok], px[ok]]
        image[full] = canvas_rgb[full]
        for inst in insts:
            if (inst[2] & full).any():
                inst[2] &= ~full
                inst[4] = True
        insts.append([("pasted", pl.category_id), None, full, visible, True])
    out = []
    for key, box, m, area0, occluded in insts:
        if occluded:
            vis = int(m.sum())
            if vis == 0 or vis < min_visible_pixels or vis < min_visible_frac * area0:
                continue
            ys, xs = np.nonzero(m)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        out.append((key, box, m, occluded))
    return out, skipped


def _blob(rng, h, w) -> np.ndarray:
    """A random mask: an ellipse, sometimes with a hole or a second part."""
    yy, xx = np.mgrid[:h, :w]
    m = ((xx - w / 2 + 0.5) / max(w / 2, 0.5)) ** 2 + ((yy - h / 2 + 0.5) / max(h / 2, 0.5)) ** 2 <= 1.0
    if rng.random() < 0.3 and h > 6 and w > 6:
        m[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] = False
    if rng.random() < 0.2:
        m[: max(1, h // 4), : max(1, w // 4)] = True
    return m


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    annots = []
    for k in range(int(rng.integers(0, 7))):
        kind = rng.choice(["polygon", "bitmask", "box"])
        bw, bh = int(rng.integers(3, w)), int(rng.integers(3, h))
        x0, y0 = float(rng.integers(-bw // 2, w - bw // 2)), float(rng.integers(-bh // 2, h - bh // 2))  # at borders
        box = np.array([x0, y0, x0 + bw, y0 + bh], np.float64)
        if kind == "polygon":
            n = int(rng.integers(3, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.4, 1.0, n)
            cx, cy = x0 + bw / 2, y0 + bh / 2
            pts = np.stack([cx + rad * np.cos(ang) * bw / 2, cy + rad * np.sin(ang) * bh / 2], 1)
            seg = [pts.reshape(-1)]
            box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
        elif kind == "bitmask":  # a mask that may reach outside its (shrunk) box
            seg = np.zeros((h, w), bool)
            blob = _blob(rng, bh, bw)
            ys, xs = np.nonzero(blob)
            ys, xs = ys + int(y0), xs + int(x0)
            ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            seg[ys[ok], xs[ok]] = True
            if rng.random() < 0.5:
                box = box + np.array([bw / 4, bh / 4, -bw / 4, -bh / 4])
        else:
            seg = None
        annots.append(Annot(category_id=k, box=box, segmentation=seg, extra={"key": ("real", k)}))
    placements = []
    for j in range(int(rng.integers(1, 9))):
        ph, pw = int(rng.integers(1, h + 10)), int(rng.integers(1, w + 10))  # some cover most of the image
        mask = _blob(rng, ph, pw)
        rgb = rng.integers(0, 255, (ph, pw, 3), dtype=np.uint8)
        placements.append(Placement(rgb=rgb, mask=mask, x0=int(rng.integers(-pw, w)), y0=int(rng.integers(-ph, h)),
                                    category_id=100 + j))
    frac = float(rng.choice([0.0, 0.25, 0.5, 0.8]))
    pixels = int(rng.choice([0, 5, 32]))
    return image, annots, placements, frac, pixels


def test_region_local_paste_equals_full_canvas_paste():
    """Over 300 random cases (instances at the border, bitmasks reaching outside their box, heavy occlusion, pastes
    skipped for visibility): the same pixels, masks, boxes and dropped instances as pasting on the whole canvas."""
    import copy

    stats = {"skipped": 0, "dropped": 0, "occluded": 0, "bitmask_outside_box": 0}
    for seed in range(300):
        image, annots, placements, frac, pixels = _random_case(seed)
        h, w = image.shape[:2]
        ref_img = image.copy()
        ref, skipped = _full_canvas_paste(ref_img, copy.deepcopy(annots), placements, min_visible_frac=frac,
                                 min_visible_pixels=pixels)
        got_img = image.copy()
        got = paste_instances(got_img, copy.deepcopy(annots), placements, min_visible_frac=frac,
                              min_visible_pixels=pixels)
        np.testing.assert_array_equal(got_img, ref_img, err_msg=f"case {seed}: pixels")
        keys = [a.extra["key"] if a.source == SOURCE_REAL else ("pasted", a.category_id) for a in got]
        assert keys == [r[0] for r in ref], f"case {seed}: surviving instances"
        for a, (key, box, mask, occluded) in zip(got, ref):
            assert a.occluded == occluded, (seed, key)
            np.testing.assert_allclose(a.box, box, err_msg=f"case {seed} {key}: box")
            if a.occluded:
                full = np.zeros((h, w), bool)
                full[a.y0:a.y0 + a.local.shape[0], a.x0:a.x0 + a.local.shape[1]] = a.local
            else:
                full = _raster_full(a.segmentation, a.box, h, w)
            np.testing.assert_array_equal(full, mask, err_msg=f"case {seed} {key}: mask")
        n_pasted = sum(k[0] == "pasted" for k in keys)
        stats["dropped"] += len(annots) - (len(keys) - n_pasted)
        stats["occluded"] += sum(o for _, _, _, o in ref)
        stats["skipped"] += skipped
        stats["bitmask_outside_box"] += sum(
            isinstance(a.segmentation, np.ndarray) and a.segmentation.any()
            and not _raster_full(None, a.box, h, w)[a.segmentation].all() for a in annots)
    # the cases do exercise every rule
    assert all(v > 10 for v in stats.values()), stats
    assert stats["occluded"] > 300 and stats["dropped"] > 50, stats
