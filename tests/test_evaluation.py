"""LVIS evaluation: numbers equal lvis-api's, known answers per frequency group, null for empty groups, verified
negatives count, metrics.json contract, the detectron2 evaluator's id mapping and the ``acp-data eval`` CLI."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from acp_data.d2.evaluation import (
    METRICS,
    EvaluationError,
    cli_main,
    evaluate_lvis_results,
    write_metrics,
)

H = W = 100
SIDE = 40  # 40 x 40 = 1600 px: every object is "medium" (32^2 .. 96^2)


def square(x: float, y: float, side: float = SIDE) -> list[float]:
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def make_gt(freqs=("r", "c", "f"), n_images: int = 4, neg_all: bool = True) -> dict:
    """One category per frequency in ``freqs`` (ids 1..K); image i holds category (i % K) + 1 at two places."""
    cats = [{"id": i + 1, "name": f"cat{i + 1}", "frequency": f, "image_count": 1} for i, f in enumerate(freqs)]
    images, anns = [], []
    for i in range(n_images):
        img_id = i + 1
        cid = i % len(cats) + 1
        for j, (x, y) in enumerate(((5, 5), (55, 50))):
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cid,
                         "segmentation": [square(x, y)], "bbox": [x, y, SIDE, SIDE], "area": SIDE * SIDE})
            del j
        neg = [c["id"] for c in cats if c["id"] != cid] if neg_all else []
        images.append({"id": img_id, "height": H, "width": W, "file_name": f"{img_id}.jpg",
                       "neg_category_ids": neg, "not_exhaustive_category_ids": []})
    return {"images": images, "annotations": anns, "categories": cats}


def det(image_id: int, category_id: int, x: float, y: float, score: float, side: float = SIDE) -> dict:
    """A detection with a box and an RLE mask (string counts, as detectron2 writes them)."""
    from pycocotools import mask as mask_util

    rle = mask_util.merge(mask_util.frPyObjects([square(x, y, side)], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, side, side], "score": score,
            "segmentation": rle}


def perfect_dets(gt: dict, categories: set[int], score: float = 0.9) -> list[dict]:
    return [det(a["image_id"], a["category_id"], a["bbox"][0], a["bbox"][1], score)
            for a in gt["annotations"] if a["category_id"] in categories]


def lvis_direct(gt_path: str, dets: list[dict], task: str) -> dict:
    """What lvis-api computes when called by hand (as detectron2 does: segm without boxes, 300 per image)."""
    from lvis import LVIS, LVISEval, LVISResults

    if not hasattr(np, "float") or "float" not in np.__dict__:
        np.float = float  # lvis 0.5.3 under numpy 2
    dets = copy.deepcopy(dets)
    if task == "segm":
        for d in dets:
            d.pop("bbox")
    gt = LVIS(gt_path)
    ev = LVISEval(gt, LVISResults(gt, dets, max_dets=300), task)
    ev.run()
    return {m: ev.get_results()[m] for m in METRICS}


def write(tmp_path, name: str, obj) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_nine_numbers_equal_lvis_api(tmp_path):
    gt = make_gt(n_images=6)
    rng = np.random.default_rng(0)
    dets = []
    for a in gt["annotations"]:  # jittered hits with random scores
        dx, dy = rng.uniform(-6, 6, 2)
        dets.append(det(a["image_id"], a["category_id"], a["bbox"][0] + dx, a["bbox"][1] + dy, rng.uniform(0.1, 1)))
    for _ in range(15):  # false positives of every size on random images and categories
        side = float(rng.choice([10, 40, 99]))
        dets.append(det(int(rng.integers(1, 7)), int(rng.integers(1, 4)), float(rng.uniform(0, 100 - side)),
                        float(rng.uniform(0, 100 - side)), float(rng.uniform(0, 1)), side=side))
    gt_path = write(tmp_path, "gt.json", gt)
    ours = evaluate_lvis_results(gt_path, dets)
    assert list(ours) == ["bbox", "segm"]
    for task in ("bbox", "segm"):
        direct = lvis_direct(gt_path, dets, task)
        assert list(ours[task]) == list(METRICS)
        for m in METRICS:
            expected = None if direct[m] == -1 else direct[m] * 100
            if expected is None:
                assert ours[task][m] is None, (task, m)
            else:
                assert ours[task][m] == pytest.approx(expected, abs=1e-9), (task, m)
        assert 0 < ours[task]["AP"] < 100  # a non-trivial case
    # the same from a results file, and the input list is left untouched
    before = copy.deepcopy(dets)
    assert evaluate_lvis_results(gt_path, write(tmp_path, "dt.json", dets)) == ours
    assert dets == before


def test_known_answer_perfect_on_two_groups_nothing_on_rare(tmp_path):
    gt = make_gt()
    res = evaluate_lvis_results(write(tmp_path, "gt.json", gt), perfect_dets(gt, {2, 3}))
    for task in ("bbox", "segm"):
        m = res[task]
        assert m["APr"] == 0.0
        assert m["APc"] == pytest.approx(100.0) and m["APf"] == pytest.approx(100.0)
        assert m["AP"] == pytest.approx(200 / 3) and m["AP50"] == pytest.approx(200 / 3)
        assert m["APm"] == pytest.approx(200 / 3)
        assert m["APs"] is None and m["APl"] is None  # no small or large ground truth


def test_empty_frequency_group_is_null_in_results_and_metrics_json(tmp_path):
    gt = make_gt(freqs=("c", "f", "f"))
    res = evaluate_lvis_results(write(tmp_path, "gt.json", gt), perfect_dets(gt, {1, 2, 3}))
    assert res["segm"]["APr"] is None and res["bbox"]["APr"] is None
    assert res["segm"]["APc"] == pytest.approx(100.0)
    path = write_metrics(tmp_path / "out", res, dataset="toy_val", iteration=12, config_sha="abc")
    doc = json.loads(open(path).read())
    assert set(doc) == {"bbox", "segm", "dataset", "iter", "config_sha"}
    assert doc["segm"]["APr"] is None and "null" in open(path).read()
    assert doc["dataset"] == "toy_val" and doc["iter"] == 12 and doc["config_sha"] == "abc"
    assert set(doc["bbox"]) == set(METRICS)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]  # no temp file left behind


def test_no_detections_scores_zero_not_crash(tmp_path):
    gt = make_gt(freqs=("c", "f"))
    res = evaluate_lvis_results(write(tmp_path, "gt.json", gt), [], tasks=("bbox", "segm"))
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == 0.0 and res[task]["APc"] == 0.0 and res[task]["APf"] == 0.0
        assert res[task]["APr"] is None


def test_false_positive_on_verified_negative_lowers_ap(tmp_path):
    # category 2 ("c") is annotated in image 2 only; image 1 holds category 1
    gt = make_gt(n_images=3)
    fp = det(1, 2, 30, 30, score=0.99)
    hits = perfect_dets(gt, {1, 2, 3}, score=0.5)
    gt_path = write(tmp_path, "gt.json", gt)
    assert 2 in gt["images"][0]["neg_category_ids"]
    with_neg = evaluate_lvis_results(gt_path, [*hits, fp])["segm"]
    # the FP outranks category 2's two true positives: precision 2/3 at every recall level -> AP 66.7
    assert with_neg["APc"] == pytest.approx(200 / 3)
    assert with_neg["AP"] == pytest.approx((100 + 200 / 3 + 100) / 3)
    # without the verified negative the same FP is ignored (lvis-api's federated rule)
    gt_unknown = copy.deepcopy(gt)
    gt_unknown["images"][0]["neg_category_ids"] = []
    no_neg = evaluate_lvis_results(write(tmp_path, "gt2.json", gt_unknown), [*hits, fp])["segm"]
    assert no_neg["APc"] == pytest.approx(100.0)
    # not_exhaustive: an unmatched detection of that category in that image is ignored as well
    gt_ne = copy.deepcopy(gt)
    gt_ne["images"][0]["not_exhaustive_category_ids"] = [2]
    assert evaluate_lvis_results(write(tmp_path, "gt3.json", gt_ne), [*hits, fp])["segm"]["APc"] == pytest.approx(100)


def test_ground_truth_without_frequency_or_negatives(tmp_path, caplog):
    gt = make_gt()
    for c in gt["categories"]:
        del c["frequency"], c["image_count"]
    for img in gt["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    # frequencies follow the json's own image counts: every category is in 1-2 images -> all rare
    with caplog.at_level("WARNING"):
        res = evaluate_lvis_results(gt, perfect_dets(gt, {1}))
    assert "neg_category_ids" in caplog.text
    assert res["bbox"]["APc"] is None and res["bbox"]["APf"] is None
    assert res["bbox"]["APr"] == pytest.approx(100 / 3)


def test_bad_detections_are_named(tmp_path):
    gt_path = write(tmp_path, "gt.json", make_gt())
    with pytest.raises(EvaluationError, match="off by one"):
        evaluate_lvis_results(gt_path, [det(1, 4, 0, 0, 0.5)])
    with pytest.raises(EvaluationError, match="image ids not in the ground truth"):
        evaluate_lvis_results(gt_path, [det(99, 1, 0, 0, 0.5)])
    with pytest.raises(EvaluationError, match="segmentation"):
        evaluate_lvis_results(gt_path, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}],
                              tasks=("segm",))
    with pytest.raises(EvaluationError, match="detection #0 has no score"):
        evaluate_lvis_results(gt_path, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}])
    with pytest.raises(EvaluationError, match="cannot read ground truth"):
        evaluate_lvis_results(str(tmp_path / "missing.json"), [])
    # boxes only: bbox alone is inferred
    only_boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in perfect_dets(make_gt(), {1})]
    assert list(evaluate_lvis_results(gt_path, only_boxes)) == ["bbox"]


def test_max_dets_per_image_is_applied(tmp_path):
    gt = make_gt()
    gt_path = write(tmp_path, "gt.json", gt)
    hits = perfect_dets(gt, {1, 2, 3}, score=0.1)
    noise = [det(a["image_id"], a["category_id"], 0, 60, 0.9, side=10) for a in gt["annotations"]]
    full = evaluate_lvis_results(gt_path, hits + noise)["bbox"]["AP"]
    capped = evaluate_lvis_results(gt_path, hits + noise, max_dets=2)["bbox"]["AP"]  # the hits fall off
    assert full > 0 and capped == 0.0


def test_detectron2_evaluator_maps_contiguous_ids_and_writes_metrics(tmp_path):
    import torch
    from detectron2.structures import Boxes, Instances

    from acp_data.d2.config import get_acp_cfg
    from acp_data.d2.evaluation import build_lvis_evaluator
    from acp_data.d2.lvis_format import register_lvis_format

    gt = make_gt()
    gt_path = write(tmp_path, "gt.json", gt)
    register_lvis_format("acp_test_eval_toy", gt_path, str(tmp_path))
    cfg = get_acp_cfg()
    cfg.MODEL.MASK_ON = True
    ev = build_lvis_evaluator(cfg, "acp_test_eval_toy", str(tmp_path / "run"), iteration=7)
    ev.reset()
    dets = perfect_dets(gt, {2, 3})
    for img in gt["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + SIDE, d["bbox"][1] + SIDE]
                                              for d in mine], dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in mine], dtype=torch.int64)  # contiguous
        masks = np.zeros((len(mine), H, W), dtype=bool)
        for k, d in enumerate(mine):
            x, y = int(d["bbox"][0]), int(d["bbox"][1])
            masks[k, y:y + SIDE, x:x + SIDE] = True
        inst.pred_masks = torch.from_numpy(masks)
        ev.process([{"image_id": img["id"], "height": H, "width": W}], [{"instances": inst}])
    out = ev.evaluate()
    expected = evaluate_lvis_results(gt_path, dets)
    for task in ("bbox", "segm"):
        for m in METRICS:
            e = expected[task][m]
            assert (math.isnan(out[task][m]) if e is None else out[task][m] == pytest.approx(e, abs=1e-6)), (task, m)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["dataset"] == "acp_test_eval_toy" and doc["iter"] == 7 and len(doc["config_sha"]) == 16
    assert doc["segm"]["APc"] == pytest.approx(100.0) and doc["segm"]["APr"] == 0.0
    saved = json.loads((tmp_path / "run" / "lvis_instances_results.json").read_text())
    assert {d["category_id"] for d in saved} == {2, 3}  # json ids, not contiguous
    assert not list((tmp_path / "run").glob("*.pth"))  # no pickle


def test_eval_cli_writes_metrics(tmp_path, capsys):
    gt = make_gt()
    gt_path = write(tmp_path, "gt.json", gt)
    dt_path = write(tmp_path, "dt.json", perfect_dets(gt, {2, 3}))
    out = tmp_path / "out"
    assert cli_main(["--gt", gt_path, "--dt", dt_path, "--out", str(out), "--iter", "100"]) == 0
    printed = capsys.readouterr().out
    assert "bbox:" in printed and "segm:" in printed and "APr" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["iter"] == 100 and doc["dataset"] == gt_path and doc["config_sha"] is None
    assert doc["segm"] == pytest.approx(evaluate_lvis_results(gt_path, dt_path)["segm"])
    assert cli_main(["--gt", gt_path, "--dt", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "cannot read detections" in capsys.readouterr().err


def test_acp_data_eval_command(tmp_path):
    gt = make_gt()
    gt_path = write(tmp_path, "gt.json", gt)
    dt_path = write(tmp_path, "dt.json", perfect_dets(gt, {1, 2, 3}))
    r = subprocess.run([sys.executable, "-m", "acp_data.cli", "eval", "--gt", gt_path, "--dt", dt_path,
                        "--out", str(tmp_path / "o"), "--dataset", "toy"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["dataset"] == "toy" and doc["bbox"]["AP"] == pytest.approx(100.0) and doc["segm"]["APr"] == 100.0


@pytest.mark.parametrize("backend", ["lvis", "hotcoco"])
def test_training_evaluator_uses_the_configured_backend(tmp_path, backend, caplog):
    import torch
    from detectron2.structures import Boxes, Instances

    from acp_data.d2.config import get_acp_cfg
    from acp_data.d2.evaluation import build_lvis_evaluator
    from acp_data.d2.lvis_format import register_lvis_format

    gt = make_gt(n_images=3)
    gt_path = write(tmp_path, "gt.json", gt)
    name = f"acp_test_eval_backend_{backend}"
    register_lvis_format(name, gt_path, str(tmp_path))
    cfg = get_acp_cfg()
    cfg.MODEL.MASK_ON = False  # boxes only: segm is not evaluated, metrics.json has "segm": null
    cfg.ACP.EVAL_BACKEND = backend
    dets = perfect_dets(gt, {1, 3})

    def feed(ev) -> dict:
        ev.reset()
        for img in gt["images"]:
            mine = [d for d in dets if d["image_id"] == img["id"]]
            inst = Instances((H, W))
            inst.pred_boxes = Boxes(torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + SIDE,
                                                   d["bbox"][1] + SIDE] for d in mine],
                                                 dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
            inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in mine], dtype=torch.int64)
            ev.process([{"image_id": img["id"], "height": H, "width": W}], [{"instances": inst}])
        with caplog.at_level("INFO", logger="acp_data.d2.evaluation"):
            return ev.evaluate()

    out = feed(build_lvis_evaluator(cfg, name, str(tmp_path / backend), iteration=3))
    assert list(out) == ["bbox"]
    assert f"LVIS evaluation ({backend}) of bbox" in caplog.text
    doc = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert doc["eval_backend"] == backend and doc["segm"] is None
    assert doc["bbox"]["APr"] == pytest.approx(100.0) and doc["bbox"]["APc"] == 0.0
    assert doc["bbox"] == pytest.approx(evaluate_lvis_results(gt_path, dets, tasks=("bbox",), backend="lvis")["bbox"])
    # the per-category AP table, if asked
    from acp_data.d2.evaluation import LVISMetricsEvaluator

    caplog.clear()
    feed(LVISMetricsEvaluator(name, tasks=("bbox",), backend=backend, per_category=True))
    assert "Per-category bbox AP" in caplog.text
    assert re.search(r"\| cat1 +\| r +\| 100 +\| cat2 +\| c +\| 0 +\|", caplog.text)


def test_eval_backend_config_key_is_validated():
    from acp_data.d2.config import ConfigError, get_acp_cfg, validate_acp_config

    cfg = get_acp_cfg()
    assert cfg.ACP.EVAL_BACKEND == "hotcoco"
    cfg.ACP.EVAL_BACKEND = "lvis"
    validate_acp_config(cfg)
    cfg.ACP.EVAL_BACKEND = "pycocotools"
    with pytest.raises(ConfigError, match="ACP.EVAL_BACKEND = 'pycocotools'.*hotcoco, lvis"):
        validate_acp_config(cfg)  # checked with ACP off too: evaluation runs either way
