"""Priors: geometric buckets, the relation lexicon, statistics, seeded caps, the file round trip, relations input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from acp_data.categories import CategoryTable
from acp_data.priors import (
    BUCKET_PHRASES,
    BUCKETS,
    SYMMETRIC_BUCKETS,
    Priors,
    PriorsError,
    cli_main,
    geometric_bucket,
    relation_bucket,
)


def _json(images, anns, names=("dog", "frisbee", "car", "police car")):
    cats = [{"id": i + 1, "name": n, "synonyms": [n.replace(" ", "_")] + (["pup"] if n == "dog" else []),
             "frequency": "f"} for i, n in enumerate(names)]
    return {"images": [{"id": i, "width": w, "height": h} for i, w, h in images],
            "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": list(b)}
                            for k, (im, c, b) in enumerate(anns)],
            "categories": cats}


def _random_json(n_images=60, k=4, seed=0, per_image=9):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for im in range(1, n_images + 1):
        images.append((im, 200, 100))
        for _ in range(int(rng.integers(1, per_image + 1))):
            w, h = rng.uniform(5, 80), rng.uniform(5, 50)
            anns.append((im, int(rng.integers(1, k + 1)), (rng.uniform(0, 200 - w), rng.uniform(0, 100 - h), w, h)))
    return _json(images, anns)


# ----- buckets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,o,expected", [
    ((0.4, 0.1, 0.2, 0.2), (0.4, 0.6, 0.2, 0.2), "above"),
    ((0.4, 0.6, 0.2, 0.2), (0.4, 0.1, 0.2, 0.2), "below"),
    ((0.05, 0.4, 0.1, 0.2), (0.7, 0.4, 0.2, 0.2), "left_of"),
    ((0.7, 0.4, 0.2, 0.2), (0.05, 0.4, 0.1, 0.2), "right_of"),
    ((0.3, 0.3, 0.1, 0.1), (0.2, 0.2, 0.5, 0.5), "inside"),       # S entirely in O
    ((0.2, 0.2, 0.5, 0.5), (0.3, 0.3, 0.1, 0.1), "overlapping"),  # O in S: contains, not inside
    ((0.2, 0.2, 0.3, 0.3), (0.3, 0.25, 0.3, 0.3), "overlapping"),
    ((0.1, 0.4, 0.2, 0.2), (0.32, 0.45, 0.2, 0.2), "next_to"),    # gap 0.02 of mean width 0.2, same height band
    ((0.1, 0.4, 0.2, 0.2), (0.36, 0.45, 0.2, 0.2), "left_of"),    # gap 0.06 > 0.25 * 0.2
])
def test_geometric_bucket_hand_placed(s, o, expected):
    assert geometric_bucket(s, o) == expected
    # absolute pixels of a 640 x 480 image give the same bucket (per-axis ratios only)
    scale = np.array([640, 480, 640, 480])
    assert geometric_bucket(np.array(s) * scale, np.array(o) * scale) == expected


def test_relation_lexicon():
    cases = {"on top of": "above", "sitting on top of": "above", "is above": "above", "under": "below",
             "next to": "next_to", "beside": "next_to", "is to the left of": "left_of", "Right_Of": "right_of",
             "in front of": "overlapping", "holding": "overlapping", "sitting on": "inside", "inside": "inside",
             "left_of": "left_of", "jumping over": "above"}
    for phrase, bucket in cases.items():
        assert relation_bucket(phrase) == bucket, phrase
    assert relation_bucket("xyzzy") is None
    assert relation_bucket("") is None
    for b in BUCKETS:
        assert relation_bucket(BUCKET_PHRASES[b]) == b
    assert SYMMETRIC_BUCKETS == {"next_to", "overlapping"}


# ----- statistics ---------------------------------------------------------------------------------------------------
def test_size_stats_cooccurrence_and_pools():
    d = _json([(1, 100, 100), (2, 200, 100), (3, 50, 50)], [
        (1, 1, (10, 10, 20, 20)),   # dog: sqrt(400/10000) = 0.2
        (1, 2, (50, 60, 10, 10)),   # frisbee below-right of dog
        (2, 1, (0, 0, 40, 20)),     # dog: sqrt(800/20000) = 0.2, aspect log 2
        (2, 1, (100, 0, 10, 40)),   # dog: sqrt(400/20000), aspect log(0.25)
        (3, 3, (0, 0, 10, 10)),     # car alone
    ])
    pr = Priors.build(d)
    m, sd, am, asd = pr.size_stats(1)
    vals = [0.2, 0.2, math.sqrt(0.02)]
    assert m == pytest.approx(np.mean(vals))
    assert sd == pytest.approx(np.std(vals))
    assert am == pytest.approx(np.mean([0.0, math.log(2), math.log(0.25)]))
    assert asd == pytest.approx(np.std([0.0, math.log(2), math.log(0.25)]))
    assert pr.size_stats(4) is None
    c = pr.cooccurrence()
    assert c.shape == (5, 5) and c.dtype == np.int64
    assert c[1, 1] == 2 and c[1, 2] == 1 and c[2, 1] == 1 and c[3, 3] == 1 and c[1, 3] == 0
    # pools: image 1 gives (dog, frisbee) and (frisbee, dog); image 2 two (dog, dog) pairs
    assert pr.pool_buckets(1, 2) == {geometric_bucket((10, 10, 20, 20), (50, 60, 10, 10)): 1}
    assert sum(pr.pool_buckets(1, 1).values()) == 2
    assert pr.pool_buckets(3, 1) == {}
    b = next(iter(pr.pool_buckets(1, 2)))
    np.testing.assert_allclose(pr.pool(1, 2, b), [[0.1, 0.1, 0.2, 0.2, 0.5, 0.6, 0.1, 0.1]], atol=1e-6)
    assert pr.pool(1, 2, b).dtype == np.float32
    with pytest.raises(ValueError):
        pr.pool(1, 2, b)[0, 0] = 1.0  # read-only
    got = pr.sample_pair(1, 2, np.random.default_rng(0))
    assert got is not None and got[0] == b
    np.testing.assert_allclose(got[1], [0.1, 0.1, 0.2, 0.2], atol=1e-6)
    assert pr.sample_pair(3, 4, np.random.default_rng(0)) is None
    assert pr.categories.id_of("pup") == 1
    assert pr.similar_categories(3) == (4,) and pr.similar_categories(4) == (3,)  # "police car" ~ "car"


def test_caps_deterministic_per_seed():
    d = _random_json()
    a = Priors.build(d, seed=3, max_pairs_per_image=10, max_refs_per_pool=4, max_refs_per_bucket=7)
    b = Priors.build(d, seed=3, max_pairs_per_image=10, max_refs_per_pool=4, max_refs_per_bucket=7)
    c = Priors.build(d, seed=4, max_pairs_per_image=10, max_refs_per_pool=4, max_refs_per_bucket=7)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    np.testing.assert_array_equal(a.bucket_refs, b.bucket_refs)
    assert not np.array_equal(a.pairs, c.pairs) or not np.array_equal(a.bucket_refs, c.bucket_refs)
    assert np.diff(a.pool_offsets).max() <= 4
    assert all(np.diff(a.bucket_offsets) <= 7)
    # per-image cap: without a pool cap, the pair count is sum(min(n(n-1), 10)) over images
    full = Priors.build(d, seed=3, max_pairs_per_image=10, max_refs_per_pool=0)
    n = np.bincount([a["image_id"] for a in d["annotations"]])
    expected = int(sum(min(k * (k - 1), 10) for k in n if k >= 2))
    assert full.num_pairs == expected
    unc = Priors.build(d, max_pairs_per_image=0, max_refs_per_pool=0)
    assert unc.num_pairs == int(sum(k * (k - 1) for k in n))


def test_round_trip(tmp_path):
    pr = Priors.build(_random_json(), seed=1)
    path = tmp_path / "sub" / "priors.npz"
    pr.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["priors.npz"]  # no temporary left behind
    back = Priors.load(path)
    assert back.categories == pr.categories
    for name in ("size", "cooc", "pairs", "pool_keys", "pool_offsets", "bucket_refs", "bucket_offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pr, name))
    assert back.settings["seed"] == 1
    assert back.pool_buckets(1, 2) == pr.pool_buckets(1, 2)
    with pytest.raises(PriorsError, match="does not exist"):
        Priors.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(PriorsError, match="lacks arrays"):
        Priors.load(bad)


def test_coco_ids_are_remapped():
    d = _json([(1, 100, 100)], [(1, 7, (0, 0, 10, 10)), (1, 3, (50, 50, 10, 10))])
    d["categories"] = [{"id": 3, "name": "cup"}, {"id": 7, "name": "table"}]
    pr = Priors.build(d)
    assert pr.categories.names == ["cup", "table"]
    assert pr.settings["json_category_ids"] == [3, 7]
    assert sum(pr.pool_buckets(2, 1).values()) == 1


def test_bad_input_names_the_problem():
    d = _json([(1, 100, 100)], [(1, 9, (0, 0, 10, 10))])
    with pytest.raises(PriorsError, match="category_id 9"):
        Priors.build(d)
    d = _json([(1, 100, 100)], [(2, 1, (0, 0, 10, 10))])
    with pytest.raises(PriorsError, match="image 2"):
        Priors.build(d)


def test_relations_file(tmp_path):
    d = _json([(1, 100, 100)], [(1, 1, (0, 0, 10, 10))])
    lines = [
        {"subject": "Pup", "object": "frisbee", "relation": "jumping over", "subject_bbox": [10, 10, 20, 20],
         "object_bbox": [10, 50, 20, 10], "width": 100, "height": 200},
        {"subject": "dog", "object": "frisbee", "relation": "next to", "normalized": True,
         "subject_bbox": [0.1, 0.1, 0.2, 0.2], "object_bbox": [0.35, 0.1, 0.2, 0.2]},
        {"subject": "unicorn", "object": "frisbee", "relation": "above", "subject_bbox": [0, 0, 1, 1],
         "object_bbox": [0, 0, 1, 1], "width": 10, "height": 10},
        {"subject": "dog", "object": "frisbee", "relation": "contemplating", "subject_bbox": [0, 0, 1, 1],
         "object_bbox": [0, 0, 1, 1], "width": 10, "height": 10},
    ]
    path = tmp_path / "rel.jsonl"
    path.write_text("# comment\n" + "\n".join(json.dumps(x) for x in lines) + "\n\n")
    pr = Priors.build(d, relations=path)
    assert pr.pool_buckets(1, 2) == {"above": 1, "next_to": 1}
    np.testing.assert_allclose(pr.pool(1, 2, "above"), [[0.1, 0.05, 0.2, 0.1, 0.1, 0.25, 0.2, 0.05]], atol=1e-6)
    st = pr.settings["relations"]
    assert (st["used"], st["unknown_names"], st["unknown_phrases"]) == (2, 1, 1)
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(PriorsError, match=r"rel.jsonl:2"):
        Priors.build(d, relations=path)
    path.write_text(json.dumps({k: v for k, v in lines[0].items() if k != "width"}) + "\n")
    with pytest.raises(PriorsError, match="width"):
        Priors.build(d, relations=path)


def test_cli_build_and_info(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_random_json(n_images=10)))
    out = tmp_path / "p.npz"
    assert cli_main(["build", "--ann", str(ann), "--out", str(out), "--seed", "2", "--max-pairs-per-image", "5",
                     "--max-refs-per-pool", "3"]) == 0
    pr = Priors.load(out)
    assert pr.settings["max_pairs_per_image"] == 5 and np.diff(pr.pool_offsets).max() <= 3
    assert isinstance(pr.categories, CategoryTable)
    assert cli_main(["info", str(out)]) == 0
    assert '"reference_pairs"' in capsys.readouterr().out
    assert cli_main(["info", str(tmp_path / "nope.npz")]) == 2
