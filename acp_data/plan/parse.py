"""The two-stage answers of an LLM planner (description, layout) -> a repaired, validated ``SceneGraph``.

LLMs wrap JSON in code fences and prose, leave trailing commas, use single quotes or Python literals, and get cut
off at the token limit: ``jsontext.extract_json`` finds the JSON, in bounded time. Every verdict is a list of named
reasons (``scene.py``'s codes plus ``jsontext``'s), so a planner can count them and feed the message back to the
model on retry.

Two answer shapes are read: ours (``prompts.py``) and the ACP repository's (attributes and groups as lists of
``{name, attributes}`` / ``{id, group}``, relations as per-caption blocks ``{caption, relations: [{subject, object,
relation}]}``, a layout with ``width``/``height`` and pixel boxes). Noise in the ids is handled by fixed rules, each
counted (docs/prebuild.md "LLM answers: shapes, repairs, rejections"):

- an id that unambiguously stands for a requested one is renamed (``rename_id``): same number and a similar name
  (``follower-8`` -> ``flower-8``, ``dog_1`` -> ``dog-1``); a similar name whose number names no requested object;
  or, only where it is referred to (groups, relations, layers, caption) and never described as an object of its
  own, the same number under another name (``woman-1`` -> ``person-1``). Name and number pointing at different
  requested ids (``collar-4`` when ``collar-2`` and ``steps-4`` were asked for) is ambiguous: nothing is renamed;
- an object the request did not ask for is dropped (``drop_extra_object``);
- a relation that names an id which is not an object (after renaming) is dropped (``drop_relation``); such an id in
  a group or a depth layer is removed from it (``drop_dangling_id``);
- a requested object the layout leaves out rejects the answer (``missing_object``), as do duplicates and boxes
  beyond ``scene.MAX_OVERSHOOT``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..scene import (
    CAPTION_MISSING_OBJECT,
    DEPTH_LAYERS,
    MISSING_BOX,
    REPAIR_NORMALIZE_ID,
    UNKNOWN_RELATION_ID,
    Relation,
    SceneGraph,
    SceneObject,
    normalize_object_id,
)
from .jsontext import (
    BAD_JSON,
    BAD_SCHEMA,
    MAX_ANSWER_CHARS,
    NO_JSON,
    PARSE_REASONS,
    TOO_LONG,
    TRUNCATED,
    ParseError,
    extract_json,
)

# Repairs counted by the parser (``SceneGraph.repair`` adds ``clip_box`` and ``normalize_id``).
REPAIR_ACP_SHAPE = "acp_shape"
REPAIR_RENAME_ID = "rename_id"
REPAIR_DROP_EXTRA = "drop_extra_object"
REPAIR_DROP_RELATION = "drop_relation"
REPAIR_DROP_DANGLING = "drop_dangling_id"
PARSE_REPAIRS = (REPAIR_ACP_SHAPE, REPAIR_RENAME_ID, REPAIR_DROP_EXTRA, REPAIR_DROP_RELATION, REPAIR_DROP_DANGLING)

__all__ = [  # the extraction names stay importable from here
    "NO_JSON", "TRUNCATED", "TOO_LONG", "BAD_JSON", "BAD_SCHEMA", "PARSE_REASONS", "MAX_ANSWER_CHARS", "ParseError",
    "extract_json", "PARSE_REPAIRS", "Verdict", "parse_description", "parse_layout", "description_to_scene",
    "layout_to_scene",
]


@dataclass
class Verdict:
    """Outcome of parsing one answer: the (repaired) scene graph when it could be built, and the reasons it is
    rejected (empty = accepted)."""

    scene: SceneGraph | None
    reasons: list[tuple[str, str]] = field(default_factory=list)
    repairs: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.scene is not None and not self.reasons

    @property
    def codes(self) -> list[str]:
        return [c for c, _ in self.reasons]

    def message(self) -> str:
        return "; ".join(f"{c}: {d}" for c, d in self.reasons)


# ----- schema helpers -----------------------------------------------------------------------------------------------
def _key(k: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(k).lower())


def _get(d: Mapping[str, Any], *names: str) -> Any:
    """Value of the first key matching any of ``names``, ignoring case, spaces, underscores and hyphens."""
    wanted = [_key(n) for n in names]
    keys = {_key(k): k for k in d}
    for w in wanted:
        if w in keys:
            return d[keys[w]]
    return None


class _Schema(ValueError):
    pass


def _id_list(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int)) for x in v):
        return [str(x) for x in v]
    raise _Schema(f"{what} must be an object id or a list of ids, got {json.dumps(v)[:80]}")


def _attr_list(v: Any, oid: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [a.strip() for a in re.split(r"[,;]", v) if a.strip()]
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
        return [str(x).strip() for x in v if str(x).strip()]
    raise _Schema(f"attributes of {oid} must be a list of words, got {json.dumps(v)[:80]}")


def _attributes(v: Any, repairs: Counter) -> dict[str, list[str]]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {str(k): _attr_list(a, str(k)) for k, a in v.items()}
    if isinstance(v, list):  # ACP: [{"name": "dog-1", "attributes": "a brown dog"}, ...]
        repairs[REPAIR_ACP_SHAPE] += 1
        out: dict[str, list[str]] = {}
        for item in v:
            if not isinstance(item, Mapping):
                raise _Schema(f"each attributes entry must be an object, got {json.dumps(item)[:80]}")
            oid = _get(item, "object", "id", "name")
            if not isinstance(oid, str):
                raise _Schema(f"attributes entry without an object id: {json.dumps(item)[:80]}")
            out[oid] = _attr_list(_get(item, "attributes", "attribute"), oid)
        return out
    raise _Schema("'attributes' must map object ids to lists of words")


def _groups(v: Any, repairs: Counter) -> dict[str, list[str]]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {str(k): _id_list(m, f"group {k}") for k, m in v.items()}
    if isinstance(v, list):
        out: dict[str, list[str]] = {}
        for i, m in enumerate(v, start=1):
            if isinstance(m, Mapping):  # ACP: {"id": "group-1", "group": [ids]}
                repairs[REPAIR_ACP_SHAPE] += 1
                gid = _get(m, "id", "group id", "name")
                members = _get(m, "group", "members", "objects", "ids")
                out[str(gid) if isinstance(gid, (str, int)) else f"group-{i}"] = _id_list(members, f"group {i}")
            else:
                out[f"group-{i}"] = _id_list(m, f"group {i}")
        return out
    raise _Schema("'groups' must map group ids to lists of object ids")


def _layers(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _Schema("'layers of depth' must map depth layers to lists of group or object ids")
    canon = {_key(n): n for n in DEPTH_LAYERS}
    return {canon.get(_key(k), str(k)): _id_list(m, f"layer {k}") for k, m in v.items()}


def _relation(r: Any) -> Relation:
    if isinstance(r, Mapping):
        subj = _id_list(_get(r, "subjects", "subject", "subject_ids", "from"), "relation subject")
        obj = _id_list(_get(r, "objects", "object", "object_ids", "to", "target"), "relation object")
        phrase = _get(r, "relation", "phrase", "predicate", "relationship", "rel")
    elif isinstance(r, (list, tuple)) and len(r) == 3:
        subj, phrase, obj = _id_list(r[0], "relation subject"), r[1], _id_list(r[2], "relation object")
    else:
        raise _Schema(f"a relation must be {{subjects, objects, relation}}, got {json.dumps(r)[:80]}")
    if not isinstance(phrase, str) or not phrase.strip() or not subj or not obj:
        raise _Schema(f"relation {json.dumps(r)[:80]} needs subjects, objects and a relation phrase")
    return Relation(subj, obj, phrase.strip())


def _relations(v: Any, repairs: Counter) -> list[Relation]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Schema("'relations' must be a list")
    out = []
    for r in v:
        inner = _get(r, "relations") if isinstance(r, Mapping) else None
        if isinstance(inner, list) and _get(r, "subjects", "subject") is None:
            repairs[REPAIR_ACP_SHAPE] += 1  # ACP: {"caption": ..., "relations": [...]} per sub-caption
            out += [_relation(x) for x in inner]
        else:
            out.append(_relation(r))
    return out


def _is_description(v: Any) -> bool:
    return isinstance(v, Mapping) and any(_get(v, k) is not None
                                          for k in ("caption", "attributes", "relations", "layers of depth"))


def _layout_entries(v: Any) -> list[Any] | None:
    if isinstance(v, Mapping):
        inner = _get(v, "layout", "layouts", "boxes", "objects", "bboxes")
        return inner if isinstance(inner, list) else None
    if isinstance(v, list) and v and all(isinstance(e, Mapping) for e in v):
        return v
    return None


def _is_layout(v: Any) -> bool:
    entries = _layout_entries(v)
    return bool(entries) and all(isinstance(e, Mapping) and _get(e, "bbox", "box") is not None for e in entries)


def _box(v: Any, oid: str) -> tuple[float, float, float, float]:
    if isinstance(v, Mapping):
        v = [_get(v, "x"), _get(v, "y"), _get(v, "w", "width"), _get(v, "h", "height")]
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise _Schema(f"bbox of {oid} must be [x, y, w, h], got {json.dumps(v)[:80]}")
    try:
        return tuple(float(x) for x in v)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise _Schema(f"bbox of {oid} must hold 4 numbers, got {json.dumps(v)[:80]}") from None


def _image_size(v: Any) -> tuple[float, float] | None:
    """ACP's layouts give the canvas (``width``, ``height``) and pixel boxes; None when the answer gives no size."""
    if not isinstance(v, Mapping):
        return None
    w, h = _get(v, "width", "image width", "w"), _get(v, "height", "image height", "h")
    try:
        w, h = float(w), float(h)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 2 and h > 2 else None


# ----- id repair ----------------------------------------------------------------------------------------------------
_LOOSE_ID = re.compile(r"^(?P<name>.*?[a-z])[-_ ]?(?P<k>\d+)$")
_SIMILAR = 0.75  # difflib ratio above which two names count as the same word misspelt ("follower" ~ "flower": 0.86)


def _split_id(oid: str) -> tuple[str, int] | None:
    m = _LOOSE_ID.match(normalize_object_id(oid))
    return (m.group("name").strip("-_"), int(m.group("k"))) if m else None


def _similar(a: str, b: str) -> bool:
    return (a == b or a.split("_")[-1] == b.split("_")[-1]
            or difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= _SIMILAR)


def _renames(found: list[str], declared: set[str], requested: list[str]) -> dict[str, str]:
    """Answer id -> the requested id it unambiguously stands for (rules in the module docstring). ``found`` are the
    normalised ids of the answer that are not requested, ``declared`` those it describes as objects."""
    req = [(r, _split_id(r)) for r in requested]
    out: dict[str, str] = {}
    for u in found:
        parts = _split_id(u)
        if parts is None:
            continue
        name, k = parts
        if name == "group":  # a group id (layers name groups), never an object
            continue
        by_num = [r for r, p in req if p is not None and p[1] == k]
        by_name = [r for r, p in req if p is not None and _similar(name, p[0])]
        target = None
        if len(by_num) == 1 and by_num[0] in by_name:
            target = by_num[0]
        elif len(by_name) == 1 and not by_num:
            target = by_name[0]
        elif len(by_num) == 1 and not by_name and u not in declared and by_num[0] in declared:
            target = by_num[0]
        if target is not None and not (u in declared and target in declared):  # two objects, not one renamed
            out[u] = target
    return out


_TAG = re.compile(r"\(([^()]+)\)")


def _tag_ids(m: re.Match) -> list[str] | None:
    """The ids of a caption tag ``(dog-1, dog-2)``, or None for prose in parentheses."""
    tokens = [t.strip() for t in m.group(1).split(",")]
    return tokens if all(_split_id(t) for t in tokens) else None


def _tag_tokens(caption: str) -> list[str]:
    return [t for m in _TAG.finditer(caption or "") for t in _tag_ids(m) or []]


def _rewrite_tags(caption: str, fix: Callable[[str], str | None]) -> str:
    """Rewrite the ids inside the caption's tags with ``fix`` (None: leave that id as written)."""
    def one(m: re.Match) -> str:
        ids = _tag_ids(m)
        return m.group(0) if ids is None else "(" + ", ".join(fix(t) or t for t in ids) + ")"

    return _TAG.sub(one, caption)


def _resolve(scene: SceneGraph, requested: Mapping[str, int], declared: list[str], repairs: Counter) -> SceneGraph:
    """Apply the id rules: rename, drop extra objects, drop relations and group/layer members naming non-objects.
    ``declared`` are the ids the answer describes as objects (its attributes or layout entries), as written."""
    req = [normalize_object_id(r) for r in requested]
    decl = {normalize_object_id(d) for d in declared}
    mentioned = [*declared, *(x for g in scene.groups.values() for x in g),
                 *(x for layer in scene.layers.values() for x in layer),
                 *(x for r in scene.relations for x in [*r.subjects, *r.objects])]
    mentioned += _tag_tokens(scene.caption)
    unknown = list(dict.fromkeys(n for n in map(normalize_object_id, mentioned) if n not in req
                                 and n not in scene.groups))
    renames = _renames(unknown, decl, req)
    repairs[REPAIR_RENAME_ID] += len(renames)

    def fix(oid: str) -> str:
        n = normalize_object_id(oid)
        return renames.get(n, n)

    objects = []
    for o in scene.objects:
        if fix(o.id) not in req:
            repairs[REPAIR_DROP_EXTRA] += 1
            continue
        if normalize_object_id(o.id) != o.id and normalize_object_id(o.id) not in renames:
            repairs[REPAIR_NORMALIZE_ID] += 1
        objects.append(SceneObject(fix(o.id), o.category_id, o.attributes, o.bbox))
    known = {o.id for o in objects}
    relations = []
    for r in scene.relations:
        subj, obj = [fix(x) for x in r.subjects], [fix(x) for x in r.objects]
        if all(x in known for x in [*subj, *obj]):
            relations.append(Relation(subj, obj, r.phrase))
        else:
            repairs[REPAIR_DROP_RELATION] += 1

    def members(ids: list[str], groups: Mapping[str, Any] | None = None) -> list[str]:
        kept = [fix(x) if fix(x) in known else x for x in ids if fix(x) in known or x in (groups or {})]
        repairs[REPAIR_DROP_DANGLING] += len(ids) - len(kept)
        return kept

    groups = {g: members(m) for g, m in scene.groups.items()}
    layers = {k: members(m, groups) for k, m in scene.layers.items()}
    caption = _rewrite_tags(scene.caption, lambda t: fix(t) if fix(t) in known else None)
    return SceneGraph(objects=objects, relations=relations, layers=layers, caption=caption, groups=groups)


# ----- conversion -----------------------------------------------------------------------------------------------------
def description_to_scene(desc: Mapping[str, Any], requested: Mapping[str, int],
                         repairs: Counter | None = None) -> SceneGraph:
    """A description answer (already parsed, our shape or ACP's) -> SceneGraph without boxes: the requested objects
    in their order, ids repaired and extras dropped by the module's rules (counted in ``repairs``)."""
    repairs = Counter() if repairs is None else repairs
    attrs = _attributes(_get(desc, "attributes", "attribute"), repairs)
    caption = _get(desc, "caption", "description", "global caption")
    if caption is not None and not isinstance(caption, str):
        raise _Schema("'caption' must be a string")
    scene = SceneGraph(objects=[SceneObject(k, 0, a) for k, a in attrs.items()],
                       relations=_relations(_get(desc, "relations", "relation"), repairs),
                       layers=_layers(_get(desc, "layers of depth", "layers", "depth layers", "depth")),
                       caption=(caption or "").strip(), groups=_groups(_get(desc, "groups", "group"), repairs))
    if repairs[REPAIR_ACP_SHAPE] > 1:
        repairs[REPAIR_ACP_SHAPE] = 1  # one reinterpreted answer, however many of its parts
    scene = _resolve(scene, requested, list(attrs), repairs)
    by_id = {o.id: o.attributes for o in scene.objects}
    scene.objects = [SceneObject(normalize_object_id(oid), cid, by_id.get(normalize_object_id(oid), []))
                     for oid, cid in requested.items()]
    return scene


def layout_to_scene(layout: Any, description: SceneGraph, requested: Mapping[str, int],
                    repairs: Counter | None = None) -> SceneGraph:
    """A layout answer (already parsed) + the accepted description -> SceneGraph with boxes. The layout decides which
    objects exist: a requested object it leaves out is missing (rejected), one it adds is dropped; requested objects
    first. ACP's pixel layouts (``width``, ``height``) are divided by the canvas size."""
    repairs = Counter() if repairs is None else repairs
    entries = _layout_entries(layout)
    if entries is None:
        raise _Schema('the layout must be {"Layout": [{"object": id, "bbox": [x, y, w, h]}, ...]}')
    size = _image_size(layout)
    placed: list[SceneObject] = []
    for e in entries:
        if not isinstance(e, Mapping):
            raise _Schema(f"each layout entry must be an object, got {json.dumps(e)[:80]}")
        oid = _get(e, "object", "id", "name")
        if not isinstance(oid, str) or not oid.strip():
            raise _Schema(f"layout entry without an object id: {json.dumps(e)[:80]}")
        placed.append(SceneObject(oid, 0, [], _box(_get(e, "bbox", "box"), oid)))
    if size is not None and any(max(o.bbox) > 2 for o in placed if o.bbox is not None):
        repairs[REPAIR_ACP_SHAPE] += 1
        w, h = size
        for o in placed:
            x, y, bw, bh = o.bbox  # type: ignore[misc]
            o.bbox = (x / w, y / h, bw / w, bh / h)
    scene = _resolve(SceneGraph(objects=placed), requested, [o.id for o in placed], repairs)
    req = {normalize_object_id(k): v for k, v in requested.items()}
    desc_attrs = {normalize_object_id(o.id): o.attributes for o in description.objects}
    for o in scene.objects:
        o.category_id, o.attributes = req[o.id], list(desc_attrs.get(o.id, []))
    order = {oid: i for i, oid in enumerate(req)}
    scene.objects.sort(key=lambda o: order[o.id])
    return SceneGraph(objects=scene.objects, relations=list(description.relations), layers=dict(description.layers),
                      caption=description.caption, groups=dict(description.groups))


def _finish(scene: SceneGraph, requested: Mapping[str, int], repairs: Counter,
            ignore: tuple[str, ...] = ()) -> Verdict:
    repaired, more = scene.repair()
    v = repaired.validate(list(requested))
    reasons = [(c, d) for c, d in v.reasons if c not in ignore]
    return Verdict(repaired, reasons, +(repairs + more))


def parse_description(text: str, requested: Mapping[str, int], finish_reason: str | None = None) -> Verdict:
    """Stage 1 answer -> Verdict (scene without boxes; ``missing_box`` is not checked at this stage)."""
    repairs: Counter = Counter()
    try:
        value = extract_json(text, _is_description, finish_reason)
        scene = description_to_scene(value, requested, repairs)
    except ParseError as e:
        return Verdict(None, [(e.code, e.detail)])
    except _Schema as e:
        return Verdict(None, [(BAD_SCHEMA, str(e))])
    return _finish(scene, requested, repairs, ignore=(MISSING_BOX,))


def parse_layout(text: str, description: SceneGraph, requested: Mapping[str, int],
                 finish_reason: str | None = None) -> Verdict:
    """Stage 2 answer -> Verdict with the complete scene graph (repaired, validated against ``requested``)."""
    repairs: Counter = Counter()
    try:
        value = extract_json(text, _is_layout, finish_reason)
        scene = layout_to_scene(value, description, requested, repairs)
    except ParseError as e:
        return Verdict(None, [(e.code, e.detail)])
    except _Schema as e:
        return Verdict(None, [(BAD_SCHEMA, str(e))])
    # relations and caption were checked against the requested ids in stage 1: when the layout drops an object,
    # their complaints only echo missing_object
    return _finish(scene, requested, repairs, ignore=(UNKNOWN_RELATION_ID, CAPTION_MISSING_OBJECT))
