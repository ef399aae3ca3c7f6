"""``acp-data priors``: ``build`` a priors file from an LVIS/COCO-format json (and relation records), ``info`` on a
priors file."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from ..categories import CategoryError
from ..cli import fail
from .buckets import BUCKETS, PriorsError
from .build import RELATIONS_FORMAT, build_priors
from .container import Priors

__all__ = ["cli_main"]


def cli_main(argv: list[str]) -> int:
    description = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package's first line
    parser = argparse.ArgumentParser(prog="acp-data priors", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a priors file from an LVIS/COCO-format json",
                       epilog=RELATIONS_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--ann", required=True, help="LVIS/COCO-format json (e.g. lvis_v1_train.json)")
    b.add_argument("--relations", default=None, help="optional JSON lines of phrase-annotated box pairs (see below)")
    b.add_argument("--out", required=True, help="output priors file (.npz)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-pairs-per-image", type=int, default=32, help="ordered box pairs kept per image (0 = all)")
    b.add_argument("--max-refs-per-pool", type=int, default=500,
                   help="reference pairs kept per (subject, object, bucket) pool (0 = all)")
    b.add_argument("--max-refs-per-bucket", type=int, default=5000,
                   help="size of each bucket's category-independent back-off pool (0 = all)")
    i = sub.add_parser("info", help="print a summary of a priors file")
    i.add_argument("file")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build":
            pr = build_priors(args.ann, relations=args.relations, seed=args.seed,
                              max_pairs_per_image=args.max_pairs_per_image, max_refs_per_pool=args.max_refs_per_pool,
                              max_refs_per_bucket=args.max_refs_per_bucket)
            pr.save(args.out)
            print(f"wrote {args.out}: {pr}")
        else:
            pr = Priors.load(args.file)
            summary = {k: v for k, v in pr.settings.items() if k != "json_category_ids"}
            summary["categories"] = len(pr.categories)
            summary["pool_sizes_by_bucket"] = {
                BUCKETS[bk]: int(np.diff(pr.pool_offsets)[pr.pool_keys % len(BUCKETS) == bk].sum())
                for bk in range(len(BUCKETS))}
            print(json.dumps(summary, indent=2, sort_keys=True))
    except (PriorsError, CategoryError) as e:
        return fail("acp-data priors", e)
    return 0
