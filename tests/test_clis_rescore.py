"""`acp-data rescore`: new scores and `selected` in a new index generation, images untouched, resumable."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from cache_helpers import make_categories, write_cache
from tiny_models import make_tiny_open_clip

from acp_data.cache.index import list_generations, read_meta
from acp_data.cache.reader import CacheReader, decode_image
from acp_data.clis.image import ClipScorer
from acp_data.clis.rescore import candidate_from_record, cli_main, rescore_cache
from acp_data.clis.select import select_unit
from acp_data.stages import ImageScorer, StageContext


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


def _shard_digests(cache):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((cache / "shards").glob("*.tar"))}


def _by_unit(reader):
    units = {}
    for row in range(len(reader)):
        rec = reader.read_record(row)
        units.setdefault(rec["key"], []).append((rec["candidate_idx"], row, rec))
    return {k: sorted(v) for k, v in units.items()}


class Flaky(ImageScorer):
    """Delegates to a scorer (same settings, so the same rescore id) and fails on call number ``fail_at``."""

    def __init__(self, inner, fail_at):
        super().__init__(inner.ctx)
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def settings(self):
        return self.inner.settings()

    def score(self, candidates):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.score(candidates)


def test_rescore_scores_selection_images_and_resume(tmp_path, tiny_clip):
    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=4, n_cand=3, shard_max_samples=6, fsync=False)
    assert len(list_generations(cache)) == 2
    before = CacheReader(cache)
    images = [before.read_image_bytes(r) for r in range(len(before))]
    digests = _shard_digests(cache)

    scorer = ClipScorer(StageContext(cats), model=tiny_clip)
    stats = rescore_cache(cache, scorer, min_clis_i=5.0, units_per_batch=3, progress=False)
    assert (stats["shards_rescored"], stats["units"], stats["candidates"]) == (2, 4, 12)
    assert stats["unmatched_instances"] == 0

    after = CacheReader(cache)
    assert _shard_digests(cache) == digests  # shards untouched
    assert [after.read_image_bytes(r) for r in range(len(after))] == images
    for shard, gens in list_generations(cache).items():
        meta = read_meta(cache, shard, gens[-1])
        assert meta["reason"] == "rescore" and meta["scoring"]["rescore_id"] == stats["rescore_id"]
    clis_i, selected = after.column("clis_i"), after.column("selected")
    inst_clis_i, inst_start = after.column("inst_clis_i"), after.column("inst_start")
    for _key, cands in _by_unit(after).items():
        built = [candidate_from_record(rec, decode_image(after.read_image_bytes(row))) for _, row, rec in cands]
        expect = scorer.score([c for c, _ in built])  # the same scorer, one unit at a time
        rows = [row for _, row, _ in cands]
        np.testing.assert_allclose(clis_i[rows], [e.image for e in expect], atol=1e-4)
        for (_, obj_of), e, row, (_, _, rec) in zip(built, expect, rows, cands):
            got = inst_clis_i[inst_start[row]:inst_start[row] + len(obj_of)]
            np.testing.assert_allclose(got, [e.instances[o] for o in obj_of], atol=1e-4)
            assert rec["clis_i"] == pytest.approx(clis_i[row])  # records read back carry the new scores
        res = select_unit([float(clis_i[r]) for r in rows], [float(after.column("clis_l")[r]) for r in rows],
                          [list(e.instances) for e in expect], min_clis_i=5.0)
        assert [bool(selected[r]) for r in rows] == [i == res.selected_idx for i in range(len(rows))]

    # the same rescore again: nothing to do; --force redoes it
    again = rescore_cache(cache, scorer, min_clis_i=5.0, progress=False)
    assert (again["shards_skipped"], again["shards_rescored"]) == (2, 0)
    n_gens = {s: len(g) for s, g in list_generations(cache).items()}
    forced = rescore_cache(cache, scorer, min_clis_i=5.0, force=True, progress=False)
    assert forced["shards_rescored"] == 2
    assert all(len(g) == n_gens[s] + 1 for s, g in list_generations(cache).items())


def test_interrupted_rescore_resumes(tmp_path, tiny_clip):
    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=4, n_cand=2, shard_max_samples=4, fsync=False)
    scorer = ClipScorer(StageContext(cats), model=tiny_clip, global_negatives=4)
    flaky = Flaky(scorer, fail_at=3)  # one unit per call: dies on the first unit of the second shard
    with pytest.raises(KeyboardInterrupt):
        rescore_cache(cache, flaky, units_per_batch=1, progress=False)
    reasons = sorted(read_meta(cache, s, g[-1])["reason"] for s, g in list_generations(cache).items())
    assert reasons == ["rescore", "write"]  # the finished shard is published, the other keeps its generation
    resumed = rescore_cache(cache, Flaky(scorer, fail_at=0), units_per_batch=1, progress=False)
    assert (resumed["shards_skipped"], resumed["shards_rescored"]) == (1, 1)


def test_cli(tmp_path, tiny_clip, capsys):
    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=2, n_cand=2, fsync=False)
    rc = cli_main([str(cache), "--scorer", "clip", "--set", f"model={tiny_clip}", "--set", "global_negatives=3",
                   "--min-clis-i", "10", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == 4 and out["shards_rescored"] == 1
    assert cli_main([str(cache), "--scorer", "clip", "--set", "modle=x", "--no-progress"]) == 2
    assert "unknown options" in capsys.readouterr().err
