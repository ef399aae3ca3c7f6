#!/usr/bin/env python
"""Judge calibration on the Shapes world: how CLIS-I separates correctly drawn objects from generation failures.

    .venv/bin/python benchmarks/judge_calibration.py                       # the demo cache (output/demo/cache)
    .venv/bin/python benchmarks/judge_calibration.py --cache DIR --thresholds 0,10,20,30,40,60
    .venv/bin/python benchmarks/judge_calibration.py --judge in_domain=local-dir:output/demo/judge_in_domain

The truth of every cached object (which came out right and which failed: wrong colour or shape, missing, merged, off
its box, smeared) is the record's ``shapes_truth`` provenance; a cache written before it was recorded is drawn again
(the Shapes generator is deterministic per scene, seed and candidate: ``generate_with_truth``). No selection rule but
``SELECT oracle`` sees that truth; this study uses it to pick an instance threshold on the judge's own scale and to
compare judges: each ``--judge NAME=SPEC`` scores every cached candidate again in memory with the ``clip`` scorer
and that model (``acp-data shapes judge --variant in_domain`` trains the judge that learned from the world's own
long tail), beside the cache's own scores (``cache``). The paper's 60 is on its VLM judge's scale; a CLIP-style
scorer (100 x softmax over the vocabulary) spreads correct objects lower. A dropped instance stays in the image unlabelled and trains as background,
so the threshold trades failed objects kept as labels against correct objects turned into background.

Prints, per failure kind, the CLIS-I quantiles; then, per threshold, over all candidates and over the selected ones
(``selected`` flag), the share of correct and of failed objects kept; then, per rare category and judge, the AUROC
of CLIS-I separating correctly drawn from failed objects and the shares kept at ``--threshold``. The last line is
one JSON object.
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
    """One row per cached instance: failure kind ('ok' when drawn right), CLIS-I, selected flag, category id, row."""
    from acp_data.cache.reader import CacheReader
    from acp_data.scene import SceneGraph
    from acp_data.shapes.generator import TRUTH_FIELD, ShapesGenerator
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
        failures = (rec["provenance"].get(TRUTH_FIELD) or {}).get("failures")
        if failures is None:  # written before the truth was recorded: draw the candidate again
            if gen is None:
                opts = {k: v for k, v in settings.items() if k not in ("name", "version", "candidates")}
                gen = ShapesGenerator(StageContext(categories=reader.categories), **opts)
            if rec["key"] not in drawn:  # records of one unit are adjacent: keep one unit's drawings at a time
                scene = SceneGraph.from_dict(rec["scene_graph"])
                drawn = {rec["key"]: gen.generate_with_truth(scene, int(settings.get("candidates", 4)), rec["seed"])}
            failures = drawn[rec["key"]][rec["candidate_idx"]].failures
        ids = [o["id"] for o in rec["scene_graph"]["objects"]]
        for j, inst in enumerate(rec["instances"]):
            score = inst["clis_i"]
            rows.append({"failure": failures[ids.index(inst["object_id"])] or "ok",
                         "clis_i": -1.0 if score is None else float(score), "selected": bool(rec["selected"]),
                         "unit": int(rec["unit"]), "category_id": int(inst["category_id"]), "row": row, "j": j,
                         "scores": {"cache": -1.0 if score is None else float(score)}})
    return rows


def rescore_rows(cache_dir: Path, rows: list[dict], name: str, spec: str, batch_size: int = 128) -> None:
    """Score every cached candidate again with the ``clip`` scorer and the model ``spec`` (in memory); each row gets
    ``scores[name]``."""
    from acp_data.cache.reader import CacheReader
    from acp_data.clis.rescore import candidate_from_record
    from acp_data.registry import SCORERS
    from acp_data.stages import StageContext

    reader = CacheReader(cache_dir)
    scorer = SCORERS.build("clip", StageContext(reader.categories), model=spec, batch_size=batch_size)
    by_row: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_row[r["row"]].append(r)
    todo = sorted(by_row)
    for s in range(0, len(todo), 64):
        cands, maps = [], []
        for row in todo[s:s + 64]:
            cand, obj_of = candidate_from_record(reader.read_record(row), reader.read_image(row))
            cands.append(cand)
            maps.append(obj_of)
        for row, sc, obj_of in zip(todo[s:s + 64], scorer.score(cands), maps):
            for r in by_row[row]:
                oi = obj_of[r["j"]]
                v = None if oi is None else sc.instances[oi]
                r["scores"][name] = -1.0 if v is None or not np.isfinite(v) else float(v)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Probability that a correctly drawn object scores above a failed one (ties count half); None without both."""
    if not len(pos) or not len(neg):
        return None
    p, n = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def per_category(rows: list[dict], categories, judges: list[str], threshold: float) -> dict[str, dict[str, dict]]:
    """Per judge and rare category: objects, AUROC, shares kept at ``threshold``; plus the mean AUROC over them."""
    out: dict[str, dict[str, dict]] = {}
    rare = [c for c in categories if c.frequency == "r"]
    for judge in judges:
        cats: dict[str, dict] = {}
        for c in rare:
            ok = np.array([r["scores"][judge] for r in rows if r["category_id"] == c.id and r["failure"] == "ok"])
            bad = np.array([r["scores"][judge] for r in rows if r["category_id"] == c.id and r["failure"] != "ok"])
            a = auroc(ok, bad)
            cats[c.name] = {"ok": len(ok), "failed": len(bad), "auroc": None if a is None else round(a, 3),
                            "ok_kept": round(float((ok >= threshold).mean()), 3) if len(ok) else None,
                            "failed_kept": round(float((bad >= threshold).mean()), 3) if len(bad) else None}
        vals = [v["auroc"] for v in cats.values() if v["auroc"] is not None]
        out[judge] = {"categories": cats, "mean_auroc": round(float(np.mean(vals)), 3) if vals else None}
    return out


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
    p.add_argument("--threshold", type=float, default=10.0,
                   help="the instance threshold of the per-category table (default 10, configs/shapes/acp.yaml)")
    p.add_argument("--judge", action="append", default=[], metavar="NAME=SPEC",
                   help="also score every candidate with this clip model (e.g. in_domain=local-dir:DIR; repeatable)")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    judges = {}
    for j in args.judge:
        if "=" not in j:
            p.error(f"--judge {j!r} must look like NAME=SPEC")
        name, spec = j.split("=", 1)
        judges[name.strip()] = spec.strip()
    rows = collect(Path(args.cache))
    for name, spec in judges.items():
        rescore_rows(Path(args.cache), rows, name, spec)

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
    from acp_data.cache.reader import CacheReader

    cats = per_category(rows, CacheReader(args.cache).categories, ["cache", *judges], args.threshold)
    print(f"\nrare categories: AUROC of CLIS-I (correct vs failed objects) and shares kept at CLIS-I >= "
          f"{args.threshold:g}")
    print("| category | judge | correct | failed | AUROC | correct kept | failed kept |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    for name in next(iter(cats.values()))["categories"] if cats else []:
        for judge, res in cats.items():
            c = res["categories"][name]
            print(f"| {name} | {judge} | {c['ok']} | {c['failed']} | "
                  f"{'n/a' if c['auroc'] is None else format(c['auroc'], '.2f')} | {pct(c['ok_kept'])} | "
                  f"{pct(c['failed_kept'])} |")
    print("mean AUROC over the rare categories: " + ", ".join(f"{j} {r['mean_auroc']}" for j, r in cats.items()))
    print(json.dumps({"instances": len(rows), "by_threshold": table, "rare_categories": cats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
