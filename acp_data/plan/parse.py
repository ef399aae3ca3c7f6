"""Robust JSON extraction from real LLM answers, and conversion of the two-stage answers (description, layout) into
a validated ``SceneGraph``.

LLMs wrap JSON in code fences and prose, leave trailing commas, use single quotes or Python literals, and get cut
off at the token limit. ``extract_json`` tolerates the first four and reports the last as ``truncated``. Every
verdict is a list of named reasons: ``scene.py``'s codes plus the parse codes below, so a planner can count them
and feed the message back to the model on retry.
"""

from __future__ import annotations

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
    UNKNOWN_RELATION_ID,
    Relation,
    SceneGraph,
    SceneObject,
    normalize_object_id,
)

NO_JSON = "no_json"
TRUNCATED = "truncated"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
PARSE_REASONS = (NO_JSON, TRUNCATED, BAD_JSON, BAD_SCHEMA)

__all__ = [
    "NO_JSON", "TRUNCATED", "BAD_JSON", "BAD_SCHEMA", "PARSE_REASONS", "ParseError", "Verdict", "extract_json",
    "parse_description", "parse_layout", "description_to_scene", "layout_to_scene",
]

_MAX_CANDIDATES = 64


class ParseError(ValueError):
    """An answer without usable JSON; ``code`` is one of ``PARSE_REASONS``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


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


# ----- JSON extraction ----------------------------------------------------------------------------------------------
_CLOSE = {"{": "}", "[": "]"}


def _apostrophe(text: str, i: int) -> bool:
    """A single quote between two letters is an apostrophe (``dog's``), not a string delimiter."""
    return 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()


def _scan(text: str, start: int) -> tuple[int | None, bool]:
    """From an opening bracket at ``start``, the index just past its matching close (string-aware, both quote
    styles), or ``(None, truncated)``: truncated when the text ends inside the value, else a bracket mismatch."""
    stack = [_CLOSE[text[start]]]
    i, n = start + 1, len(text)
    quote: str | None = None
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote and not (c == "'" and _apostrophe(text, i)):
                quote = None
            elif c == "\n" and quote == "'":  # an apostrophe in prose, not a string: give up on this quote
                quote = None
        elif c in "\"'" and not (c == "'" and _apostrophe(text, i)):
            quote = c
        elif c in "{[":
            stack.append(_CLOSE[c])
        elif c in "}]":
            if c != stack[-1]:
                return None, False
            stack.pop()
            if not stack:
                return i + 1, False
        i += 1
    return None, True


_WORDS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false", "null": "null",
          "NaN": "null", "nan": "null"}


def _to_json(span: str) -> str:
    """Rewrite JSON-ish text as JSON: single-quoted strings, Python literals, comments, trailing commas."""
    out: list[str] = []
    i, n = 0, len(span)
    while i < n:
        c = span[i]
        if c in "\"'":
            j = i + 1
            buf: list[str] = []
            while j < n and (span[j] != c or c == "'" and _apostrophe(span, j)):
                if span[j] == "\\" and j + 1 < n:
                    buf.append(span[j:j + 2])
                    j += 2
                    continue
                buf.append(span[j])
                j += 1
            s = "".join(buf)
            if c == "'":
                s = s.replace("\\'", "'").replace('"', '\\"')
            out.append('"' + s + '"')
            i = j + 1
        elif span.startswith("//", i):
            j = span.find("\n", i)
            i = n if j < 0 else j
        elif span.startswith("/*", i):
            j = span.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "#":  # Python comment
            j = span.find("\n", i)
            i = n if j < 0 else j
        elif c == ",":
            j = i + 1
            while j < n and span[j].isspace():
                j += 1
            if j < n and span[j] in "}]":
                i = j
            else:
                out.append(c)
                i += 1
        elif c.isdigit() or (c in "-+." and i + 1 < n and span[i + 1].isdigit()):
            j = i + 1
            while j < n and (span[j].isdigit() or span[j] in ".eE" or span[j] in "+-" and span[j - 1] in "eE"):
                j += 1
            num = span[i:j].lstrip("+")
            if num.startswith("."):
                num = "0" + num
            elif num.startswith("-."):
                num = "-0" + num[1:]
            out.append(num)
            i = j
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (span[j].isalnum() or span[j] == "_"):
                j += 1
            word = span[i:j]
            out.append(_WORDS.get(word, json.dumps(word)))  # bare keys become strings
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _loads(span: str) -> Any:
    try:
        return json.loads(span, strict=False)
    except json.JSONDecodeError:
        pass
    return json.loads(_to_json(span), strict=False)


def extract_json(text: str, accept: Callable[[Any], bool] | None = None, finish_reason: str | None = None) -> Any:
    """The first JSON value (object or array) in ``text`` that parses and satisfies ``accept``.

    Tries the contents of code fences first, then every opening bracket in order (prose may contain ``{...}``
    placeholders). Raises ``ParseError`` with ``no_json`` (nothing like JSON), ``truncated`` (the answer ends inside a
    value, or the generation hit its token limit without a complete value), ``bad_json`` (brackets balance but it
    does not parse) or ``bad_schema`` (parses but ``accept`` refuses every candidate).
    """
    if not isinstance(text, str) or not text.strip():
        raise ParseError(TRUNCATED if finish_reason == "length" else NO_JSON, "the answer is empty")
    sources = [m.group(1) for m in re.finditer(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", text, flags=re.S)]
    fence_open = text.rfind("```")
    if len(re.findall(r"```", text)) % 2 == 1 and fence_open >= 0:  # an unclosed fence: the answer was cut off
        sources.append(text[fence_open:].split("\n", 1)[-1] if "\n" in text[fence_open:] else "")
    sources.append(text)
    seen_any = truncated = parsed_any = False
    errors: list[str] = []
    tried = 0
    for src in sources:
        pos = 0
        while tried < _MAX_CANDIDATES:
            m = re.compile(r"[{\[]").search(src, pos)
            if m is None:
                break
            start = m.start()
            seen_any = True
            tried += 1
            end, cut = _scan(src, start)
            pos = start + 1
            if end is None:
                truncated = truncated or cut
                continue
            try:
                value = _loads(src[start:end])
            except (json.JSONDecodeError, ValueError) as e:
                errors.append(str(e))
                continue
            parsed_any = True
            if accept is None or accept(value):
                return value
            pos = start + 1  # the expected object may be nested inside
    if truncated or (finish_reason == "length" and not parsed_any):
        raise ParseError(TRUNCATED, "the answer ends before its JSON is complete (token limit?)")
    if parsed_any:
        raise ParseError(BAD_SCHEMA, "the JSON in the answer does not have the expected keys")
    if seen_any:
        raise ParseError(BAD_JSON, "the JSON in the answer does not parse" + (f" ({errors[0]})" if errors else ""))
    raise ParseError(NO_JSON, "the answer contains no JSON object")


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


def _attributes(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {str(k): _attr_list(a, str(k)) for k, a in v.items()}
    if isinstance(v, list):
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


def _groups(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {str(k): _id_list(m, f"group {k}") for k, m in v.items()}
    if isinstance(v, list):
        return {f"group-{i}": _id_list(m, f"group {i}") for i, m in enumerate(v, start=1)}
    raise _Schema("'groups' must map group ids to lists of object ids")


def _layers(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _Schema("'layers of depth' must map depth layers to lists of group or object ids")
    canon = {_key(n): n for n in DEPTH_LAYERS}
    return {canon.get(_key(k), str(k)): _id_list(m, f"layer {k}") for k, m in v.items()}


def _relations(v: Any) -> list[Relation]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Schema("'relations' must be a list")
    out = []
    for r in v:
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
        out.append(Relation(subj, obj, phrase.strip()))
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


# ----- conversion -----------------------------------------------------------------------------------------------------
def description_to_scene(desc: Mapping[str, Any], requested: Mapping[str, int]) -> SceneGraph:
    """A description answer (already parsed) -> SceneGraph without boxes. Requested objects come first in their
    order; ids the answer adds (in its attributes) become extra objects (category 0) so validation names them."""
    attrs = _attributes(_get(desc, "attributes", "attribute"))
    caption = _get(desc, "caption", "description", "global caption")
    if caption is not None and not isinstance(caption, str):
        raise _Schema("'caption' must be a string")
    by_norm = {normalize_object_id(k): a for k, a in attrs.items()}
    objects = [SceneObject(oid, cid, by_norm.get(normalize_object_id(oid), [])) for oid, cid in requested.items()]
    req_norm = {normalize_object_id(o) for o in requested}
    objects += [SceneObject(k, 0, a) for k, a in attrs.items() if normalize_object_id(k) not in req_norm]
    known = {normalize_object_id(o.id) for o in objects}

    def tag(m: re.Match) -> str:  # "(Dog 1)" style variants of known ids -> "(dog-1)"
        norm = normalize_object_id(m.group(1))
        return f"({norm})" if norm in known else m.group(0)

    caption = re.sub(r"\(([^()]+?-\d+)\)", tag, (caption or "").strip())
    return SceneGraph(objects=objects, relations=_relations(_get(desc, "relations", "relation")),
                      layers=_layers(_get(desc, "layers of depth", "layers", "depth layers", "depth")),
                      caption=caption, groups=_groups(_get(desc, "groups", "group")))


def layout_to_scene(layout: Any, description: SceneGraph, requested: Mapping[str, int]) -> SceneGraph:
    """A layout answer (already parsed) + the accepted description -> SceneGraph with boxes. The layout decides which
    objects exist (a requested object it leaves out is missing; one it adds is extra); requested objects first."""
    entries = _layout_entries(layout)
    if entries is None:
        raise _Schema('the layout must be {"Layout": [{"object": id, "bbox": [x, y, w, h]}, ...]}')
    desc_attrs = {normalize_object_id(o.id): o.attributes for o in description.objects}
    req = {normalize_object_id(k): v for k, v in requested.items()}
    placed: list[SceneObject] = []
    for e in entries:
        if not isinstance(e, Mapping):
            raise _Schema(f"each layout entry must be an object, got {json.dumps(e)[:80]}")
        oid = _get(e, "object", "id", "name")
        if not isinstance(oid, str) or not oid.strip():
            raise _Schema(f"layout entry without an object id: {json.dumps(e)[:80]}")
        box = _box(_get(e, "bbox", "box"), oid)
        norm = normalize_object_id(oid)
        placed.append(SceneObject(oid, req.get(norm, 0), list(desc_attrs.get(norm, [])), box))
    order = {oid: i for i, oid in enumerate(req)}
    placed.sort(key=lambda o: order.get(normalize_object_id(o.id), len(order)))
    return SceneGraph(objects=placed, relations=list(description.relations), layers=dict(description.layers),
                      caption=description.caption, groups=dict(description.groups))


def _finish(scene: SceneGraph, requested: Mapping[str, int], ignore: tuple[str, ...] = ()) -> Verdict:
    repaired, repairs = scene.repair()
    v = repaired.validate(list(requested))
    reasons = [(c, d) for c, d in v.reasons if c not in ignore]
    return Verdict(repaired, reasons, repairs)


def parse_description(text: str, requested: Mapping[str, int], finish_reason: str | None = None) -> Verdict:
    """Stage 1 answer -> Verdict (scene without boxes; ``missing_box`` is not checked at this stage)."""
    try:
        value = extract_json(text, _is_description, finish_reason)
        scene = description_to_scene(value, requested)
    except ParseError as e:
        return Verdict(None, [(e.code, e.detail)])
    except _Schema as e:
        return Verdict(None, [(BAD_SCHEMA, str(e))])
    return _finish(scene, requested, ignore=(MISSING_BOX,))


def parse_layout(text: str, description: SceneGraph, requested: Mapping[str, int],
                 finish_reason: str | None = None) -> Verdict:
    """Stage 2 answer -> Verdict with the complete scene graph (repaired, validated against ``requested``)."""
    try:
        value = extract_json(text, _is_layout, finish_reason)
        scene = layout_to_scene(value, description, requested)
    except ParseError as e:
        return Verdict(None, [(e.code, e.detail)])
    except _Schema as e:
        return Verdict(None, [(BAD_SCHEMA, str(e))])
    # relations and caption were checked against the requested ids in stage 1: when the layout adds or drops
    # objects, their complaints only echo extra_object / missing_object
    return _finish(scene, requested, ignore=(UNKNOWN_RELATION_ID, CAPTION_MISSING_OBJECT))
