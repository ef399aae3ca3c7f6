"""The relation vocabulary: the buckets a subject-object box pair falls in, a phrase for each, the lexicon that maps
relation phrases to buckets (:func:`relation_bucket`) and the geometric rule for unannotated box pairs
(:func:`geometric_bucket`); the single source of the vocabulary for the planner, CLIS-L and the priors builder."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from ..categories import normalize_name

__all__ = ["BUCKETS", "BUCKET_INDEX", "BUCKET_PHRASES", "SYMMETRIC_BUCKETS", "INSIDE_MIN_IOA", "OVERLAP_MIN_IOMIN",
           "NEXT_TO_MAX_GAP", "RELATION_LEXICON", "PriorsError", "relation_bucket", "geometric_buckets",
           "geometric_bucket", "bucket_index", "normalize_phrase"]

BUCKETS: tuple[str, ...] = ("above", "below", "left_of", "right_of", "inside", "overlapping", "next_to")
BUCKET_INDEX: dict[str, int] = {b: i for i, b in enumerate(BUCKETS)}
# A natural phrase per bucket (what the prior planner writes into a scene graph); relation_bucket maps it back.
BUCKET_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left_of": "to the left of",
    "right_of": "to the right of",
    "inside": "on",
    "overlapping": "with",
    "next_to": "next to",
}
# Buckets whose relation holds both ways (R(a, b) <=> R(b, a)): CLIS-L also tries each reference with its subject and
# object swapped and keeps the better score.
SYMMETRIC_BUCKETS: frozenset[str] = frozenset({"next_to", "overlapping"})

# Geometry thresholds of geometric_bucket (documented there).
INSIDE_MIN_IOA = 0.9
OVERLAP_MIN_IOMIN = 0.5
NEXT_TO_MAX_GAP = 0.25

# Relation lexicon: bucket -> phrases. A phrase matches when its normalised form equals one of these, else the
# longest of these that occurs in it as whole words wins ("sitting on top of" -> "on top of" -> above).
RELATION_LEXICON: dict[str, tuple[str, ...]] = {
    "above": ("above", "over", "on top of", "atop", "on the top of", "higher than", "up from", "hanging above",
              "flying over", "flying above", "hovering over", "floating above"),
    "below": ("below", "under", "underneath", "beneath", "lower than", "hanging from", "hanging below",
              "down from", "at the bottom of", "under the"),
    "left_of": ("left of", "to the left of", "on the left of", "on the left side of", "at the left of",
                "left to", "on left of", "left side of"),
    "right_of": ("right of", "to the right of", "on the right of", "on the right side of", "at the right of",
                 "right to", "on right of", "right side of"),
    "inside": ("inside", "in", "inside of", "within", "on", "onto", "upon", "into", "in the middle of", "part of",
               "attached to", "mounted on", "printed on", "painted on", "written on", "hanging on", "sitting on",
               "sitting in", "standing on", "standing in", "lying on", "lying in", "parked on", "resting on",
               "placed on", "contained in", "filled with", "on the surface of"),
    "overlapping": ("overlapping", "overlapping with", "overlaps", "with", "has", "have", "having", "holding",
                    "holds", "wearing", "wears", "carrying", "carries", "riding", "rides", "covering", "covered by",
                    "in front of", "behind", "touching", "against", "eating", "using", "playing with", "occluding",
                    "occluded by", "across", "around", "surrounding", "surrounded by", "crossing"),
    "next_to": ("next to", "next", "beside", "besides", "near", "nearby", "by", "alongside", "along", "close to",
                "adjacent to", "side by side with", "leaning on", "leaning against", "neighbouring", "neighboring",
                "beside of", "at"),
}
_LEXICON: dict[str, str] = {}
for _b, _phrases in RELATION_LEXICON.items():
    for _p in (*_phrases, _b.replace("_", " ")):
        _LEXICON.setdefault(_p, _b)
_LEXICON_BY_LENGTH = sorted(_LEXICON, key=lambda p: (-len(p.split()), -len(p)))
_FILLER = {"the", "a", "an", "is", "are", "be", "being", "was", "were", "it", "its", "of"}


class PriorsError(ValueError):
    """A priors file or a build input that cannot be used; the message names the file, key or value."""


def normalize_phrase(phrase: str) -> str:
    """Lower case, punctuation and underscores to spaces, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", normalize_name(phrase)).split())


@functools.lru_cache(maxsize=8192)
def relation_bucket(phrase: str) -> str | None:
    """Bucket of a relation phrase through the lexicon, or None when no lexicon phrase occurs in it.

    Case, underscores and punctuation are ignored; the exact phrase wins, then the phrase without articles and
    auxiliaries ("is on the left of" -> "on left of"), then the longest lexicon phrase contained as whole words.
    Bucket names map to themselves ("left_of" -> left_of).
    """
    p = normalize_phrase(phrase)
    if not p:
        return None
    if p in _LEXICON:
        return _LEXICON[p]
    words = p.split()
    core = " ".join(w for w in words if w not in _FILLER)
    if core in _LEXICON:
        return _LEXICON[core]
    padded = f" {p} "
    for cand in _LEXICON_BY_LENGTH:
        if f" {cand} " in padded:
            return _LEXICON[cand]
    padded = f" {core} "
    for cand in _LEXICON_BY_LENGTH:
        if f" {cand} " in padded:
            return _LEXICON[cand]
    return None


def geometric_buckets(subj_xywh: np.ndarray, obj_xywh: np.ndarray) -> np.ndarray:
    """Vectorised :func:`geometric_bucket`: (n, 4) and (n, 4) XYWH boxes -> (n,) int bucket indices into BUCKETS."""
    s = np.asarray(subj_xywh, dtype=np.float64).reshape(-1, 4)
    o = np.asarray(obj_xywh, dtype=np.float64).reshape(-1, 4)
    sw, sh, ow, oh = s[:, 2], s[:, 3], o[:, 2], o[:, 3]
    ix = np.clip(np.minimum(s[:, 0] + sw, o[:, 0] + ow) - np.maximum(s[:, 0], o[:, 0]), 0, None)
    iy = np.clip(np.minimum(s[:, 1] + sh, o[:, 1] + oh) - np.maximum(s[:, 1], o[:, 1]), 0, None)
    inter = ix * iy
    area_s, area_o = sw * sh, ow * oh
    with np.errstate(divide="ignore", invalid="ignore"):
        ioa_s = np.where(area_s > 0, inter / area_s, 0.0)
        io_min = np.where(np.minimum(area_s, area_o) > 0, inter / np.minimum(area_s, area_o), 0.0)
        dx = (o[:, 0] + ow / 2) - (s[:, 0] + sw / 2)
        dy = (o[:, 1] + oh / 2) - (s[:, 1] + sh / 2)
        half_w, half_h = (sw + ow) / 2, (sh + oh) / 2
        ndx = np.where(half_w > 0, dx / half_w, 0.0)
        ndy = np.where(half_h > 0, dy / half_h, 0.0)
    out = np.empty(len(s), dtype=np.int8)
    vertical = np.abs(ndy) >= np.abs(ndx)
    out[vertical] = np.where(ndy[vertical] > 0, BUCKET_INDEX["above"], BUCKET_INDEX["below"])
    horiz = ~vertical
    gap = np.abs(ndx) - 1.0  # horizontal gap between the boxes, in units of their mean width
    near = horiz & (gap <= NEXT_TO_MAX_GAP) & (np.abs(ndy) < 1.0)
    out[horiz] = np.where(ndx[horiz] > 0, BUCKET_INDEX["left_of"], BUCKET_INDEX["right_of"])
    out[near] = BUCKET_INDEX["next_to"]
    out[io_min >= OVERLAP_MIN_IOMIN] = BUCKET_INDEX["overlapping"]
    out[ioa_s >= INSIDE_MIN_IOA] = BUCKET_INDEX["inside"]
    return out


def geometric_bucket(box_s_xywh: Sequence[float], box_o_xywh: Sequence[float]) -> str:
    """The bucket of "subject S, object O" from their XYWH boxes (normalised or absolute: the rule only uses ratios
    along each axis, so scaling x and y independently never changes the answer). First rule that holds wins:

    1. ``inside``: at least 90 % of S's area lies in O (S inside / on O).
    2. ``overlapping``: the intersection covers at least 50 % of the smaller box.
    3. ``above`` / ``below``: the centre offset, measured in units of the boxes' mean half-height vertically and mean
       half-width horizontally (``ndy = dy / ((hS + hO) / 2)``, ``ndx`` likewise), is at least as large vertically
       as horizontally; S above O when S's centre is higher (``ndy > 0`` with ``dy = cyO - cyS``).
    4. ``next_to``: horizontally offset, the vertical extents overlap (``|ndy| < 1``) and the horizontal gap is at
       most 25 % of the mean width (``|ndx| - 1 <= 0.25``).
    5. ``left_of`` / ``right_of``: otherwise; S left of O when S's centre is further left.
    """
    return BUCKETS[int(geometric_buckets(np.asarray(box_s_xywh), np.asarray(box_o_xywh))[0])]



def bucket_index(bucket: str) -> int:
    """Index of a bucket name in ``BUCKETS`` (an unknown name is a ``PriorsError`` listing the buckets)."""
    try:
        return BUCKET_INDEX[bucket]
    except KeyError:
        raise PriorsError(f"unknown relation bucket {bucket!r}; buckets: {', '.join(BUCKETS)}") from None
