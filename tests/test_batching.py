"""Batches formed in the sampler: exact per-batch composition per rank, aspect-ratio grouping that does not depend on
the dataloader workers, concat + exact refused, and rejected synthetic samples replaced from the synthetic source."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from acp_data.d2.batching import (
    ExactBatches,
    GroupedBatches,
    SynthCounts,
    aspect_groups,
    build_batch_sampler,
    real_aspect_groups,
)
from acp_data.d2.sampler import (
    REAL,
    SYNTH,
    ConcatSampler,
    ImageCategories,
    PoolSchedule,
    RatioSampler,
    SampleRef,
    SynthPool,
    image_repeat_factors,
)

N_REAL, N_SYN = 40, 12
REAL_CATS = [[i % 5, (i * 7) % 9] for i in range(N_REAL)]
SYN_CATS = [[i % 4] for i in range(N_SYN)]
# sizes: a third of the real images are portrait, the synthetic ones half landscape, half square
REAL_WH = [(64, 48) if i % 3 else (40, 72) for i in range(N_REAL)]
SYN_WH = [(96, 64) if i % 2 else (64, 64) for i in range(N_SYN)]
REAL_G = aspect_groups([w for w, _ in REAL_WH], [h for _, h in REAL_WH])
SYN_G = aspect_groups([w for w, _ in SYN_WH], [h for _, h in SYN_WH])


def _pool():
    return SynthPool(ImageCategories.from_lists(SYN_CATS), groups=SYN_G)


def _ratio(ratio, rank=0, world=1, seed=5, sampling="class_balanced"):
    real = ImageCategories.from_lists(REAL_CATS)
    return RatioSampler(ratio=ratio, seed=seed, num_real=N_REAL, real_factors=image_repeat_factors(real, 0.3),
                        schedule=PoolSchedule(_pool()), synth_sampling=sampling, rank=rank, world_size=world)


def _group_of(ref: SampleRef) -> int:
    return int(REAL_G[ref.index] if ref.source == REAL else SYN_G[ref.index])


@pytest.mark.parametrize("grouping", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_every_batch_of_every_rank_is_exact(ratio, grouping):
    n = 120  # batches per rank
    for world in (1, 2, 4):
        for size in (1, 2, 5, 16):
            x = ratio * size
            allowed = {math.floor(x), math.ceil(x)}
            seen: set[int] = set()
            ranks = []
            for rank in range(world):
                s = ExactBatches(_ratio(ratio, rank, world), size, REAL_G if grouping else None)
                batches = list(itertools.islice(s.batches(), n))
                ks = np.array([sum(r.source == SYNTH for r in b) for b in batches])
                assert all(len(b) == size for b in batches)
                assert set(ks.tolist()) <= allowed, (world, size, rank, sorted(set(ks.tolist())))
                np.testing.assert_array_equal(ks, s.planned_counts(np.arange(n) * world + rank))
                # long run, per rank: within one image of ratio x images
                assert abs(ks.sum() - x * n) <= 1.0 + 1e-9, (world, size, rank, ks.sum(), x * n)
                positions = [r.position for b in batches for r in b]
                assert seen.isdisjoint(positions)
                seen.update(positions)
                if grouping:
                    assert all(len({_group_of(r) for r in b}) == 1 for b in batches)
                ranks.append(batches)
            # the ranks' batches are the global stream's batches r, r + W, ...
            glob = [b for _, b in itertools.islice(ExactBatches(_ratio(ratio, 0, world), size,
                                                                REAL_G if grouping else None).global_batches(),
                                                   n * world)]
            assert glob == [ranks[j % world][j // world] for j in range(n * world)]
            if ratio == 0.0:
                assert all(r.source == REAL for b in glob for r in b)
            if ratio == 1.0:
                assert all(r.source == SYNTH for b in glob for r in b)


@pytest.mark.parametrize("world", [1, 4])
def test_long_run_fraction_over_10000_batches(world):
    for ratio, size in ((0.1, 16), (0.3, 5), (1 / 3, 2)):
        counts = SynthCounts(seed=9, ratio=ratio, batch_size=size, rank=world - 1)
        ks = counts(np.arange(10_000))
        assert set(ks.tolist()) <= {math.floor(ratio * size), math.ceil(ratio * size)}
        assert abs(ks.sum() / (10_000 * size) - ratio) <= 1 / (10_000 * size) + 1e-12
    # the phase of the floor/ceil pattern comes from (SEED, rank)
    phases = {tuple(SynthCounts(seed, 0.1, 16, 0)(np.arange(5)).tolist()) for seed in range(20)}
    assert len(phases) > 1


def test_exact_keeps_the_real_stream_and_the_synthetic_policy():
    s = ExactBatches(_ratio(0.25, sampling="class_balanced"), 8)
    refs = [r for b in itertools.islice(s.batches(), 1500) for r in b]
    real = [r.index for r in refs if r.source == REAL]
    assert real == s.base.real_stream().take(len(real)).tolist()  # real images in repeat-factor order, as in ratio
    syn = np.array([r.index for r in refs if r.source == SYNTH])
    # class_balanced: each of the 4 categories 1/4 of the time, then a uniform image of that category
    cats = np.array([SYN_CATS[i][0] for i in syn])
    np.testing.assert_allclose(np.bincount(cats, minlength=4) / cats.size, 0.25, atol=0.02)
    assert [r.position for r in refs] == list(range(len(refs)))


def test_grouped_stream_is_detectron2_grouping_with_zero_workers():
    from detectron2.data.common import AspectRatioGroupedDataset

    sampler = _ratio(0.5)
    dicts = ({"ref": r, "width": (REAL_WH if r.source == REAL else SYN_WH)[r.index][0],
              "height": (REAL_WH if r.source == REAL else SYN_WH)[r.index][1]} for r in sampler)
    d2 = [[d["ref"] for d in b] for b in itertools.islice(iter(AspectRatioGroupedDataset(dicts, 4)), 300)]
    ours = list(itertools.islice(GroupedBatches(_ratio(0.5), 4, REAL_G).batches(), 300))
    assert ours == d2


class _RefDataset(torch.utils.data.Dataset):
    """Map-style dataset returning the reference asked for, with its size (what the mixed dataset resolves)."""

    def __getitem__(self, ref):
        w, h = (REAL_WH if ref.source == REAL else SYN_WH)[ref.index]
        return {"ref": tuple(ref), "width": w, "height": h}

    def __len__(self):
        return 1


def _loader_batches(sampler, workers: int, grouping: bool, n: int = 10) -> list:
    from detectron2.data import build_detection_train_loader

    loader = build_detection_train_loader(dataset=_RefDataset(), sampler=sampler, mapper=None, total_batch_size=4,
                                          aspect_ratio_grouping=grouping, num_workers=workers)
    return [[d["ref"] for d in b] for b in itertools.islice(iter(loader), n)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("composition", ["stream", "exact"])
def test_grouped_batches_are_the_same_with_0_1_4_workers(composition):
    streams = []
    for workers in (0, 1, 4):
        batches = build_batch_sampler(_ratio(0.3), composition=composition, batch_size=4, real_groups=REAL_G)
        streams.append(_loader_batches(batches, workers, grouping=False))
    assert streams[0] == streams[1] == streams[2]
    assert all(len({_group_of(SampleRef(*r)) for r in b}) == 1 for b in streams[0])
    if composition == "exact":
        assert [sum(r[1] == SYNTH for r in b) for b in streams[0]] == \
            ExactBatches(_ratio(0.3), 4).planned_counts(np.arange(10)).tolist()


def test_detectron2_grouping_after_the_workers_depends_on_the_worker_count():
    """Why grouping moved into the sampler: the same sampler grouped by detectron2 gives other batches with 2
    workers than with 0."""
    zero = _loader_batches(_ratio(0.3), 0, grouping=True)
    two = _loader_batches(_ratio(0.3), 2, grouping=True)
    assert zero != two


def test_build_batch_sampler_choices_and_refusals():
    plain = _ratio(0.5)
    assert build_batch_sampler(plain, composition="stream", batch_size=4, real_groups=None) is plain
    with pytest.raises(ValueError, match="BATCH_COMPOSITION"):
        build_batch_sampler(plain, composition="exactly", batch_size=4, real_groups=None)
    real = ImageCategories.from_lists(REAL_CATS)
    concat = ConcatSampler(real_categories=real, repeat_thresh=0.3, seed=5, num_real=N_REAL,
                           real_factors=image_repeat_factors(real, 0.3), schedule=PoolSchedule(_pool()), rank=0,
                           world_size=1)
    with pytest.raises(ValueError, match="exact.*concat"):
        build_batch_sampler(concat, composition="exact", batch_size=4, real_groups=None)
    assert isinstance(build_batch_sampler(concat, composition="stream", batch_size=4, real_groups=REAL_G),
                      GroupedBatches)
    no_sizes = RatioSampler(ratio=0.5, seed=5, num_real=N_REAL, real_factors=None,
                            schedule=PoolSchedule(SynthPool(ImageCategories.from_lists(SYN_CATS))), rank=0,
                            world_size=1)
    with pytest.raises(ValueError, match="synthetic images' sizes"):
        next(iter(GroupedBatches(no_sizes, 4, REAL_G)))
    with pytest.raises(ValueError, match="'width' and 'height'"):
        real_aspect_groups([{"file_name": "a.jpg", "width": 3, "height": 2}, {"file_name": "b.jpg"}])


def test_concat_with_exact_is_refused_by_the_config():
    from acp_data.d2.config import ConfigError, get_acp_cfg, validate_acp_config

    cfg = get_acp_cfg()
    cfg.SEED, cfg.ACP.ENABLED, cfg.ACP.CACHE_DIRS = 1, True, ["cache"]
    cfg.ACP.MIX_MODE, cfg.ACP.BATCH_COMPOSITION = "concat", "exact"
    with pytest.raises(ConfigError, match=r"ACP\.BATCH_COMPOSITION = 'exact'.*ACP\.MIX_MODE = 'concat'"):
        validate_acp_config(cfg)
    cfg.ACP.MIX_MODE = "ratio+paste"
    cfg.ACP.PASTE.SCALE_FROM_PRIORS = False
    validate_acp_config(cfg)
    cfg.ACP.BATCH_COMPOSITION = "per-batch"
    with pytest.raises(ConfigError, match="ACP.BATCH_COMPOSITION"):
        validate_acp_config(cfg)


def test_group_pool_holds_one_aspect_group():
    pool = _pool()
    sub, rows = pool.group_pool(0)
    assert rows.tolist() == [i for i in range(N_SYN) if SYN_G[i] == 0]
    assert [sub.categories.of(j).tolist() for j in range(len(sub))] == [SYN_CATS[i] for i in rows]
    picks = rows[sub.pick("class_balanced", 3, np.arange(500))]
    assert (SYN_G[picks] == 0).all()


# ----- the loader: a rejected synthetic sample is replaced from the synthetic source -----------------------------------
def _real_dicts():
    return [{"file_name": f"r{i}.jpg", "image_id": i, "width": w, "height": h, "src": "real"}
            for i, (w, h) in enumerate(REAL_WH)]


def _synth_dicts():
    return [{"file_name": f"acp://s{i}", "image_id": 1000 + i, "width": w, "height": h, "src": "synthetic"}
            for i, (w, h) in enumerate(SYN_WH)]


class _RejectingMapper:
    """Rejects (returns None for) the synthetic images ``bad``; records the sample key of every call."""

    def __init__(self, bad):
        self.bad = set(bad)

    def __call__(self, record, sample_key=None):
        if record["src"] == "synthetic" and record["image_id"] - 1000 in self.bad:
            return None
        return {**record, "key": sample_key}


@pytest.mark.parametrize("grouping", [False, True])
def test_rejected_synthetic_sample_is_replaced_from_the_synthetic_source(grouping):
    from acp_data.d2.loader import StaticVersions, build_acp_train_loader

    bad = {0, 1, 2, 5}
    batches = {}
    for workers in (0, 2):
        loader = build_acp_train_loader(_real_dicts(), synthetic=StaticVersions(_synth_dicts()),
                                        sampler=_ratio(0.4, sampling="uniform"), mapper=_RejectingMapper(bad),
                                        total_batch_size=5, aspect_ratio_grouping=grouping, num_workers=workers,
                                        batch_composition="exact")
        batches[workers] = list(itertools.islice(iter(loader), 40))
    assert [[d["image_id"] for d in b] for b in batches[0]] == [[d["image_id"] for d in b] for b in batches[2]]
    planned = ExactBatches(_ratio(0.4), 5).planned_counts(np.arange(40)).tolist()
    got = [sum(d["src"] == "synthetic" for d in b) for b in batches[0]]
    assert got == planned and set(got) == {2}
    used = {d["image_id"] - 1000 for b in batches[0] for d in b if d["src"] == "synthetic"}
    assert used and used.isdisjoint(bad)
    if grouping:
        for b in batches[0]:
            assert len({int(d["width"] > d["height"]) for d in b}) == 1
    # the stream did ask for the bad images: they were replaced, not avoided
    asked = ExactBatches(_ratio(0.4, sampling="uniform"), 5, REAL_G if grouping else None)
    assert {r.index for b in itertools.islice(asked.batches(), 40) for r in b if r.source == SYNTH} & bad


# ----- from the config ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_loader_errors import build_mixing_world

    return build_mixing_world(tmp_path_factory.mktemp("batchworld"), n_units=6)


def test_exact_from_the_config(world, tmp_path):
    import json

    from test_loader_errors import world_cfg

    from acp_data.d2.loader import ACPLoaderError, build_acp_train_loader

    cfg = world_cfg(world, tmp_path / "exact", "ratio", SYNTH_RATIO=0.25, BATCH_COMPOSITION="exact")
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
    batches = list(itertools.islice(iter(build_acp_train_loader(cfg)), 6))
    # synthetic images carry gt_sources 2 (and keep at least one instance); one per batch of 4 at ratio 0.25
    assert [sum(2 in d["instances"].gt_sources.tolist() for d in b) for b in batches] == [1] * 6
    run = json.loads((tmp_path / "exact" / "acp_run.json").read_text())
    assert run["batch_composition"] == "exact" and run["effective_synthetic_fraction"] == 0.25
    bad = world_cfg(world, tmp_path / "concat", "concat", BATCH_COMPOSITION="exact")
    with pytest.raises(ACPLoaderError, match=r"ACP\.BATCH_COMPOSITION.*ACP\.MIX_MODE = 'concat'"):
        build_acp_train_loader(bad)
