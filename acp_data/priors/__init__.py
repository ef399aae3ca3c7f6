"""Data priors: per-category box statistics, co-occurrence counts and subject-object box-pair pools.

Built by ``acp-data priors build --ann JSON [--relations FILE] --out FILE`` from any LVIS/COCO-format json, and read
by the ``prior`` planner (combinations, layouts), CLIS-L (reference pairs) and paste mode (object scale).

**Relation buckets** (``buckets``). LVIS has no relation phrases, so a box pair gets a bucket from geometry
(:func:`geometric_bucket`); phrase-annotated pairs (``--relations``) get one from a small lexicon
(:func:`relation_bucket`). Both functions are the single source of the bucket vocabulary for the planner and CLIS-L.

Modules: ``buckets`` (the relation vocabulary), ``container`` (``Priors``: the arrays, their lookups and the
``.npz`` file format), ``build`` (``build_priors``: the seeded builder and the relation-records reader), ``cli``
(``acp-data priors``).
"""

from .buckets import (
    BUCKET_INDEX,
    BUCKET_PHRASES,
    BUCKETS,
    INSIDE_MIN_IOA,
    NEXT_TO_MAX_GAP,
    OVERLAP_MIN_IOMIN,
    RELATION_LEXICON,
    SYMMETRIC_BUCKETS,
    PriorsError,
    geometric_bucket,
    geometric_buckets,
    relation_bucket,
)
from .build import RELATIONS_FORMAT, build_priors, read_relations
from .cli import cli_main
from .container import FORMAT_NAME, FORMAT_VERSION, Priors

__all__ = [
    "BUCKETS", "BUCKET_INDEX", "BUCKET_PHRASES", "SYMMETRIC_BUCKETS", "INSIDE_MIN_IOA", "OVERLAP_MIN_IOMIN",
    "NEXT_TO_MAX_GAP", "RELATION_LEXICON", "PriorsError", "relation_bucket", "geometric_buckets", "geometric_bucket",
    "Priors", "FORMAT_NAME", "FORMAT_VERSION", "build_priors", "read_relations", "RELATIONS_FORMAT", "cli_main",
]
