"""Finding the JSON value in a real LLM answer, in bounded time.

LLMs wrap JSON in code fences and prose, leave trailing commas, use single quotes or Python literals, and get cut
off at the token limit. ``extract_json`` tolerates the first four and reports the last as ``truncated``; it reads
at most ``MAX_ANSWER_CHARS`` of an answer, in time linear in what it reads (a 2 MB answer costs what 256 KiB do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

NO_JSON = "no_json"
TRUNCATED = "truncated"
TOO_LONG = "too_long"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
PARSE_REASONS = (NO_JSON, TRUNCATED, TOO_LONG, BAD_JSON, BAD_SCHEMA)
# Answers are read up to this many characters: a complete JSON value must start and end within them.
MAX_ANSWER_CHARS = 1 << 18

__all__ = ["NO_JSON", "TRUNCATED", "TOO_LONG", "BAD_JSON", "BAD_SCHEMA", "PARSE_REASONS", "MAX_ANSWER_CHARS",
           "ParseError", "extract_json"]

_MAX_CANDIDATES = 64


class ParseError(ValueError):
    """An answer without usable JSON; ``code`` is one of ``PARSE_REASONS``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# ----- JSON extraction ----------------------------------------------------------------------------------------------
_CLOSE = {"{": "}", "[": "]"}
_OPEN = re.compile(r"[{\[]")


def _apostrophe(text: str, i: int) -> bool:
    """A single quote between two letters is an apostrophe (``dog's``), not a string delimiter."""
    return 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()


def _scan(text: str, start: int, found: dict[int, tuple[int | None, bool]]) -> int:
    """One pass from the opening bracket at ``start`` (string-aware, both quote styles): records in ``found``, for it
    and every bracket opened inside it outside strings, the index just past its matching close, or ``(None,
    truncated)``: truncated when the text ends inside the value, else a bracket mismatch. Returns where the pass
    stopped; a bracket opened at p inside the pass would scan exactly the same from p, so no pass is repeated and
    extraction stays linear in the text."""
    stack = [(start, _CLOSE[text[start]])]
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
            stack.append((i, _CLOSE[c]))
        elif c in "}]":
            if c != stack[-1][1]:
                for p, _ in stack:
                    found[p] = (None, False)
                return i
            found[stack.pop()[0]] = (i + 1, False)
            if not stack:
                return i
        i += 1
    for p, _ in stack:
        found[p] = (None, True)
    return n


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


def _loads(span: str, budget: list[int]) -> Any:
    """Parse a candidate as JSON, else as JSON-ish text rewritten by ``_to_json`` while ``budget[0]`` (characters
    left to rewrite, shared by all candidates of an answer) lasts."""
    try:
        return json.loads(span, strict=False)
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if len(span) > budget[0]:
        raise ValueError("not JSON (and no rewrite budget left)")
    budget[0] -= len(span)
    try:
        return json.loads(_to_json(span), strict=False)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def extract_json(text: str, accept: Callable[[Any], bool] | None = None, finish_reason: str | None = None) -> Any:
    """The first JSON value (object or array) in ``text`` that parses and satisfies ``accept``.

    Tries the contents of code fences first, then every opening bracket in order (prose may contain ``{...}``
    placeholders), brackets inside an earlier candidate's strings excepted. Reads the first ``MAX_ANSWER_CHARS`` of
    ``text`` only. Raises ``ParseError`` with ``no_json`` (nothing like JSON), ``truncated`` (the answer ends inside
    a value, or the generation hit its token limit without a complete value), ``too_long`` (no complete value in the
    characters read of a longer answer), ``bad_json`` (brackets balance but it does not parse) or ``bad_schema``
    (parses but ``accept`` refuses every candidate).
    """
    if not isinstance(text, str) or not text.strip():
        raise ParseError(TRUNCATED if finish_reason == "length" else NO_JSON, "the answer is empty")
    cut_here = len(text) > MAX_ANSWER_CHARS
    text = text[:MAX_ANSWER_CHARS]
    sources = [m.group(1) for m in re.finditer(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", text, flags=re.S)]
    fence_open = text.rfind("```")
    if text.count("```") % 2 == 1 and fence_open >= 0:  # an unclosed fence: the answer was cut off
        sources.append(text[fence_open:].split("\n", 1)[-1] if "\n" in text[fence_open:] else "")
    sources.append(text)
    seen_any = truncated = parsed_any = False
    errors: list[str] = []
    tried = 0
    budget = [2 * len(text) + 4096]
    for src in sources:
        found: dict[int, tuple[int | None, bool]] = {}
        covered = -1  # the last index an earlier pass of this source read
        for m in _OPEN.finditer(src):
            if tried >= _MAX_CANDIDATES:
                break
            start = m.start()
            if start > covered:
                covered = _scan(src, start, found)
            elif start not in found:  # inside a string of an earlier candidate
                continue
            seen_any = True
            tried += 1
            end, cut = found[start]
            if end is None:
                truncated = truncated or cut
                continue
            try:
                value = _loads(src[start:end], budget)
            except (json.JSONDecodeError, ValueError) as e:
                errors.append(str(e))
                continue
            parsed_any = True
            if accept is None or accept(value):
                return value
            # the expected object may be nested inside: the next candidates are the brackets within
    if cut_here and finish_reason != "length":
        raise ParseError(TOO_LONG, f"the answer is longer than {MAX_ANSWER_CHARS} characters and has no complete, "
                                   "expected JSON in them")
    if truncated or (finish_reason == "length" and not parsed_any):
        raise ParseError(TRUNCATED, "the answer ends before its JSON is complete (token limit?)")
    if parsed_any:
        raise ParseError(BAD_SCHEMA, "the JSON in the answer does not have the expected keys")
    if seen_any:
        raise ParseError(BAD_JSON, "the JSON in the answer does not parse" + (f" ({errors[0]})" if errors else ""))
    raise ParseError(NO_JSON, "the answer contains no JSON object")
