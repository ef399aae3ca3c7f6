"""The oracle: the Shapes generator's truth (which objects it drew wrong) round-trips through the cache as the
provenance field ``shapes_truth``; ``SELECT oracle`` picks each unit's candidate with the fewest failures, drops the
failed instances like a threshold does, and stops on a cache without the truth, naming the key and the cache."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit, write_cache

from acp_data.cache.layout import CacheError
from acp_data.cache.reader import CacheReader
from acp_data.cache.records import validate_record
from acp_data.cache.selection import DROP_ORACLE, DROP_REASONS, Selection, SelectionError, select
from acp_data.cache.truth import NO_TRUTH, record_truth, sample_truth
from acp_data.cache.writer import CacheWriter


def _with_truth(records: list[dict], failed: list[list[bool]]) -> list[dict]:
    """Give each candidate's instances object ids and its provenance the truth ``failed[c][j]``."""
    for rec, flags in zip(records, failed):
        objs = rec["scene_graph"]["objects"]
        assert len(objs) == len(rec["instances"]) == len(flags)
        for inst, o in zip(rec["instances"], objs):
            inst["object_id"] = o["id"]
        rec["provenance"] = {**rec["provenance"],
                             "shapes_truth": {"failures": ["wrong_colour" if f else None for f in flags]}}
    return records


def _oracle_cache(path, cats):
    """Two units of three candidates with two instances each; failures per candidate: unit 0 (2, 1, 0), unit 1
    (1, 2, 1)."""
    rng = np.random.default_rng(3)
    truth = {0: [[True, True], [False, True], [False, False]], 1: [[True, False], [True, True], [False, True]]}
    written = {}
    with CacheWriter(path, cats, GENERATION_SETTINGS) as w:
        for u in (0, 1):
            records, images = make_unit(u, 3, cats, rng, category_ids=[1, 4], size=(160, 200))
            _with_truth(records, truth[u])
            assert w.add_unit(records, images)
            written[u] = records
    return written, truth


def test_truth_round_trips_through_the_cache(tmp_path):
    cats = make_categories()
    written, truth = _oracle_cache(tmp_path / "c", cats)
    reader = CacheReader(tmp_path / "c")
    seen = 0
    for row in range(len(reader)):
        rec = reader.read_record(row)
        want = truth[rec["unit"]][rec["candidate_idx"]]
        assert rec["provenance"]["shapes_truth"] == {"failures": ["wrong_colour" if f else None for f in want]}
        assert record_truth(rec) == (sum(want), want)
        seen += 1
    assert seen == 6
    fails, flags = sample_truth(reader)
    units, cands = reader.column("unit"), reader.column("candidate_idx")
    assert [int(f) for f in fails] == [sum(truth[int(u)][int(c)]) for u, c in zip(units, cands)]
    assert int(flags.sum()) == sum(sum(x) for t in truth.values() for x in t)


def test_validation_rejects_a_malformed_truth():
    cats = make_categories()
    records, images = make_unit(0, 1, cats, np.random.default_rng(0), category_ids=[1, 2], size=(160, 200))
    rec = _with_truth(records, [[False, True]])[0]
    assert validate_record(rec, images[0], cats, "t")["provenance"]["shapes_truth"]["failures"] == [None,
                                                                                                      "wrong_colour"]
    for bad in ({"failures": [None]}, {"failures": [None, 3]}, ["x", None], {"failures": [None, ""]}):
        rec["provenance"]["shapes_truth"] = bad
        with pytest.raises(CacheError, match="shapes_truth"):
            validate_record(rec, images[0], cats, "t")


def test_select_oracle_takes_the_fewest_failures_and_drops_the_failed(tmp_path):
    cats = make_categories()
    _oracle_cache(tmp_path / "c", cats)
    reader = CacheReader(tmp_path / "c")
    res = select(reader, Selection(select="oracle", min_clis_i=0.0))
    units, cands = reader.column("unit"), reader.column("candidate_idx")
    chosen = {int(units[r]): int(cands[r]) for r in res.sample_row}
    assert chosen[0] == 2  # no failure
    assert chosen[1] in (0, 2)  # one failure each: a seeded tie-break
    k1 = [k for k, r in enumerate(res.sample_row) if int(units[r]) == 1][0]
    assert len(res.category_ids(k1)) == 1 and res.drop_reason[res.dropped(k1)].tolist() == [DROP_ORACLE]
    assert DROP_REASONS[DROP_ORACLE] == "generator_truth" and res.stats["dropped_oracle"] == 1
    # ties go both ways over seeds; the unit without failures never moves
    picks = set()
    for seed in range(12):
        r = select(reader, Selection(select="oracle", min_clis_i=0.0, seed=seed))
        got = {int(units[x]): int(cands[x]) for x in r.sample_row}
        assert got[0] == 2
        picks.add(got[1])
    assert picks == {0, 2}
    # the selection report names the oracle's drops as its own rule
    from acp_data.cache.select_report import selection_report

    rules = {r["key"]: r for r in selection_report(res, cats)["rules"]}
    assert rules["dropped_oracle"]["count"] == 1 and "oracle" in rules["dropped_oracle"]["rule"]
    # and `acp-data inspect` says why that instance is gone
    from acp_data.cache.inspect import _Reasons

    why = _Reasons.compute(reader, Selection(select="oracle", min_clis_i=0.0))
    row = int(res.sample_row[k1])
    assert sorted(why.instance(row, j) for j in range(2)) == ["", "drawn wrong (generator truth)"]


def test_select_oracle_errors_on_a_cache_without_truth(tmp_path):
    cats = make_categories()
    write_cache(tmp_path / "plain", cats, n_units=2)
    reader = CacheReader(tmp_path / "plain")
    assert (sample_truth(reader)[0] == NO_TRUTH).all()
    with pytest.raises(SelectionError, match=r"ACP.SELECT = 'oracle'.*plain"):
        select(reader, Selection(select="oracle", min_clis_i=0.0))
    for mode in ("clis", "random", "all"):  # no other rule reads the truth
        select(reader, Selection(select=mode, min_clis_i=0.0))


def test_generator_records_what_it_drew():
    from acp_data.scene import SceneGraph
    from acp_data.shapes.generator import TRUTH_FIELD, ShapesGenerator
    from acp_data.shapes.world import world_category_table
    from acp_data.stages import StageContext

    table = world_category_table("small")
    gen = ShapesGenerator(StageContext(categories=table), p_wrong_colour=0.3, p_missing=0.2)
    scene = SceneGraph.from_dict({"objects": [
        {"id": "a-1", "category_id": 1, "attributes": [], "bbox": [0.1, 0.1, 0.3, 0.3]},
        {"id": "b-1", "category_id": 7, "attributes": [], "bbox": [0.5, 0.5, 0.35, 0.35]}],
        "relations": [], "layers": {}, "caption": "x", "groups": {}})
    images, prov = gen.generate_with_provenance(scene, 6, seed=5)
    truth = gen.generate_with_truth(scene, 6, seed=5)
    assert len(images) == len(prov) == 6
    for im, p, t in zip(images, prov, truth):
        assert np.array_equal(im, t.image) and p == {TRUTH_FIELD: {"failures": t.failures}}
    assert any(f is not None for p in prov for f in p[TRUTH_FIELD]["failures"])


def test_oracle_config_loads_and_is_validated():
    from acp_data.d2.config import load_cfg

    cfg = load_cfg("configs/shapes/oracle.yaml", [])
    assert cfg.ACP.SELECT == "oracle" and cfg.ACP.MIN_CLIS_I == 0.0
    base = load_cfg("configs/shapes/acp.yaml", [])
    assert cfg.ACP.DROPPED_INSTANCES == base.ACP.DROPPED_INSTANCES  # the filtered group's policy
    assert cfg.ACP.CACHE_DIRS == base.ACP.CACHE_DIRS
