"""End to end through tools/train_net.py: a few iterations of the tiny Mask R-CNN in every mix mode (concat, ratio,
paste, ratio+paste) on a tiny LVIS-format dataset and a cache written by the test, then --eval-only."""

from __future__ import annotations

import json
import math

import pytest
from helpers import run_train_net, tiny_dataset_overrides, tiny_model_overrides
from test_loader_errors import build_mixing_world

MAX_ITER = 3
CONFIG = "configs/tiny/mask_rcnn_R18_tiny.yaml"

MODES = [  # mode, mask format, dataloader workers
    ("concat", "polygon", 2),
    ("ratio", "polygon", 0),
    ("paste", "polygon", 0),
    ("ratio+paste", "bitmask", 0),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_mixing_world(tmp_path_factory.mktemp("trainworld"), n_units=8)


def _acp_overrides(world, mode: str, mask_format: str, workers: int, out) -> list[str]:
    return [
        *tiny_dataset_overrides(), *tiny_model_overrides(max_iter=MAX_ITER),
        "OUTPUT_DIR", str(out), "SEED", "7", "INPUT.MASK_FORMAT", mask_format,
        "DATALOADER.NUM_WORKERS", str(workers),
        "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", "DATALOADER.REPEAT_THRESHOLD", "0.3",
        "ACP.ENABLED", "True", "ACP.CACHE_DIRS", json.dumps([world["cache"]]), "ACP.CATEGORIES", "all",
        "ACP.MIN_CLIS_I", "0.0", "ACP.MIX_MODE", mode, "ACP.SYNTH_RATIO", "0.5",
        "ACP.SYNTH_SAMPLING", "class_balanced", "ACP.PRIORS", world["priors"], "ACP.PASTE.PROB", "1.0",
        "ACP.PASTE.MAX_INSTANCES", "4",
    ]


@pytest.mark.slow
def test_every_mix_mode_trains_then_evaluates(world, tmp_path):
    outs = {}
    for mode, fmt, workers in MODES:
        out = tmp_path / mode.replace("+", "_")
        res = run_train_net(["--config-file", CONFIG, *_acp_overrides(world, mode, fmt, workers, out)],
                            datasets_root=world["datasets_root"])
        assert res.returncode == 0, f"{mode}: {res.stderr[-4000:]}"
        log = (out / "log.txt").read_text()
        assert f"ACP data: mix mode {mode}, mask format {fmt}" in log
        run = json.loads((out / "acp_run.json").read_text())
        assert run["mix_mode"] == mode and run["mask_format"] == fmt and run["real_images"] == 8
        if mode == "paste":
            assert run["synthetic_images"] == 0 and run["paste"]["crops"] > 0
        else:
            assert run["synthetic_images"] > 0 and 0 < run["effective_synthetic_fraction"] < 1
        scalars = [json.loads(line) for line in (out / "train_metrics.json").read_text().splitlines()]
        losses = [s["total_loss"] for s in scalars if "total_loss" in s]
        assert losses and all(math.isfinite(v) for v in losses)
        assert (out / "model_final.pth").is_file() and (out / "metrics.json").is_file()
        outs[mode] = out

    # evaluate one of the trained models on its own
    out = outs["ratio+paste"]
    (out / "metrics.json").unlink()
    ev = run_train_net(["--config-file", CONFIG, "--eval-only", *tiny_dataset_overrides(), "OUTPUT_DIR", str(out),
                        "INPUT.MASK_FORMAT", "bitmask", "MODEL.WEIGHTS", str(out / "model_final.pth")],
                       datasets_root=world["datasets_root"])
    assert ev.returncode == 0, ev.stderr[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["iter"] == MAX_ITER and doc["dataset"] == "tiny_val"
    assert doc["segm"]["AP"] is not None and doc["bbox"]["AP"] is not None

    # the comparison guard sees the two mask formats
    from acp_data.d2.runfile import check_same_mask_format

    assert check_same_mask_format([outs["concat"], outs["ratio"], outs["paste"]]) == "polygon"
    with pytest.raises(ValueError, match="same INPUT.MASK_FORMAT"):
        check_same_mask_format([outs["concat"], outs["ratio+paste"]])


@pytest.mark.parametrize("mode", ["ratio+paste", "concat"])
def test_mapped_stream_is_the_same_with_0_and_2_workers(world, tmp_path, mode):
    """Sampling, augmentation and pastes all come from (SEED, position): worker count changes nothing."""
    import itertools

    from test_loader_errors import world_cfg

    from acp_data.d2.loader import build_acp_train_loader

    sigs = []
    for workers in (0, 2):
        cfg = world_cfg(world, tmp_path / f"w{workers}", mode, SYNTH_RATIO=0.5, **{"PASTE.PROB": 0.8})
        cfg.DATALOADER.NUM_WORKERS = workers
        cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
        batches = list(itertools.islice(iter(build_acp_train_loader(cfg)), 6))
        sigs.append([(d["image_id"], int(d["image"].sum()), d["instances"].gt_classes.tolist(),
                      d["instances"].gt_sources.tolist(), d["instances"].gt_boxes.tensor.tolist())
                     for b in batches for d in b])
    assert sigs[0] == sigs[1]
    assert len({s[0] for s in sigs[0]}) > 3
