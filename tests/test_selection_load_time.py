"""Load-time selection that means what its keys say: CATEGORIES picks samples by their unit's target (companions keep
their labels), SELECT clis recomputes best of N from the stored scores with the load-time thresholds (the prebuild's
own rule), the per-category CLIS-I rule never empties a scored category, and caches that cannot honour looser
thresholds say so."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit

from acp_data.cache.reader import CacheReader
from acp_data.cache.selection import (
    IndexColumns,
    Selection,
    SelectionError,
    per_category_thresholds,
    select,
)
from acp_data.cache.targets import sample_targets
from acp_data.cache.writer import CacheWriter
from acp_data.clis.select import best_of_n, select_unit

NAN = float("nan")
RARE, FREQUENT = (1, 2, 3), (7, 8)


def _write(d, cats, units, *, settings=None, scoring=None, with_target=True):
    """``units``: list of ``(combo, n_cand, rng seed)``; records get ``target``/``combo`` unless ``with_target`` is
    False (a record written before they were recorded), and one CLIS-L per unit (its candidates share the layout, as
    in prebuild). Returns key -> records."""
    written = {}
    with CacheWriter(d, cats, settings or GENERATION_SETTINGS, scoring_settings=scoring) as w:
        for u, (combo, n_cand, seed) in enumerate(units):
            rng = np.random.default_rng(seed)
            records, images = make_unit(u, n_cand, cats, rng, category_ids=list(combo))
            for r in records:
                r["clis_l"] = records[0]["clis_l"]
                if with_target:
                    r["target"], r["combo"] = int(combo[0]), [int(c) for c in combo]
            assert w.add_unit(records, images)
            written[records[0]["key"]] = records
    return written


@pytest.fixture(scope="module")
def companions(tmp_path_factory):
    """Units drawn for rare targets with frequent companions, and for frequent targets with rare companions."""
    d = tmp_path_factory.mktemp("sel") / "cache"
    cats = make_categories()
    units = [((1 + u % 3, 7 + u % 2), 1, u) for u in range(12)] + [((7 + u % 2, 1 + u % 3), 1, 100 + u)
                                                                    for u in range(12)]
    return d, _write(d, cats, units)


def _key_cand(reader, row):
    return reader.key(row), int(reader.value("candidate_idx", row))


def test_targets_come_from_the_record_tail(companions, tmp_path):
    d, written = companions
    r = CacheReader(d)
    recs = {(rec["key"], rec["candidate_idx"]): rec for v in written.values() for rec in v}
    t = sample_targets(r)
    assert t.tolist() == [recs[_key_cand(r, i)]["target"] for i in range(len(r))]
    # records without `target`: the first object of the scene graph (the planners list the target first)
    d2 = tmp_path / "old"
    old = _write(d2, make_categories(), [((2, 8), 2, 5), ((8, 2), 1, 6)], with_target=False)
    r2 = CacheReader(d2)
    first = {(rec["key"], rec["candidate_idx"]): rec["scene_graph"]["objects"][0]["category_id"]
             for v in old.values() for rec in v}
    assert sample_targets(r2).tolist() == [first[_key_cand(r2, i)] for i in range(len(r2))] and \
        sorted(set(first.values())) == [2, 8]


def test_companions_keep_their_labels_under_categories_rare(companions):
    from acp_data.d2.datasets import SyntheticDataset

    d, written = companions
    recs = {(rec["key"], rec["candidate_idx"]): rec for v in written.values() for rec in v}
    sel = Selection(select="all", min_clis_i=0.0, category_ids=RARE)
    ds = SyntheticDataset(d, sel)
    r = ds.readers[0]
    assert len(ds) == 12 and ds.result.stats["dropped_target_samples"] == 12
    labelled_frequent = 0
    for i in range(len(ds)):
        item = ds[i]
        rec = recs[_key_cand(r, item["acp_source"][1])]
        assert rec["target"] in RARE
        assert [a["category_id"] + 1 for a in item["annotations"]] == [x["category_id"] for x in rec["instances"]]
        assert item["acp_dropped"] == []
        labelled_frequent += sum(a["category_id"] + 1 in FREQUENT for a in item["annotations"])
    assert labelled_frequent > 0  # the companions are labelled, not background
    # the old behaviour under its explicit name: every image holding a rare instance, only rare instances labelled
    inst = SyntheticDataset(d, Selection(select="all", min_clis_i=0.0, category_ids=RARE,
                                         categories_apply_to="instances"))
    assert len(inst) == 24
    for i in range(len(inst)):
        item = inst[i]
        assert all(a["category_id"] + 1 in RARE for a in item["annotations"])
        assert all(a["category_id"] + 1 in FREQUENT and a["acp_drop_reason"] == "category"
                   for a in item["acp_dropped"])


def test_categories_apply_to_from_cfg(companions):
    from acp_data.cache.selection import selection_from_cfg
    from acp_data.d2.config import get_acp_cfg

    d, _ = companions
    cfg = get_acp_cfg()
    cfg.ACP.MIN_CLIS_I = 0.0
    sel = selection_from_cfg(cfg, make_categories())
    assert sel.categories_apply_to == "samples" and sel.category_ids == RARE
    cfg.ACP.CATEGORIES_APPLY_TO = "instances"
    assert selection_from_cfg(cfg, make_categories()).categories_apply_to == "instances"


def _unit_rows(reader):
    kh = reader.column("key_hash")
    out = {}
    for row in range(len(reader)):
        out.setdefault(int(kh[row]), []).append(row)
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """60 units of 4 candidates with spread scores; the stored flags were computed with 60 / 50."""
    d = tmp_path_factory.mktemp("scored") / "cache"
    cats = make_categories()
    units = [((1 + u % 8, 1 + (u * 3) % 8, 1 + (u * 5) % 8), 4, 1000 + u) for u in range(60)]
    _write(d, cats, units)
    return d


@pytest.mark.parametrize("min_i,min_l", [(60.0, 0.0), (60.0, 50.0), (30.0, 0.0), (0.0, 0.0), (80.0, 70.0)])
def test_clis_recomputes_best_of_n_from_the_scores(scored, min_i, min_l):
    """The kept set is exactly what the prebuild's own rule (select_unit) says over the stored scores."""
    r = CacheReader(scored)
    clis_i, clis_l, cand = r.column("clis_i"), r.column("clis_l"), r.column("candidate_idx")
    start, cnt, iscore = r.column("inst_start"), r.column("inst_count"), r.column("inst_clis_i")
    expect_samples, expect_inst = set(), set()
    for rows in _unit_rows(r).values():
        rows = sorted(rows, key=lambda x: cand[x])
        res = select_unit([clis_i[x] for x in rows], [clis_l[x] for x in rows],
                          [list(iscore[start[x]:start[x] + cnt[x]]) for x in rows], min_clis_i=min_i,
                          min_clis_l=min_l)
        if res.selected_idx is not None:
            row = rows[res.selected_idx]
            expect_samples.add(row)
            expect_inst |= {(row, j) for j, k in enumerate(res.kept_instances[res.selected_idx]) if k}
    got = select(r, Selection(select="clis", min_clis_i=min_i, min_clis_l=min_l))
    assert set(got.sample_row.tolist()) == expect_samples and len(expect_samples) > 0
    got_inst = {(int(got.sample_row[k]), int(j)) for k in range(len(got)) for j in got.inst_local[got.instances(k)]}
    assert got_inst == expect_inst
    if (min_i, min_l) == (0.0, 0.0):  # the thresholds the test cache's stored flags were computed with
        stored = select(r, Selection(select="stored", min_clis_i=min_i, min_clis_l=min_l))
        assert np.array_equal(stored.sample_row, got.sample_row)


def test_loosening_min_clis_l_at_load_time_brings_units_back(scored):
    r = CacheReader(scored)
    strict = select(r, Selection(min_clis_i=60.0, min_clis_l=50.0))
    loose = select(r, Selection(min_clis_i=60.0, min_clis_l=0.0))
    assert set(strict.sample_row.tolist()) < set(loose.sample_row.tolist())  # the layout filter drops whole units
    assert loose.stats["after_select"] == loose.stats["units"]  # every unit has a scored candidate


def test_best_of_n_is_select_units_rule():
    """The vectorised rule over many units equals select_unit unit by unit (NaN, ties, layout filter)."""
    rng = np.random.default_rng(0)
    vals = np.array([NAN, 40.0, 55.0, 60.0, 70.0, 70.0, 90.0])
    groups, orders, images, layouts = [], [], [], []
    for u in range(3000):
        n = int(rng.integers(1, 5))
        groups += [u] * n
        orders += list(range(n))
        images += list(rng.choice(vals, n))
        layouts += list(rng.choice(vals, n)) if rng.random() < 0.5 else [rng.choice(vals)] * n
    g, o, im, la = (np.array(x) for x in (groups, orders, images, layouts))
    for min_l in (0.0, 50.0, 70.0):
        mask = best_of_n(g, o, im, la, min_l)
        for u in range(3000):
            idx = np.flatnonzero(g == u)
            res = select_unit(list(im[idx]), list(la[idx]), [[99.0]] * len(idx), min_clis_i=0.0, min_clis_l=min_l)
            chosen = np.flatnonzero(mask[idx])
            assert (res.selected_idx is None and not len(chosen)) or chosen.tolist() == [res.selected_idx]


def _low_and_high(n_units=40):
    """Category 1 scored high, category 2 uniformly low (a scorer whose scale differs), category 3 unscored."""
    units, rng = [], np.random.default_rng(3)
    for u in range(n_units):
        cats = [1, 2, 3] if u % 2 else [2, 1]
        clis = [float(rng.uniform(70, 95)) if c == 1 else float(rng.uniform(5, 25)) if c == 2 else NAN
                for c in cats]
        units.append((u, cats, clis))
    kh, ci, cnt, ids, sc = [], [], [], [], []
    for u, cats, clis in units:
        for c in range(2):
            kh.append(1000 + u)
            ci.append(c)
            cnt.append(len(cats))
            ids += cats
            sc += [v - 3 * c for v in clis]
    n = len(kh)
    return IndexColumns({"key_hash": np.array(kh, np.uint64), "candidate_idx": np.array(ci, np.int32),
                         "selected": np.array(ci) == 0, "clis_l": np.full(n, 60.0), "clis_i": np.full(n, 70.0),
                         "inst_count": np.array(cnt, np.int32), "inst_category_id": np.array(ids, np.int32),
                         "inst_clis_i": np.array(sc, np.float64)})


@pytest.mark.parametrize("mode", ["clis", "stored", "random", "first", "all"])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 1.0])
def test_per_category_rule_never_empties_a_scored_category(mode, q):
    idx = _low_and_high()
    absolute = select(idx, Selection(select=mode, min_clis_i=60.0))
    assert 2 not in set(absolute.inst_category_id.tolist())  # the absolute threshold empties category 2
    res = select(idx, Selection(select=mode, min_clis_i=60.0, min_clis_i_rule="per_category", min_clis_i_quantile=q))
    kept = set(res.inst_category_id.tolist())
    assert {1, 2} <= kept and 3 not in kept  # unscored instances still pass only a threshold of 0
    thr = res.min_clis_i_by_category
    assert thr[1] == 60.0 and thr[2] < 25.0 and np.isnan(thr[3])


def test_per_category_thresholds_are_the_quantile_capped_by_the_absolute():
    rng = np.random.default_rng(1)
    cids = rng.integers(1, 6, 500)
    scores = rng.uniform(0, 100, 500) * (cids / 5.0)
    scores[rng.random(500) < 0.1] = NAN
    for q in (0.0, 0.25, 0.5, 1.0):
        thr = per_category_thresholds(cids, scores, 60.0, q, 6)
        for c in range(1, 6):
            v = scores[(cids == c) & ~np.isnan(scores)]
            assert thr[c] == pytest.approx(min(60.0, float(np.quantile(v, q)))) and thr[c] <= v.max()


def test_per_category_rule_needs_instance_scores(tmp_path):
    idx = _low_and_high()
    idx.columns["inst_clis_i"] = np.full(len(idx.columns["inst_clis_i"]), NAN)
    with pytest.raises(SelectionError, match="ACP.MIN_CLIS_I_RULE"):
        select(idx, Selection(min_clis_i_rule="per_category"))
    select(idx, Selection(min_clis_i=0.0))  # the absolute rule serves unscored caches at threshold 0


def test_keep_selected_cache_warns_about_looser_thresholds(tmp_path, caplog):
    d = tmp_path / "sel_only"
    settings = {**GENERATION_SETTINGS, "store": {"keep": "selected", "image_format": "jpg"}}
    _write(d, make_categories(), [((1, 7), 1, 1), ((2, 8), 1, 2)], settings=settings,
           scoring={"selection": {"min_clis_i": 60, "min_clis_l": 50}})
    r = CacheReader(d)
    with caplog.at_level("WARNING", logger="acp_data.cache.selection"):
        res = select(r, Selection(min_clis_i=60.0, min_clis_l=0.0))
    assert len(res.warnings) == 1 and "selection.min_clis_l = 50" in res.warnings[0] and \
        "ACP.MIN_CLIS_L 0" in res.warnings[0] and "keep: selected" in caplog.text
    res = select(r, Selection(min_clis_i=40.0, min_clis_l=50.0))
    assert len(res.warnings) == 1 and "ACP.MIN_CLIS_I 40" in res.warnings[0] and "= 60" in res.warnings[0]
    assert select(r, Selection(min_clis_i=60.0, min_clis_l=50.0)).warnings == []
    assert "per_category" in select(r, Selection(min_clis_i=60.0, min_clis_l=50.0,
                                                 min_clis_i_rule="per_category")).warnings[0]


@pytest.mark.parametrize("key, value", [("MIN_CLIS_I_RULE", "relative"), ("MIN_CLIS_I_QUANTILE", 1.5),
                                        ("MIN_CLIS_I_QUANTILE", -0.1), ("CATEGORIES_APPLY_TO", "images"),
                                        ("SELECT", "flag")])
def test_bad_selection_keys_name_the_key(key, value, tmp_path):
    from acp_data.d2.config import ConfigError, get_acp_cfg, validate_acp_config

    cfg = get_acp_cfg()
    cfg.ACP.ENABLED, cfg.ACP.CACHE_DIRS, cfg.SEED = True, [str(tmp_path)], 1
    validate_acp_config(cfg)
    setattr(cfg.ACP, key, value)
    with pytest.raises(ConfigError, match=f"ACP.{key} = {value!r}"):
        validate_acp_config(cfg)


def test_select_command_prints_what_training_gets(companions, scored, capsys):
    import json

    from acp_data.cli import main

    d, _ = companions
    assert main(["select", str(d), "ACP.MIN_CLIS_I", "0.0", "--json", "--top", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kept_images"] == 12 and r["settings"]["category_ids"] == list(RARE)
    rules = {x["key"]: x["count"] for x in r["rules"]}
    assert rules["dropped_target_samples"] == 12 and rules["dropped_min_clis_i"] == 0
    assert r["per_group"]["frequent"]["instances"] > 0  # the companions, labelled
    assert r["per_group"]["rare"]["images"] == 12 and r["dropped_instances_policy"] in ("background", "ignore", "erase")
    assert len(r["top_categories"]) == 3 and r["starved_categories"] == []
    assert {c["id"]: c["drawn_for"] for c in r["top_categories"]} == {1: 4, 2: 4, 3: 4}  # 12 units, u % 3
    # thresholds set at load time change the report as they change the selection; text output names the rules
    assert main(["select", str(scored), "ACP.CATEGORIES", "all", "ACP.MIN_CLIS_I", "90.0",
                 "ACP.MIN_CLIS_I_RULE", "per_category", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["per_category_thresholds"]["lowered"] > 0 and r["categories_with_instances"] == 8
    res = select(CacheReader(scored), Selection(min_clis_i=90.0, min_clis_i_rule="per_category"))
    assert r["kept_images"] == len(res) and r["kept_instances"] == len(res.inst_category_id)
    assert main(["select", str(scored), "ACP.CATEGORIES", "all"]) == 0
    text = capsys.readouterr().out
    assert "ACP.MIN_CLIS_I: " in text and "per frequency group" in text and "most kept:" in text
    # bad input: one line naming the key, exit status 2
    assert main(["select", str(scored), "ACP.MIN_CLIS_I_RULE", "relative"]) == 2
    assert "ACP.MIN_CLIS_I_RULE = 'relative'" in capsys.readouterr().err
    assert main(["select", str(scored), "ACP.CATEGORIES", "nope"]) == 2
    assert "ACP.CATEGORIES" in capsys.readouterr().err


def test_training_start_records_the_report_and_refuses_what_a_cache_cannot_serve(tmp_path):
    """acp_run.json holds the same report as `acp-data select`; a per-category rule on a cache without instance
    scores is one ACPLoaderError naming the key, before any model is built."""
    import json
    import shutil

    from test_loader_errors import build_mixing_world, world_cfg

    from acp_data.cache.index import shard_scores, update_scores
    from acp_data.cache.select_report import selection_report
    from acp_data.d2.loader import ACPLoaderError, _train_loader_from_config, check_acp_train_data

    world = build_mixing_world(tmp_path / "w", n_units=6)
    cfg = world_cfg(world, tmp_path / "out", "concat", MIN_CLIS_I=40.0, MIN_CLIS_I_RULE="per_category")
    parts = _train_loader_from_config(cfg)
    run = json.loads((tmp_path / "out" / "acp_run.json").read_text())
    rep = run["selection_report"]
    synth = parts["synthetic"](0)
    assert rep["kept_images"] == run["synthetic_images"] == len(synth) > 0 and "per_category_thresholds" in rep
    assert json.loads(json.dumps(selection_report(synth.result, synth.categories, rep["dropped_instances_policy"],
                                                  readers=synth.readers))) == rep
    # paste modes build their pool per instance whatever CATEGORIES_APPLY_TO says: only the chosen categories' crops
    from acp_data.cache.selection import selection_from_cfg
    from acp_data.d2.loader import build_paste_source

    paste_cfg = world_cfg(world, tmp_path / "paste", "paste", CATEGORIES="rare")
    table = world["cats"]
    pool = build_paste_source(paste_cfg, selection_from_cfg(paste_cfg, table), table)
    rare = {c.id for c in table if c.frequency == "r"}
    assert len(pool) > 0 and set(int(c) for c in pool.categories) <= rare
    unscored = tmp_path / "unscored"
    shutil.copytree(world["cache"], unscored)
    from acp_data.cache.reader import CacheReader

    for info in CacheReader(unscored).shards:
        sc = shard_scores(unscored, info.name)
        sc.inst_clis_i[:] = NAN
        update_scores(unscored, sc)
    cfg.ACP.CACHE_DIRS = [str(unscored)]
    with pytest.raises(ACPLoaderError, match=r"ACP.MIN_CLIS_I_RULE = 'per_category' needs per-instance CLIS-I"):
        check_acp_train_data(cfg)
