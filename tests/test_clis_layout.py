"""CLIS-L known answers: identity, symmetry, direction, a hand-computed pool, the penalty, back-off, unscored."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acp_data.clis.layout import NO_REFERENCES, NO_RELATIONS, LayoutScorer, nearest_rank, similarity
from acp_data.priors import Priors
from acp_data.scene import Relation, SceneGraph, SceneObject

NAMES = ("dog", "frisbee", "car", "police car", "cat")


def make_priors(refs):
    """Priors whose only reference pairs are ``refs``: (subject, object, phrase, subject box, object box)."""
    d = {"images": [{"id": 1, "width": 100, "height": 100}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}],
         "categories": [{"id": i + 1, "name": n, "frequency": "f"} for i, n in enumerate(NAMES)]}
    rel = [{"subject": s, "object": o, "relation": p, "subject_bbox": list(sb), "object_bbox": list(ob),
            "normalized": True} for s, o, p, sb, ob in refs]
    return Priors.build(d, relations=rel)


def scene(pairs):
    """pairs: (subject name, subject box, object name, object box, phrase); ids name-k."""
    objs, rels = {}, []
    for sname, sbox, oname, obox, phrase in pairs:
        for name, box in ((sname, sbox), (oname, obox)):
            oid = f"{name.replace(' ', '_')}-{sum(1 for k in objs if k.startswith(name.replace(' ', '_')))+1}"
            objs[oid] = SceneObject(oid, NAMES.index(name) + 1, [], tuple(box))
        ids = list(objs)
        rels.append(Relation([ids[-2]], [ids[-1]], phrase))
    return SceneGraph(list(objs.values()), rels, caption="")


# ----- an independent, plain-Python statement of the definition ---------------------------------------------------
def _feat(s, o):
    ix = max(0.0, min(s[0] + s[2], o[0] + o[2]) - max(s[0], o[0]))
    iy = max(0.0, min(s[1] + s[3], o[1] + o[3]) - max(s[1], o[1]))
    inter = ix * iy
    iou = inter / (s[2] * s[3] + o[2] * o[3] - inter)
    vx, vy = (o[0] + o[2] / 2) - (s[0] + s[2] / 2), (o[1] + o[3] / 2) - (s[1] + s[3] / 2)
    diag = (math.hypot(s[2], s[3]) + math.hypot(o[2], o[3])) / 2
    return (s[2] * s[3]) / (o[2] * o[3]), iou, math.hypot(vx, vy) / diag, (vx, vy)


def _sim(a, b):
    if a == 0 and b == 0:
        return 1.0
    return min(a, b) / max(a, b)


def _pen(t):
    return t if t >= 0.03 else -1 + (0.03 + 1) * t / 0.03


def _ref_score(L, R):
    fl, fr = _feat(*L), _feat(*R)
    size = _sim(fl[0], fr[0])
    dist = (_sim(fl[1], fr[1]) + _sim(fl[2], fr[2])) / 2
    (ax, ay), (bx, by) = fl[3], fr[3]
    cos = (ax * bx + ay * by) / (math.hypot(ax, ay) * math.hypot(bx, by))
    direction = (cos + 1) / 2
    return min(1.0, max(0.0, (0.5 * _pen(size) + 1.0 * _pen(dist) + 0.8 * _pen(direction)) / 2.3))


# ----- tests --------------------------------------------------------------------------------------------------------
def test_similarity_handles_zeros():
    np.testing.assert_allclose(similarity([0, 0, 2, 1], [0, 3, 4, 1]), [1.0, 0.0, 0.5, 1.0])
    assert nearest_rank(np.array([3.0, 1.0, 2.0]), 98) == 3.0
    assert nearest_rank(np.array([3.0, 1.0, 2.0]), 50) == 2.0
    assert nearest_rank(np.arange(1, 101, dtype=float), 98) == 98.0
    assert nearest_rank(np.arange(1, 51, dtype=float), 98) == 49.0  # ceil(0.98 * 50) = 49, no float drift to 50


def test_identical_pair_scores_100():
    s, o = (0.375, 0.125, 0.25, 0.1875), (0.3125, 0.5, 0.375, 0.25)  # exact in float32, the priors' storage
    sc = LayoutScorer(make_priors([("dog", "frisbee", "above", s, o)]), min_refs=1)
    res = sc.score(scene([("dog", s, "frisbee", o, "above")]))
    assert res.score == 100.0
    rec = res.pairs[0]
    assert (rec["pool"], rec["refs"], rec["bucket"], rec["weight"]) == ("exact", 1, "above", 1.0)


def test_swap_under_above_lowers_the_score():
    s, o = (0.4, 0.1, 0.2, 0.2), (0.4, 0.5, 0.2, 0.2)
    sc = LayoutScorer(make_priors([("dog", "frisbee", "on top of", s, o)]), min_refs=1)
    same = sc.score(scene([("dog", s, "frisbee", o, "above")])).score
    swapped = sc.score(scene([("dog", o, "frisbee", s, "above")])).score
    assert same == pytest.approx(100.0)
    assert swapped < 50.0


def test_symmetric_relation_mirrored_scores_as_original():
    refs = [("dog", "cat", "next to", (0.1, 0.3, 0.2, 0.3), (0.35, 0.35, 0.3, 0.2)),
            ("dog", "cat", "beside", (0.5, 0.2, 0.1, 0.2), (0.2, 0.25, 0.25, 0.2)),
            ("dog", "cat", "near", (0.1, 0.6, 0.3, 0.3), (0.45, 0.5, 0.2, 0.35))]
    sc = LayoutScorer(make_priors(refs), min_refs=1)
    a, b = (0.15, 0.3, 0.25, 0.3), (0.45, 0.32, 0.2, 0.25)
    orig = sc.score(scene([("dog", a, "cat", b, "next to")])).score
    mirrored = sc.score(scene([("dog", b, "cat", a, "next to")])).score
    roles = sc.score(scene([("cat", b, "dog", a, "next to")])).score  # (cat, dog) pool includes (dog, cat) pairs
    assert orig is not None and orig < 100
    assert mirrored == pytest.approx(orig, abs=1e-9)
    assert roles == pytest.approx(orig, abs=1e-9)
    # the same boxes under an asymmetric phrase are not mirrored: the swap changes the score
    sc2 = LayoutScorer(make_priors([(s, o, "left of", sb, ob) for s, o, _, sb, ob in refs]), min_refs=1)
    assert sc2.score(scene([("dog", b, "cat", a, "left of")])).score != pytest.approx(orig)


def test_three_reference_pool_hand_computed():
    # multiples of 1/64: exact in the priors' float32 storage, so 1e-6 compares the arithmetic, not the rounding
    L = ((0.125, 0.125, 0.1875, 0.1875), (0.40625, 0.125, 0.1875, 0.3125))
    R = [((0.125, 0.1875, 0.1875, 0.1875), (0.5, 0.1875, 0.1875, 0.1875)),
         ((0.0, 0.0, 0.3125, 0.3125), (0.1875, 0.09375, 0.3125, 0.3125)),  # overlapping: IoU term differs
         ((0.59375, 0.15625, 0.09375, 0.09375), (0.09375, 0.125, 0.1875, 0.1875))]  # reversed: direction < 0.03
    pr = make_priors([("dog", "frisbee", "left of", s, o) for s, o in R])
    expected = sorted(_ref_score(L, r) for r in R)
    (ax, ay), (bx, by) = _feat(*L)[3], _feat(*R[2])[3]
    assert (ax * bx + ay * by) / (math.hypot(ax, ay) * math.hypot(bx, by)) / 2 + 0.5 < 0.03  # penalty active
    for pct, rank in ((98, 3), (50, 2), (34, 2), (33, 1), (10, 1)):
        sc = LayoutScorer(pr, percentile=pct, min_refs=3)
        res = sc.score(scene([("dog", L[0], "frisbee", L[1], "to the left of")]))
        assert res.score == pytest.approx(100 * expected[rank - 1], abs=1e-6), pct
        assert res.pairs[0]["refs"] == 3 and res.pairs[0]["pool"] == "exact"
    # every reference individually, through the vectorised pass
    sc = LayoutScorer(pr, min_refs=3)
    feat = np.array([*_feat(*L)[:3], 0, 0, 1.0])
    v = np.array(_feat(*L)[3])
    feat[3:5] = v / np.linalg.norm(v)
    got = np.sort(sc.reference_scores(feat, slice(0, 3)))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_penalty_applies_below_threshold_only():
    sc = LayoutScorer(make_priors([("dog", "cat", "above", (0, 0, 0.1, 0.1), (0, 0.5, 0.1, 0.1))]))
    t = np.array([0.0, 0.015, 0.0299, 0.03, 0.031, 0.5, 1.0])
    got = sc.penalise(t)
    np.testing.assert_allclose(got[3:], t[3:])  # unchanged at and above 0.03
    np.testing.assert_allclose(got[:3], -1 + 1.03 * t[:3] / 0.03)  # linear below: -1 at 0 up to 0.03
    assert np.all(got[:3] < t[:3])
    assert np.all(np.diff(got) > 0)  # continuous and monotone across the threshold
    off = LayoutScorer(sc.priors, penalty_threshold=0.0)
    np.testing.assert_allclose(off.penalise(t), t)


def test_no_references_is_unscored():
    sc = LayoutScorer(make_priors([("dog", "frisbee", "above", (0.4, 0.1, 0.2, 0.2), (0.4, 0.5, 0.2, 0.2))]))
    res = sc.score(scene([("car", (0.1, 0.1, 0.2, 0.2), "cat", (0.5, 0.5, 0.2, 0.2), "below")]))
    assert res.score is None and res.reason == NO_REFERENCES
    assert res.pairs[0]["score"] is None and res.pairs[0]["refs"] == 0
    assert "no reference" in res.pairs[0]["reason"]
    empty = sc.score(SceneGraph([SceneObject("dog-1", 1, [], (0.1, 0.1, 0.2, 0.2))]))
    assert empty.score is None and empty.reason == NO_RELATIONS
    # a pair without references does not drag the mean: only the scored pair counts
    mixed = sc.score(scene([("car", (0.1, 0.1, 0.2, 0.2), "cat", (0.5, 0.5, 0.2, 0.2), "below"),
                            ("dog", (0.4, 0.1, 0.2, 0.2), "frisbee", (0.4, 0.5, 0.2, 0.2), "above")]))
    assert mixed.score == pytest.approx(100.0)


def test_back_off_levels_and_weights():
    refs = [("police car", "dog", "left of", (0.1, 0.4, 0.2, 0.1 + 0.01 * i), (0.6, 0.4, 0.2, 0.2))
            for i in range(5)]
    sc = LayoutScorer(make_priors(refs), min_refs=5)
    boxes = ((0.1, 0.4, 0.2, 0.12), (0.6, 0.4, 0.2, 0.2))
    exact = sc.score(scene([("police car", boxes[0], "dog", boxes[1], "left of")])).pairs[0]
    similar = sc.score(scene([("car", boxes[0], "dog", boxes[1], "left of")])).pairs[0]
    bucket = sc.score(scene([("cat", boxes[0], "frisbee", boxes[1], "left of")])).pairs[0]
    assert (exact["pool"], exact["weight"]) == ("exact", 1.0)
    assert (similar["pool"], similar["refs"], similar["weight"]) == ("similar", 5, 0.5)
    assert (bucket["pool"], bucket["refs"], bucket["weight"]) == ("bucket", 5, 0.25)
    assert exact["score"] == pytest.approx(similar["score"]) == pytest.approx(bucket["score"])
    # small pools weigh less: 3 references with min_refs 6 -> weight 0.5
    small = LayoutScorer(make_priors(refs[:3]), min_refs=6)
    rec = small.score(scene([("police car", boxes[0], "dog", boxes[1], "left of")])).pairs[0]
    assert (rec["pool"], rec["refs"], rec["weight"]) == ("exact", 3, 0.5)
    # weighted layout mean over pairs
    two = sc.score(scene([("police car", boxes[0], "dog", boxes[1], "left of"),
                          ("car", boxes[1], "dog", boxes[0], "left of")]))
    s1, s2 = (p["score"] for p in two.pairs)
    assert two.score == pytest.approx((1.0 * s1 + 0.5 * s2) / 1.5)


def test_unknown_phrase_uses_all_buckets():
    s, o = (0.4, 0.1, 0.2, 0.2), (0.4, 0.5, 0.2, 0.2)
    sc = LayoutScorer(make_priors([("dog", "frisbee", "above", s, o)]), min_refs=1)
    rec = sc.score(scene([("dog", s, "frisbee", o, "contemplating")])).pairs[0]
    assert rec["bucket"] is None and rec["pool"] == "exact" and rec["score"] == pytest.approx(100.0)


def test_invalid_settings_are_rejected():
    pr = make_priors([("dog", "frisbee", "above", (0, 0, 0.1, 0.1), (0, 0.5, 0.1, 0.1))])
    for kw in ({"percentile": 0}, {"weights": (1, 1)}, {"min_refs": 0}, {"penalty_threshold": 1.5}):
        with pytest.raises(ValueError):
            LayoutScorer(pr, **kw)
