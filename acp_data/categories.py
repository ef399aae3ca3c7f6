"""The ``CategoryTable`` contract: contiguous category ids 1..K with names, synonyms, frequency group and image count.

Built from detectron2's LVIS v1 tables or from any LVIS-format json; stored in every cache manifest and priors file,
so a cache can be checked against the dataset it is mixed into. Also holds concept selection (``rare``,
``rare+common``, ``all``, names, a file of names).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fsio import load_json_arg

FREQUENCIES = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
_GROUP_ALIASES = {"rare": "r", "r": "r", "common": "c", "c": "c", "frequent": "f", "f": "f"}


def frequency_from_count(image_count: int) -> str:
    """LVIS rule: rare 1-10 training images, common 11-100, frequent > 100 (0 counts as rare)."""
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


def normalize_name(name: str) -> str:
    """Lower case, underscores and runs of spaces become one space, trimmed: the key names are matched on."""
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def safe_name(name: str) -> str:
    """A file-system-safe slug for a category name: never a path separator, ``..`` or an empty string."""
    slug = re.sub(r"[^a-z0-9]+", "_", normalize_name(name)).strip("_")
    return slug or "category"


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    frequency: str = "r"
    image_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["synonyms"] = list(self.synonyms)
        return d


class CategoryError(ValueError):
    """A category name, id or table that does not fit."""


@dataclass
class CategoryTable:
    """Categories with ids 1..K in order. ``source`` says where the table came from (shown in errors)."""

    categories: list[Category]
    source: str = ""
    _by_name: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        cats = sorted(self.categories, key=lambda c: c.id)
        ids = [c.id for c in cats]
        if ids != list(range(1, len(cats) + 1)):
            bad = next((i for i, cid in enumerate(ids, start=1) if cid != i), None)
            raise CategoryError(
                f"category ids in {self.source or 'table'} must be contiguous 1..K (LVIS/detectron2 maps id-1 to the "
                f"contiguous index); found id {ids[bad - 1] if bad else '?'} at position {bad}"
            )
        for c in cats:
            if c.frequency not in FREQUENCIES:
                raise CategoryError(f"category {c.id} ({c.name!r}) in {self.source or 'table'}: frequency "
                                    f"{c.frequency!r} is not one of r/c/f")
        self.categories = cats
        self._by_name = {}
        for c in cats:
            for n in (c.name, *c.synonyms):
                self._by_name.setdefault(normalize_name(n), c.id)

    # ----- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_lvis_v1(cls) -> CategoryTable:
        """The 1203 LVIS v1 categories from detectron2's tables (frequency and training image counts)."""
        from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
        from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

        counts = {d["id"]: d["image_count"] for d in LVIS_CATEGORY_IMAGE_COUNT}
        cats = [
            Category(
                id=int(d["id"]), name=d["name"], synonyms=tuple(d.get("synonyms", ())), definition=d.get("def", ""),
                frequency=d["frequency"], image_count=int(counts.get(d["id"], 0)),
            )
            for d in LVIS_CATEGORIES
        ]
        return cls(cats, source="detectron2 LVIS v1 tables")

    @classmethod
    def from_lvis_json(cls, data: str | os.PathLike | dict[str, Any]) -> CategoryTable:
        """From an LVIS/COCO-format json (path or loaded dict).

        ``frequency`` and ``image_count`` are taken from the category entries when present; otherwise the image count
        is the number of images with at least one annotation of the category, and the frequency follows it.
        """
        data, source = load_json_arg(data, CategoryError, "categories from")
        if "categories" not in data:
            raise CategoryError(f"{source} has no 'categories' key; is it an LVIS/COCO-format json?")
        image_sets: dict[int, set[int]] = {}
        for a in data.get("annotations", []):
            image_sets.setdefault(int(a["category_id"]), set()).add(int(a["image_id"]))
        cats = []
        for d in data["categories"]:
            cid = int(d["id"])
            count = int(d["image_count"]) if "image_count" in d else len(image_sets.get(cid, ()))
            freq = d.get("frequency") or frequency_from_count(count)
            cats.append(Category(
                id=cid, name=str(d["name"]), synonyms=tuple(d.get("synonyms", ())), definition=d.get("def", ""),
                frequency=freq, image_count=count,
            ))
        return cls(cats, source=source)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> CategoryTable:
        cats = [
            Category(
                id=int(c["id"]), name=c["name"], synonyms=tuple(c.get("synonyms", ())),
                definition=c.get("definition", c.get("def", "")), frequency=c["frequency"],
                image_count=int(c.get("image_count", 0)),
            )
            for c in d["categories"]
        ]
        return cls(cats, source=source or d.get("source", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "categories": [c.to_dict() for c in self.categories]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "") -> CategoryTable:
        return cls.from_dict(json.loads(text), source=source)

    # ----- lookups ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self):
        return iter(self.categories)

    def __getitem__(self, category_id: int) -> Category:
        if not 1 <= int(category_id) <= len(self.categories):
            raise CategoryError(f"category id {category_id} is outside 1..{len(self.categories)} of "
                                f"{self.source or 'the CategoryTable'}")
        return self.categories[int(category_id) - 1]

    def __eq__(self, other: object) -> bool:  # source is provenance, not content
        return isinstance(other, CategoryTable) and self.categories == other.categories

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def thing_classes(self) -> list[str]:
        """detectron2 ``thing_classes`` (index = id - 1)."""
        return self.names

    @property
    def class_image_count(self) -> list[dict[str, int]]:
        """detectron2 ``class_image_count`` metadata (used by the federated loss)."""
        return [{"id": c.id, "image_count": c.image_count} for c in self.categories]

    def frequency_ids(self, groups: Iterable[str]) -> list[int]:
        gs = {_GROUP_ALIASES[g] for g in groups}
        return [c.id for c in self.categories if c.frequency in gs]

    def counts(self) -> dict[str, int]:
        return {g: sum(1 for c in self.categories if c.frequency == g) for g in FREQUENCIES}

    def closest(self, name: str, n: int = 3) -> list[str]:
        """The ``n`` category names (or synonyms, reported as their category) closest to ``name``."""
        keys = list(self._by_name)
        matches = difflib.get_close_matches(normalize_name(name), keys, n=n * 3, cutoff=0.0)
        out: list[str] = []
        for m in matches:
            nm = self[self._by_name[m]].name
            if nm not in out:
                out.append(nm)
            if len(out) == n:
                break
        return out

    def id_of(self, name: str) -> int:
        """Id of a category by name or synonym (case, spaces and underscores ignored)."""
        key = normalize_name(name)
        if key in self._by_name:
            return self._by_name[key]
        raise CategoryError(
            f"unknown category {name!r} in {self.source or 'the CategoryTable'}; closest: "
            + ", ".join(repr(n) for n in self.closest(name))
        )

    def select(self, spec: str | Sequence[str]) -> list[int]:
        """Category ids for a concept spec.

        ``rare``, ``common``, ``frequent`` and ``+``-joined groups (``rare+common``), ``all``, a list of names, a
        comma-separated string of names, or a path to a text file with one name per line (``#`` comments allowed).
        Unknown names raise ``CategoryError`` naming the closest categories.
        """
        names: list[str]
        if isinstance(spec, str):
            s = spec.strip()
            if s.lower() == "all":
                return [c.id for c in self.categories]
            parts = [p.strip().lower() for p in s.split("+")]
            if parts and all(p in _GROUP_ALIASES for p in parts):
                return self.frequency_ids(parts)
            path = s[1:] if s.startswith("@") else s
            if s.startswith("@") or (os.sep in s or s.endswith((".txt", ".lst"))):
                return self.select_file(path)
            names = [p for p in s.split(",") if p.strip()]
        else:
            names = list(spec)
            if len(names) == 1 and isinstance(names[0], str):
                one = names[0].strip().lower()
                if one == "all" or all(p in _GROUP_ALIASES for p in one.split("+")):
                    return self.select(names[0])
        ids: list[int] = []
        for n in names:
            cid = self.id_of(n)
            if cid not in ids:
                ids.append(cid)
        if not ids:
            raise CategoryError(f"category selection {spec!r} is empty")
        return ids

    def select_file(self, path: str | os.PathLike) -> list[int]:
        p = Path(path)
        if not p.is_file():
            raise CategoryError(f"category list file {str(p)!r} does not exist")
        names = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
        names = [n for n in names if n]
        if not names:
            raise CategoryError(f"category list file {str(p)!r} names no category")
        try:
            return self.select(names)
        except CategoryError as e:
            raise CategoryError(f"{p}: {e}") from e

    def check_same(self, other: CategoryTable, this_source: str, other_source: str, names_only: bool = False) -> None:
        """Raise naming both sources when two tables differ (ids, names, and unless ``names_only`` frequency)."""
        if len(self) != len(other):
            raise CategoryError(f"category tables differ: {this_source} has {len(self)} categories, "
                                f"{other_source} has {len(other)}")
        for a, b in zip(self.categories, other.categories):
            if normalize_name(a.name) != normalize_name(b.name) or (not names_only and a.frequency != b.frequency):
                raise CategoryError(
                    f"category tables differ at id {a.id}: {this_source} says {a.name!r} ({a.frequency}), "
                    f"{other_source} says {b.name!r} ({b.frequency})"
                )
