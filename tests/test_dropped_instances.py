"""ACP.DROPPED_INSTANCES: the config keys, ``erase`` (inpainting only near the dropped masks), ``ignore`` (the mapper's
ignore boxes, and no RPN / ROI-head loss from them on a tiny model), and paste pools without dropped instances."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_ioa

from acp_data.d2.config import ConfigError, get_acp_cfg, load_cfg, validate_acp_config
from acp_data.d2.mapper import ERASE_RADIUS, ACPDatasetMapper, erase_instances
from acp_data.d2.modeling import IgnoreInstances, IgnoreRPN, IgnoreStandardROIHeads
from acp_data.masks import mask_to_rle, rle_to_mask

H, W = 96, 128


# ----- config ----------------------------------------------------------------------------------------------------------
def _acp_cfg(**acp):
    cfg = get_acp_cfg()
    cfg.SEED = 1
    cfg.ACP.ENABLED = True
    cfg.ACP.CACHE_DIRS = ["cache"]
    for k, v in acp.items():
        setattr(cfg.ACP, k, v)
    return cfg


def test_default_is_the_paper():
    cfg = get_acp_cfg()
    assert cfg.ACP.DROPPED_INSTANCES == "background" and cfg.ACP.IGNORE_IOA == 0.5


@pytest.mark.parametrize("acp, key", [
    ({"DROPPED_INSTANCES": "mask"}, "ACP.DROPPED_INSTANCES"),
    ({"DROPPED_INSTANCES": "ignore", "IGNORE_IOA": 0.0}, "ACP.IGNORE_IOA"),
    ({"IGNORE_IOA": 1.5}, "ACP.IGNORE_IOA"),
    ({"IGNORE_IOA": "half"}, "ACP.IGNORE_IOA"),
])
def test_bad_values_name_the_key(acp, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_acp_config(_acp_cfg(**acp))


def test_ignore_refuses_heads_it_does_not_extend():
    cfg = _acp_cfg(DROPPED_INSTANCES="ignore")
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    with pytest.raises(ConfigError, match=r"MODEL\.ROI_HEADS\.NAME.*IgnoreStandardROIHeads"):
        validate_acp_config(cfg)
    cfg = _acp_cfg(DROPPED_INSTANCES="background")
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    validate_acp_config(cfg)


def test_load_cfg_switches_the_model_to_the_ignore_pair():
    from acp_data.d2.config import CONFIG_DIR

    base = str(CONFIG_DIR / "tiny" / "mask_rcnn_R18_tiny.yaml")
    common = ["SEED", "1", "ACP.ENABLED", "True", "ACP.CACHE_DIRS", "['c']"]
    cfg = load_cfg(base, common + ["ACP.DROPPED_INSTANCES", "ignore"])
    assert (cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg.MODEL.ROI_HEADS.NAME) == ("IgnoreRPN", "IgnoreStandardROIHeads")
    for policy in ("background", "erase"):
        cfg = load_cfg(base, common + ["ACP.DROPPED_INSTANCES", policy])
        assert (cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg.MODEL.ROI_HEADS.NAME) == ("RPN", "StandardROIHeads")


# ----- a hand-made synthetic record ------------------------------------------------------------------------------------
def _disc(cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _ann(mask, cat):
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
    return {"category_id": cat, "bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "segmentation": mask_to_rle(mask),
            "iscrowd": 0, "acp_clis_i": 90.0}


def _record(seed=0):
    """Noise image (PNG, lossless); a kept disc touching a dropped one, and a second dropped disc elsewhere."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    kept = _disc(40, 40, 14)
    dropped = [_disc(58, 44, 12), _disc(100, 70, 9)]
    ok, png = cv2.imencode(".png", image)
    assert ok
    rec = {"file_name": "acp://x/0", "image_id": 1, "height": H, "width": W, "acp_source": (0, 0),
           "acp_image_bytes": png.tobytes(), "annotations": [_ann(kept, 3)],
           "acp_dropped": [{**_ann(m, 1), "acp_drop_reason": "min_clis_i"} for m in dropped]}
    return rec, image, kept, dropped


def _mapper(policy, augmentations=(), **kw):
    return ACPDatasetMapper(True, augmentations=list(augmentations), image_format="BGR", use_instance_mask=True,
                            instance_mask_format="bitmask", dropped_instances=policy, **kw)


def _image(out):
    return out["image"].numpy().transpose(1, 2, 0)


# ----- erase -----------------------------------------------------------------------------------------------------------
def test_erase_changes_only_pixels_near_the_dropped_masks():
    rec, image, kept, dropped = _record()
    plain = _mapper("background")(dict(rec))
    erased = _mapper("erase")(dict(rec))
    assert (_image(plain) == image).all()  # no augmentation: the decoded image as it was
    changed = (_image(erased) != image).any(-1)
    near = cv2.dilate(np.any(dropped, 0).astype(np.uint8),
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ERASE_RADIUS + 1,) * 2)).astype(bool)
    assert changed.any()
    assert not (changed & ~near).any(), "erase touched pixels outside the dropped masks' neighbourhood"
    assert not (changed & kept).any(), "erase touched a kept instance"
    for m in dropped:  # the noise inside each dropped object is replaced (not left as it was)
        assert changed[m & ~kept].mean() > 0.9
    # the labels are the same as without erasing
    assert erased["instances"].gt_classes.tolist() == plain["instances"].gt_classes.tolist() == [3]
    assert (erased["instances"].gt_masks.tensor == plain["instances"].gt_masks.tensor).all()


def test_erase_happens_before_augmentation():
    rec, image, kept, dropped = _record(1)
    flip = [T.RandomFlip(prob=1.0)]
    out = _image(_mapper("erase", flip)(dict(rec)))
    ref = erase_instances(image, rec["acp_dropped"], rec["annotations"])
    assert (out == ref[:, ::-1]).all()


def test_erase_without_dropped_instances_is_the_identity():
    rec, image, _, _ = _record(2)
    rec["acp_dropped"] = []
    assert (_image(_mapper("erase")(dict(rec))) == image).all()
    assert erase_instances(image, []) is image


def test_background_and_erase_give_plain_instances():
    rec = _record()[0]
    for policy in ("background", "erase"):
        assert type(_mapper(policy)(dict(rec))["instances"]) is Instances


# ----- ignore: the mapper ----------------------------------------------------------------------------------------------
def test_ignore_boxes_follow_the_augmentation():
    """Each ignore box is the box the same annotation would get if it were kept (same transforms)."""
    rec, *_ = _record(3)
    augs = [T.Resize((64, 160)), T.RandomFlip(prob=1.0)]
    out = _mapper("ignore", augs)(dict(rec))
    inst = out["instances"]
    assert isinstance(inst, IgnoreInstances) and len(inst) == 1
    as_kept = dict(rec, annotations=rec["annotations"] + [{k: v for k, v in a.items() if k != "acp_drop_reason"}
                                                          for a in rec["acp_dropped"]], acp_dropped=[])
    ref = _mapper("ignore", augs)(as_kept)["instances"]
    np.testing.assert_allclose(inst.ignore_boxes.tensor.numpy(), ref.gt_boxes.tensor[1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), ref.gt_boxes.tensor[:1].numpy(), atol=1e-4)
    assert (out["image"] == _mapper("background", augs)(dict(rec))["image"]).all()  # pixels untouched


def test_ignore_instances_survive_to_device_and_pickle():
    rec, *_ = _record()
    inst = _mapper("ignore")(dict(rec))["instances"]
    for other in (inst.to("cpu"), pickle.loads(pickle.dumps(inst))):
        assert isinstance(other, IgnoreInstances)
        assert torch.equal(other.ignore_boxes.tensor, inst.ignore_boxes.tensor) and len(other.ignore_boxes) == 2
        assert torch.equal(other.gt_boxes.tensor, inst.gt_boxes.tensor)
    assert "ignore_boxes=2" in str(inst)


def test_ignore_on_a_record_without_dropped_instances():
    rec, *_ = _record()
    rec["acp_dropped"] = []
    inst = _mapper("ignore")(dict(rec))["instances"]
    assert len(inst.ignore_boxes) == 0 and len(inst) == 1


def test_unknown_policy_in_the_mapper():
    with pytest.raises(ValueError, match="ACP.DROPPED_INSTANCES"):
        _mapper("drop")


# ----- ignore: the model -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg():
    from acp_data.d2.config import CONFIG_DIR

    cfg = get_acp_cfg()
    cfg.merge_from_file(str(CONFIG_DIR / "tiny" / "mask_rcnn_R18_tiny.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    return cfg


def _grid_anchors(size=128, step=8, sides=(16, 32)):
    c = torch.arange(step / 2, size, step, dtype=torch.float32)
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    out = [torch.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], -1).reshape(-1, 4) for s in sides]
    return Boxes(torch.cat(out))


GT = [[8.0, 8.0, 40.0, 40.0]]
IGNORE = [[64.0, 60.0, 120.0, 120.0]]


def _targets(ignore=IGNORE, cls=IgnoreInstances):
    inst = cls((128, 128)) if cls is Instances else cls((128, 128), Boxes(torch.tensor(ignore).reshape(-1, 4)))
    inst.gt_boxes = Boxes(torch.tensor(GT))
    inst.gt_classes = torch.tensor([2])
    return inst


def _rpn_pair(cfg, batch):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.proposal_generator import RPN

    cfg = cfg.clone()
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = batch
    cfg.MODEL.RPN.IN_FEATURES = ["p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 32]]
    shape = {"p3": ShapeSpec(channels=8, stride=8)}
    torch.manual_seed(0)
    stock = RPN(cfg, shape)
    torch.manual_seed(0)
    ours = IgnoreRPN(cfg, shape)
    return stock, ours


def test_rpn_without_ignore_boxes_labels_as_stock(tiny_cfg):
    stock, ours = _rpn_pair(tiny_cfg, 64)  # subsampling on: the same seed must give the same sample
    anchors = _grid_anchors()
    for targets in (_targets(cls=Instances), _targets(ignore=[])):
        torch.manual_seed(5)
        want, want_boxes = stock.label_and_sample_anchors([anchors], [targets])
        torch.manual_seed(5)
        got, got_boxes = ours.label_and_sample_anchors([anchors], [targets])
        assert torch.equal(want[0], got[0]) and torch.equal(want_boxes[0], got_boxes[0])


def test_rpn_ignore_box_gives_no_loss(tiny_cfg):
    from detectron2.utils.events import EventStorage

    stock, ours = _rpn_pair(tiny_cfg, 100000)  # sampling keeps every labelled anchor: labels compare one to one
    anchors = _grid_anchors()
    want = stock.label_and_sample_anchors([anchors], [_targets(cls=Instances)])[0][0]
    labels, matched = ours.label_and_sample_anchors([anchors], [_targets()])
    got = labels[0]
    inside = (pairwise_ioa(Boxes(torch.tensor(IGNORE)), anchors) > 0.5).any(0)
    assert inside.sum() > 20 and (want[inside] == 0).any()
    assert (got[inside & (want == 0)] == -1).all()  # negatives there are ignored
    assert torch.equal(got[~inside], want[~inside]) and torch.equal(got[want == 1], want[want == 1])  # rest as stock
    # the objectness loss does not depend on the logits of anchors inside the ignore box
    n = len(anchors)
    logits = torch.randn(1, n)
    deltas = torch.zeros(1, n, 4)
    moved = logits.clone()
    moved[0, inside] += 10.0
    with EventStorage():
        a = ours.losses([anchors], [logits], labels, [deltas], matched)
        b = ours.losses([anchors], [moved], labels, [deltas], matched)
        c = stock.losses([anchors], [moved], [want], [deltas], matched)
    assert torch.equal(a["loss_rpn_cls"], b["loss_rpn_cls"])
    assert not torch.equal(a["loss_rpn_cls"], c["loss_rpn_cls"])  # the stock RPN learns "background" there


def _roi_pair(cfg, batch):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import StandardROIHeads

    cfg = cfg.clone()
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = batch
    shape = {f"p{i}": ShapeSpec(channels=64, stride=2 ** i) for i in range(2, 7)}
    torch.manual_seed(0)
    stock = StandardROIHeads(cfg, shape)
    torch.manual_seed(0)
    ours = IgnoreStandardROIHeads(cfg, shape)
    return stock, ours


def _proposals():
    p = Instances((128, 128))
    p.proposal_boxes = _grid_anchors(step=16)
    p.objectness_logits = torch.zeros(len(p.proposal_boxes))
    return p


def test_roi_heads_without_ignore_boxes_sample_as_stock(tiny_cfg):
    from detectron2.utils.events import EventStorage

    stock, ours = _roi_pair(tiny_cfg, 32)
    for targets in (_targets(cls=Instances), _targets(ignore=[])):
        with EventStorage():
            torch.manual_seed(3)
            want = stock.label_and_sample_proposals([_proposals()], [targets])[0]
            torch.manual_seed(3)
            got = ours.label_and_sample_proposals([_proposals()], [targets])[0]
        assert torch.equal(want.proposal_boxes.tensor, got.proposal_boxes.tensor)
        assert torch.equal(want.gt_classes, got.gt_classes)


def test_roi_heads_never_sample_background_inside_an_ignore_box(tiny_cfg):
    from detectron2.utils.events import EventStorage

    stock, ours = _roi_pair(tiny_cfg, 100000)
    with EventStorage():
        want = stock.label_and_sample_proposals([_proposals()], [_targets(cls=Instances)])[0]
        got = ours.label_and_sample_proposals([_proposals()], [_targets()])[0]
    bg = 6
    inside = lambda p: (pairwise_ioa(Boxes(torch.tensor(IGNORE)), p.proposal_boxes) > 0.5).any(0)  # noqa: E731
    assert (inside(want) & (want.gt_classes == bg)).sum() > 5  # the stock heads train "background" there
    assert not inside(got).any()  # ours sample nothing there (no fg there either: the gt is elsewhere)
    key = lambda p: sorted(map(tuple, p.proposal_boxes.tensor.tolist()))  # noqa: E731
    assert key(got) == key(want[~inside(want)])  # everything else sampled as by the stock heads
    assert (got.gt_classes == 2).sum() == (want.gt_classes == 2).sum() > 0


def test_a_positive_inside_an_ignore_box_stays_positive(tiny_cfg):
    from detectron2.utils.events import EventStorage

    stock, ours = _roi_pair(tiny_cfg, 100000)
    with EventStorage():
        want = stock.label_and_sample_proposals([_proposals()], [_targets(cls=Instances)])[0]
        got = ours.label_and_sample_proposals([_proposals()], [_targets(ignore=[[0.0, 0.0, 64.0, 64.0]])])[0]
    assert (got.gt_classes == 2).sum() == (want.gt_classes == 2).sum() > 0  # the kept instance's positives
    assert (got.gt_classes == 6).sum() < (want.gt_classes == 6).sum()  # fewer negatives


def test_the_trainer_model_receives_the_ignore_boxes(tiny_cfg):
    """GeneralizedRCNN moves each image's Instances to the device; the ignore boxes reach the RPN and the ROI heads
    of the model the Trainer builds from a load_cfg config."""
    from detectron2.utils.events import EventStorage

    from acp_data.d2.config import CONFIG_DIR
    from acp_data.d2.engine import Trainer

    cfg = load_cfg(str(CONFIG_DIR / "tiny" / "mask_rcnn_R18_tiny.yaml"),
                   ["SEED", "1", "ACP.ENABLED", "True", "ACP.CACHE_DIRS", "['c']", "ACP.DROPPED_INSTANCES", "ignore",
                    "MODEL.ROI_HEADS.NUM_CLASSES", "6", "INPUT.MASK_FORMAT", "bitmask"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    assert isinstance(model.proposal_generator, IgnoreRPN) and isinstance(model.roi_heads, IgnoreStandardROIHeads)
    seen = []
    for mod, name in ((model.proposal_generator, "label_and_sample_anchors"),
                      (model.roi_heads, "label_and_sample_proposals")):
        orig = getattr(mod, name)

        def spy(a, targets, _orig=orig, _name=name):
            seen.append((_name, [t.ignore_boxes.tensor.tolist() for t in targets]))
            return _orig(a, targets)

        setattr(mod, name, spy)
    rec, *_ = _record()
    batch = [_mapper("ignore", [T.ResizeShortestEdge(128, 160)])(dict(rec)) for _ in range(2)]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, _ in seen] == ["label_and_sample_anchors", "label_and_sample_proposals"]
    want = batch[0]["instances"].ignore_boxes.tensor.tolist()
    assert len(want) == 2 and all(boxes == [want, want] for _, boxes in seen)


# ----- paste pools -----------------------------------------------------------------------------------------------------
def test_paste_pool_holds_no_dropped_instance(tmp_path_factory):
    from test_loader_errors import build_mixing_world, world_cfg

    from acp_data.cache.reader import CacheReader
    from acp_data.cache.selection import select
    from acp_data.d2.loader import _prepare_synthetic

    world = build_mixing_world(tmp_path_factory.mktemp("dropworld"), n_units=6)
    cfg = world_cfg(world, tmp_path_factory.mktemp("dropout"), "ratio+paste", MIN_CLIS_I=50.0, SELECT="all",
                    DROPPED_INSTANCES="ignore")
    _, selection, synth, source = _prepare_synthetic(cfg)
    reader = CacheReader(world["cache"])
    res = select(reader, selection)
    kh, ci = reader.column("key_hash"), reader.column("candidate_idx")

    def triples(rows, offsets, local):
        out = set()
        for k, row in enumerate(rows):
            for j in local[offsets[k]:offsets[k + 1]]:
                out.add((int(kh[row]), int(ci[row]), int(j)))
        return out

    dropped = triples(res.sample_row, res.drop_offsets, res.drop_local)
    kept = triples(res.sample_row, res.inst_offsets, res.inst_local)
    store = source.stores[0]
    everything = {(int(a), int(b), int(c)) for a, b, c in zip(store.column("key_hash"), store.column("candidate_idx"),
                                                               store.column("instance"))}
    pool = {(int(store.column("key_hash")[i]), int(store.column("candidate_idx")[i]), int(store.column("instance")[i]))
            for i in source._crop}
    assert dropped & everything, "the crop store has crops of dropped instances: the test can tell"
    assert pool and not pool & dropped
    assert pool == kept & everything
    assert any(synth[i]["acp_dropped"] for i in range(len(synth)))


def test_the_loader_mapper_applies_the_policy_to_cache_records(tmp_path_factory):
    """Through the config: synthetic records of a real cache with instances below MIN_CLIS_I get ignore boxes (one
    per dropped instance) under ``ignore`` and lose their pixels under ``erase``."""
    from test_loader_errors import build_mixing_world, world_cfg

    from acp_data.d2.loader import _prepare_synthetic

    world = build_mixing_world(tmp_path_factory.mktemp("policyworld"), n_units=4)
    outs = {}
    for policy in ("background", "ignore", "erase"):
        cfg = world_cfg(world, tmp_path_factory.mktemp(policy), "ratio", MIN_CLIS_I=50.0, SELECT="all",
                        DROPPED_INSTANCES=policy)
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128  # the cache's size: no resize
        cfg.INPUT.RANDOM_FLIP = "none"
        _, _, synth, _ = _prepare_synthetic(cfg)
        mapper = ACPDatasetMapper(cfg, True)
        idx = [i for i in range(len(synth)) if synth[i]["acp_dropped"]]
        assert idx
        outs[policy] = [(synth[i], mapper(synth[i])) for i in idx]
    for (rec, plain), (_, ign), (_, era) in zip(outs["background"], outs["ignore"], outs["erase"]):
        assert len(ign["instances"].ignore_boxes) == len(rec["acp_dropped"])
        assert torch.equal(ign["instances"].gt_boxes.tensor, plain["instances"].gt_boxes.tensor)
        assert (ign["image"] == plain["image"]).all()
        changed = (era["image"] != plain["image"]).any(0).numpy()
        dropped = np.any([rle_to_mask(a["segmentation"]) for a in rec["acp_dropped"]], 0)
        near = cv2.dilate(dropped.astype(np.uint8), cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * ERASE_RADIUS + 1,) * 2)).astype(bool)
        assert changed.any() and not (changed & ~near).any()
