#!/usr/bin/env python
"""The CLIS-I instance rules against the Shapes generator's truth: what ``MIN_CLIS_I_RULE`` absolute and per_category
keep, per category.

    .venv/bin/python benchmarks/selection_rules.py                          # the demo cache (output/demo/cache)
    .venv/bin/python benchmarks/selection_rules.py --cache DIR --rules absolute:20,absolute:60,per_category:60:0.5

Every cached candidate of the Shapes generator can be drawn again with its truth (which objects came out right;
``benchmarks/judge_calibration.py`` does the same), so each rule's kept instances can be split into correct and failed
ones. For each rule (``absolute:T`` or ``per_category:T:Q``, over the selection of ``--select``, every category) it
prints the instances kept, the share of correct and of failed instances kept, the label precision, and the categories
that have scored instances but keep none (an absolute threshold on a scorer whose scale differs by category empties
them; the per-category rule cannot). The last line is one JSON object.

Measured on the Shapes demo cache (world seed 0, 3,625 instances of which 1,210 failed; SELECT clis; 2-core CPU):
absolute 20 keeps 93.1 % of the correct and 28.1 % of the failed instances (precision 0.953), absolute 60 53.4 % /
7.8 % (0.977) and empties striped triangle (0/45) and striped cross (0/40), per_category 60 q 0.5 72.1 % / 12.5 %
(0.972) and empties none, per_category 20 q 0.5 94.1 % / 30.5 % (0.950).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def truth(cache_dir: Path) -> dict[tuple[int, int], bool]:
    """``(row, instance position) -> drawn correctly`` for every cached instance."""
    from acp_data.cache.reader import CacheReader
    from acp_data.scene import SceneGraph
    from acp_data.shapes.generator import ShapesGenerator
    from acp_data.stages import StageContext

    reader = CacheReader(cache_dir)
    gen = None
    drawn: dict[str, list] = {}
    out = {}
    for row in range(len(reader)):
        rec = reader.read_record(row)
        settings = rec["provenance"]["generator"]["settings"]
        if settings.get("name") != "ShapesGenerator":
            raise SystemExit(f"selection_rules: {cache_dir} was not made by the shapes generator")
        if gen is None:
            opts = {k: v for k, v in settings.items() if k not in ("name", "version", "candidates")}
            gen = ShapesGenerator(StageContext(categories=reader.categories), **opts)
        if rec["key"] not in drawn:
            drawn = {rec["key"]: gen.generate_with_truth(SceneGraph.from_dict(rec["scene_graph"]),
                                                         int(settings.get("candidates", 4)), rec["seed"])}
        t = drawn[rec["key"]][rec["candidate_idx"]]
        ids = [o["id"] for o in rec["scene_graph"]["objects"]]
        for j, inst in enumerate(rec["instances"]):
            out[(row, j)] = not t.failures[ids.index(inst["object_id"])]
    return out


def evaluate(cache_dir: Path, rules: list[str], select_mode: str) -> dict:
    from acp_data.cache.reader import CacheReader
    from acp_data.cache.selection import Selection, select

    ok = truth(cache_dir)
    reader = CacheReader(cache_dir)
    cats = reader.categories
    n_ok, n_bad = sum(ok.values()), sum(not v for v in ok.values())
    out = {"cache": str(cache_dir), "select": select_mode, "instances": len(ok), "correct": n_ok, "failed": n_bad,
           "rules": {}}
    for spec in rules:
        parts = spec.split(":")
        rule, thr = parts[0], float(parts[1])
        q = float(parts[2]) if len(parts) > 2 else 0.5
        base = select(reader, Selection(select=select_mode, min_clis_i=0.0, min_clis_l=0.0))
        res = select(reader, Selection(select=select_mode, min_clis_i=thr, min_clis_l=0.0, min_clis_i_rule=rule,
                                       min_clis_i_quantile=q))
        kept = [(int(res.sample_row[k]), int(j)) for k in range(len(res)) for j in res.inst_local[res.instances(k)]]
        cand = [(int(base.sample_row[k]), int(j)) for k in range(len(base)) for j in base.inst_local[base.instances(k)]]
        k_ok = sum(ok[x] for x in kept)
        c_ok = sum(ok[x] for x in cand)
        per_cat = np.bincount(res.inst_category_id, minlength=len(cats) + 1)[1:]
        scored = np.bincount(base.inst_category_id, minlength=len(cats) + 1)[1:]
        empty = [cats[i + 1].name for i in np.flatnonzero((scored > 0) & (per_cat == 0))]
        out["rules"][spec] = {
            "kept_instances": len(kept), "kept_images": len(res),
            "correct_kept": round(k_ok / max(c_ok, 1), 3),
            "failed_kept": round((len(kept) - k_ok) / max(len(cand) - c_ok, 1), 3),
            "label_precision": round(k_ok / max(len(kept), 1), 3),
            "emptied_categories": empty,
            "fewest_kept": sorted(((cats[i + 1].name, int(per_cat[i]), int(scored[i]))
                                   for i in np.flatnonzero(scored > 0)), key=lambda t: t[1] / t[2])[:4],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="output/demo/cache", help="a cache built by configs/shapes/prebuild.yaml")
    p.add_argument("--rules", default="absolute:20,absolute:60,per_category:60:0.5,per_category:20:0.5",
                   help="comma-separated absolute:T or per_category:T:Q")
    p.add_argument("--select", default="clis", help="ACP.SELECT for every rule (default clis)")
    a = p.parse_args(argv)
    res = evaluate(Path(a.cache), [r for r in a.rules.split(",") if r], a.select)
    print(f"{res['instances']} cached instances ({res['correct']} drawn right, {res['failed']} failed), SELECT "
          f"{res['select']}")
    for spec, r in res["rules"].items():
        print(f"{spec:>22}: {r['kept_instances']} kept in {r['kept_images']} images; correct kept "
              f"{r['correct_kept']:.3f}, failed kept {r['failed_kept']:.3f}, precision {r['label_precision']:.3f}; "
              f"emptied {r['emptied_categories'] or 'none'}; fewest kept {r['fewest_kept']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
