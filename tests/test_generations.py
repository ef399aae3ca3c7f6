"""Recorded selection defaults and index generations: list them, make an earlier one current (a rescore undone)."""

from __future__ import annotations

import numpy as np
from cache_helpers import make_categories, write_cache

from acp_data.cache.index import list_generations, shard_scores, update_scores
from acp_data.cache.manifest import recorded_selection_defaults

PREBUILT = {"selection": {"min_clis_i": 20, "min_clis_l": 0}}


def _rescore_all(cache, min_clis_i, select=lambda sc: ~sc.selected):
    """A stand-in rescore: flips `selected` and records its thresholds, as `acp-data rescore` does."""
    for shard in sorted(list_generations(cache)):
        sc = shard_scores(cache, shard)
        sc.selected[:] = select(sc)
        update_scores(cache, sc, scoring={"rescore_id": "t", "selection": {"min_clis_i": min_clis_i,
                                                                           "min_clis_l": 0.0}})


def test_defaults_follow_the_cache(tmp_path):
    cats = make_categories()
    write_cache(tmp_path / "none", cats, n_units=2, fsync=False)
    d = recorded_selection_defaults(tmp_path / "none")
    assert (d.min_clis_i, d.min_clis_l) == (60.0, 0.0) and "defaults" in d.source

    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=4, n_cand=2, shard_max_samples=4, fsync=False, scoring_settings=PREBUILT)
    d = recorded_selection_defaults(cache)
    assert d.as_dict() == {"min_clis_i": 20.0, "min_clis_l": 0.0} and "manifest.json" in d.source

    _rescore_all(cache, 35.0)
    d = recorded_selection_defaults(cache)
    assert d.min_clis_i == 35.0 and "rescore" in d.source

    # an interrupted rescore (shards disagree) falls back to the prebuild's settings
    first = sorted(list_generations(cache))[0]
    sc = shard_scores(cache, first)
    update_scores(cache, sc, scoring={"selection": {"min_clis_i": 50.0, "min_clis_l": 0.0}})
    assert recorded_selection_defaults(cache).min_clis_i == 20.0
    assert np.isfinite(recorded_selection_defaults(cache).min_clis_l)
