"""``acp-data rescore CACHE --scorer NAME``: recompute CLIS-I (and ``selected``; CLIS-L too with ``--priors``) for
every stored candidate of a cache, without touching an image, as a new index generation per shard.

Images, masks and scene graphs are read from the shards; the scores go to a new index generation of each shard
(``acp_data.cache.index.update_scores``), published shard by shard. An interrupted rescore leaves every shard it had
not finished on its previous generation; running the same command again skips the shards whose newest generation is
this rescore (same scorer settings, thresholds and layout settings: the ``rescore_id``) and does the rest. ``--force``
redoes them all.

Instances in a record are matched to scene-graph objects by ``object_id`` (written by the prebuild), else to the
first unmatched object of the same category; the scorer sees every scene object, with ``None`` masks for objects
that have no stored instance (the segmenter rejected them), exactly as in the prebuild. ``selected`` follows
:func:`acp_data.clis.select.select_unit` over the candidates stored for the unit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..scene import SceneGraph
from ..stages import Candidate, ImageScorer, StageContext, stable_hash
from .select import DEFAULT_MIN_CLIS_I, DEFAULT_MIN_CLIS_L, select_unit

logger = logging.getLogger(__name__)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def candidate_from_record(record: dict[str, Any], image: np.ndarray) -> tuple[Candidate, list[int | None]]:
    """The Candidate a scorer sees (every scene object; ``None`` mask where no instance is stored) and, per record
    instance, the index of its scene object (None when it matches none: it stays unscored)."""
    from ..masks import rle_to_mask

    scene = SceneGraph.from_dict(record["scene_graph"])
    h, w = image.shape[:2]
    masks: list[np.ndarray | None] = [None] * len(scene.objects)
    boxes = scene.boxes_xyxy(w, h)
    by_id = {o.id: i for i, o in enumerate(scene.objects)}
    used: set[int] = set()
    obj_of: list[int | None] = []
    for inst in record.get("instances", []):
        oi = by_id.get(inst.get("object_id"))
        if oi is None or oi in used:
            oi = next((i for i, o in enumerate(scene.objects)
                       if i not in used and o.category_id == int(inst["category_id"])), None)
        obj_of.append(oi)
        if oi is None:
            continue
        used.add(oi)
        masks[oi] = rle_to_mask(inst["segmentation"])
        if not np.isfinite(boxes[oi]).all():
            x, y, bw, bh = (float(v) for v in inst["layout_bbox"])
            boxes[oi] = (x, y, x + bw, y + bh)
    return Candidate(image, scene, boxes, masks), obj_of


def rescore_id(settings: dict[str, Any]) -> str:
    return stable_hash(settings, n=16)


def rescore_cache(cache_dir: str | Path, scorer: ImageScorer, min_clis_i: float = DEFAULT_MIN_CLIS_I,
                  min_clis_l: float = DEFAULT_MIN_CLIS_L, layout: Any = None, units_per_batch: int = 16,
                  force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Rescore a cache in place (new index generations); returns counts. ``layout``: a LayoutScorer to recompute
    CLIS-L (else the stored CLIS-L is kept). See the module docstring for resume and matching rules."""
    from tqdm import tqdm

    from ..cache.index import list_generations, read_meta, shard_scores, update_scores
    from ..cache.reader import CacheReader, decode_image

    reader = CacheReader(cache_dir)
    settings = {"scorer": scorer.settings(), "selection": {"min_clis_i": float(min_clis_i),
                                                           "min_clis_l": float(min_clis_l)},
                "layout": None if layout is None else layout.settings()}
    settings = json.loads(json.dumps(settings, default=str))
    rid = rescore_id(settings)
    stats: dict[str, Any] = {"rescore_id": rid, "shards": len(reader.shards), "shards_rescored": 0,
                             "shards_skipped": 0, "units": 0, "candidates": 0, "instances": 0,
                             "unmatched_instances": 0, "selection": Counter()}
    gens = list_generations(cache_dir)
    todo = []
    for info in reader.shards:
        meta = read_meta(cache_dir, info.name, gens[info.name][-1])
        if not force and meta.get("reason") == "rescore" and (meta.get("scoring") or {}).get("rescore_id") == rid:
            stats["shards_skipped"] += 1
        else:
            todo.append(info)
    if stats["shards_skipped"]:
        logger.info("rescore %s: %d of %d shards already done (same settings), skipped", rid,
                    stats["shards_skipped"], len(reader.shards))
    bar = tqdm(total=sum(i.num_samples for i in todo), unit="cand", desc="rescore", disable=not progress)
    for info in todo:
        sc = shard_scores(cache_dir, info.name)
        if len(sc.clis_i) != info.num_samples:
            raise RuntimeError(f"shard {info.name}: the reader sees {info.num_samples} samples but the newest index "
                               f"generation has {len(sc.clis_i)}; run `acp-data verify {cache_dir}` first")
        units: dict[str, list[tuple[int, dict[str, Any], bytes]]] = defaultdict(list)
        for local, record, img in reader.iter_shard(info.name):
            units[record["key"]].append((local, record, img))
        keys = list(units)
        for b in range(0, len(keys), max(1, int(units_per_batch))):
            batch = [sorted(units[k], key=lambda t: t[1]["candidate_idx"]) for k in keys[b:b + units_per_batch]]
            cands, objmaps = [], []
            for unit in batch:
                for _, record, img in unit:
                    c, obj_of = candidate_from_record(record, decode_image(img))
                    cands.append(c)
                    objmaps.append(obj_of)
            scores = scorer.score(cands)
            if len(scores) != len(cands):
                raise RuntimeError(f"scorer returned {len(scores)} scores for {len(cands)} candidates")
            i = 0
            for unit in batch:
                rows = [local for local, _, _ in unit]
                us = scores[i:i + len(unit)]
                maps = objmaps[i:i + len(unit)]
                first_cand = cands[i]
                i += len(unit)
                if layout is not None:
                    clis_l = layout.score(first_cand.scene).score
                    sc.clis_l[rows] = _nan(clis_l)
                clis_l_vals = [_none(sc.clis_l[r]) for r in rows]
                res = select_unit([s.image for s in us], clis_l_vals, [list(s.instances) for s in us],
                                  min_clis_i=min_clis_i, min_clis_l=min_clis_l)
                stats["selection"].update(res.reasons)
                for pos, (row, s, obj_of) in enumerate(zip(rows, us, maps)):
                    sc.clis_i[row] = _nan(s.image)
                    sc.selected[row] = pos == res.selected_idx
                    start = int(sc.inst_start[row])
                    if len(obj_of) != int(sc.inst_count[row]):
                        raise RuntimeError(f"shard {info.name} row {row}: the record has {len(obj_of)} instances, "
                                           f"the index {int(sc.inst_count[row])}")
                    for j, oi in enumerate(obj_of):
                        v = s.instances[oi] if oi is not None and oi < len(s.instances) else None
                        sc.inst_clis_i[start + j] = _nan(v)
                        stats["unmatched_instances"] += oi is None
                    stats["instances"] += len(obj_of)
                stats["units"] += 1
                stats["candidates"] += len(unit)
                bar.update(len(unit))
        gen = update_scores(cache_dir, sc, scoring={"rescore_id": rid, **settings})
        stats["shards_rescored"] += 1
        logger.info("rescore %s: shard %s -> index generation %d", rid, info.name, gen)
    bar.close()
    failures = getattr(scorer, "failures", None)
    if failures:
        stats["scorer_failures"] = dict(failures)
    stats["selection"] = dict(stats["selection"])
    return stats


# ----- command line -------------------------------------------------------------------------------------------------
def _parse_sets(items: Sequence[str], where: str) -> dict[str, Any]:
    """``a.b=value`` items -> nested dict; values parsed as YAML (numbers, booleans, lists, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{where} {item!r} must look like key=value (dots for nested keys: captioner.model=...)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where} {item!r}: {p} is both a value and a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, fail

    prog = "acp-data rescore"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter, epilog=(
                                         "A rescore publishes new index generations; `acp-data generations CACHE` "
                                         "lists them and `--use N` makes an earlier one current again."))
    parser.add_argument("cache", help="cache directory written by `acp-data prebuild`")
    parser.add_argument("--scorer", required=True, help="clip, vlm, or an import path package.module:Class")
    parser.add_argument("--options", default=None, help="YAML/JSON file with the scorer's options (a mapping)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a scorer option (repeatable; dots for nested keys, values parsed as YAML), e.g. "
                        "model=local-dir:PATH or model=ViT-B-32 pretrained=openai; the scorer stops if no weights "
                        "are named (docs/plugins.md)")
    parser.add_argument("--min-clis-i", type=float, default=None,
                        help="instance threshold of `selected` (default: the one the cache records, from its "
                        f"last rescore or its prebuild settings, else {DEFAULT_MIN_CLIS_I:g})")
    parser.add_argument("--min-clis-l", type=float, default=None,
                        help="layout threshold of `selected` (default: the one the cache records, else "
                        f"{DEFAULT_MIN_CLIS_L:g})")
    parser.add_argument("--priors", default=None, help="priors file: also recompute CLIS-L (default: keep the stored "
                        "CLIS-L)")
    parser.add_argument("--layout-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a LayoutScorer option with --priors (percentile=98, min_refs=5, ...)")
    parser.add_argument("--device", default="cpu", help="torch device of the scorer")
    parser.add_argument("--dtype", default="float32", help="model dtype (float32, float16, bfloat16)")
    parser.add_argument("--units-per-batch", type=int, default=16, help="work units scored per scorer call")
    parser.add_argument("--force", action="store_true", help="rescore shards already rescored with these settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..cache.generations import selected_count
    from ..cache.layout import CacheError
    from ..cache.manifest import recorded_selection_defaults
    from ..cache.reader import CacheReader
    from ..priors import Priors, PriorsError
    from ..registry import SCORERS, RegistryError

    try:
        if not Path(args.cache).is_dir():
            raise ValueError(f"cache directory {args.cache!r} does not exist")
        recorded = recorded_selection_defaults(args.cache)
        min_clis_i = recorded.min_clis_i if args.min_clis_i is None else args.min_clis_i
        min_clis_l = recorded.min_clis_l if args.min_clis_l is None else args.min_clis_l
        if args.min_clis_i is None or args.min_clis_l is None:
            logger.info("rescore thresholds: min_clis_i %g, min_clis_l %g (defaults from %s)", min_clis_i,
                        min_clis_l, recorded.source)
        options: dict[str, Any] = {}
        if args.options:
            import yaml

            try:
                loaded = yaml.safe_load(Path(args.options).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"cannot read --options {args.options!r}: {e}") from e
            if not isinstance(loaded, dict):
                raise ValueError(f"--options {args.options!r} must hold a mapping of scorer options")
            options = loaded
        options = _merge(options, _parse_sets(args.sets, "--set"))
        categories = CacheReader(args.cache).categories
        priors = Priors.load(args.priors) if args.priors else None
        ctx = StageContext(categories, priors, device=args.device, dtype=args.dtype)
        scorer = SCORERS.build(args.scorer, ctx, **options)
        layout = None
        if priors is not None:
            from .layout import LayoutScorer

            if len(priors.categories) != len(categories):
                raise ValueError(f"priors {args.priors} have {len(priors.categories)} categories, the cache "
                                 f"{len(categories)}")
            layout = LayoutScorer(priors, **_parse_sets(args.layout_set, "--layout-set"))
        before = selected_count(args.cache)
        stats = rescore_cache(args.cache, scorer, min_clis_i=min_clis_i, min_clis_l=min_clis_l,
                              layout=layout, units_per_batch=args.units_per_batch, force=args.force,
                              progress=not args.no_progress)
        stats["selected_before"], stats["selected_after"] = before, selected_count(args.cache)
    except (ValueError, CacheError, PriorsError, RegistryError, FileNotFoundError) as e:
        return fail(prog, e)
    print(json.dumps(stats, indent=1, sort_keys=True))
    print(f"{args.cache}: selected {stats['selected_before']} -> {stats['selected_after']} samples "
          f"(min_clis_i {min_clis_i:g}, min_clis_l {min_clis_l:g}); undo with `acp-data generations {args.cache}` "
          "and --use N", file=sys.stderr)
    return 0
