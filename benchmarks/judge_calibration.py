#!/usr/bin/env python
"""Judge calibration on the Shapes world: how CLIS-I separates correctly drawn objects from generation failures.

    .venv/bin/python benchmarks/judge_calibration.py                       # the demo cache (output/demo/cache)
    .venv/bin/python benchmarks/judge_calibration.py --cache DIR --thresholds 0,10,20,30,40,60

The Shapes generator is deterministic per (scene, seed, candidate), so every cached candidate can be drawn again with
its truth (``generate_with_truth``): which objects came out right and which failed (wrong colour or shape, missing,
merged, off its box, smeared). The pipeline never sees that truth; this study uses it to pick an instance threshold
on the judge's own scale. The paper's 60 is on its VLM judge's scale; a CLIP-style scorer (100 x softmax over the
vocabulary) spreads correct objects lower. A dropped instance stays in the image unlabelled and trains as background,
so the threshold trades failed objects kept as labels against correct objects turned into background.

Prints, per failure kind, the CLIS-I quantiles; then, per threshold, over all candidates and over the selected ones
(``selected`` flag), the share of correct and of failed objects kept. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def collect(cache_dir: Path) -> list[dict]:
    """One row per cached instance: failure kind ('ok' when drawn right), CLIS-I, selected flag, category id."""
    from acp_data.cache.reader import CacheReader
    from acp_data.scene import SceneGraph
    from acp_data.shapes.generator import ShapesGenerator
    from acp_data.stages import StageContext

    reader = CacheReader(cache_dir)
    if len(reader) == 0:
        raise SystemExit(f"judge_calibration: {cache_dir} holds no samples")
    gen: ShapesGenerator | None = None
    drawn: dict[str, list] = {}
    rows = []
    for row in range(len(reader)):
        rec = reader.read_record(row)
        settings = rec["provenance"]["generator"]["settings"]
        if settings.get("name") != "ShapesGenerator":
            raise SystemExit(f"judge_calibration: {cache_dir} was not made by the shapes generator "
                             f"(row {row}: {settings.get('name')!r})")
        if gen is None:
            opts = {k: v for k, v in settings.items() if k not in ("name", "version", "candidates")}
            gen = ShapesGenerator(StageContext(categories=reader.categories), **opts)
        if rec["key"] not in drawn:  # records of one unit are adjacent: keep one unit's drawings at a time
            scene = SceneGraph.from_dict(rec["scene_graph"])
            drawn = {rec["key"]: gen.generate_with_truth(scene, int(settings.get("candidates", 4)), rec["seed"])}
        truth = drawn[rec["key"]][rec["candidate_idx"]]
        ids = [o["id"] for o in rec["scene_graph"]["objects"]]
        for inst in rec["instances"]:
            score = inst["clis_i"]
            rows.append({"failure": truth.failures[ids.index(inst["object_id"])] or "ok",
                         "clis_i": -1.0 if score is None else float(score), "selected": bool(rec["selected"]),
                         "unit": int(rec["unit"]), "category_id": int(inst["category_id"])})
    return rows


def kept_shares(rows: list[dict], t: float) -> dict[str, float | int]:
    ok = np.array([r["clis_i"] for r in rows if r["failure"] == "ok"])
    bad = np.array([r["clis_i"] for r in rows if r["failure"] != "ok"])
    kept_ok, kept_bad = int((ok >= t).sum()), int((bad >= t).sum())
    return {"threshold": t, "ok": len(ok), "failed": len(bad), "ok_kept": round(kept_ok / max(len(ok), 1), 3),
            "failed_kept": round(kept_bad / max(len(bad), 1), 3),
            "label_precision": round(kept_ok / max(kept_ok + kept_bad, 1), 3), "ok_dropped": int(len(ok) - kept_ok)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="output/demo/cache", help="a cache built by configs/shapes/prebuild.yaml "
                                                                  "with keep: all")
    p.add_argument("--thresholds", default="0,10,20,30,40,50,60", help="comma-separated CLIS-I thresholds")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = collect(Path(args.cache))

    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_kind[r["failure"]].append(r["clis_i"])
    print(f"{len(rows)} instances in {args.cache}\n")
    print("| object | n | mean CLIS-I | p10 | p25 | p50 | p75 | p90 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in sorted(by_kind, key=lambda k: (k != "ok", k)):
        v = np.array(by_kind[kind])
        q = np.percentile(v, [10, 25, 50, 75, 90])
        print(f"| {kind} | {len(v)} | {v.mean():.1f} | " + " | ".join(f"{x:.1f}" for x in q) + " |")

    table = {}
    for name, subset in (("all", rows), ("selected", [r for r in rows if r["selected"]])):
        print(f"\n{name} candidates: objects kept as labels at each instance threshold")
        print("| CLIS-I >= | correct kept | failed kept | label precision | correct dropped (unlabelled) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        table[name] = [kept_shares(subset, t) for t in thresholds]
        for s in table[name]:
            print(f"| {s['threshold']:g} | {s['ok_kept']:.0%} | {s['failed_kept']:.0%} | {s['label_precision']:.0%} "
                  f"| {s['ok_dropped']} |")
    print(json.dumps({"instances": len(rows), "by_threshold": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
