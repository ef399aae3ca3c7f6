"""acp-data report: grouping by seed, mean +- std, tables, plots and the mask-format check."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from acp_data.report import ReportError, make_report


def _run(root: Path, name: str, seed: int, enabled: bool, apr: float, ratio: float = 0.5, fmt: str = "polygon",
         mode: str = "ratio", **acp: Any) -> Path:
    d = root / name
    d.mkdir(parents=True)
    seg = {"AP": 20.0 + seed, "AP50": 1.0, "AP75": 1.0, "APs": None, "APm": 1.0, "APl": 1.0,
           "APr": apr, "APc": 15.0, "APf": 30.0}
    (d / "metrics.json").write_text(json.dumps({"bbox": seg, "segm": seg, "dataset": "x", "iter": 10,
                                                "config_sha": "abc"}))
    cfg = {"SEED": seed, "OUTPUT_DIR": str(d), "INPUT": {"MASK_FORMAT": fmt},
           "ACP": {"ENABLED": enabled, "SYNTH_RATIO": ratio, "MIX_MODE": mode, **acp}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_groups_mean_std_tables_and_plots(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "baseline_seed0", 0, False, 1.0),
        _run(tmp_path, "baseline_seed1", 1, False, 3.0),
        _run(tmp_path, "acp_r0.25_seed0", 0, True, 10.0, ratio=0.25),
        _run(tmp_path, "acp_r0.5_seed0", 0, True, 14.0, ratio=0.5),
        _run(tmp_path, "acp_r0.5_seed1", 1, True, 16.0, ratio=0.5),
    ]
    out = tmp_path / "report"
    summary = make_report(runs, out)
    assert set(summary) == {"baseline", "acp_r0.25", "acp_r0.5"}
    base = summary["baseline"]["segm_APr"]
    assert base["n"] == 2 and base["mean"] == pytest.approx(2.0) and base["std"] == pytest.approx(2 ** 0.5)
    assert summary["acp_r0.5"]["segm_APr"]["mean"] == pytest.approx(15.0)
    md = (out / "report.md").read_text()
    assert "2.0 ± 1.4" in md and "Mask format of all runs: `polygon`" in md
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 5 and {r["group"] for r in rows} == set(summary)
    for name in ("ap_groups_segm.png", "ap_groups_bbox.png", "apr_sweep.png"):
        assert (out / name).stat().st_size > 5000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concat_runs_are_not_points_of_a_ratio_sweep(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "baseline_seed0", 0, False, 1.0),
            _run(tmp_path, "acp_seed0", 0, True, 15.0, ratio=0.5, mode="concat"),  # SYNTH_RATIO unused in concat
            _run(tmp_path, "ratio_0.1_seed0", 0, True, 10.0, ratio=0.1)]
    make_report(runs, tmp_path / "one")
    assert not (tmp_path / "one" / "apr_sweep.png").exists()  # one ratio point is no sweep
    make_report([*runs, _run(tmp_path, "ratio_0.25_seed0", 0, True, 12.0, ratio=0.25)], tmp_path / "two")
    assert (tmp_path / "two" / "apr_sweep.png").is_file()


def test_mixed_mask_formats_rejected(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", 0, False, 1.0, fmt="polygon")
    b = _run(tmp_path, "b", 0, True, 1.0, fmt="bitmask")
    with pytest.raises(ReportError, match="MASK_FORMAT"):
        make_report([a, b], tmp_path / "out")


def test_missing_metrics_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty.*metrics.json"):
        make_report([tmp_path / "empty"], tmp_path / "out")


def test_eval_backend_shown_and_not_a_group_key(tmp_path: Path) -> None:
    a = _run(tmp_path, "acp_seed0", 0, True, 10.0)
    b = _run(tmp_path, "acp_seed1", 1, True, 12.0)
    old = _run(tmp_path, "acp_seed2", 2, True, 14.0)  # a metrics.json from before eval_backend: lvis-api's
    for run, backend in ((a, "hotcoco"), (b, "lvis")):
        m = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**m, "eval_backend": backend}))
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["ACP"]["EVAL_BACKEND"] = backend
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = make_report([a, b, old], tmp_path / "out")
    assert list(summary) == ["acp"] and summary["acp"]["segm_APr"]["n"] == 3  # one group: the backend changes nothing
    md = (tmp_path / "out" / "report.md").read_text()
    assert "acp_seed0: hotcoco, acp_seed1: lvis, acp_seed2: lvis" in md
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert [r["eval_backend"] for r in rows] == ["hotcoco", "lvis", "lvis"]
    make_report([a], tmp_path / "one")
    assert "Evaluation backend of all runs: `hotcoco`." in (tmp_path / "one" / "report.md").read_text()


def test_groups_differing_in_more_than_the_cap_are_no_sweep(tmp_path: Path) -> None:
    """The held-out table's groups: random capped at 381 images, CLIS uncapped (0), oracle capped at 383. They differ
    in the selection rule too, so no APr-against-MAX_IMAGES curve may be drawn through them."""
    def run(name: str, select: str, cap: int, apr: float) -> Path:
        return _run(tmp_path, name, 0, True, apr, mode="concat", SELECT=select, MAX_IMAGES=cap)

    runs = [_run(tmp_path, "baseline_seed0", 0, False, 1.0), run("unfiltered_seed0", "random", 381, 18.0),
            run("filtered_seed0", "clis", 0, 19.0), run("oracle_seed0", "oracle", 383, 19.0)]
    make_report(runs, tmp_path / "one")
    assert not (tmp_path / "one" / "apr_sweep.png").exists()
    # the same selection at two caps is a sweep (0, no cap, is no point of it)
    runs += [run("cap100_seed0", "clis", 100, 12.0), run("cap200_seed0", "clis", 200, 15.0)]
    make_report(runs, tmp_path / "two")
    assert (tmp_path / "two" / "apr_sweep.png").is_file()
