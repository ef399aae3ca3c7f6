"""Recorded selection defaults and index generations: list them, make an earlier one current (a rescore undone)."""

from __future__ import annotations

import json

import numpy as np
from cache_helpers import make_categories, write_cache

from acp_data.cache.index import list_generations, shard_scores, update_scores
from acp_data.cache.manifest import recorded_selection_defaults
from acp_data.stages import ImageScore, ImageScorer

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


def test_list_and_use_an_earlier_generation(tmp_path, capsys):
    from acp_data.cache.generations import list_cache_generations, selected_count, use_generation
    from acp_data.cache.reader import CacheReader
    from acp_data.cli import main

    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=6, n_cand=3, shard_max_samples=6, fsync=False, scoring_settings=PREBUILT)
    original = CacheReader(cache).column("selected").copy()
    assert selected_count(cache) == 6 == int(original.sum())

    _rescore_all(cache, 60.0, select=lambda sc: np.zeros_like(sc.selected))  # a rescore that selects nothing
    assert selected_count(cache) == 0
    infos = list_cache_generations(cache)
    assert [(i.generation, i.reasons, i.shards, i.in_use, i.selected) for i in infos] == [
        (0, ["write"], 3, 0, 6), (1, ["rescore"], 3, 3, 0)]
    assert "min_clis_i=20" in infos[0].settings and "min_clis_i=60" in infos[1].settings

    assert main(["generations", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "rescore" in out and "3/3" in out and "--use N" in out

    # undo the rescore from the command line: selected comes back, with the prebuild's thresholds as defaults
    assert main(["generations", str(cache), "--use", "0"]) == 0
    assert "selected: 0 -> 6 samples" in capsys.readouterr().out
    assert np.array_equal(CacheReader(cache).column("selected"), original)
    assert recorded_selection_defaults(cache).min_clis_i == 20.0
    gens = list_generations(cache)
    assert all(g == [0, 1, 2] for g in gens.values())  # nothing deleted; the undo is a new generation
    res = use_generation(cache, 1)  # and the undo can be undone
    assert (res["selected_before"], res["selected_after"]) == (6, 0)
    assert use_generation(cache, 1)["published"] == {}  # already current: nothing published

    # a generation some shard lacks is refused before anything changes, naming the shards
    assert main(["generations", str(cache), "--use", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acp-data generations: error: cannot use generation 7") and "3 shard(s)" in err
    assert list_generations(cache) == {s: [0, 1, 2, 3] for s in gens}
    assert main(["generations", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


class HalfScorer(ImageScorer):
    """Every instance scores 40 (the image 40 too): kept at a threshold of 20, dropped at 60."""

    def score(self, candidates):
        return [ImageScore(40.0, [40.0] * len(c.scene.objects)) for c in candidates]


def test_rescore_defaults_follow_the_cache_and_report_selected(tmp_path, capsys):
    from acp_data.clis.rescore import cli_main

    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=3, n_cand=2, fsync=False, scoring_settings=PREBUILT)
    assert cli_main([str(cache), "--scorer", "test_generations:HalfScorer", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)
    assert stats["selection"]["selected"] == 3 and stats["selection"]["instances_below_min_clis_i"] == 0  # 20, not 60
    assert (stats["selected_before"], stats["selected_after"]) == (3, 3)
    assert "selected 3 -> 3 samples (min_clis_i 20, min_clis_l 0)" in err and "acp-data generations" in err

    assert cli_main([str(cache), "--scorer", "test_generations:HalfScorer", "--min-clis-i", "60",
                     "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["selected_before"], stats["selected_after"]) == (3, 0)
    assert recorded_selection_defaults(cache).min_clis_i == 60.0  # the rescore's thresholds are now the cache's


def test_a_generation_for_another_shard_size_is_refused(tmp_path):
    import pytest

    from acp_data.cache.generations import list_cache_generations, use_generation
    from acp_data.cache.index import load_columns, publish_generation
    from acp_data.cache.layout import CacheError

    cache = tmp_path / "cache"
    write_cache(cache, make_categories(), n_units=2, n_cand=2, fsync=False)
    (shard,) = list_generations(cache)
    cols = load_columns(cache, shard, 0, mmap=False)
    publish_generation(cache, shard, cols, reason="verify", shard_size=1)  # as if written for another shard file
    infos = list_cache_generations(cache)
    assert [(i.generation, i.usable, i.in_use) for i in infos] == [(0, 1, 1), (1, 0, 0)]
    with pytest.raises(CacheError, match="rewritten \\(by verify\\) after generation 1"):
        use_generation(cache, 1)
    assert list_generations(cache) == {shard: [0, 1]}
