"""End to end on a small Shapes world, through the demo's own code path: world, priors, a tiny judge, a few prebuild
units, a few training iterations of the baseline and ACP configs (child ``tools/train_net.py`` processes), LVIS
evaluation, the side-by-side table and the report; then a second invocation that reuses every step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ITERS = 3
# A smaller, faster model than configs/shapes/Base-Shapes.yaml (the structure stays): few proposals and detections.
TINY = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "TEST.DETECTIONS_PER_IMAGE", "20",
        "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128",
        # a judge trained for seconds scores everything low: keep every instance so the ACP run has synthetic data
        "ACP.MIN_CLIS_I", "0.0"]


def _demo_args(out: Path) -> list[str]:
    return ["--out", str(out), "--size", "small", "--iters", str(ITERS), "--judge-steps", "8", "--max-units", "6",
            "--prebuild-set", "selection.min_clis_i=0", "--prebuild-set", "unit_batch=6", "--no-progress", *TINY]


@pytest.mark.slow
def test_demo_end_to_end_then_everything_reused(tmp_path, capsys, monkeypatch):
    import torch

    from acp_data.shapes import demo

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    assert demo.main(_demo_args(out)) == 0
    printed = capsys.readouterr().out

    # the world is registered from DETECTRON2_DATASETS-relative paths, the judge is an open_clip local-dir
    assert (out / "datasets" / "shapes" / "train.json").is_file()
    assert (out / "judge" / "open_clip_config.json").is_file()
    assert (out / "priors.npz").is_file() and (out / "priors.npz.stamp.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache"]["units"]["total"] == 6 and summary["cache"]["kept"] == 6 * 4  # 4 candidates, all kept
    for run in ("baseline", "acp"):
        m = json.loads((out / "runs" / run / "metrics.json").read_text())
        assert m["iter"] == ITERS and m["dataset"] == "shapes_val"
        for task in ("bbox", "segm"):
            assert m[task]["AP"] is not None and 0.0 <= m[task]["AP"] <= 100.0
            assert m[task]["APr"] is not None  # the small world has rare categories in its validation split
        assert summary["metrics"][run] == m
    acp_run = json.loads((out / "runs" / "acp" / "acp_run.json").read_text())
    assert acp_run["mix_mode"] == "concat" and acp_run["real_images"] == 80
    assert 1 <= acp_run["synthetic_images"] <= 6  # one selected candidate per unit at most
    assert summary["synthetic_images"] == acp_run["synthetic_images"]
    assert not (out / "runs" / "baseline" / "acp_run.json").exists()  # the baseline is plain detectron2 training

    # one side-by-side table with the difference row, computed from the two metrics files
    assert "difference" in printed and "APr" in printed
    # under the table: what the CLIS filter removed (nothing at MIN_CLIS_I 0), per frequency group
    removed = next(line for line in printed.splitlines() if line.startswith("CLIS filter"))
    assert "MIN_CLIS_I 0, MIN_CLIS_L 0) removed 0 of" in removed and "rare 0 of" in removed
    base = summary["metrics"]["baseline"]["segm"]["AP"]
    acp = summary["metrics"]["acp"]["segm"]["AP"]
    diff_line = next(line for line in printed.splitlines() if line.startswith("difference"))
    assert f"{acp - base:+.1f}" in diff_line
    assert (out / "report" / "report.md").is_file() and (out / "report" / "ap_groups_segm.png").is_file()

    # the ablation driver counts the synthetic images exactly as the ACP loader selected them
    from longtail_ablation import count_synthetic, load_cfg

    cfg = load_cfg("configs/shapes/acp.yaml", {"ACP.CACHE_DIRS": json.dumps([str(out / "cache")]),
                                               "ACP.MIN_CLIS_I": "0.0", "SEED": "42"})
    assert count_synthetic(cfg) == acp_run["synthetic_images"]

    # the judge calibration redraws every cached candidate with the generator's truth: one row per cached instance
    import judge_calibration

    from acp_data.cache.reader import CacheReader

    assert judge_calibration.main(["--cache", str(out / "cache"), "--thresholds", "0,101"]) == 0
    calib = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calib["instances"] == CacheReader(out / "cache").num_instances > 0
    at0, at101 = calib["by_threshold"]["all"]
    assert at0["ok_kept"] == 1.0 and at0["ok"] + at0["failed"] == calib["instances"]
    assert at101["ok_kept"] == 0.0 and at101["ok_dropped"] == at0["ok"]
    # the records carry the generator's truth; scoring again with the same judge gives the cache's own scores
    assert "shapes_truth" in CacheReader(out / "cache").read_record(0)["provenance"]
    spec = f"local-dir:{out / 'judge'}"
    assert judge_calibration.main(["--cache", str(out / "cache"), "--thresholds", "0", "--judge", f"again={spec}"]) == 0
    rare = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rare_categories"]
    assert set(rare) == {"cache", "again"} and rare["cache"]["categories"]
    for name, c in rare["cache"]["categories"].items():
        d = rare["again"]["categories"][name]
        assert (c["ok"], c["failed"]) == (d["ok"], d["failed"])
        assert c["auroc"] is None or abs(c["auroc"] - d["auroc"]) < 0.02

    # per-category AP of the rare categories, from each run's saved detections: their mean is the run's APr
    import per_category_ap

    runs = [str(out / "runs" / r) for r in ("baseline", "acp")]
    assert per_category_ap.main(["--gt", str(out / "datasets" / "shapes" / "val.json"), *runs]) == 0
    per_cat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for r in ("baseline", "acp"):
        aps = [v for v in per_cat["runs"][r].values() if v is not None]
        assert aps and abs(sum(aps) / len(aps) - summary["metrics"][r]["segm"]["APr"]) < 0.1

    # second run: world, priors, judge, cache and both trainings are reused
    stamps = {p: p.stat().st_mtime_ns for p in (out / "priors.npz", out / "judge" / "open_clip_model.safetensors",
                                                 out / "runs" / "acp" / "metrics.json")}
    assert demo.main(_demo_args(out)) == 0
    again = capsys.readouterr().out
    assert again.count("reusing") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["cache"]["units"]["skipped_done"] == 6 and summary2["metrics"] == summary["metrics"]
