"""``acp-data generations CACHE [--use N]``: list a cache's index generations and make an earlier one current again,
so a rescore (or any scoring change) can be undone.

Generations are per shard (docs/cache.md "On disk"); shards written and rescored together share their numbers, so
the listing groups them by number: per generation the shards that have it, why it was written, its samples and
``selected`` count, the thresholds it records and how many shards use it now. ``--use N`` never deletes or rewrites
anything: for every shard it publishes a copy of generation N as the newest one (reason ``revert``, N's scoring
settings), so readers pick it up and the undo is itself undoable. A generation recorded for another size of the shard
(``verify`` rewrote the shard since) cannot be used: its byte offsets point elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .index import choose_generation, list_generations, load_columns, publish_generation, read_meta
from .layout import CacheError, shard_path

logger = logging.getLogger(__name__)


@dataclass
class GenerationInfo:
    """One generation number across the cache's shards."""

    generation: int
    shards: int = 0  # shards that have it
    usable: int = 0  # ... recorded for the shard's current size
    in_use: int = 0  # ... that readers use now
    samples: int = 0
    selected: int = 0
    reasons: list[str] = field(default_factory=list)
    created: float = 0.0
    settings: str = ""


def _settings_summary(scoring: Any) -> str:
    """``min_clis_i=20 min_clis_l=0 scorer=clip(local-dir:...)`` from a generation's scoring settings."""
    if not isinstance(scoring, dict):
        return "-"
    parts = []
    sel = scoring.get("selection")
    if isinstance(sel, dict):
        parts += [f"{k}={sel[k]:g}" if isinstance(sel[k], (int, float)) else f"{k}={sel[k]}"
                  for k in ("min_clis_i", "min_clis_l") if k in sel]
    sc = scoring.get("scorer")
    if isinstance(sc, dict):
        model = sc.get("model")
        parts.append(f"scorer={sc.get('name', '?')}" + (f"({model})" if model else ""))
    if "reverted_to" in scoring:
        parts.append(f"copy of {scoring['reverted_to']}")
    return " ".join(parts) or "-"


def _present_shards(cache_dir: str | os.PathLike) -> dict[str, tuple[list[int], int]]:
    """shard -> (its generations, the shard file's size) for shards whose file exists."""
    out = {}
    for shard, gens in sorted(list_generations(cache_dir).items()):
        p = shard_path(cache_dir, shard)
        if p.is_file():
            out[shard] = (gens, p.stat().st_size)
    return out


def list_cache_generations(cache_dir: str | os.PathLike) -> list[GenerationInfo]:
    """Every generation number of the cache, oldest first (see the module docstring)."""
    infos: dict[int, GenerationInfo] = {}
    for shard, (gens, size) in _present_shards(cache_dir).items():
        current, _, _ = choose_generation(cache_dir, shard, gens, size)
        for g in gens:
            meta = read_meta(cache_dir, shard, g)
            info = infos.setdefault(g, GenerationInfo(g, created=float(meta.get("created", 0.0))))
            info.shards += 1
            info.usable += int(meta.get("shard_size", -1)) == size
            info.in_use += g == current
            info.samples += int(meta.get("num_samples", 0))
            info.selected += int(np.count_nonzero(load_columns(cache_dir, shard, g, ["selected"])["selected"]))
            reason = str(meta.get("reason"))
            if reason not in info.reasons:
                info.reasons.append(reason)
            info.created = min(info.created, float(meta.get("created", info.created)))
            summary = _settings_summary(meta.get("scoring"))
            if info.settings and summary != info.settings and "(varies)" not in info.settings:
                info.settings += " (varies)"
            info.settings = info.settings or summary
    return [infos[g] for g in sorted(infos)]


def selected_count(cache_dir: str | os.PathLike) -> int:
    """Samples flagged ``selected`` in the generations readers use now."""
    n = 0
    for shard, (gens, size) in _present_shards(cache_dir).items():
        g, _, _ = choose_generation(cache_dir, shard, gens, size)
        n += int(np.count_nonzero(load_columns(cache_dir, shard, g, ["selected"])["selected"]))
    return n


def use_generation(cache_dir: str | os.PathLike, generation: int) -> dict[str, Any]:
    """Make ``generation`` current in every shard (a copy published as the newest generation); returns counts.

    Every shard is checked first (``CacheError`` naming the shards that lack a usable generation ``generation``),
    so a refused call changes nothing.
    """
    shards = _present_shards(cache_dir)
    if not shards:
        raise CacheError(f"{cache_dir} has no indexed shards")
    missing, stale = [], []
    for shard, (gens, size) in shards.items():
        if generation not in gens:
            missing.append(shard)
        elif int(read_meta(cache_dir, shard, generation).get("shard_size", -1)) != size:
            stale.append(shard)
    if missing or stale:
        lines = ([f"{len(missing)} shard(s) have no generation {generation}: {', '.join(missing[:5])}"] if missing
                 else []) + ([f"{len(stale)} shard(s) were rewritten (by verify) after generation {generation}, "
                              f"so its offsets no longer fit: {', '.join(stale[:5])}"] if stale else [])
        raise CacheError(f"cannot use generation {generation} of {cache_dir}: " + "; ".join(lines)
                         + f" (list them with `acp-data generations {cache_dir}`)")
    before = selected_count(cache_dir)
    published: dict[str, int] = {}
    for shard, (gens, size) in shards.items():
        current, cmeta, _ = choose_generation(cache_dir, shard, gens, size)
        if current == generation or (cmeta.get("reason") == "revert"
                                     and (cmeta.get("scoring") or {}).get("reverted_to") == generation):
            continue  # already current (itself or a copy)
        meta = read_meta(cache_dir, shard, generation)
        cols = load_columns(cache_dir, shard, generation, mmap=False)
        scoring = dict(meta.get("scoring") or {})
        scoring["reverted_to"] = generation
        published[shard] = publish_generation(cache_dir, shard, cols, reason="revert", scoring=scoring,
                                              base_generation=gens[-1], shard_size=size)
    return {"generation": generation, "shards": len(shards), "published": published, "selected_before": before,
            "selected_after": selected_count(cache_dir)}


def _table(infos: list[GenerationInfo], n_shards: int) -> str:
    head = f"{'gen':>4}  {'shards':>6}  {'in use':>6}  {'reason':<16}  {'created':<19}  {'samples':>8}  " \
           f"{'selected':>8}  settings"
    lines = [head]
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created)) if i.created else "-"
        shards = f"{i.shards}" + ("" if i.usable == i.shards else f" ({i.shards - i.usable} stale)")
        lines.append(f"{i.generation:>4}  {shards:>6}  {f'{i.in_use}/{n_shards}':>6}  {'/'.join(i.reasons):<16}  "
                     f"{created:<19}  {i.samples:>8}  {i.selected:>8}  {i.settings}")
    return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, fail

    prog = "acp-data generations"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"),
                                formatter_class=HelpFormatter)
    p.add_argument("cache", help="cache directory")
    p.add_argument("--use", type=int, default=None, metavar="N",
                   help="make generation N current in every shard (a new generation copying it; nothing is deleted)")
    p.add_argument("--json", action="store_true", help="print the listing (or the --use result) as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import load_manifest

    try:
        load_manifest(a.cache)
        if a.use is not None:
            res = use_generation(a.cache, a.use)
            if a.json:
                print(json.dumps(res, indent=1, sort_keys=True))
            else:
                print(f"{a.cache}: generation {a.use} is current again in {res['shards']} shard(s) "
                      f"({len(res['published'])} new generation(s) published); selected: {res['selected_before']} "
                      f"-> {res['selected_after']} samples")
            return 0
        infos = list_cache_generations(a.cache)
    except CacheError as e:
        return fail(prog, e)
    if a.json:
        print(json.dumps([asdict(i) for i in infos], indent=1))
    else:
        n = len(_present_shards(a.cache))
        print(f"{Path(a.cache)}: {n} shard(s)")
        print(_table(infos, n))
        print(f"make one current again: acp-data generations {a.cache} --use N")
    return 0
