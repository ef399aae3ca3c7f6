"""End to end through tools/train_net.py: a tiny Mask R-CNN trains a few iterations on a tiny LVIS-format dataset
(registered with ACP.REGISTER_LVIS under $DETECTRON2_DATASETS), then --eval-only on the checkpoint."""

from __future__ import annotations

import json

import pytest
from helpers import run_train_net, tiny_dataset_overrides, tiny_model_overrides

from acp_data.d2.evaluation import METRICS

MAX_ITER = 4


@pytest.mark.slow
def test_train_then_eval_only(tiny_lvis, tmp_path):
    out = tmp_path / "run"
    common = [*tiny_dataset_overrides(), *tiny_model_overrides(max_iter=MAX_ITER), "OUTPUT_DIR", str(out)]
    # a bare name is looked up in configs/, so the base config is used by name
    train = run_train_net(["--config", "Base-MaskRCNN-LVIS.yaml", "--num-gpus", "1", *common],
                          datasets_root=tiny_lvis["root"], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert "Mask format: polygon" in log
    assert (out / "model_final.pth").is_file()
    # detectron2's per-iteration scalars no longer collide with the evaluation's metrics.json
    scalars = [json.loads(line) for line in (out / "train_metrics.json").read_text().splitlines()]
    assert any("total_loss" in s for s in scalars) and any("segm/APr" in s for s in scalars)
    after_train = json.loads((out / "metrics.json").read_text())
    assert after_train["iter"] == MAX_ITER and after_train["dataset"] == "tiny_val"

    (out / "metrics.json").unlink()
    ev = run_train_net(["--config-file", "configs/tiny/mask_rcnn_R18_tiny.yaml", "--eval-only",
                        *tiny_dataset_overrides(), "OUTPUT_DIR", str(out), "MODEL.WEIGHTS",
                        str(out / "model_final.pth")], datasets_root=tiny_lvis["root"])
    assert ev.returncode == 0, ev.stderr[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) == {"bbox", "segm", "dataset", "iter", "config_sha", "eval_backend"}
    assert doc["eval_backend"] == "hotcoco"  # --eval-only runs the default ACP.EVAL_BACKEND
    for task in ("bbox", "segm"):
        assert set(doc[task]) == set(METRICS)
        for m in METRICS:
            v = doc[task][m]
            assert v is None or 0.0 <= v <= 100.0, (task, m, v)
        assert doc[task]["AP"] is not None and doc[task]["APr"] is not None  # every group has ground truth
    assert doc["iter"] == MAX_ITER  # from the checkpoint
    assert doc["dataset"] == "tiny_val" and isinstance(doc["config_sha"], str)
    dets = json.loads((out / "inference" / "tiny_val" / "lvis_instances_results.json").read_text())
    assert all(1 <= d["category_id"] <= 6 for d in dets)
