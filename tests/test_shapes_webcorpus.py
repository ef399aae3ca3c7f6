"""The judge's web corpus: deterministic from its seed, every category (so every colour and shape) in about equal
amounts, some caption noise, nothing from the world's splits; the judge variants are chosen by name."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from acp_data.shapes.judge import VARIANTS, JudgeOptions, training_instances
from acp_data.shapes.webcorpus import WebOptions, web_corpus
from acp_data.shapes.world import build_world, parse_category, world_categories

NAMES = [c.name for c in world_categories("small")]
SMALL = WebOptions(images_per_category=12)


@pytest.fixture(scope="module")
def corpus():
    return web_corpus(NAMES, seed=0, opts=SMALL)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def test_deterministic_from_its_seed(corpus):
    again = web_corpus(NAMES, seed=0, opts=SMALL)
    assert [_digest(a) for a in corpus.images] == [_digest(b) for b in again.images]
    assert np.array_equal(corpus.inst_class, again.inst_class) and np.array_equal(corpus.inst_box, again.inst_box)
    other = web_corpus(NAMES, seed=1, opts=SMALL)
    assert len({_digest(a) for a in corpus.images} & {_digest(b) for b in other.images}) == 0


def test_every_category_colour_and_shape_in_about_equal_amounts(corpus):
    assert len(corpus.images) == 12 * len(NAMES)
    counts = np.bincount(corpus.inst_class, minlength=len(NAMES))
    assert counts.min() >= 12 and counts.min() >= 0.5 * counts.max(), counts
    colours = Counter(parse_category(NAMES[c])[1] for c in corpus.inst_class.tolist())
    shapes = Counter(parse_category(NAMES[c])[0] for c in corpus.inst_class.tolist())
    assert len(colours) == 5 and min(colours.values()) >= 0.7 * max(colours.values()), colours
    assert len(shapes) == 6 and min(shapes.values()) >= 0.7 * max(shapes.values()), shapes
    # the world is long-tailed: its rare categories have 1-10 images; here "striped" is as common as "red"
    assert colours["striped"] >= 0.7 * colours["red"]
    h, w = zip(*(im.shape[:2] for im in corpus.images))
    assert min(h) >= SMALL.min_size and max(w) <= SMALL.max_size
    for i, b in zip(corpus.inst_image.tolist(), corpus.inst_box):
        hh, ww = corpus.images[i].shape[:2]
        assert 0 <= b[0] < b[2] <= ww and 0 <= b[1] < b[3] <= hh


def test_caption_noise_changes_labels_not_pictures():
    clean = web_corpus(NAMES, seed=2, opts=WebOptions(images_per_category=6, label_noise=0.0))
    noisy = web_corpus(NAMES, seed=2, opts=WebOptions(images_per_category=6, label_noise=0.3))
    assert [_digest(a) for a in clean.images] == [_digest(b) for b in noisy.images]
    wrong = float((clean.inst_class != noisy.inst_class).mean())
    assert 0.15 < wrong < 0.45, wrong
    with pytest.raises(ValueError, match="label_noise"):
        web_corpus(NAMES, opts=WebOptions(label_noise=1.0))


def test_nothing_from_the_worlds_splits(tmp_path, corpus):
    from acp_data.shapes.judge_data import load_instances

    world = build_world(tmp_path / "w", seed=0, size="small", progress=False)
    world_digests = set()
    for split in (world.train_json, world.val_json):
        world_digests |= {_digest(im) for im in load_instances(split, world.image_root).images}
    assert not world_digests & {_digest(im) for im in corpus.images}
    # the judge's training material per variant: the web corpus for the world's names, or the world's train split
    web = training_instances(world.train_json, world.image_root, JudgeOptions(web=SMALL))
    assert web.names == NAMES and [_digest(a) for a in web.images] == [_digest(b) for b in corpus.images]
    real = training_instances(world.train_json, world.image_root, JudgeOptions(variant="in_domain", web=SMALL))
    n_ann = len(json.loads(world.train_json.read_text())["annotations"])
    assert len(real.inst_class) == n_ann and {_digest(im) for im in real.images} <= world_digests


def test_judge_variants_by_name():
    assert VARIANTS == ("web", "in_domain") and JudgeOptions().variant == "web"
    JudgeOptions(variant="in_domain").validate()
    with pytest.raises(ValueError, match="judge variant 'clip'"):
        JudgeOptions(variant="clip").validate()
    from acp_data.shapes.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["judge", "--world", "x", "--out", "y", "--variant", "clip"])
