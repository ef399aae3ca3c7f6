"""hotcoco against lvis-api: the nine numbers of bbox and segm equal to 1e-9 (and null in the same places) on
generated LVIS-format sets with the edge cases of the LVIS protocol, from a results list and from a results file;
bad input raises the same error on both backends; the backend is recorded in metrics.json."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import acp_data.d2.eval_backends as eb
from acp_data.d2.eval_backends import METRICS, EvaluationError, GroundTruth, evaluate_tasks, resolve_backend
from acp_data.d2.evaluation import cli_main, evaluate_lvis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_bench import make_lvis_set  # noqa: E402

pytest.importorskip("hotcoco")

# 18 categories over the three groups, LVIS-like train image counts
CATS = [{"id": i + 1, "name": f"cat{i + 1}", "frequency": f, "image_count": n}
        for i, (f, n) in enumerate([("r", 2), ("r", 5), ("r", 9), ("c", 20), ("c", 40), ("c", 60), ("c", 90)]
                                   + [("f", 150 * (k + 1)) for k in range(11)])]


def _stats(gt: GroundTruth, results, backend: str, tasks=("bbox", "segm"), max_dets: int = 300) -> dict:
    runs, _ = evaluate_tasks(gt, results, tasks, max_dets, backend)
    return {r.task: r.stats for r in runs}


def assert_same(ref: dict, got: dict) -> None:
    assert list(ref) == list(got)
    for task in ref:
        for m in METRICS:
            a, b = ref[task][m], got[task][m]
            assert (a == -1) == (b == -1), (task, m, a, b)  # null in the same places
            assert abs(a - b) <= 1e-9, (task, m, a, b)


def edge_case_set(seed: int, categories=CATS, n_images: int = 14, dets: int = 60) -> tuple[dict, list[dict]]:
    """A generated set with every edge case the LVIS protocol has, on top of what the generator makes."""
    gt, dts = make_lvis_set(n_images, dets, seed=seed, categories=copy.deepcopy(categories), instances_per_image=6,
                            score_decimals=1 if seed % 2 else None)  # ties in scores on odd seeds
    rng = np.random.default_rng(seed)
    imgs = gt["images"]
    # an image with only verified negatives (and detections on them)
    only_neg = imgs[0]["id"]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != only_neg]
    imgs[0]["neg_category_ids"] = sorted({c["id"] for c in categories[:6]})
    # a not-exhaustive category with false positives on it
    pos = next(a for a in gt["annotations"] if a["image_id"] == imgs[1]["id"])
    imgs[1]["not_exhaustive_category_ids"] = [pos["category_id"]]
    # more than 300 detections on one image (some of them hits), so the per-image cap bites
    extra, _ = make_lvis_set(1, 0, seed=seed + 100, categories=copy.deepcopy(categories))
    hits = [d for d in dts if d["image_id"] == imgs[2]["id"]]
    for k in range(330):
        d = copy.deepcopy(hits[k % len(hits)])
        d["score"] = round(float(rng.uniform(0, 1)), 1)
        dts.append(d)
    # ground truth masks as compressed RLE besides polygons; a zero-area ground truth annotation
    from pycocotools import mask as mask_util

    for a in gt["annotations"][::5]:
        img = next(i for i in imgs if i["id"] == a["image_id"])
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], img["height"], img["width"]))
        rle["counts"] = rle["counts"].decode("ascii")
        a["segmentation"] = rle
    gt["annotations"][1]["area"] = 0.0
    # detections with an empty mask and a zero-width box
    empty = mask_util.encode(np.zeros((imgs[3]["height"], imgs[3]["width"], 1), np.uint8, order="F"))[0]
    empty["counts"] = empty["counts"].decode("ascii")
    dts.append({"image_id": imgs[3]["id"], "category_id": imgs[3]["neg_category_ids"][0], "score": 0.95,
                "bbox": [3.0, 4.0, 0.0, 10.0], "segmentation": empty})
    del extra
    return gt, dts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hotcoco_equals_lvis_api_on_generated_sets(seed, tmp_path):
    gt_dict, dets = edge_case_set(seed)
    gt = GroundTruth.load(gt_dict)
    ref = _stats(gt, dets, "lvis")
    assert 0 < ref["segm"]["AP"] < 1 and 0 < ref["bbox"]["AP"] < 1  # non-trivial numbers
    assert_same(ref, _stats(gt, dets, "hotcoco"))
    path = tmp_path / "dt.json"
    path.write_text(json.dumps(dets))
    assert_same(ref, _stats(gt, str(path), "hotcoco"))  # parsed by hotcoco itself


def test_empty_frequency_group_and_polygon_free_detections_on_the_real_table(tmp_path):
    """No rare category at all (APr null on both) over the real LVIS v1 table's common and frequent categories."""
    from acp_data.categories import CategoryTable

    cats = [{"id": c.id, "name": c.name, "frequency": c.frequency, "image_count": c.image_count}
            for c in CategoryTable.from_lvis_v1() if c.frequency != "r"][:200]
    for new_id, c in enumerate(cats, start=1):
        c["id"] = new_id
    gt_dict, dets = make_lvis_set(10, 80, seed=7, categories=cats)
    gt = GroundTruth.load(gt_dict)
    ref = _stats(gt, dets, "lvis")
    assert ref["bbox"]["APr"] == -1 and ref["segm"]["APr"] == -1
    assert_same(ref, _stats(gt, dets, "hotcoco"))


@pytest.mark.parametrize("max_dets", [5, -1])
def test_max_dets_cap_is_the_same(max_dets):
    gt_dict, dets = edge_case_set(5, n_images=6, dets=40)
    gt = GroundTruth.load(gt_dict)
    assert_same(_stats(gt, dets, "lvis", max_dets=max_dets), _stats(gt, dets, "hotcoco", max_dets=max_dets))


def test_per_category_precision_is_the_same():
    gt_dict, dets = edge_case_set(4, n_images=8, dets=40)
    gt = GroundTruth.load(gt_dict)
    (ref,), _ = evaluate_tasks(gt, dets, ("segm",), backend="lvis")
    (hot,), _ = evaluate_tasks(gt, dets, ("segm",), backend="hotcoco")
    assert ref.cat_ids == hot.cat_ids
    assert ref.precision.shape == hot.precision.shape
    assert np.abs(ref.precision - hot.precision).max() <= 1e-12



# ----- segm mask areas from the results file -----------------------------------------------------------------------
def _spellings(dets: list[dict]) -> dict[str, tuple[str, bool]]:
    """One results list written as different json writers write it, and whether the RLE counts are read straight from
    the text (else the segmentations come back from hotcoco: same numbers, slower)."""
    plain = json.dumps(dets)
    assert "\\\\" in plain  # some counts hold a backslash (an RLE character), escaped as a pair
    noted = json.dumps([dict(d, note="a/b") if i == 5 else d for i, d in enumerate(dets)])
    return {"json.dumps": (plain, True),
            "compact": (json.dumps(dets, separators=(",", ":")), True),
            "indented": (json.dumps(dets, indent=2), True),
            "unicode escapes": (plain.replace("\\\\", "\\u005c"), False),
            "an escaped solidus": (noted.replace('"a/b"', '"a\\/b"'), False)}


def test_segm_from_any_results_spelling_equals_lvis_api(tmp_path):
    gt_dict, dets = edge_case_set(6, n_images=8, dets=50)
    gt = GroundTruth.load(gt_dict)
    ref = _stats(gt, dets, "lvis")
    for name, (text, direct) in _spellings(dets).items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(text)
        for chunk in (7, 100, 4096, 1 << 24):  # block boundaries anywhere, also inside keys and strings
            keys, _, counts = eb._scan_keys(str(path), ["score", "counts"], chunk=chunk, rle=True)
            assert keys == {"score": len(dets), "counts": len(dets)}, (name, chunk)
            assert (counts is not None) == direct, (name, chunk)
            if direct:  # every detection's counts, in order, unescaped
                assert [c.decode() for c in counts] == [d["segmentation"]["counts"] for d in dets], (name, chunk)
        assert_same(ref, _stats(gt, str(path), "hotcoco"))


def test_segm_areas_are_lvis_api_mask_areas(tmp_path):
    """Every evaluated detection's area is its mask area (lvis-api's for results without boxes), from a list and from
    a file; the boxes' areas are not."""
    from lvis import LVISResults

    gt_dict, dets = edge_case_set(7, n_images=6, dets=40)
    gt = GroundTruth.load(gt_dict)
    path = tmp_path / "dt.json"
    path.write_text(json.dumps(dets))
    eb._numpy_float_shim()
    no_box = [{k: v for k, v in d.items() if k != "bbox"} for d in copy.deepcopy(dets)]
    mask_area = {a["id"]: a["area"] for a in LVISResults(gt.lvis(), no_box, max_dets=-1).dataset["annotations"]}
    for hot in (eb.HotcocoResults.from_list(gt, dets), eb.HotcocoResults.from_file(gt, str(path), ("segm",))[0]):
        assert hot._rle_counts is not None
        hot._use_mask_areas()
        anns = [a for a in hot._dt.load_anns(hot._dt.get_ann_ids())
                if a["category_id"] in {c for i in gt_dict["images"] if i["id"] == a["image_id"]
                                        for c in i["neg_category_ids"]}]
        assert len(anns) > 20
        assert [a["area"] for a in anns] == [mask_area[a["id"]] for a in anns]
        assert any(a["area"] != a["bbox"][2] * a["bbox"][3] for a in anns)

# ----- bad input ---------------------------------------------------------------------------------------------------
def _bad_inputs(gt: dict, dets: list[dict]) -> dict[str, list]:
    ok = dets[0]
    return {
        "unknown category": [*dets[:3], dict(ok, category_id=999)],
        "unknown image": [*dets[:3], dict(ok, image_id=12345)],
        "nan score": [*dets[:3], dict(ok, score=float("nan"))],
        "inf score": [*dets[:3], dict(ok, score=float("inf"))],
        "nan box": [*dets[:3], dict(ok, bbox=[1.0, float("nan"), 3.0, 4.0])],
        "no score": [*dets[:3], {k: v for k, v in ok.items() if k != "score"}],
        "no mask": [*dets[:3], {k: v for k, v in ok.items() if k != "segmentation"}],
        "no box": [*dets[:3], {k: v for k, v in ok.items() if k != "bbox"}],
    }


def _error(gt, results, backend, tasks=("bbox", "segm")) -> str:
    with pytest.raises(EvaluationError) as e:
        evaluate_lvis(gt, results, tasks=tasks, backend=backend)
    return str(e.value)


def test_bad_input_same_error_on_both_backends(tmp_path):
    gt_dict, dets = make_lvis_set(4, 10, seed=3, categories=copy.deepcopy(CATS))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_dict))
    expected = {"unknown category": "category ids not in the ground truth: [999]",
                "unknown image": "image ids not in the ground truth, e.g. [12345]",
                "nan score": "has score nan", "inf score": "has score inf", "nan box": "has bbox [1.0, nan",
                "no score": "detection #3 has no score", "no mask": "'segmentation' (RLE) in every detection",
                "no box": "'bbox' in every detection"}
    for name, bad in _bad_inputs(gt_dict, dets).items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(bad))  # NaN / Infinity written as json does
        msgs = {_error(str(gt_path), bad, "lvis"), _error(str(gt_path), bad, "hotcoco"),
                _error(str(gt_path), str(path), "lvis"), _error(str(gt_path), str(path), "hotcoco")}
        assert len(msgs) == 1, (name, msgs)
        assert expected[name] in msgs.pop(), name
    # a file that is no results list at all
    (tmp_path / "obj.json").write_text(json.dumps({"annotations": dets}))
    assert _error(str(gt_path), str(tmp_path / "obj.json"), "lvis") == \
        _error(str(gt_path), str(tmp_path / "obj.json"), "hotcoco")


def test_empty_results_same_on_both_backends(tmp_path, capsys, caplog):
    gt_dict, _ = make_lvis_set(4, 0, seed=3, categories=copy.deepcopy(CATS))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_dict))
    (tmp_path / "dt.json").write_text("[]")
    # the API: every AP 0 (a model that detected nothing) with a warning, the same on both
    with caplog.at_level("WARNING"):
        res = {b: evaluate_lvis(str(gt_path), str(tmp_path / "dt.json"), tasks=("bbox", "segm"), backend=b).results
               for b in ("lvis", "hotcoco")}
    assert res["lvis"] == res["hotcoco"] and res["lvis"]["segm"]["AP"] == 0.0
    assert "no detections" in caplog.text
    # acp-data eval: an empty results file is an error, the same on both
    errs = set()
    for b in ("lvis", "hotcoco"):
        assert cli_main(["--gt", str(gt_path), "--dt", str(tmp_path / "dt.json"), "--out", str(tmp_path / b),
                         "--backend", b]) == 2
        errs.add(capsys.readouterr().err)
    assert len(errs) == 1 and "no detections" in errs.pop()


# ----- backend choice ----------------------------------------------------------------------------------------------
def test_backend_recorded_in_metrics_json_and_cli_choice(tmp_path, capsys):
    gt_dict, dets = make_lvis_set(5, 30, seed=9, categories=copy.deepcopy(CATS))
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt_dict))
    dt_path.write_text(json.dumps(dets))
    docs = {}
    for b in ("lvis", "hotcoco"):
        assert cli_main(["--gt", str(gt_path), "--dt", str(dt_path), "--out", str(tmp_path / b), "--backend", b,
                         "--per-category"]) == 0
        docs[b] = json.loads((tmp_path / b / "metrics.json").read_text())
        assert docs[b]["eval_backend"] == b
    assert "cat18" in capsys.readouterr().out  # the per-category table
    assert {k: v for k, v in docs["lvis"].items() if k != "eval_backend"} == \
        {k: v for k, v in docs["hotcoco"].items() if k != "eval_backend"}
    # the default is hotcoco
    assert cli_main(["--gt", str(gt_path), "--dt", str(dt_path), "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["eval_backend"] == "hotcoco"
    with pytest.raises(SystemExit):
        cli_main(["--gt", str(gt_path), "--dt", str(dt_path), "--out", str(tmp_path / "x"), "--backend", "fast"])


def test_resolve_backend(monkeypatch, caplog):
    assert resolve_backend(None) == "hotcoco" and resolve_backend("LVIS") == "lvis"
    with pytest.raises(EvaluationError, match="unknown evaluation backend 'pycocotools'"):
        resolve_backend("pycocotools")
    # without hotcoco the default falls back to lvis-api with one log line
    import acp_data.d2.eval_backends as eb

    monkeypatch.setitem(sys.modules, "hotcoco", None)
    monkeypatch.setattr(eb, "_fallback_logged", False)
    with caplog.at_level("WARNING"):
        assert resolve_backend(None) == "lvis" and resolve_backend("hotcoco") == "lvis"
    assert caplog.text.count("falls back to lvis-api") == 1

