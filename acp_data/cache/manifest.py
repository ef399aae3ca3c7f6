"""``manifest.json``: written once per cache (O_EXCL semantics) with the format version, the CategoryTable, the
generation settings, the scoring settings (informational) and the tool version.

Every later writer (another rank, a resumed run) reads it and is refused when its generation settings or category
table differ, with the differences listed key by key: mixing two generation recipes in one cache would make the
generation keys, and so resume, meaningless. A cache that holds a manifest and no sample (a prebuild that failed
before storing anything, e.g. while loading its models) is taken over instead: its manifest is replaced, with a
warning listing what changed (docs/prebuild.md "Generation key, manifest, resume").
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..categories import CategoryError, CategoryTable
from .layout import (
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    SHARDS,
    CacheError,
    CacheFormatError,
    atomic_write_bytes,
    fsync_dir,
    read_json,
    tmp_name,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "acp-data cache"


@dataclass
class Manifest:
    path: Path
    categories: CategoryTable
    generation: dict[str, Any]
    scoring: dict[str, Any] = field(default_factory=dict)
    tool_version: str = ""
    created: float = 0.0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": self.format_version, "tool_version": self.tool_version,
            "created": self.created, "categories": self.categories.to_dict(), "generation": self.generation,
            "scoring": self.scoring,
        }


def _normalise(obj: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so settings compare as they are stored."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CacheError(f"settings must be JSON-serialisable (no NaN): {e}") from e


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not obj and prefix:
            out[prefix] = {}
        return out
    return {prefix or "<root>": obj}


def settings_diff(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Lines ``key: stored X, given Y`` for every differing (dotted) key of two settings dicts."""
    a, b = _flatten(_normalise(stored)), _flatten(_normalise(given))
    missing = object()
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            sa = "(absent)" if va is missing else json.dumps(va)
            sb = "(absent)" if vb is missing else json.dumps(vb)
            lines.append(f"{k}: cache has {sa}, given {sb}")
    return lines


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """Read and check ``<cache>/manifest.json``: another format version or a corrupt file is a
    ``CacheFormatError`` naming it."""
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheFormatError(f"{path} does not exist: {cache_dir} is not an acp-data cache (build one with "
                               "`acp-data prebuild --config FILE --out CACHE`)")
    d = read_json(path, "cache manifest")
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{path} is not an acp-data cache manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFormatError(f"{path} has cache format version {version!r}; this acp-data reads version "
                               f"{FORMAT_VERSION}. Use the acp-data release that wrote it, or rebuild the cache")
    try:
        table = CategoryTable.from_dict(d["categories"], source=f"cache manifest {path}")
        return Manifest(path=path, categories=table, generation=dict(d["generation"]), scoring=dict(d.get("scoring")
                        or {}), tool_version=str(d.get("tool_version", "")), created=float(d.get("created", 0.0)),
                        format_version=int(version))
    except (KeyError, TypeError, ValueError, CategoryError) as e:
        raise CacheFormatError(f"{path} is corrupt: {type(e).__name__}: {e}") from e


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it does. The file appears complete: a fully
    written, fsynced temp file is hard-linked to the final name (``link`` fails when the name exists, like O_EXCL);
    where hard links are unsupported, ``open(O_CREAT | O_EXCL)`` is used directly."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            created = True
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        fsync_dir(path.parent)
    return created


def sample_files(cache_dir: str | os.PathLike) -> list[str]:
    """What in ``cache_dir`` holds or may become samples: shards (closed or being written: ``.tar.tmp``) and index
    generations. Empty: the cache has a manifest at most, and another recipe may take it over."""
    out = []
    for sub in (SHARDS, INDEX):
        d = Path(cache_dir) / sub
        if d.is_dir():
            out += sorted(f"{sub}/{p.name}" for p in d.iterdir())
    return out


def manifest_problems(existing: Manifest, categories: CategoryTable, generation: dict[str, Any]) -> list[str]:
    """Why a writer with ``categories`` and ``generation`` settings may not add to the cache of ``existing``: one
    line naming both category tables when they differ, else ``key: cache has X, given Y`` per differing setting."""
    try:
        existing.categories.check_same(categories, f"cache manifest {existing.path}", "the writer's CategoryTable"
                                       + (f" ({categories.source})" if categories.source else ""))
    except CategoryError as e:
        return [str(e)]
    diff = settings_diff(existing.generation, generation)
    if diff:
        return [f"its generation settings ({existing.path}) differ from this run's, so their generation keys would "
                "not match:", *(f"  {d}" for d in diff)]
    return []


def refusal_message(cache_dir: Path, problems: list[str], held: list[str]) -> str:
    msg = f"refusing to write into {cache_dir}: " + "\n".join(problems)
    if all(h.endswith(".tmp") for h in held):
        msg += (f"\nIt holds no closed shard, only {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}: a writer "
                "may still be running. If none is, delete them to let this run take the cache over.")
    return msg + "\nUse another --out directory for another generation recipe."


def ensure_manifest(cache_dir: str | os.PathLike, categories: CategoryTable, generation_settings: dict[str, Any],
                    scoring_settings: dict[str, Any] | None = None) -> Manifest:
    """Create the cache's manifest, or check an existing one against these settings.

    Raises ``CacheError`` listing every differing generation-settings key, or naming both category tables, when the
    cache was built differently and holds samples. A cache with a manifest (even a damaged one) and nothing in
    ``shards/`` or ``index/`` is taken over: the manifest is replaced and a warning lists what changed. Scoring
    settings are informational (rescoring never regenerates) and not compared.
    """
    from .. import __version__
    from ..fsio import build_lock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / MANIFEST
    generation = _normalise(dict(generation_settings))
    manifest = Manifest(path=path, categories=categories, generation=generation,
                        scoring=_normalise(dict(scoring_settings or {})), tool_version=__version__,
                        created=time.time())
    data = (json.dumps(manifest.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    if _create_exclusive(path, data):
        return manifest
    with build_lock(path):  # two writers taking over at once: the second finds the first's manifest
        held = sample_files(cache_dir)
        try:
            existing = load_manifest(cache_dir)
        except CacheFormatError as e:
            if held:
                raise
            problems = [str(e)]
        else:
            problems = manifest_problems(existing, categories, generation)
            if not problems:
                return existing
            if held:
                raise CacheError(refusal_message(cache_dir, problems, held))
        atomic_write_bytes(path, data)
    logger.warning("taking over %s: it holds a manifest but no sample (an earlier prebuild stored nothing), so the "
                   "manifest is replaced by this run's; %s", cache_dir, "\n".join(problems))
    return manifest


@dataclass(frozen=True)
class SelectionDefaults:
    """The selection thresholds a cache records, for command-line defaults: ``source`` says where they came from
    (shown in help and logs, so a user sees why the default is not the paper's 60)."""

    min_clis_i: float
    min_clis_l: float
    source: str

    def as_dict(self) -> dict[str, float]:
        return {"min_clis_i": self.min_clis_i, "min_clis_l": self.min_clis_l}


def _selection_of(scoring: Any) -> tuple[float, float] | None:
    sel = scoring.get("selection") if isinstance(scoring, dict) else None
    if not isinstance(sel, dict):
        return None
    try:
        return float(sel["min_clis_i"]), float(sel["min_clis_l"])
    except (KeyError, TypeError, ValueError):
        return None


def recorded_selection_defaults(cache_dir: str | os.PathLike) -> SelectionDefaults:
    """MIN_CLIS_I / MIN_CLIS_L that made the cache's current ``selected`` flags, so commands default to them.

    In order: the thresholds recorded by the index generations in use (the last ``rescore`` or a revert to one;
    ``verify`` generations carry their predecessor's), when every shard agrees; else the prebuild's
    ``scoring.selection`` in ``manifest.json``; else acp-data's defaults (60 and 0, the paper's recipe). A cache
    that does not exist or does not parse raises ``CacheFormatError`` like ``load_manifest``.
    """
    from ..clis.select import DEFAULT_MIN_CLIS_I, DEFAULT_MIN_CLIS_L
    from .index import choose_generation, list_generations, read_meta
    from .layout import shard_path

    manifest = load_manifest(cache_dir)
    found: set[tuple[float, float]] = set()
    reasons: set[str] = set()
    complete = True
    for shard, gens in sorted(list_generations(cache_dir).items()):
        p = shard_path(cache_dir, shard)
        if not p.exists():
            continue
        g, _, _ = choose_generation(cache_dir, shard, gens, p.stat().st_size)
        sel = None
        for older in sorted((x for x in gens if x <= g), reverse=True):  # verify/reindex record no scoring
            meta = read_meta(cache_dir, shard, older)
            sel = _selection_of(meta.get("scoring"))
            if sel is not None:
                reasons.add(str(meta.get("reason")))
                break
        if sel is None:
            complete = False
        else:
            found.add(sel)
    recorded = _selection_of(manifest.scoring)
    if complete and len(found) == 1 and (reasons - {"write"} or recorded is None):
        (i, l_), = found
        return SelectionDefaults(i, l_, "the cache's index (the thresholds its current `selected` was made with, "
                                 f"by {'/'.join(sorted(reasons))})")
    if recorded is not None:
        return SelectionDefaults(recorded[0], recorded[1], f"the cache's prebuild settings ({manifest.path})")
    return SelectionDefaults(DEFAULT_MIN_CLIS_I, DEFAULT_MIN_CLIS_L, "acp-data's defaults (the cache records none)")
