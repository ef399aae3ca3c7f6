"""Counter-based mix samplers: ratio fractions, concat repeat factors, rank/worker invariance, determinism."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from acp_data.d2.sampler import (
    REAL,
    SYNTH,
    ConcatSampler,
    EpochStream,
    ImageCategories,
    PoolSchedule,
    RatioSampler,
    SampleRef,
    SynthPool,
    describe_concat_factors,
    image_repeat_factors,
    take_stream,
)
from acp_data.rng import derive_key, uniform, uniform_scalar

REAL_CATS = [[0, 1], [1], [1, 2], [2], [2], [2, 3], [3], [3], [3], [3]]
SYN_CATS = [[0], [0, 4], [4], [1]]


def _ratio(ratio=0.5, seed=3, rank=0, world=1, sampling="uniform", thresh=0.0):
    real = ImageCategories.from_lists(REAL_CATS)
    return RatioSampler(ratio=ratio, seed=seed, num_real=len(real), real_factors=image_repeat_factors(real, thresh),
                        schedule=PoolSchedule(SynthPool(ImageCategories.from_lists(SYN_CATS))),
                        synth_sampling=sampling, rank=rank, world_size=world)


def _concat(seed=3, rank=0, world=1, thresh=0.3):
    real = ImageCategories.from_lists(REAL_CATS)
    return ConcatSampler(real_categories=real, repeat_thresh=thresh, seed=seed, num_real=len(real),
                         real_factors=image_repeat_factors(real, thresh),
                         schedule=PoolSchedule(SynthPool(ImageCategories.from_lists(SYN_CATS))),
                         rank=rank, world_size=world)


def _worker_slice(stream, worker, num_workers, chunk):
    """What detectron2's ToIterableDataset gives one dataloader worker (chunks of ``chunk`` round robin)."""
    it = iter(stream)
    while True:
        block = list(itertools.islice(it, chunk * num_workers))
        if len(block) < chunk * num_workers:
            return
        yield from block[worker * chunk:(worker + 1) * chunk]


def test_hash_is_counter_based_and_uniform():
    k = derive_key(7, 1)
    u = uniform(k, np.arange(200_000))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    np.testing.assert_array_equal(u[[5, 17, 123_456]], uniform(k, [5, 17, 123_456]))
    assert uniform_scalar(k, 17) == u[17]
    assert derive_key(7, 1) != derive_key(1, 7) and derive_key(7, 1, 0) != derive_key(7, 1)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
def test_ratio_fraction_per_rank_and_per_worker(ratio):
    n = 10_000
    for rank in range(2):
        refs = take_stream(_ratio(ratio, rank=rank, world=2), 2 * n)
        srcs = np.array([r.source for r in refs])
        assert abs(srcs[:n].mean() - ratio) <= 0.01, (rank, srcs[:n].mean())
        for w in range(2):
            ws = np.array([r.source for r in _worker_slice(refs, w, 2, chunk=4)])
            assert len(ws) == n
            assert abs(ws.mean() - ratio) <= 0.01, (rank, w, ws.mean())
        if ratio == 0.0:
            assert (srcs == REAL).all()
        if ratio == 1.0:
            assert (srcs == SYNTH).all()


def test_ratio_deviation_is_binomial_over_seeds():
    """The per-rank fraction behaves like independent draws (|deviation| < 4 sigma) whatever the seed."""
    n, r = 10_000, 0.3
    sigma = math.sqrt(r * (1 - r) / n)
    for seed in range(5):
        srcs = np.array([x.source for x in take_stream(_ratio(r, seed=seed, rank=1, world=2), n)])
        assert abs(srcs.mean() - r) < 4 * sigma


def test_ratio_real_positions_follow_repeat_factors():
    thresh = 0.3
    s = _ratio(0.25, thresh=thresh)
    refs = take_stream(s, 40_000)
    real = np.array([r.index for r in refs if r.source == REAL])
    factors = image_repeat_factors(ImageCategories.from_lists(REAL_CATS), thresh)
    expected = factors / factors.sum()
    observed = np.bincount(real, minlength=len(REAL_CATS)) / real.size
    np.testing.assert_allclose(observed, expected, atol=0.01)
    assert factors.max() > 1.0  # the test exercises repeats


def test_class_balanced_picks_categories_uniformly():
    refs = take_stream(_ratio(1.0, sampling="class_balanced"), 30_000)
    idx = np.array([r.index for r in refs])
    # categories 0, 1, 4 are present; each is drawn 1/3 of the time, then an image containing it uniformly
    # image 0: cat 0 (1/2 of cat-0 draws); image 1: cats 0 and 4 (1/2 + 1/2); image 2: cat 4; image 3: cat 1
    expected = np.array([1 / 6, 1 / 6 + 1 / 6, 1 / 6, 1 / 3])
    np.testing.assert_allclose(np.bincount(idx, minlength=4) / idx.size, expected, atol=0.01)
    uni = np.array([r.index for r in take_stream(_ratio(1.0, sampling="uniform"), 30_000)])
    np.testing.assert_allclose(np.bincount(uni, minlength=4) / uni.size, 0.25, atol=0.01)


def test_concat_repeat_factors_by_hand():
    # union of 10 real + 4 synthetic images = 14 images, t = 0.3, r(c) = max(1, sqrt(t / f(c)))
    # image counts on the union: c0: 3 (real 0, syn 0, syn 1), c1: 4, c2: 4, c3: 5, c4: 2
    t, n = 0.3, 14
    rc = {0: math.sqrt(t / (3 / n)), 1: math.sqrt(t / (4 / n)), 2: math.sqrt(t / (4 / n)),
          3: max(1.0, math.sqrt(t / (5 / n))), 4: math.sqrt(t / (2 / n))}
    assert rc[3] == 1.0 and rc[4] > rc[0] > rc[1]
    expected = [max(rc[c] for c in cats) for cats in REAL_CATS + SYN_CATS]
    s = _concat(thresh=t)
    got = s.union_factors(s.schedule.pool_at(0)[1])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # and against detectron2's own computation on the same union
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    dicts = [{"annotations": [{"category_id": c} for c in cats]} for cats in REAL_CATS + SYN_CATS]
    d2 = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t).numpy()
    np.testing.assert_allclose(got, d2, rtol=1e-6)
    # synthetic images lower the real images' factors of the categories they contain (c0: real-only 1 of 10)
    real_only = image_repeat_factors(ImageCategories.from_lists(REAL_CATS), t)
    assert got[0] < real_only[0]
    desc = describe_concat_factors(ImageCategories.from_lists(REAL_CATS), ImageCategories.from_lists(SYN_CATS), t)
    assert math.isclose(desc["synthetic_fraction"], sum(expected[10:]) / sum(expected))
    # the stream visits each image in proportion to its factor
    refs = take_stream(s, 60_000)
    union_idx = np.array([r.index + (10 if r.source == SYNTH else 0) for r in refs])
    observed = np.bincount(union_idx, minlength=14) / union_idx.size
    np.testing.assert_allclose(observed, np.array(expected) / sum(expected), atol=0.005)


def test_epoch_stream_without_repeats_is_a_permutation_per_epoch():
    es = EpochStream(np.ones(37), key=5)
    for _ in range(3):
        assert sorted(es.take(37).tolist()) == list(range(37))
    es2 = EpochStream(np.array([1.0, 2.0, 1.5]), key=5)
    counts = np.bincount(es2.take(4500), minlength=3)  # ~1000 epochs of 4.5 items
    np.testing.assert_allclose(counts / counts.sum(), np.array([1.0, 2.0, 1.5]) / 4.5, atol=0.02)


@pytest.mark.parametrize("make", [_ratio, _concat])
def test_two_ranks_are_disjoint_and_interleave_to_the_one_rank_stream(make):
    n = 3000
    one = take_stream(make(rank=0, world=1), 2 * n)
    r0 = take_stream(make(rank=0, world=2), n)
    r1 = take_stream(make(rank=1, world=2), n)
    assert {r.position for r in r0}.isdisjoint({r.position for r in r1})
    assert [x for pair in zip(r0, r1) for x in pair] == one
    assert [r.position for r in one] == list(range(2 * n))


@pytest.mark.parametrize("make", [_ratio, _concat])
def test_same_seed_same_stream(make):
    a, b = take_stream(make(seed=11), 5000), take_stream(make(seed=11), 5000)
    assert a == b
    assert take_stream(make(seed=12), 5000) != a


def test_replacement_keeps_source_and_is_deterministic():
    s = _ratio(0.5, sampling="class_balanced")
    for ref in take_stream(s, 200):
        reps = [s.replacement(ref, k) for k in (1, 2, 3)]
        assert reps == [s.replacement(ref, k) for k in (1, 2, 3)]
        assert all(x.source == ref.source and x.position == ref.position for x in reps)
        bound = len(REAL_CATS) if ref.source == REAL else len(SYN_CATS)
        assert all(0 <= x.index < bound for x in reps)
    assert len({s.replacement(SampleRef(5, REAL, 0, 0), k).index for k in range(1, 60)}) > 3


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="seed"):
        RatioSampler(ratio=0.5, seed=-1, num_real=1, real_factors=None,
                     schedule=PoolSchedule(SynthPool(ImageCategories.from_lists([[0]]))), rank=0, world_size=1)
    with pytest.raises(ValueError, match="SYNTH_RATIO"):
        _ratio(1.5)


class _RefDataset(torch.utils.data.Dataset):
    """A map-style dataset whose item records the reference it was asked for (as the mixed dataset resolves it)."""

    def __getitem__(self, ref):
        return {"ref": tuple(ref), "width": 10, "height": 8}

    def __len__(self):  # never consulted by the sampler path
        return 1


@pytest.mark.parametrize("make", [_ratio, _concat])
def test_zero_one_two_workers_give_the_same_stream(make):
    from detectron2.data import build_detection_train_loader

    streams = []
    for workers in (0, 1, 2):
        loader = build_detection_train_loader(dataset=_RefDataset(), sampler=make(rank=0, world=1), mapper=None,
                                              total_batch_size=4, aspect_ratio_grouping=False,
                                              num_workers=workers)
        batches = list(itertools.islice(iter(loader), 12))
        streams.append([d["ref"] for b in batches for d in b])
    assert streams[0] == streams[1] == streams[2]
    assert [r[0] for r in streams[0]] == list(range(48))


def test_epoch_stream_refuses_factors_below_one():
    # factors >= 1 are what make every epoch non-empty (each image at least once)
    for bad in ([1.0, 0.5], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="repeat factors must be >= 1"):
            EpochStream(np.array(bad), key=5)
