"""What every planner shares: the object ids of a work unit and the per-attempt seeds."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from ..scene import object_id
from ..stages import stable_hash

if TYPE_CHECKING:
    from ..categories import CategoryTable

__all__ = ["display_name", "requested_objects", "attempt_seed"]


def display_name(name: str) -> str:
    """A category name as words for prompts and ids: ``"bow_(weapon)"`` -> ``"bow weapon"``,
    ``"Band_Aid"`` -> ``"band aid"`` (parenthesised LVIS qualifiers kept as plain words, so ids stay ``name-k``)."""
    s = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")  # crème -> creme
    s = re.sub(r"[()\[\]{}\"]", " ", s)
    s = re.sub(r"[^\w\s'&+.\-/]", " ", s)
    s = re.sub(r"[\s_]+", " ", s).strip().lower()
    return s or "object"


def requested_objects(categories: CategoryTable, combo: tuple[int, ...] | list[int]) -> dict[str, int]:
    """Object ids for a combination, in order, mapped to their category ids: ``(18, 412) -> {"dog-1": 18,
    "frisbee-2": 412}`` (the number is the position, so repeated categories get distinct ids)."""
    return {object_id(display_name(categories[cid].name), k): int(cid) for k, cid in enumerate(combo, start=1)}


def attempt_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed for one stage/attempt of a unit, stable across machines."""
    return int(stable_hash([int(seed), *map(str, parts)], n=8), 16) & 0x7FFFFFFF
