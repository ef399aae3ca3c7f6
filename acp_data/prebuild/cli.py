"""``acp-data prebuild``: the command line over ``run_prebuild`` (rank and world size from ``--shard`` or the
environment, ``--set`` overrides, ``--check`` without loading models, against ``--out``'s manifest). Exit status: 0
done, 1 the run failed or stored nothing (every unit rejected: the counts say by what), 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..cli import fail
from .config import PrebuildError, apply_overrides, load_config
from .prepare import prepare
from .runner import run_prebuild
from .summary import format_summary, nothing_stored

__all__ = ["cli_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acp-data prebuild", description=sys.modules[__package__].__doc__.split("\n\n")[0],
        epilog="Rank and world size come from --shard, else RANK/WORLD_SIZE (torchrun), a SLURM array "
               "(SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) or SLURM tasks. See docs/prebuild.md.")
    p.add_argument("--config", required=True, help="prebuild YAML config (docs/prebuild.md)")
    p.add_argument("--out", required=True, help="cache directory (created; shared by all ranks)")
    p.add_argument("--shard", default=None, metavar="r/W", help="run rank r of W (default: from the environment)")
    p.add_argument("--max-units", type=int, default=None, metavar="N",
                   help="only the first N units of the global list (before sharding)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads of this rank (default on CPU: 1)")
    p.add_argument("--keep", choices=("all", "selected"), default=None,
                   help="store every candidate (default) or only each unit's selected one")
    p.add_argument("--categories-from", default=None, metavar="JSON",
                   help="take the categories from this LVIS-format json (overrides the config's 'categories')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML value; dotted keys for sections), e.g. generator.steps=20")
    p.add_argument("--check", action="store_true",
                   help="validate the config and --out's manifest and print the units this rank would run, without "
                        "loading models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .units import ShardError, rank_world_from_env

    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        if args.categories_from:
            config["categories"] = args.categories_from
        rank, world = rank_world_from_env(args.shard)
        if args.check:
            prep = prepare(config, device=args.device, keep=args.keep, threads=args.threads)
            from .units import shard_units

            units = prep.make_units(args.max_units)
            mine = shard_units(units, rank, world)
            print(json.dumps({"units": len(units), "rank": rank, "world": world, "rank_units": len(mine),
                              "targets": len(prep.targets), "generation_settings": prep.generation_settings(),
                              "cache": check_out_manifest(args.out, prep)}, indent=1, sort_keys=True))
            return 0
        summary = run_prebuild(config, args.out, rank, world, args.max_units, device=args.device,
                               threads=args.threads, keep=args.keep, progress=not args.no_progress)
    except (PrebuildError, ShardError) as e:
        return fail("acp-data prebuild", e)
    print(format_summary(summary))
    empty = nothing_stored(summary, args.out)
    if empty:
        print(f"acp-data prebuild: error: {empty}", file=sys.stderr)
        return 1
    return 0 if summary["status"] == "complete" else 1


def check_out_manifest(out: str, prep: Any) -> str:
    """What a run into ``out`` would find (``--check``): no cache yet, a cache this config extends, or an empty one it
    would take over; a cache of another recipe that holds samples is a ``PrebuildError`` listing the differences,
    as the run itself would give."""
    from ..cache.layout import MANIFEST, CacheError
    from ..cache.manifest import load_manifest, manifest_problems, refusal_message, sample_files

    path = Path(out) / MANIFEST
    if not path.exists():
        return f"{out}: no cache yet (a run creates it)"
    held = sample_files(out)
    try:
        problems = manifest_problems(load_manifest(out), prep.categories, prep.generation_settings())
    except CacheError as e:
        if held:
            raise PrebuildError(str(e)) from e
        problems = [str(e)]
    if not problems:
        return f"{out}: an existing cache with these generation settings (a run adds the missing units)"
    if held:
        raise PrebuildError(refusal_message(Path(out), problems, held))
    return f"{out}: a manifest of other settings and no sample: a run takes it over (" + " ".join(
        p.strip() for p in problems) + ")"

