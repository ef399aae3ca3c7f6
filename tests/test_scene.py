"""SceneGraph: JSON round trip, every rejection reason, every repair, the one XYWH -> XYXY conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from acp_data import scene as S
from acp_data.scene import SceneGraph

GOOD = """
{
  "objects": [
    {"id": "dog-1", "category_id": 3, "attributes": ["brown", "fluffy"], "bbox": [0.1, 0.2, 0.3, 0.4]},
    {"id": "frisbee-2", "category_id": 7, "attributes": ["red"], "bbox": [0.5, 0.1, 0.2, 0.1]}
  ],
  "relations": [{"subjects": ["dog-1"], "objects": ["frisbee-2"], "phrase": "catching"}],
  "layers": {"Foreground": ["dog-1"], "Midground": ["frisbee-2"]},
  "groups": {"g1": ["dog-1", "frisbee-2"]},
  "caption": "A brown dog(dog-1) leaps to catch a red frisbee(frisbee-2)."
}
"""
REQUESTED = ["dog-1", "frisbee-2"]


def graph(**changes) -> SceneGraph:
    """GOOD with top-level keys replaced, or ``objN`` (index N) objects patched."""
    d = json.loads(GOOD)
    for k, v in changes.items():
        if k.startswith("obj"):
            d["objects"][int(k[3:])].update(v)
        else:
            d[k] = v
    return SceneGraph.from_dict(d)


def test_good_graph_validates_and_round_trips():
    g = SceneGraph.from_json(GOOD)
    v = g.validate(REQUESTED)
    assert v.ok, v.message()
    assert SceneGraph.from_json(g.to_json()).to_dict() == g.to_dict()
    assert g.ids == REQUESTED
    assert g.phrases() == ["brown fluffy dog", "red frisbee"]
    assert g.object("frisbee-2").category_id == 7


@pytest.mark.parametrize(
    "changes, requested, reason, detail",
    [
        ({"obj1": {"id": "cat-2"}}, REQUESTED, S.MISSING_OBJECT, "frisbee-2"),
        ({"obj1": {"id": "dog-1"}}, None, S.DUPLICATE_OBJECT, "dog-1 appears 2 times"),
        ({}, ["dog-1"], S.EXTRA_OBJECT, "frisbee-2"),
        ({"obj0": {"bbox": None}}, REQUESTED, S.MISSING_BOX, "dog-1"),
        ({"obj0": {"bbox": [0.8, 0.2, 0.5, 0.4]}}, REQUESTED, S.BOX_OUT_OF_RANGE, "dog-1"),
        ({"obj0": {"bbox": [-0.2, 0.2, 0.3, 0.4]}}, REQUESTED, S.BOX_OUT_OF_RANGE, "dog-1"),
        ({"obj0": {"bbox": [0.1, 0.2, float("nan"), 0.4]}}, REQUESTED, S.BOX_OUT_OF_RANGE, "not finite"),
        ({"obj0": {"bbox": [0.1, 0.2, 0.0, 0.4]}}, REQUESTED, S.BOX_ZERO_AREA, "dog-1"),
        ({"obj1": {"bbox": [0.5, 0.1, 0.2, -0.1]}}, REQUESTED, S.BOX_ZERO_AREA, "frisbee-2"),
        ({"relations": [{"subjects": ["dog-1"], "objects": ["ball-9"], "phrase": "chasing"}]}, REQUESTED,
         S.UNKNOWN_RELATION_ID, "ball-9"),
        ({"layers": {"Background": ["tree-5"]}}, REQUESTED, S.UNKNOWN_RELATION_ID, "tree-5"),
        ({"caption": "A brown dog(dog-1) on the grass."}, REQUESTED, S.CAPTION_MISSING_OBJECT, "frisbee-2"),
        ({"caption": "A dog on the grass."}, REQUESTED, S.CAPTION_MISSING_OBJECT, "frisbee-2"),
        ({"caption": ""}, REQUESTED, S.CAPTION_MISSING_OBJECT, "empty"),
        ({"obj0": {"id": "dog"}}, None, S.BAD_OBJECT_ID, "'dog'"),
    ],
)
def test_each_rejection_reason(changes, requested, reason, detail):
    v = graph(**changes).validate(requested)
    assert not v.ok
    assert reason in v.codes, v.message()
    assert any(detail in d for c, d in v.reasons if c == reason), v.message()
    assert reason in S.REJECTION_REASONS


def test_untagged_caption_mentioning_every_name_passes():
    assert graph(caption="A dog leaps to catch a frisbee.").validate(REQUESTED).ok


def test_layers_may_name_groups():
    assert graph(layers={"Foreground": ["g1"]}).validate(REQUESTED).ok


def test_caption_check_can_be_skipped():
    assert graph(caption="").validate(REQUESTED, check_caption=False).ok


def test_repair_clips_small_overshoot_only():
    """The tolerance is measured against the image side (MAX_OVERSHOOT = 0.1), not the box's own side."""
    assert S.MAX_OVERSHOOT == 0.10
    # overshoots the right edge by 0.02 of the image -> clipped
    g, repairs = graph(obj1={"bbox": [0.82, 0.1, 0.2, 0.1]}).repair()
    assert repairs[S.REPAIR_CLIP_BOX] == 1
    np.testing.assert_allclose(g.object("frisbee-2").bbox, [0.82, 0.1, 0.18, 0.1])
    assert g.validate(REQUESTED).ok
    # overshoots the top by 0.05 of the image: 12.5 % of this 0.4 tall box, but within 0.1 of the image -> clipped
    g, repairs = graph(obj0={"bbox": [0.1, -0.05, 0.3, 0.4]}).repair()
    assert repairs[S.REPAIR_CLIP_BOX] == 1
    np.testing.assert_allclose(g.object("dog-1").bbox, [0.1, 0.0, 0.3, 0.35])
    assert g.validate(REQUESTED).ok
    # a tiny box overshooting by 0.08 (far more than its own side) is still within the image's slack -> clipped
    g, repairs = graph(obj1={"bbox": [0.96, 0.5, 0.12, 0.04]}).repair()
    assert repairs[S.REPAIR_CLIP_BOX] == 1 and g.validate(REQUESTED).ok
    np.testing.assert_allclose(g.object("frisbee-2").bbox, [0.96, 0.5, 0.04, 0.04])
    # the edge at exactly 0.1 outside is clipped; beyond it the box is left alone, then rejected
    g, repairs = graph(obj0={"bbox": [-0.1, 0.2, 0.5, 0.4]}).repair()
    assert repairs[S.REPAIR_CLIP_BOX] == 1 and g.validate(REQUESTED).ok
    for bad in ([0.1, -0.15, 0.3, 0.4], [0.7, 0.2, 0.45, 0.4], [0.1, 0.75, 0.3, 0.4], [1.02, 0.2, 0.05, 0.1]):
        g, repairs = graph(obj0={"bbox": bad}).repair()
        assert repairs[S.REPAIR_CLIP_BOX] == 0, bad
        assert g.object("dog-1").bbox == tuple(bad)
        assert S.BOX_OUT_OF_RANGE in g.validate(REQUESTED).codes, bad


def test_caption_tags_may_list_several_ids():
    assert S.caption_tags("Two dogs(dog-1, Dog-2) and a cat(cat-3) (yes)") == {"dog-1", "dog-2", "cat-3", "yes"}
    assert graph(caption="A dog and a frisbee(dog-1, frisbee-2).").validate(REQUESTED).ok
    v = graph(caption="A dog and a frisbee(dog-1, frisbee-20).").validate(REQUESTED)
    assert v.codes == [S.CAPTION_MISSING_OBJECT] and "frisbee-2" in v.message()


def test_repair_normalises_ids_everywhere():
    d = json.loads(GOOD)
    d["objects"][0]["id"] = "Dog-1"
    d["objects"][1]["id"] = "Red  Frisbee-2"
    d["relations"] = [{"subjects": ["Dog-1"], "objects": ["Red  Frisbee-2"], "phrase": " catching   a "}]
    d["layers"] = {"Foreground": ["Dog-1"]}
    d["groups"] = {"g1": ["Red  Frisbee-2"]}
    d["caption"] = "A dog(Dog-1) catches a frisbee(Red  Frisbee-2)."
    d["objects"][0]["attributes"] = [" brown ", "  "]
    g, repairs = SceneGraph.from_dict(d).repair()
    assert repairs[S.REPAIR_NORMALIZE_ID] == 2
    assert g.ids == ["dog-1", "red_frisbee-2"]
    assert g.relations[0].subjects == ["dog-1"] and g.relations[0].objects == ["red_frisbee-2"]
    assert g.relations[0].phrase == "catching a"
    assert g.layers == {"Foreground": ["dog-1"]} and g.groups == {"g1": ["red_frisbee-2"]}
    assert g.caption == "A dog(dog-1) catches a frisbee(red_frisbee-2)."
    assert g.object("dog-1").attributes == ["brown"]
    assert g.object("red_frisbee-2").name == "red frisbee"
    assert g.validate(["dog-1", "Red Frisbee-2"]).ok


def test_repair_of_a_clean_graph_changes_nothing():
    g0 = SceneGraph.from_json(GOOD)
    g, repairs = g0.repair()
    assert not repairs
    assert g.to_dict() == g0.to_dict()


def test_xywh_to_xyxy():
    g = SceneGraph.from_json(GOOD)
    np.testing.assert_allclose(g.boxes_xyxy(), [[0.1, 0.2, 0.4, 0.6], [0.5, 0.1, 0.7, 0.2]])
    np.testing.assert_allclose(g.boxes_xyxy(width=200, height=100), [[20, 20, 80, 60], [100, 10, 140, 20]])
    np.testing.assert_allclose(S.xyxy_to_xywh(g.boxes_xyxy()), g.boxes_xywh())
    missing = graph(obj0={"bbox": None}).boxes_xyxy()
    assert np.isnan(missing[0]).all() and np.isfinite(missing[1]).all()


def test_object_id_helpers():
    assert S.object_id("Red Star", 2) == "red_star-2"
    assert S.object_name("red_star-2") == "red star"
    assert S.normalize_object_id("  Big   Dog-10 ") == "big_dog-10"
