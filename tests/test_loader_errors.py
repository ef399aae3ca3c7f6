"""Bad ACP configurations fail when the train loader starts, with one clear message each; and the mixing world
(tiny LVIS dataset + matching cache + crop store + priors) shared by the mixing tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_TRAIN, TINY_VAL = "mix_tiny_train", "mix_tiny_val"


# ----- the mixing world (also imported by test_online.py and test_mixing_train.py) -----------------------------------
def build_mixing_world(root: Path, n_units: int = 10, n_cand: int = 2, seed: int = 0) -> dict:
    """Tiny LVIS dataset (tests/helpers.py), a cache of synthetic samples with the same six categories
    (tests/cache_helpers.py), its crop store and a priors file; returns the paths."""
    from cache_helpers import make_categories, write_cache
    from helpers import TINY_CATEGORIES, write_tiny_lvis

    from acp_data.cache.crops import build_crops
    from acp_data.priors import Priors

    root = Path(root)
    lvis = write_tiny_lvis(root / "datasets", n_images=8, n_val=3, seed=seed)
    cats = make_categories([(name, freq) for name, _, _, freq, _ in TINY_CATEGORIES])
    cache = root / "cache"
    write_cache(cache, cats, n_units=n_units, n_cand=n_cand, seed=seed, unit_kwargs={"size": (96, 128)})
    build_crops(cache)
    priors = root / "priors.npz"
    Priors.build(lvis["train_json"]).save(priors)
    return {"lvis": lvis, "datasets_root": lvis["root"], "cache": str(cache), "priors": str(priors), "cats": cats}


def world_cfg(world: dict, out_dir: Path, mode: str = "concat", **acp):
    """A tiny-model config over the world with ACP on (datasets registered under the world's root)."""
    import os

    from helpers import tiny_model_overrides

    from acp_data.d2.config import get_acp_cfg
    from acp_data.d2.lvis_format import register_lvis_format

    lvis = world["lvis"]
    register_lvis_format(TINY_TRAIN, lvis["train_json"], lvis["image_dir"])
    register_lvis_format(TINY_VAL, lvis["val_json"], lvis["image_dir"])
    cfg = get_acp_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "mask_rcnn_R18_tiny.yaml"))
    cfg.merge_from_list(tiny_model_overrides())
    cfg.DATASETS.TRAIN = (TINY_TRAIN,)
    cfg.DATASETS.TEST = (TINY_VAL,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.SEED = 7
    cfg.OUTPUT_DIR = str(out_dir)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.3
    a = cfg.ACP
    a.ENABLED = True
    a.CACHE_DIRS = [world["cache"]]
    a.CATEGORIES = "all"
    a.MIN_CLIS_I = 0.0
    a.MIX_MODE = mode
    a.PRIORS = world["priors"]
    for k, v in acp.items():
        node = a
        parts = k.split(".")
        for p in parts[:-1]:
            node = getattr(node, p)
        setattr(node, parts[-1], v)
    os.makedirs(out_dir, exist_ok=True)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_mixing_world(tmp_path_factory.mktemp("mixworld"))


# ----- errors ----------------------------------------------------------------------------------------------------------
def _build(cfg):
    from acp_data.d2.loader import build_acp_train_loader

    return build_acp_train_loader(cfg)


def test_paste_with_empty_crop_store(world, tmp_path):
    from acp_data.d2.loader import ACPLoaderError

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    shutil.rmtree(cache / "crops")
    cfg = world_cfg(world, tmp_path / "out", "paste")
    cfg.ACP.CACHE_DIRS = [str(cache)]
    with pytest.raises(ACPLoaderError, match=r"acp-data crops .*cache"):
        _build(cfg)
    # a crop store with no crop at all (built with a filter that keeps nothing)
    from acp_data.cache.crops import build_crops
    from acp_data.cache.selection import Selection

    build_crops(cache, Selection(select="all", min_clis_i=100.0))
    with pytest.raises(ACPLoaderError, match=r"crop store of .* is empty; build it with `acp-data crops"):
        _build(cfg)


@pytest.mark.parametrize("mode", ["ratio", "concat"])
def test_ratio_with_no_usable_synthetic_sample(world, tmp_path, mode):
    from acp_data.d2.loader import ACPLoaderError

    cfg = world_cfg(world, tmp_path / "out", mode, SYNTH_RATIO=0.5, MIN_CLIS_I=100.0)
    with pytest.raises(ACPLoaderError, match=r"no synthetic sample is usable.*ACP.MIN_CLIS_I = 100.0: \d+ instances "
                                             r"dropped.*images left without instances: \d+ removed"):
        _build(cfg)
    cfg = world_cfg(world, tmp_path / "out", mode, SYNTH_RATIO=0.5, SELECT="clis", MIN_CLIS_L=100.0)
    with pytest.raises(ACPLoaderError, match=r"ACP.MIN_CLIS_L = 100.0: 0 kept"):
        _build(cfg)


def test_ratio_zero_needs_no_synthetic_sample(world, tmp_path):
    cfg = world_cfg(world, tmp_path / "out", "ratio", SYNTH_RATIO=0.0, MIN_CLIS_I=100.0)
    loader = _build(cfg)
    run = json.loads((tmp_path / "out" / "acp_run.json").read_text())
    assert run["synthetic_images"] == 0 and run["effective_synthetic_fraction"] == 0.0
    batch = next(iter(loader))
    assert all((b["instances"].gt_sources == 0).all() for b in batch)


def test_mismatched_category_table(world, tmp_path):
    from cache_helpers import make_categories, write_cache

    from acp_data.d2.loader import ACPLoaderError

    other = tmp_path / "other_cache"
    write_cache(other, make_categories(), n_units=2)  # the cache helpers' own eight categories
    cfg = world_cfg(world, tmp_path / "out", "concat")
    cfg.ACP.CACHE_DIRS = [str(other)]
    with pytest.raises(ACPLoaderError) as e:
        _build(cfg)
    msg = str(e.value)
    assert f"cache manifest {other / 'manifest.json'}" in msg and f"dataset '{TINY_TRAIN}'" in msg
    assert "8 categories" in msg and "6" in msg


def test_unsupported_sampler(world, tmp_path):
    from acp_data.d2.loader import ACPLoaderError

    cfg = world_cfg(world, tmp_path / "out", "concat")
    cfg.DATALOADER.SAMPLER_TRAIN = "RandomSubsetTrainingSampler"
    with pytest.raises(ACPLoaderError, match="DATALOADER.SAMPLER_TRAIN = 'RandomSubsetTrainingSampler'"):
        _build(cfg)


def test_mixed_mask_formats_are_refused(world, tmp_path):
    from acp_data.d2.runfile import check_same_mask_format, read_mask_format

    acp_poly = tmp_path / "acp_poly"
    _build(world_cfg(world, acp_poly, "ratio", SYNTH_RATIO=0.5))
    acp_bit = tmp_path / "acp_bit"
    cfg = world_cfg(world, acp_bit, "ratio", SYNTH_RATIO=0.5)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    _build(cfg)
    assert read_mask_format(acp_poly) == "polygon" and read_mask_format(acp_bit) == "bitmask"
    # a baseline run has no acp_run.json: its format comes from detectron2's config.yaml dump
    base = tmp_path / "baseline"
    base.mkdir()
    (base / "config.yaml").write_text("INPUT:\n  MASK_FORMAT: polygon\nSEED: 7\n")
    assert check_same_mask_format([base, acp_poly]) == "polygon"
    with pytest.raises(ValueError, match=r"same INPUT.MASK_FORMAT.*baseline: polygon.*acp_bit: bitmask"):
        check_same_mask_format([base, acp_bit])
    with pytest.raises(ValueError, match="neither acp_run.json nor config.yaml"):
        check_same_mask_format([tmp_path / "nowhere"])


def test_run_record_states_counts_and_fraction(world, tmp_path):
    _build(world_cfg(world, tmp_path / "c", "concat"))
    run = json.loads((tmp_path / "c" / "acp_run.json").read_text())
    assert run["mix_mode"] == "concat" and run["mask_format"] == "polygon"
    assert run["real_images"] == 8 and run["synthetic_images"] > 0
    assert 0.0 < run["effective_synthetic_fraction"] < 1.0
    d = run["concat_repeat_factors"]
    assert d["synthetic_fraction"] == run["effective_synthetic_fraction"]
    assert set(run["real_instances_per_group"]) == {"rare", "common", "frequent"}
    _build(world_cfg(world, tmp_path / "r", "ratio", SYNTH_RATIO=0.25))
    run = json.loads((tmp_path / "r" / "acp_run.json").read_text())
    assert abs(run["effective_synthetic_fraction"] - 0.25) < 0.01


def test_check_function_reports_before_any_loader_is_built(world, tmp_path):
    from acp_data.d2.loader import ACPLoaderError, check_acp_train_data

    check_acp_train_data(world_cfg(world, tmp_path / "ok", "ratio+paste", SYNTH_RATIO=0.5))
    assert not (tmp_path / "ok" / "acp_run.json").exists()  # checks only
    cfg = world_cfg(world, tmp_path / "out", "paste", PRIORS=str(tmp_path / "missing.npz"))
    with pytest.raises(ACPLoaderError, match=r"ACP.PRIORS .*missing.npz"):
        check_acp_train_data(cfg)
    cfg = world_cfg(world, tmp_path / "out", "concat", CATEGORIES="red_disk,not_a_category")
    with pytest.raises(ACPLoaderError, match=r"ACP.CATEGORIES .*not_a_category"):
        check_acp_train_data(cfg)


# ----- the two-layer shape (detectron2's from_config + @configurable builder) ----------------------------------------
def _signature(loader, n: int = 3) -> list:
    import itertools

    return [(d["image_id"], int(d["image"].sum()), d["instances"].gt_sources.tolist(),
             d["instances"].gt_boxes.tensor.tolist()) for b in itertools.islice(iter(loader), n) for d in b]


def test_explicit_parts_build_the_same_stream_as_the_config(world, tmp_path):
    from acp_data.d2.loader import _train_loader_from_config, build_acp_train_loader
    from acp_data.d2.mapper import ACPDatasetMapper
    from acp_data.d2.sampler import RatioSampler

    cfg = world_cfg(world, tmp_path / "cfg", "ratio+paste", SYNTH_RATIO=0.5, **{"PASTE.PROB": 0.8})
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    from_cfg = _signature(build_acp_train_loader(cfg))
    parts = _train_loader_from_config(cfg)  # checks, MIX_MODE resolved once, acp_run.json written
    assert isinstance(parts["sampler"], RatioSampler) and parts["sampler"].ratio == 0.5
    assert isinstance(parts["mapper"], ACPDatasetMapper) and parts["mapper"].paste_source is not None
    assert parts["synthetic"] is not None and not parts["online"]
    assert json.loads((tmp_path / "cfg" / "acp_run.json").read_text())["mix_mode"] == "ratio+paste"
    assert _signature(build_acp_train_loader(**parts)) == from_cfg
    # a mapper given to the cfg form replaces the default one (as in detectron2's build_detection_train_loader)
    seen = []

    class Recording(ACPDatasetMapper):
        def __call__(self, dataset_dict, sample_key=None):
            seen.append(sample_key)
            return super().__call__(dataset_dict, sample_key)

    mapper = Recording(cfg, True, paste_source=parts["mapper"].paste_source)
    assert _signature(build_acp_train_loader(cfg, mapper=mapper)) == from_cfg and seen


def test_paste_mode_resolves_to_a_real_only_stream(world, tmp_path):
    from acp_data.d2.loader import MixMode, _train_loader_from_config

    cfg = world_cfg(world, tmp_path / "p", "paste", SYNTH_RATIO=0.5)
    mix = MixMode.from_cfg(cfg)
    assert (mix.images, mix.ratio, mix.paste, mix.concat) == (False, 0.0, True, False)
    parts = _train_loader_from_config(cfg)
    assert parts["synthetic"] is None and parts["sampler"].ratio == 0.0
    assert MixMode.from_cfg(world_cfg(world, tmp_path / "c", "concat", SYNTH_RATIO=0.5)).ratio == 0.0
