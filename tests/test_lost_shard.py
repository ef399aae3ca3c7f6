"""A lost shard can be rebuilt: resume counts a unit done only when its samples are present and intact, ``verify
--repair`` drops what is gone (whole units), and rerunning the same prebuild regenerates exactly that
(docs/cache.md "Losing a shard")."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_unit, unit_key, write_cache
from test_prebuild import _shapes_config, _shapes_lvis, write_inputs

from acp_data.cache.index import list_generations, load_columns, unit_status
from acp_data.cache.reader import CacheReader
from acp_data.cache.verify import verify_cache
from acp_data.cache.writer import CacheWriter
from acp_data.cli import main as cli
from acp_data.prebuild import run_prebuild


def _samples(cache: Path) -> dict[tuple[str, int], bytes]:
    """Every readable sample's image bytes by (key, candidate_idx); a duplicate is a test failure."""
    r = CacheReader(cache)
    out: dict[tuple[str, int], bytes] = {}
    for row in range(len(r)):
        rec, img = r.read_sample(row)
        k = (rec["key"], rec["candidate_idx"])
        assert k not in out, f"{k} stored twice"
        out[k] = img
    return out


def _break(cache: Path, delete: int, truncate: int, cut_row: int = 4) -> tuple[str, str]:
    """Delete one shard file and cut another inside the image of its sample ``cut_row`` (with 3 candidates per unit,
    row 4 leaves the shard's second unit with one intact candidate); returns their names."""
    shards = sorted((cache / "shards").glob("*.tar"))
    gone, cut = shards[delete], shards[truncate]
    gone.unlink()
    gen = list_generations(cache)[cut.stem][-1]
    os.truncate(cut, int(load_columns(cache, cut.stem, gen, ["image_offset"])["image_offset"][cut_row]) + 10)
    return gone.stem, cut.stem


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory) -> dict[str, Any]:
    # 16 units x 3 candidates, 2 units per shard: the truncated shard has a whole unit and a partly cut one
    return _shapes_config(write_inputs(tmp_path_factory.mktemp("lost_shard_inputs"), "shapes", _shapes_lvis()),
                          images_per_category=2)


def test_delete_and_truncate_then_verify_repair_and_resume_rebuild_the_cache(tmp_path, shapes_config):
    cache = tmp_path / "cache"
    first = run_prebuild(shapes_config, cache, progress=False)
    units = first["units"]["processed"]
    original = _samples(cache)
    assert first["status"] == "complete" and len(original) == 3 * units and units >= 8

    _break(cache, delete=1, truncate=2)
    st = unit_status(cache)
    assert len(st.missing_shards) == 1 and len(st.damaged_shards) == 1
    assert len(st.lost) == 2 and len(st.damaged) == 1  # the deleted shard's 2 units; 1 unit cut in part
    assert len(st.done) == units - 3

    assert cli(["verify", str(cache), "--repair"]) == 1  # something was missing or broken: said, and fixed
    assert verify_cache(cache).ok  # consistent again: no missing shard, no partial unit
    assert len(unit_status(cache).done) == units - 3

    again = run_prebuild(shapes_config, cache, progress=False)
    assert again["units"]["processed"] == 3 and again["units"]["skipped_done"] == units - 3
    rebuilt = _samples(cache)
    assert {k for k, _ in rebuilt} == {k for k, _ in original}
    assert len(rebuilt) == len(original) and rebuilt == original  # the Shapes stages are deterministic
    assert verify_cache(cache).ok


def test_resume_without_verify_regenerates_lost_units_and_holds_damaged_ones(tmp_path, caplog):
    cats = make_categories()
    cache = tmp_path / "cache"
    write_cache(cache, cats, n_units=8, shard_max_samples=6, seed=3)
    original = _samples(cache)
    gone, cut = _break(cache, delete=0, truncate=1)
    st = unit_status(cache)
    assert st.missing_shards == [gone] and st.damaged_shards == [cut]

    def resume() -> CacheWriter:
        with caplog.at_level(logging.WARNING, logger="acp_data.cache.writer"):
            with CacheWriter(cache, cats, GENERATION_SETTINGS, shard_max_samples=6) as w:
                for u in range(8):
                    if not w.is_done(unit_key(u)):
                        recs, imgs = make_unit(u, 3, cats, np.random.default_rng(u))
                        w.add_unit(recs, imgs)
        return w

    w = resume()
    assert w.damaged_keys == st.damaged and len(st.damaged) == 1 and len(st.lost) == 2
    assert w.units_written == 2  # the lost ones; the damaged one waits for verify --repair
    assert any("verify --repair" in r.getMessage() for r in caplog.records)
    st2 = unit_status(cache)  # regenerated units are done although the missing shard's index still lists them
    assert st2.missing_shards == [gone] and st.lost <= st2.done and st2.damaged == st.damaged and not st2.lost
    rep = verify_cache(cache, repair=True)
    assert rep.dropped_index == [gone] and rep.removed_units == sorted(st.damaged)
    assert len(rep.removed_with_unit) == 1 and all(p.kind == "unit" for p in rep.removed_with_unit)
    assert verify_cache(cache).ok
    w = resume()
    assert w.units_written == 1 and not w.damaged_keys
    assert set(_samples(cache)) == set(original)


def test_plain_verify_then_repair_removes_the_partial_unit(tmp_path):
    """A plain verify keeps a unit's intact candidates (and says so); a later ``--repair`` still finds the unit from
    the quarantine's records and removes it whole."""
    cache = tmp_path / "cache"
    write_cache(cache, make_categories(), n_units=8, shard_max_samples=6, seed=3)
    _break(cache, delete=3, truncate=1, cut_row=2)  # the first unit keeps two candidates
    rep = verify_cache(cache)
    assert len(rep.partial_units) == 1 and not rep.removed_units and rep.missing_shards
    assert unit_status(cache).damaged == set(rep.partial_units)  # resume will not count it done
    rep2 = verify_cache(cache, repair=True)
    assert rep2.removed_units == rep.partial_units and rep2.dropped_index == rep.missing_shards
    st = unit_status(cache)
    assert not st.damaged and not st.lost and verify_cache(cache).ok


def test_verify_output_counts_samples_and_lists_damage_first(tmp_path, capsys):
    cache = tmp_path / "cache"
    write_cache(cache, make_categories(), n_units=8, shard_max_samples=6, seed=3)
    shards = sorted((cache / "shards").glob("*.tar"))
    r = CacheReader(cache)
    info = r.shards[0]
    off = int(r.shard_columns(0, ["image_offset"])["image_offset"][1]) + 50
    with open(shards[0], "r+b") as f:  # a bit flip in the first shard's second sample
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    last = r.shards[-1]
    os.truncate(shards[-1], int(load_columns(cache, last.name, last.generation, ["image_offset"])["image_offset"][4]) + 10)
    assert cli(["verify", str(cache), "--dry-run", "--no-decode"]) == 1
    out = capsys.readouterr().out.splitlines()
    head, items = out[0], [x for x in out[1:] if x.startswith(("  BROKEN", "  EXTRA"))]
    rep = verify_cache(cache, dry_run=True, decode=False)
    n_broken = len(rep.broken_samples)
    assert n_broken == 3 and len(rep.problems) == 4  # 1 flipped + 2 cut samples; the cut tail is not a sample
    assert f"{len(r)} samples checked, {len(r) - n_broken} good, {n_broken} broken" in head
    assert "checksum" in items[0] and info.name in items[0]
    assert items[-1].startswith("  EXTRA") and "truncated" in items[-1]
    assert cli(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "acp-data verify: error:" in err and "not an acp-data cache" in err
