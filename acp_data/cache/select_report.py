"""What a training run would get from its caches, before it runs: ``acp-data select CACHE --config CFG [KEY VALUE
...] [--json]`` and the ``selection_report`` entry of ``acp_run.json`` (the same function).

The report holds the settings (with the keys that act at load time), what each rule removed, images and instances
kept per frequency group and per category (the ``--top`` most and least kept of the chosen categories), the
instances each kept image carries unlabelled (and what ``ACP.DROPPED_INSTANCES`` does with them), the per-category
thresholds of ``MIN_CLIS_I_RULE: per_category``, and the warnings (starved categories, thresholds a cache cannot
honour). docs/cache.md "Python API".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..categories import FREQUENCIES, GROUP_NAMES, CategoryTable
from .selection import DROP_REASONS, SelectionResult

__all__ = ["selection_report", "format_report", "cli_main", "RULES"]

# (stats key, the rule, what the count is): in the order the rules run (acp_data/cache/selection.py).
RULES = (
    ("duplicates", "duplicates of a (key, candidate)", "samples removed"),
    ("after_select", "ACP.SELECT", "samples kept"),
    ("after_min_clis_l", "ACP.MIN_CLIS_L", "samples kept"),
    ("dropped_target_samples", "ACP.CATEGORIES (samples, by the unit's target)", "samples removed"),
    ("dropped_min_clis_i", "ACP.MIN_CLIS_I", "instances dropped from kept samples"),
    ("dropped_oracle", "ACP.SELECT oracle (the generator's failed objects)", "instances dropped from kept samples"),
    ("dropped_categories", "ACP.CATEGORIES (instances)", "instances dropped from kept samples"),
    ("empty_skipped", "samples left without instances", "samples removed"),
    ("capped", "ACP.MAX_IMAGES", "samples removed"),
)


def _name(categories: CategoryTable, cid: int) -> str:
    try:
        return categories[int(cid)].name
    except Exception:  # an id outside the table: report it as an id
        return f"id {int(cid)}"


def _kept_targets(result: SelectionResult, readers: Sequence[Any]) -> np.ndarray:
    """The target concept of every kept image (the category its unit was drawn for)."""
    from .selection import _targets

    per_cache = [_targets(r) for r in readers]
    out = np.full(len(result), -1, dtype=np.int64)
    for i, t in enumerate(per_cache):
        at = np.flatnonzero(result.cache_index == i)
        out[at] = t[result.sample_row[at]]
    return out


def selection_report(result: SelectionResult, categories: CategoryTable, dropped_policy: str = "background",
                     top: int = 10, readers: Sequence[Any] | None = None) -> dict[str, Any]:
    """The facts of one load-time selection as a JSON-ready dict (see the module docstring). With the ``readers``
    the selection ran over, each category also gets ``drawn_for``: the kept images whose unit was drawn for it."""
    sel, st = result.selection, result.stats
    k = len(categories)
    drawn = None
    if readers is not None:
        t = _kept_targets(result, readers)
        drawn = np.bincount(np.clip(t, 0, k), minlength=k + 1)[1:]
    ids = np.arange(1, k + 1)
    inst = np.bincount(np.clip(result.inst_category_id.astype(np.int64), 0, k), minlength=k + 1)[1:]
    imgs = result.category_image_counts(k)
    drop = np.bincount(np.clip(result.drop_category_id.astype(np.int64), 0, k), minlength=k + 1)[1:]
    freq = np.array([categories[int(i)].frequency for i in ids]) if k else np.zeros(0, dtype="<U1")
    pos, cats = result.sample_category_pairs()
    groups: dict[str, dict[str, int]] = {}
    for g in FREQUENCIES:
        in_g = freq == g
        g_ids = set(ids[in_g].tolist())
        img_g = len(np.unique(pos[np.isin(cats, list(g_ids))])) if len(pos) else 0
        groups[GROUP_NAMES[g]] = {"categories": int(in_g.sum()), "categories_with_instances": int(
            ((inst > 0) & in_g).sum()), "images": int(img_g), "instances": int(inst[in_g].sum()),
            "dropped_instances": int(drop[in_g].sum())}
    chosen = ids if sel.category_ids is None else np.array([c for c in sel.category_ids if 1 <= c <= k], dtype=int)

    def row(c: int) -> dict[str, Any]:
        out = {"id": int(c), "name": _name(categories, c), "frequency": str(freq[c - 1]),
               "images": int(imgs[c - 1]), "instances": int(inst[c - 1]), "dropped_instances": int(drop[c - 1])}
        if drawn is not None:
            out["drawn_for"] = int(drawn[c - 1])
        return out

    order = sorted(chosen.tolist(), key=lambda c: (-inst[c - 1], c))
    rules = []
    for key, what, unit in RULES:
        if key in st:
            rules.append({"rule": what, "key": key, "count": int(st[key]), "unit": unit})
    reasons = np.bincount(result.drop_reason.astype(np.int64), minlength=len(DROP_REASONS))
    starved = [row(c) for c in chosen.tolist() if inst[c - 1] == 0]
    warnings = list(result.warnings)
    if len(starved):
        warnings.append(f"{len(starved)} of the {len(chosen)} chosen categories get no synthetic instance: "
                        + ", ".join(r["name"] for r in starved[:10]) + (", ..." if len(starved) > 10 else ""))
    out: dict[str, Any] = {
        "settings": sel.to_dict(),
        "dropped_instances_policy": dropped_policy,
        "samples_in_caches": int(st.get("samples", 0)), "instances_in_caches": int(st.get("instances", 0)),
        "units": int(st.get("units", 0)),
        "kept_images": int(len(result)), "kept_instances": int(len(result.inst_category_id)),
        "rules": rules,
        "per_group": groups,
        "chosen_categories": int(len(chosen)),
        "categories_with_instances": int(sum(1 for c in chosen.tolist() if inst[c - 1] > 0)),
        "top_categories": [row(c) for c in order[:top]],
        "bottom_categories": [row(c) for c in order[::-1][:top]],
        "starved_categories": [r["name"] for r in starved],
        "dropped_in_kept_images": {name: int(reasons[i]) for i, name in enumerate(DROP_REASONS)},
        "warnings": warnings,
    }
    thr = result.min_clis_i_by_category
    if thr is not None:
        t = thr[1:k + 1] if len(thr) > k else np.concatenate([thr[1:], np.full(k + 1 - len(thr), np.nan)])
        lowered = np.flatnonzero(~np.isnan(t) & (t < sel.min_clis_i))
        out["per_category_thresholds"] = {
            "quantile": float(sel.min_clis_i_quantile), "absolute": float(sel.min_clis_i),
            "lowered": int(len(lowered)),
            "lowest": [{"name": _name(categories, i + 1), "threshold": round(float(t[i]), 3)}
                       for i in lowered[np.argsort(t[lowered], kind="stable")][:top]],
        }
    return out


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    s = r["settings"]
    lines = [f"load-time selection: SELECT {s['select']}, MIN_CLIS_I {s['min_clis_i']:g} ({s['min_clis_i_rule']}"
             + (f", quantile {s['min_clis_i_quantile']:g}" if s["min_clis_i_rule"] == "per_category" else "")
             + f"), MIN_CLIS_L {s['min_clis_l']:g}, CATEGORIES "
             + ("all" if s["category_ids"] is None else f"{len(s['category_ids'])} categories")
             + f" applied to {s['categories_apply_to']}, MAX_IMAGES {s['max_images']}, SEED {s['seed']}",
             f"caches: {r['samples_in_caches']} samples ({r['units']} units), {r['instances_in_caches']} instances",
             f"kept: {r['kept_images']} images, {r['kept_instances']} labelled instances",
             "rules, in order:"]
    lines += [f"  {x['rule']}: {x['count']} {x['unit']}" for x in r["rules"]]
    lines.append("per frequency group (images containing the group, labelled instances, unlabelled instances):")
    lines += [f"  {g}: {v['images']} images, {v['instances']} instances of {v['categories_with_instances']}/"
              f"{v['categories']} categories, {v['dropped_instances']} dropped" for g, v in r["per_group"].items()]
    lines.append(f"chosen categories with instances: {r['categories_with_instances']}/{r['chosen_categories']}")
    for title, key in (("most kept", "top_categories"), ("least kept", "bottom_categories")):
        lines.append(f"{title}:")
        lines += [f"  {c['name']} ({c['frequency']}): {c['images']} images"
                  + (f" ({c['drawn_for']} drawn for it)" if "drawn_for" in c else "")
                  + f", {c['instances']} instances, {c['dropped_instances']} dropped" for c in r[key]]
    d = r["dropped_in_kept_images"]
    lines.append(f"unlabelled instances in kept images: {', '.join(f'{v} by {k}' for k, v in d.items())}; "
                 f"ACP.DROPPED_INSTANCES {r['dropped_instances_policy']}")
    if "per_category_thresholds" in r:
        p = r["per_category_thresholds"]
        lines.append(f"per-category MIN_CLIS_I: {p['lowered']} categories below {p['absolute']:g}; lowest: "
                     + ", ".join(f"{x['name']} {x['threshold']:g}" for x in p["lowest"]))
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    return "\n".join(lines)


_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def cli_main(argv: list[str]) -> int:
    """``acp-data select [CACHE ...] [--config CFG] [KEY VALUE ...] [--json] [--top N]``."""
    from ..cli import UsageError, fail

    prog = "acp-data select"
    p = argparse.ArgumentParser(prog=prog, description="Print what a training run would get from its caches: the "
                                "load-time selection of the config (ACP.SELECT, MIN_CLIS_I, MIN_CLIS_I_RULE, "
                                "MIN_CLIS_L, CATEGORIES, CATEGORIES_APPLY_TO, MAX_IMAGES, SEED), nothing trained.")
    p.add_argument("args", nargs="*", metavar="CACHE | KEY VALUE",
                   help="caches (default: the config's ACP.CACHE_DIRS), then config overrides as in train_net")
    p.add_argument("--config", default=None, help="training config (a path or a name under configs/)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--top", type=int, default=10, help="categories listed at each end (default 10)")
    a = p.parse_intermixed_args(argv)
    first_key = next((i for i, x in enumerate(a.args) if _KEY.match(x)), len(a.args))
    caches, opts = a.args[:first_key], a.args[first_key:]
    try:
        result, table, policy, readers = _select_from_config(caches, a.config, opts)
    except UsageError as e:
        return fail(prog, e)
    report = selection_report(result, table, policy, top=max(0, a.top), readers=readers)
    print(json.dumps(report, sort_keys=True) if a.json else format_report(report))
    return 0


def _select_from_config(caches: Sequence[str], config: str | None, opts: Sequence[str]
                        ) -> tuple[SelectionResult, CategoryTable, str, list[Any]]:
    """The selection a training run with this config would make over ``caches`` (or its ``ACP.CACHE_DIRS``)."""
    from ..categories import CategoryError
    from ..cli import UsageError
    from ..d2.config import ConfigError, get_acp_cfg, load_cfg, resolve_config_file, validate_acp_config
    from .layout import CacheError
    from .reader import open_caches
    from .selection import SelectionError, select, selection_from_cfg

    if len(opts) % 2:
        raise UsageError(f"overrides must be KEY VALUE pairs, got {' '.join(opts)!r}")
    try:
        if config:
            cfg = load_cfg(resolve_config_file(config), opts)
        else:
            cfg = get_acp_cfg()
            cfg.SEED = 0  # detectron2's default -1 is refused with ACP on; SEED matters to random and MAX_IMAGES only
            cfg.merge_from_list(list(opts))
        if caches:
            cfg.ACP.CACHE_DIRS = list(caches)
        cfg.ACP.ENABLED = True
        validate_acp_config(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    except Exception as e:  # merge_from_list: unknown keys, bad types
        raise UsageError(f"overrides {' '.join(opts)!r}: {type(e).__name__}: {e}") from e
    try:
        readers = open_caches(list(cfg.ACP.CACHE_DIRS))
        table = readers[0].categories
        sel = selection_from_cfg(cfg, table)
        return select(readers, sel), table, str(cfg.ACP.get("DROPPED_INSTANCES", "background")), readers
    except CategoryError as e:
        raise UsageError(f"config key ACP.CATEGORIES = {cfg.ACP.CATEGORIES!r}: {e}") from e
    except (CacheError, SelectionError, ValueError) as e:
        raise UsageError(str(e)) from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
