"""ACP.ONLINE: a shard closed during a run is used from its snapshot's position on; the recorded snapshots replay the
same stream."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import numpy as np
import pytest
from test_loader_errors import build_mixing_world, world_cfg

from acp_data.d2.online import (
    OnlineError,
    Snapshot,
    SnapshotStore,
    boundary,
    online_lag_iters,
)

REFRESH, BATCH = 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_mixing_world(tmp_path_factory.mktemp("onlineworld"), n_units=6)


def _cfg(world, cache, out):
    cfg = world_cfg(world, out, "ratio", SYNTH_RATIO=1.0, ONLINE=True, ONLINE_REFRESH_ITERS=REFRESH)
    cfg.ACP.CACHE_DIRS = [str(cache)]
    cfg.SOLVER.IMS_PER_BATCH = BATCH
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False  # batch i holds positions [i * BATCH, (i + 1) * BATCH)
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _new_shard_ids(written) -> set[int]:
    from acp_data.cache.index import key_hash
    from acp_data.cache.selection import stable_image_id

    ids = set()
    for key, records in written.items():
        for r in records:
            ids.add(int(stable_image_id(key_hash([key])[0], r["candidate_idx"])[0]))
    return ids


def _signature(batch):
    return [(d["image_id"], d["instances"].gt_classes.tolist(), d["instances"].gt_boxes.tensor.round().tolist())
            for d in batch]


def test_shard_closed_during_run_is_used_from_published_position_and_replays(world, tmp_path, monkeypatch, caplog):
    from cache_helpers import write_cache

    from acp_data.d2.loader import build_acp_train_loader
    from acp_data.d2.online import REPLAY_ENV

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    out = tmp_path / "out"
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="acp_data.d2.online")
    loader = build_acp_train_loader(_cfg(world, cache, out))
    run_dir = out / "acp_online" / "run-000"
    assert (run_dir / "snapshot-000000.json").is_file()

    lag = online_lag_iters(0)
    b1 = boundary(1, REFRESH, lag, BATCH)
    n_batches = b1 // BATCH + 12
    it = iter(loader)
    batches = [next(it)]
    # a running prebuild closes a new shard while training runs
    written = write_cache(cache, world["cats"], n_units=6, n_cand=2, seed=5, first_unit=100,
                          unit_kwargs={"size": (96, 128)})
    new_ids = _new_shard_ids(written)
    batches += [next(it) for _ in range(n_batches - 1)]

    snap1 = json.loads((run_dir / "snapshot-000001.json").read_text())
    assert snap1["apply_from"] == b1 and len(snap1["shards"]) == 2
    snap0 = json.loads((run_dir / "snapshot-000000.json").read_text())
    assert len(snap0["shards"]) == 1 and snap1["num_samples"] > snap0["num_samples"]
    assert any("1 new shards" in r.getMessage() and "synthetic samples" in r.getMessage() for r in caplog.records)

    ids_by_pos = [d["image_id"] for b in batches for d in b]
    assert not new_ids & set(ids_by_pos[:b1])  # never before the published position
    assert new_ids & set(ids_by_pos[b1:])  # used after it
    assert all(d["instances"].gt_sources.eq(2).all() for b in batches for d in b)

    # replay: the recorded snapshots give the same stream, without waiting for anything
    monkeypatch.setenv(REPLAY_ENV, str(run_dir))
    replay = build_acp_train_loader(_cfg(world, cache, tmp_path / "replay"))
    again = list(itertools.islice(iter(replay), n_batches))
    assert [_signature(b) for b in again] == [_signature(b) for b in batches]
    assert not (tmp_path / "replay" / "acp_online").exists()  # a replay publishes nothing


def test_snapshot_store_and_schedule_boundaries(tmp_path):
    from acp_data.d2.online import OnlineSchedule, SyntheticVersions
    from acp_data.d2.sampler import ImageCategories, SynthPool

    store = SnapshotStore(tmp_path / "run")
    pools = {}

    def build(shards):
        return shards

    def pool_of(shards):
        pools[shards] = SynthPool(ImageCategories.from_lists([[0]] * (len(shards) + 1)))
        return pools[shards]

    versions = SyntheticVersions(build, pool_of)
    lag, r, t = 3, 5, 4
    a, b = ("c", "s0", 0), ("c", "s1", 0)
    store.write(Snapshot(0, 0, (a,)))
    store.write(Snapshot(1, boundary(1, r, lag, t), (a, b)))
    with pytest.raises(OnlineError, match="already exists"):
        store.write(Snapshot(1, boundary(1, r, lag, t), (a, b)))
    live = OnlineSchedule(store, versions, refresh_iters=r, lag_iters=lag, total_batch_size=t, replay=False)
    b1, b2 = boundary(1, r, lag, t), boundary(2, r, lag, t)
    assert (b1, b2) == ((5 + 3) * 4, (10 + 3) * 4)
    assert live.boundary_after(0) == b1 and live.boundary_after(b1 - 1) == b1 and live.boundary_after(b1) == b2
    assert live.pool_at(b1 - 1)[0] == 0 and live.pool_at(b1)[0] == 1 and len(live.pool_at(b1)[1]) == 3
    assert store.read(2, wait=False) is None
    replay = OnlineSchedule(store, versions, refresh_iters=r, lag_iters=lag, total_batch_size=t, replay=True)
    assert replay.boundary_after(b1) is None and replay.pool_at(10 ** 9)[0] == 1
    # a snapshot published with other settings than the reader's is refused
    other = OnlineSchedule(store, versions, refresh_iters=r + 1, lag_iters=lag, total_batch_size=t, replay=False)
    with pytest.raises(OnlineError, match="applies from"):
        other.pool_at(boundary(1, r + 1, lag, t))
    (tmp_path / "run" / "snapshot-000005.json").write_text(json.dumps(Snapshot(5, 10 ** 6, (a,)).to_dict()))
    with pytest.raises(OnlineError, match="not numbered"):
        store.recorded()


def test_boundary_is_after_everything_the_pipeline_can_have_sampled():
    """The lag exceeds the pipeline's lead: aspect buckets (2 batches) plus prefetching (2 per worker) per rank."""
    for workers in (0, 1, 2, 8):
        lag = online_lag_iters(workers)
        for k in (1, 2, 7):
            published_at = k * REFRESH  # iteration at which rank 0 publishes snapshot k
            lead = 2 + 2 * max(workers, 1) + 1  # batches the pipeline can hold beyond the one being trained on
            assert boundary(k, REFRESH, lag, BATCH) >= (published_at + lead) * BATCH
    assert np.all(np.diff([boundary(k, REFRESH, 6, BATCH) for k in range(6)]) > 0)
