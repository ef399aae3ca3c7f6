"""Load-time selection: SELECT modes, thresholds, unscored values, categories, MAX_IMAGES, duplicates, scale."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import make_categories, write_cache

from acp_data.cache.reader import CacheReader
from acp_data.cache.selection import IndexColumns, Selection, candidate_hash, select, selection_from_cfg
from acp_data.categories import CategoryError

NAN = float("nan")


def columns(units: list[list[dict]]) -> IndexColumns:
    """Index columns from ``units[u][c] = {"cand", "selected", "clis_l", "cats", "clis"}``."""
    kh, ci, sel, cl, cnt, cats, clis, image = [], [], [], [], [], [], [], []
    for u, cands in enumerate(units):
        for c in cands:
            kh.append(c.get("key", 1000 + u))
            ci.append(c.get("cand", 0))
            sel.append(c.get("selected", False))
            cl.append(c.get("clis_l", 50.0))
            cnt.append(len(c["cats"]))
            cats += c["cats"]
            inst = c.get("clis", [90.0] * len(c["cats"]))
            clis += inst
            image.append(c.get("image", float(np.nanmean(inst)) if not np.isnan(inst).all() else NAN))
    return IndexColumns({"key_hash": np.array(kh, np.uint64), "candidate_idx": np.array(ci, np.int32),
                         "selected": np.array(sel, bool), "clis_l": np.array(cl, np.float64),
                         "clis_i": np.array(image, np.float64),
                         "inst_count": np.array(cnt, np.int32), "inst_category_id": np.array(cats, np.int32),
                         "inst_clis_i": np.array(clis, np.float64)})


def rows(res) -> list[int]:
    return res.sample_row.tolist()


def three(selected: int = 1, **kw) -> list[dict]:
    return [{"cand": c, "selected": c == selected, "cats": [1, 2], **kw} for c in range(3)]


def test_select_modes():
    idx = columns([three(1), three(2), [{"cand": 1, "cats": [3]}, {"cand": 2, "selected": True, "cats": [3]}]])
    base = dict(min_clis_i=0.0)
    assert rows(select(idx, Selection(select="all", **base))) == list(range(8))
    assert rows(select(idx, Selection(select="stored", **base))) == [1, 5, 7]  # the stored flag
    # first = the lowest stored candidate (unit 2 lost candidate 0)
    assert rows(select(idx, Selection(select="first", **base))) == [0, 3, 6]
    r1 = select(idx, Selection(select="random", seed=5, **base))
    assert rows(r1) == rows(select(idx, Selection(select="random", seed=5, **base)))
    units = [r // 3 if r < 6 else 2 for r in rows(r1)]
    assert sorted(units) == [0, 1, 2]


def test_warns_when_only_selected_candidates_are_stored(caplog):
    only_selected = columns([[{"cand": 2, "selected": True, "cats": [1]}], [{"cand": 0, "selected": True, "cats": [2]}]])
    for mode in ("random", "first", "all"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="acp_data.cache.selection"):
            res = select(only_selected, Selection(select=mode, min_clis_i=0.0))
        assert rows(res) == [0, 1] and "keep: all" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="acp_data.cache.selection"):
        select(only_selected, Selection(select="stored", min_clis_i=0.0))
        select(columns([three(1), three(0)]), Selection(select="random", min_clis_i=0.0))  # every candidate stored
    assert "keep: all" not in caplog.text


def test_warns_when_the_threshold_empties_a_category(caplog):
    good = [[{"cats": [1, 2], "selected": True, "clis": [90.0, 80.0]}] for _ in range(30)]
    low = [[{"cats": [3], "selected": True, "clis": [5.0 if u % 10 else 70.0]}] for u in range(20)]
    idx = columns(good + low)
    with caplog.at_level("WARNING", logger="acp_data.cache.selection"):
        res = select(idx, Selection(min_clis_i=60.0))
    assert res.stats["starved_categories"] == 1 and "id 3 (2/20)" in caplog.text and "id 1" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="acp_data.cache.selection"):
        assert select(idx, Selection(min_clis_i=0.0)).stats["starved_categories"] == 0
        assert select(columns(low[:5]), Selection(min_clis_i=60.0)).stats["starved_categories"] == 0  # < 10 seen
    assert "keeps under a quarter" not in caplog.text


def test_random_is_uniform_and_seeded():
    idx = columns([three() for _ in range(3000)])
    a = select(idx, Selection(select="random", seed=1, min_clis_i=0.0))
    b = select(idx, Selection(select="random", seed=2, min_clis_i=0.0))
    assert len(a) == 3000
    picks = a.sample_row % 3
    assert all(0.30 < np.mean(picks == c) < 0.37 for c in range(3))
    assert np.mean(a.sample_row != b.sample_row) > 0.5
    assert len(np.unique(a.sample_row // 3)) == 3000


def test_thresholds_and_unscored():
    idx = columns([
        [{"cats": [1, 2, 3], "clis": [70.0, 50.0, NAN], "clis_l": 80.0}],
        [{"cats": [1], "clis": [NAN], "clis_l": NAN}],
        [{"cats": [2, 2], "clis": [10.0, 20.0], "clis_l": 30.0}],
    ])
    r = select(idx, Selection(select="all", min_clis_i=60.0))
    assert rows(r) == [0] and r.inst_local.tolist() == [0] and r.inst_row.tolist() == [0]
    assert r.stats["dropped_min_clis_i"] == 5 and r.stats["empty_skipped"] == 2
    r = select(idx, Selection(select="all", min_clis_i=0.0))  # unscored instances pass a threshold of 0 only
    assert rows(r) == [0, 1, 2] and r.inst_local.tolist() == [0, 1, 2, 0, 0, 1]
    r = select(idx, Selection(select="all", min_clis_i=0.0, min_clis_l=50.0))
    assert rows(r) == [0]  # NaN CLIS-L fails a threshold > 0
    r = select(idx, Selection(select="all", min_clis_i=0.0, min_clis_l=0.0))
    assert rows(r) == [0, 1, 2]
    r = select(idx, Selection(select="all", min_clis_i=0.0, category_ids=(2,), categories_apply_to="instances"))
    assert rows(r) == [0, 2] and r.inst_category_id.tolist() == [2, 2, 2]
    assert r.stats["dropped_categories"] == 3
    assert r.category_ids(1).tolist() == [2, 2]


def test_max_images_deterministic_and_order_free():
    units = [three(c % 3, cats=[1 + c % 4]) for c in range(200)]
    idx = columns(units)
    sel = Selection(select="all", min_clis_i=0.0, max_images=50, seed=3)
    a, b = select(idx, sel), select(idx, sel)
    assert len(a) == 50 and a.stats["capped"] == 550 and np.array_equal(a.sample_row, b.sample_row)
    bigger = select(idx, Selection(select="all", min_clis_i=0.0, max_images=80, seed=3))
    assert set(a.sample_row.tolist()) <= set(bigger.sample_row.tolist())
    other = select(idx, Selection(select="all", min_clis_i=0.0, max_images=50, seed=4))
    assert set(a.sample_row.tolist()) != set(other.sample_row.tolist())
    # the same samples in another shard order -> the same (key, candidate) subset
    perm = list(range(100, 200)) + list(range(100))
    idx2 = columns([[{**cand, "key": 1000 + i} for cand in units[i]] for i in perm])
    c = select(idx2, sel)

    def ident(cols, res):
        kh = cols.column("key_hash")[res.sample_row]
        return {(int(k), int(ci)) for k, ci in zip(kh, cols.column("candidate_idx")[res.sample_row])}

    assert ident(idx2, c) == ident(idx, a)


def test_duplicates_and_helpers(tmp_path):
    d = tmp_path / "c"
    write_cache(d, make_categories(), n_units=5)
    r = CacheReader(d)
    one = select(r, Selection(select="all", min_clis_i=0.0))
    two = select([r, CacheReader(d)], Selection(select="all", min_clis_i=0.0))
    assert len(two) == len(one) and two.stats["duplicates"] == len(r)
    assert np.array_equal(two.cache_index, np.zeros(len(one)))
    cats = r.column("inst_category_id")
    starts = r.column("inst_start")
    pos, cids = one.sample_category_pairs()
    brute = sorted({(k, int(c)) for k, row in enumerate(one.sample_row)
                    for c in cats[starts[row]:starts[row] + r.value("inst_count", row)]})
    assert list(zip(pos.tolist(), cids.tolist())) == brute
    counts = one.category_image_counts(8)
    assert counts.tolist() == [sum(1 for _, c in brute if c == cid) for cid in range(1, 9)]


def test_selection_from_cfg():
    from acp_data.d2.config import get_acp_cfg

    cats = make_categories()
    cfg = get_acp_cfg()
    cfg.SEED = 9
    cfg.ACP.SELECT = "random"
    cfg.ACP.MAX_IMAGES = 10
    s = selection_from_cfg(cfg, cats)
    assert (s.select, s.min_clis_i, s.min_clis_l, s.max_images, s.seed) == ("random", 60.0, 0.0, 10, 9)
    assert s.category_ids == (1, 2, 3)  # default CATEGORIES = rare
    cfg.ACP.CATEGORIES = "all"
    assert selection_from_cfg(cfg, cats).category_ids is None
    cfg.ACP.CATEGORIES = "red circle,orange box"
    assert selection_from_cfg(cfg, cats).category_ids == (1, 8)
    cfg.ACP.CATEGORIES = "red circel"
    with pytest.raises(CategoryError, match="red circle"):
        selection_from_cfg(cfg, cats)
    with pytest.raises(ValueError, match="selection mode"):
        Selection(select="best")


def test_one_million_instances():
    rng = np.random.default_rng(0)
    n_units, n_cand, per = 62_500, 4, 4  # 250k samples, 1M instances
    n = n_units * n_cand
    clis = rng.uniform(0, 100, n * per)
    clis[rng.random(n * per) < 0.05] = np.nan
    selected = np.zeros(n, bool)
    selected[np.arange(n_units) * n_cand + rng.integers(0, n_cand, n_units)] = True
    idx = IndexColumns({
        "key_hash": np.repeat(rng.integers(0, 2**63, n_units, dtype=np.uint64), n_cand),
        "candidate_idx": np.tile(np.arange(n_cand, dtype=np.int32), n_units), "selected": selected,
        "clis_l": rng.uniform(0, 100, n), "inst_count": np.full(n, per, np.int32),
        "inst_category_id": rng.integers(1, 1204, n * per).astype(np.int32), "inst_clis_i": clis,
    })
    res = select(idx, Selection(select="stored", min_clis_i=60.0, min_clis_l=20.0, category_ids=tuple(range(1, 338)),
                                categories_apply_to="instances"))
    # brute force over the same columns, reshaped (every sample has `per` instances)
    keep_s = selected & (idx.column("clis_l") >= 20.0)
    ok = (clis >= 60.0) & (idx.column("inst_category_id") <= 337)
    ok = ok.reshape(n, per) & keep_s[:, None]
    expect_rows = np.flatnonzero(ok.any(1))
    assert np.array_equal(res.sample_row, expect_rows)
    assert np.array_equal(res.inst_row, np.flatnonzero(ok.reshape(-1)))
    assert np.array_equal(res.inst_local, np.flatnonzero(ok.reshape(-1)) % per)
    r2 = select(idx, Selection(select="random", min_clis_i=0.0, seed=1))
    assert len(r2) == n_units and len(np.unique(r2.sample_row // n_cand)) == n_units
    h = candidate_hash(1, idx.column("key_hash"), idx.column("candidate_idx"), salt=1).reshape(n_units, n_cand)
    assert np.array_equal(r2.sample_row % n_cand, np.argmin(h, axis=1))
