"""ACP config keys: defaults load, every bad value is rejected naming the key, the shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from acp_data.d2.config import ConfigError, add_acp_config, get_acp_cfg, validate_acp_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def acp_on(**changes):
    """Default config with ACP on (a cache listed, fixed seed) and ``KEY=value`` changes (``__`` for dots)."""
    cfg = get_acp_cfg()
    cfg.merge_from_list(["ACP.ENABLED", "True", "ACP.CACHE_DIRS", "['cache']", "SEED", "7"])
    for k, v in changes.items():
        *parents, leaf = k.split("__")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, v)
    return cfg


def test_defaults_load_and_validate():
    from detectron2.config import get_cfg

    cfg = add_acp_config(get_cfg())
    validate_acp_config(cfg)
    assert cfg.ACP.ENABLED is False
    assert cfg.ACP.MIX_MODE == "concat" and cfg.ACP.SELECT == "clis" and cfg.ACP.MIN_CLIS_I == 60.0
    for key in ("CACHE_DIRS", "CATEGORIES", "PRIORS", "SELECT", "MIN_CLIS_I", "MIN_CLIS_L", "MAX_IMAGES", "BOX",
                "MIX_MODE", "SYNTH_RATIO", "SYNTH_SAMPLING", "PASTE", "ONLINE", "ONLINE_REFRESH_ITERS",
                "REGISTER_LVIS"):
        assert key in cfg.ACP, key
    for key in ("PROB", "MAX_INSTANCES", "SCALE_FROM_PRIORS", "SCALE_RANGE", "ASPECT_JITTER", "MIN_VISIBLE_FRAC",
                "MIN_VISIBLE_PIXELS"):
        assert key in cfg.ACP.PASTE, key
    validate_acp_config(acp_on())  # the defaults are a valid ACP recipe once a cache and a seed are given


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"ACP__SYNTH_RATIO": 1.5}, "ACP.SYNTH_RATIO"),
        ({"ACP__SYNTH_RATIO": -0.1}, "ACP.SYNTH_RATIO"),
        ({"ACP__MIX_MODE": "blend"}, "ACP.MIX_MODE"),
        ({"ACP__SELECT": "best"}, "ACP.SELECT"),
        ({"ACP__BOX": "tight"}, "ACP.BOX"),
        ({"ACP__SYNTH_SAMPLING": "balanced"}, "ACP.SYNTH_SAMPLING"),
        ({"ACP__MIN_CLIS_I": 101.0}, "ACP.MIN_CLIS_I"),
        ({"ACP__MIN_CLIS_L": -1.0}, "ACP.MIN_CLIS_L"),
        ({"ACP__MAX_IMAGES": -5}, "ACP.MAX_IMAGES"),
        ({"ACP__CATEGORIES": " "}, "ACP.CATEGORIES"),
        ({"ACP__CACHE_DIRS": []}, "ACP.CACHE_DIRS"),
        ({"ACP__ONLINE_REFRESH_ITERS": 0}, "ACP.ONLINE_REFRESH_ITERS"),
        ({"SEED": -1}, "SEED"),
        ({"ACP__MIX_MODE": "paste", "ACP__PASTE__PROB": 1.2, "ACP__PRIORS": "p.json"}, "ACP.PASTE.PROB"),
        ({"ACP__MIX_MODE": "paste", "ACP__PASTE__MAX_INSTANCES": 0, "ACP__PRIORS": "p.json"},
         "ACP.PASTE.MAX_INSTANCES"),
        ({"ACP__MIX_MODE": "ratio+paste", "ACP__PASTE__SCALE_RANGE": (0.5, 0.1), "ACP__PRIORS": "p.json"},
         "ACP.PASTE.SCALE_RANGE"),
        ({"ACP__MIX_MODE": "paste", "ACP__PASTE__ASPECT_JITTER": 1.0, "ACP__PRIORS": "p.json"},
         "ACP.PASTE.ASPECT_JITTER"),
        ({"ACP__MIX_MODE": "paste", "ACP__PASTE__MIN_VISIBLE_FRAC": 2.0, "ACP__PRIORS": "p.json"},
         "ACP.PASTE.MIN_VISIBLE_FRAC"),
        ({"ACP__MIX_MODE": "paste", "ACP__PASTE__MIN_VISIBLE_PIXELS": -1, "ACP__PRIORS": "p.json"},
         "ACP.PASTE.MIN_VISIBLE_PIXELS"),
        ({"ACP__MIX_MODE": "paste"}, "ACP.PASTE.SCALE_FROM_PRIORS"),
        ({"INPUT__MASK_FORMAT": "rle"}, "INPUT.MASK_FORMAT"),
        ({"ACP__REGISTER_LVIS": [["lvis_v1_mine", "a.json", "imgs"]]}, "ACP.REGISTER_LVIS"),
        ({"ACP__REGISTER_LVIS": [["only_a_name"]]}, "ACP.REGISTER_LVIS"),
    ],
)
def test_bad_values_name_the_key_and_value(changes, key):
    cfg = acp_on(**changes)
    with pytest.raises(ConfigError) as e:
        validate_acp_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"config key {key} = "), msg


def test_seed_minus_one_is_fine_with_acp_off():
    cfg = get_acp_cfg()
    cfg.SEED = -1
    validate_acp_config(cfg)
    cfg.ACP.ENABLED = True
    cfg.ACP.CACHE_DIRS = ["cache"]
    with pytest.raises(ConfigError, match="SEED = -1"):
        validate_acp_config(cfg)


def test_paste_values_ignored_without_paste_mode():
    validate_acp_config(acp_on(ACP__PASTE__PROB=3.0))


@pytest.mark.parametrize("name", ["Base-MaskRCNN-LVIS.yaml", "lvis_baseline_12ep.yaml", "acp_lvis.yaml",
                                  "tiny/mask_rcnn_R18_tiny.yaml"])
def test_shipped_configs_load_and_validate(name):
    cfg = get_acp_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    validate_acp_config(cfg)
    assert cfg.SEED >= 0
    assert cfg.INPUT.MASK_FORMAT == "polygon"


def test_paper_schedule_and_recipe():
    base = get_acp_cfg()
    base.merge_from_file(str(CONFIGS / "lvis_baseline_12ep.yaml"))
    images, batch = 100_170, base.SOLVER.IMS_PER_BATCH
    assert batch == 16
    assert base.SOLVER.MAX_ITER == round(12 * images / batch + 0.5)  # 75,127.5 rounded up
    assert base.SOLVER.STEPS == (round(8 * images / batch), round(11 * images / batch))
    assert base.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler" and base.DATALOADER.REPEAT_THRESHOLD == 0.001
    assert base.TEST.DETECTIONS_PER_IMAGE == 300 and base.MODEL.ROI_HEADS.NUM_CLASSES == 1203
    assert not base.MODEL.ROI_BOX_HEAD.USE_FED_LOSS and not base.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE
    assert base.DATASETS.TRAIN == ("lvis_v1_train",) and base.DATASETS.TEST == ("lvis_v1_val",)
    assert not base.ACP.ENABLED

    acp = get_acp_cfg()
    acp.merge_from_file(str(CONFIGS / "acp_lvis.yaml"))
    assert acp.ACP.ENABLED and acp.ACP.MIX_MODE == "concat" and acp.ACP.SELECT == "clis"
    assert acp.ACP.MIN_CLIS_I == 60.0 and acp.ACP.CACHE_DIRS
    # the comparison is fair: everything but ACP and OUTPUT_DIR is the baseline
    acp.ACP = base.ACP
    acp.OUTPUT_DIR = base.OUTPUT_DIR
    assert acp.dump() == base.dump()


def test_tiny_yaml_matches_tiny_model_overrides():
    from helpers import tiny_model_overrides

    from_yaml = get_acp_cfg()
    from_yaml.merge_from_file(str(CONFIGS / "tiny" / "mask_rcnn_R18_tiny.yaml"))
    from_overrides = get_acp_cfg()
    from_overrides.merge_from_file(str(CONFIGS / "Base-MaskRCNN-LVIS.yaml"))
    from_overrides.merge_from_list(tiny_model_overrides())
    from_overrides.OUTPUT_DIR = from_yaml.OUTPUT_DIR
    assert from_yaml.dump() == from_overrides.dump()
