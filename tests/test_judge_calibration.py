"""benchmarks/judge_calibration.py's per-category table without a cache: AUROC of CLIS-I for correctly drawn
against failed objects, per rare category and judge, and the shares kept at the threshold."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import judge_calibration as jc  # noqa: E402

from acp_data.shapes.world import world_category_table  # noqa: E402


def test_auroc_counts_ties_half():
    assert jc.auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == 0.875
    assert jc.auroc(np.array([5.0]), np.array([1.0, 2.0])) == 1.0
    assert jc.auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert jc.auroc(np.array([1.0]), np.array([])) is None


def test_per_category_by_judge():
    cats = world_category_table("demo")
    rare = [c for c in cats if c.frequency == "r"]
    a, b = rare[0], rare[1]
    rows = []
    for score_web, score_dom, failure in ((90, 1, "ok"), (80, 2, "ok"), (10, 3, "wrong_colour")):
        rows.append({"category_id": a.id, "failure": failure, "scores": {"web": score_web, "in_domain": score_dom}})
    rows.append({"category_id": b.id, "failure": "ok", "scores": {"web": 50, "in_domain": 50}})
    rows.append({"category_id": cats[1].id if cats[1].frequency != "r" else cats[2].id, "failure": "smear",
                 "scores": {"web": 0, "in_domain": 0}})  # not a rare category: not in the table
    out = jc.per_category(rows, cats, ["web", "in_domain"], threshold=20.0)
    web, dom = out["web"]["categories"], out["in_domain"]["categories"]
    assert set(web) == {c.name for c in rare}
    assert web[a.name] == {"ok": 2, "failed": 1, "auroc": 1.0, "ok_kept": 1.0, "failed_kept": 0.0}
    assert dom[a.name]["auroc"] == 0.0 and dom[a.name]["ok_kept"] == 0.0
    assert web[b.name]["auroc"] is None and web[b.name]["ok_kept"] == 1.0 and web[b.name]["failed_kept"] is None
    assert out["web"]["mean_auroc"] == 1.0 and out["in_domain"]["mean_auroc"] == 0.0
