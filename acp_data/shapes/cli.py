"""``acp-data shapes``: commands of the embedded Shapes world.

    acp-data shapes build --out DIR [--seed S] [--size small|demo] [--force]
    acp-data shapes judge --world DIR --out DIR [--variant web|in_domain] [--steps N] [--seed S] [--threads T] [--force]

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets ``func``; adding a
command is adding one such function to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable

from ..cli import fail

logger = logging.getLogger(__name__)


def _add_build(sub: argparse._SubParsersAction) -> None:
    from .world import SIZES

    p = sub.add_parser("build", help="render the world: LVIS-format train.json, val.json and images (cached)",
                       description="Render the Shapes world under --out: train.json, val.json (exhaustive: every "
                                   "absent category is a verified negative), train/ and val/ JPEGs, and world.json "
                                   "(the build stamp). Rebuilds only when the seed, size or world version change.")
    p.add_argument("--out", required=True, help="output directory (created; replaced only if it holds a world)")
    p.add_argument("--seed", type=int, default=0, help="images and layouts (the category table is fixed)")
    p.add_argument("--size", default="demo", choices=sorted(SIZES),
                   help="demo: 1,700 training images with rare/common/frequent groups; small: 80 images for tests")
    p.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from .world import build_world

    paths = build_world(args.out, seed=args.seed, size=args.size, force=args.force, progress=not args.no_progress)
    stamp = paths.stamp_data()
    print(json.dumps({"root": str(paths.root), "train_json": str(paths.train_json), "val_json": str(paths.val_json),
                      "image_root": str(paths.image_root), "seed": stamp["seed"], "size": stamp["size"],
                      "groups": stamp["groups"], "summary": stamp["summary"]}, indent=1))
    return 0


def _add_judge(sub: argparse._SubParsersAction) -> None:
    from .judge import VARIANTS, JudgeOptions

    d = JudgeOptions()
    p = sub.add_parser("judge", help="train the open_clip judge for a built world (cached; local-dir checkpoint)",
                       description="Train a small open_clip model on its web corpus (every category in equal "
                                   "amounts, variant web) or on the world's real training images (variant "
                                   "in_domain) and save it as an open_clip local-dir checkpoint "
                                   "(open_clip_config.json + open_clip_model.safetensors) under --out, for the clip CLIS-I scorer "
                                   "(scorer option model: local-dir:OUT). Retrains only when the world or the "
                                   "options change.")
    p.add_argument("--world", required=True, help="a world built by `acp-data shapes build`")
    p.add_argument("--out", required=True, help="output directory (replaced only if it holds a judge)")
    p.add_argument("--variant", default=d.variant, choices=VARIANTS,
                   help=f"training data: web (the judge's own web corpus) or in_domain (the world's real training "
                        f"images); default {d.variant}")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="retrain even if the stamp matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_judge)


def _run_judge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .judge import STAMP_NAME, JudgeOptions, train_judge

    opts = JudgeOptions(steps=args.steps, seed=args.seed, variant=args.variant)
    spec = train_judge(args.world, args.out, opts, force=args.force,
                       progress=not args.no_progress, threads=args.threads)
    stamp = json.loads((Path(args.out) / STAMP_NAME).read_text())
    print(json.dumps({"model": spec, "metrics": stamp.get("metrics"), "train_seconds": stamp.get("train_seconds")},
                     indent=1))
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_build, _add_judge]


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="acp-data shapes", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        return fail(f"acp-data shapes {args.command}", e)
