"""Work units: combinations from co-occurrence, determinism, balance, sharding, rank/world from the environment."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from tiny_models_gen import synthetic_lvis

from acp_data.prebuild.units import ShardError, make_units, parse_shard, rank_world_from_env, shard_units, unit_seed
from acp_data.priors import Priors


@pytest.fixture(scope="module")
def priors() -> Priors:
    return Priors.build(synthetic_lvis(), seed=0)


def test_units_balanced_deterministic_and_extendable(priors: Priors) -> None:
    cats = priors.categories
    targets = cats.select("rare")
    units = make_units(cats, targets, priors, images_per_category=6, seed=3, max_objects=4)
    assert [u.index for u in units] == list(range(len(units)))
    assert Counter(u.target for u in units) == {t: 6 for t in targets}
    # round-robin order: the first len(targets) units cover every target once
    assert sorted(u.target for u in units[:len(targets)]) == sorted(targets)
    for u in units:
        assert u.combo[0] == u.target
        assert 1 <= len(u.combo) <= 4
        assert len(set(u.combo)) == len(u.combo)
        assert all(1 <= c <= len(cats) for c in u.combo)
        assert u.seed == unit_seed(3, u.target, u.index // len(targets))
    again = make_units(cats, targets, priors, images_per_category=6, seed=3, max_objects=4)
    assert again == units
    more = make_units(cats, targets, priors, images_per_category=9, seed=3, max_objects=4)
    assert more[:len(units)] == units  # asking for more appends, never changes earlier units
    other = make_units(cats, targets, priors, images_per_category=6, seed=4, max_objects=4)
    assert [u.seed for u in other] != [u.seed for u in units]
    assert len({u.seed for u in units}) == len(units)


def test_companions_follow_cooccurrence(priors: Priors) -> None:
    cats = priors.categories
    dog = cats.id_of("dog")
    units = make_units(cats, [dog], priors, images_per_category=300, seed=0, max_objects=3)
    sizes = Counter(len(u.combo) for u in units)
    assert set(sizes) == {1, 2, 3}  # 0..max_companions companions
    comp = Counter(c for u in units for c in u.combo[1:])
    cooc = priors.cooccurrence()[dog].astype(float)
    cooc[dog] = 0
    never = [c for c in range(1, len(cats) + 1) if cooc[c] == 0 and c != dog]
    assert never and not any(comp[c] for c in never)  # only categories seen with the target
    top = int(np.argmax(cooc))
    assert comp[top] >= max(comp[c] for c in comp) * 0.5
    # a category only ever seen alone still gets companions (global fallback), never itself
    lonely = cats.id_of("lonely_rare_thing")
    lu = make_units(cats, [lonely], priors, images_per_category=40, seed=0, max_objects=3)
    assert any(len(u.combo) > 1 for u in lu)
    assert all(lonely not in u.combo[1:] for u in lu)


def test_units_without_priors_and_bad_input(priors: Priors) -> None:
    cats = priors.categories
    units = make_units(cats, [1, 2], None, images_per_category=3, seed=0)
    assert all(u.combo == (u.target,) for u in units)
    assert make_units(cats, [1], priors, 5, 0, max_objects=1) == make_units(cats, [1], priors, 5, 0, max_companions=0)
    with pytest.raises(ValueError, match="outside 1.."):
        make_units(cats, [999], priors, 1, 0)
    with pytest.raises(ValueError, match="images_per_category"):
        make_units(cats, [1], priors, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        make_units(cats, [], priors, 1, 0)
    with pytest.raises(ValueError, match="max_companions"):
        make_units(cats, [1], priors, 1, 0, max_objects=2, max_companions=3)


def test_shards_partition_units(priors: Priors) -> None:
    units = make_units(priors.categories, [1, 2, 3], priors, 7, seed=0)
    parts = [shard_units(units, r, 4) for r in range(4)]
    assert sorted(u.index for p in parts for u in p) == list(range(len(units)))
    assert all(u.index % 4 == r for r, p in enumerate(parts) for u in p)
    with pytest.raises(ShardError):
        shard_units(units, 4, 4)
    with pytest.raises(ShardError):
        shard_units(units, 0, 0)


def test_rank_world_from_env() -> None:
    assert rank_world_from_env(None, {}) == (0, 1)
    assert rank_world_from_env("2/5", {"RANK": "0", "WORLD_SIZE": "2"}) == (2, 5)  # --shard wins
    assert rank_world_from_env(None, {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == (1, 2)
    assert rank_world_from_env(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    # arrays that start at 1 and step
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert rank_world_from_env(None, env) == (2, 3)
    assert rank_world_from_env(None, {"SLURM_PROCID": "7", "SLURM_NTASKS": "8"}) == (7, 8)
    assert parse_shard(" 0/1 ") == (0, 1)
    for bad in ("3", "a/b", "4/4", "-1/3", "1/0", "1/2/3"):
        with pytest.raises(ShardError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ShardError, match="WORLD_SIZE"):
        rank_world_from_env(None, {"RANK": "0"})
    with pytest.raises(ShardError, match="not an integer"):
        rank_world_from_env(None, {"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ShardError, match="RANK=2"):
        rank_world_from_env(None, {"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ShardError, match="grid"):
        rank_world_from_env(None, {**env, "SLURM_ARRAY_TASK_ID": "4"})
