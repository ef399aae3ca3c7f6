#!/usr/bin/env python
"""Per-category mask AP of one frequency group (rare by default) for finished runs, from their saved detections.

    .venv/bin/python benchmarks/per_category_ap.py --gt output/demo/datasets/shapes/val.json \\
        output/ablation/runs/baseline_seed1 output/ablation/runs/filtered_seed1 ... > per_category.md

Each run's ``inference/<dataset>/lvis_instances_results.json`` is evaluated again through the same backend as the
training evaluation (``--backend``; default: the one recorded in the run's ``metrics.json``, else hotcoco; both give
lvis-api's numbers) and the AP of every category of the group is read from the precision array, so a change in APr
can be traced to the categories that moved. Prints a markdown table by run and one by group (runs named
``NAME_seedS`` are averaged over seeds); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def category_ap(gt: object, detections: Path, iou_type: str, cat_ids: list[int],
                backend: str | None = None) -> dict[int, float | None]:
    """AP (percent) of each of ``cat_ids``, from the same evaluation ``metrics.json`` comes from."""
    from acp_data.d2.evaluation import evaluate_lvis, per_category_ap

    ev = evaluate_lvis(gt, detections, tasks=(iou_type,), backend=backend)
    return {cid: None if v is None else round(v, 1)
            for cid, v in per_category_ap(ev.tasks[iou_type]).items() if cid in cat_ids}


def run_backend(run: Path) -> str | None:
    """The backend recorded in the run's ``metrics.json`` (``None`` when it records none)."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("eval_backend")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (OUTPUT_DIR of tools/train_net.py)")
    p.add_argument("--gt", required=True, help="the LVIS-format json the runs were evaluated on")
    p.add_argument("--group", default="r", choices=("r", "c", "f"), help="frequency group (default: rare)")
    p.add_argument("--iou-type", default="segm", choices=("segm", "bbox"))
    p.add_argument("--backend", choices=("hotcoco", "lvis"),
                   help="evaluation backend (default: the run's metrics.json eval_backend, else hotcoco)")
    args = p.parse_args(argv)

    from acp_data.d2.evaluation import GroundTruth

    gt = GroundTruth.load(args.gt)
    cats = {c["id"]: c["name"] for c in gt.dataset["categories"] if c.get("frequency") == args.group}
    if not cats:
        raise SystemExit(f"per_category_ap: {args.gt} has no categories of frequency {args.group!r}")
    ids = sorted(cats)
    by_run: dict[str, dict[int, float | None]] = {}
    for run in args.runs:
        found = sorted(Path(run).glob("inference/*/lvis_instances_results.json"))
        if not found:
            raise SystemExit(f"per_category_ap: no inference/*/lvis_instances_results.json under {run}")
        backend = args.backend or run_backend(Path(run))
        by_run[Path(run).name] = category_ap(gt, found[0], args.iou_type, ids, backend)

    def table(rows: dict[str, list[float | None]], first: str) -> None:
        print(f"| {first} | " + " | ".join(cats[i] for i in ids) + f" | AP{args.group} |")
        print("|---|" + "---:|" * (len(ids) + 1))
        for name, vals in rows.items():
            known = [v for v in vals if v is not None]
            mean = f"{np.mean(known):.1f}" if known else "n/a"
            print(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + f" | {mean} |")
        print()

    print(f"{args.iou_type} AP per {dict(r='rare', c='common', f='frequent')[args.group]} category\n")
    table({n: [r[i] for i in ids] for n, r in by_run.items()}, "run")
    groups: dict[str, list[dict[int, float | None]]] = {}
    for n, r in by_run.items():
        groups.setdefault(n.rsplit("_seed", 1)[0], []).append(r)
    table({g: [float(np.mean(v)) if (v := [r[i] for r in rs if r[i] is not None]) else None for i in ids]
           for g, rs in groups.items()}, "group (mean over seeds)")
    print(json.dumps({"categories": {i: cats[i] for i in ids}, "runs": by_run}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
