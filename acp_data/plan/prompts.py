"""The two-stage planner prompts (reference.md: description, then layout) with our own in-context examples.

Stage 1 asks for attributes, groups, layers of depth, relations and a tagged caption for a list of object ids;
stage 2 asks for one normalised ``[x, y, w, h]`` box per object given the caption. Messages are OpenAI-style
``{"role", "content"}`` dicts usable by a chat template or an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "DESCRIPTION_SYSTEM", "LAYOUT_SYSTEM", "EXAMPLES", "description_messages", "layout_messages", "feedback_message",
    "echo", "ECHO_CHARS", "PROMPT_VERSION",
]

# Bump when the wording or the examples change: it is part of the planner settings (and so of the generation key).
PROMPT_VERSION = 1

DESCRIPTION_SYSTEM = """\
You design realistic photographs. You are given a list of object ids such as ["cat-1", "laptop-2"]: each id is an \
object name followed by a number, and each id is exactly one object in the photo. Imagine an ordinary, natural \
photograph that contains exactly these objects and describe it as one JSON object with these keys:
- "attributes": each object id mapped to 1-3 short visual attributes (colour, material, texture, state);
- "groups": group ids ("group-1", "group-2", ...) mapped to the object ids that interact or stand together;
- "layers of depth": some of "Immediate Foreground", "Foreground", "Midground", "Background" mapped to group ids;
- "relations": a list of {"subjects": [ids], "objects": [ids], "relation": short spatial or action phrase};
- "caption": one or two sentences describing the photo that mention every object, each tagged with its id right \
after its name, written name(id), e.g. "a grey cat(cat-1)".
Use every given id exactly once and no other ids. Answer with the JSON object only."""

LAYOUT_SYSTEM = """\
You lay out realistic photographs. You are given the object ids of a photo and its caption. Give every object a \
bounding box [x, y, w, h] on a canvas normalised to 0..1: (x, y) is the top-left corner, w the width and h the \
height, and each of x, y, w, h, x + w and y + h must lie strictly between 0 and 1. Make sizes and positions \
physically plausible: relative sizes match the real objects, things resting on the ground or a table sit on a \
common support line, farther objects are smaller and higher in the image, and boxes overlap where the caption says \
objects touch or occlude each other. Answer with JSON only, one entry per object id:
{"Layout": [{"object": "cat-1", "bbox": [x, y, w, h]}, ...]}"""

# Our own few-shot examples: (object ids, description answer, layout answer).
EXAMPLES: list[tuple[list[str], dict[str, Any], dict[str, Any]]] = [
    (
        ["cat-1", "laptop-2", "mug-3"],
        {
            "attributes": {"cat-1": ["grey", "striped"], "laptop-2": ["silver", "open"],
                           "mug-3": ["white", "ceramic"]},
            "groups": {"group-1": ["cat-1", "laptop-2"], "group-2": ["mug-3"]},
            "layers of depth": {"Foreground": ["group-1"], "Midground": ["group-2"]},
            "relations": [{"subjects": ["cat-1"], "objects": ["laptop-2"], "relation": "lying on"},
                          {"subjects": ["mug-3"], "objects": ["laptop-2"], "relation": "next to"}],
            "caption": "A grey striped cat(cat-1) naps on the keyboard of an open silver laptop(laptop-2) on a "
                       "wooden desk, beside a white ceramic mug(mug-3).",
        },
        {"Layout": [{"object": "cat-1", "bbox": [0.18, 0.30, 0.52, 0.40]},
                    {"object": "laptop-2", "bbox": [0.12, 0.40, 0.62, 0.46]},
                    {"object": "mug-3", "bbox": [0.77, 0.52, 0.13, 0.20]}]},
    ),
    (
        ["fire_hydrant-1", "bicycle-2", "person-3"],
        {
            "attributes": {"fire_hydrant-1": ["red", "cast-iron"], "bicycle-2": ["blue", "city"],
                           "person-3": ["young", "yellow jacket"]},
            "groups": {"group-1": ["fire_hydrant-1"], "group-2": ["bicycle-2", "person-3"]},
            "layers of depth": {"Immediate Foreground": ["group-1"], "Midground": ["group-2"]},
            "relations": [{"subjects": ["person-3"], "objects": ["bicycle-2"], "relation": "riding"},
                          {"subjects": ["fire_hydrant-1"], "objects": ["bicycle-2"], "relation": "in front of"}],
            "caption": "A red fire hydrant(fire_hydrant-1) stands on the sidewalk in the foreground while a young "
                       "person(person-3) in a yellow jacket rides a blue bicycle(bicycle-2) down the street.",
        },
        {"Layout": [{"object": "fire_hydrant-1", "bbox": [0.06, 0.42, 0.22, 0.50]},
                    {"object": "bicycle-2", "bbox": [0.45, 0.48, 0.36, 0.30]},
                    {"object": "person-3", "bbox": [0.50, 0.20, 0.24, 0.50]}]},
    ),
    (
        ["sheep-1", "sheep-2", "shepherd_dog-3"],
        {
            "attributes": {"sheep-1": ["white", "woolly"], "sheep-2": ["cream-coloured", "woolly"],
                           "shepherd_dog-3": ["black and white", "crouching"]},
            "groups": {"group-1": ["sheep-1", "sheep-2"], "group-2": ["shepherd_dog-3"]},
            "layers of depth": {"Foreground": ["group-2"], "Midground": ["group-1"]},
            "relations": [{"subjects": ["shepherd_dog-3"], "objects": ["sheep-1", "sheep-2"], "relation": "watching"},
                          {"subjects": ["sheep-1"], "objects": ["sheep-2"], "relation": "next to"}],
            "caption": "A black and white shepherd dog(shepherd_dog-3) crouches in the grass watching a white "
                       "sheep(sheep-1) and a cream-coloured sheep(sheep-2) grazing side by side on a hillside.",
        },
        {"Layout": [{"object": "sheep-1", "bbox": [0.45, 0.36, 0.24, 0.22]},
                    {"object": "sheep-2", "bbox": [0.68, 0.38, 0.25, 0.21]},
                    {"object": "shepherd_dog-3", "bbox": [0.08, 0.58, 0.34, 0.30]}]},
    ),
    (
        ["teapot-1"],
        {
            "attributes": {"teapot-1": ["blue and white", "porcelain"]},
            "groups": {"group-1": ["teapot-1"]},
            "layers of depth": {"Foreground": ["group-1"]},
            "relations": [],
            "caption": "A blue and white porcelain teapot(teapot-1) sits on a kitchen table in soft morning light.",
        },
        {"Layout": [{"object": "teapot-1", "bbox": [0.28, 0.30, 0.44, 0.46]}]},
    ),
]


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _with_system(system: str, turns: list[dict[str, str]], system_role: bool) -> list[dict[str, str]]:
    if system_role:
        return [{"role": "system", "content": system}, *turns]
    # chat templates without a system role (e.g. Gemma): put the instructions in the first user turn
    first = dict(turns[0])
    first["content"] = f"{system}\n\n{first['content']}"
    return [first, *turns[1:]]


def description_user(ids: list[str]) -> str:
    return f"Objects: {_dump(ids)}"


def layout_user(ids: list[str], caption: str) -> str:
    return f"Objects: {_dump(ids)}\nCaption: {caption}"


def description_messages(ids: list[str], shots: int = len(EXAMPLES), system_role: bool = True) -> list[dict[str, str]]:
    """Stage 1 conversation: instructions, ``shots`` worked examples, then the unit's object ids."""
    turns: list[dict[str, str]] = []
    for ex_ids, desc, _ in EXAMPLES[:max(0, shots)]:
        turns += [{"role": "user", "content": description_user(ex_ids)},
                  {"role": "assistant", "content": _dump(desc)}]
    turns.append({"role": "user", "content": description_user(ids)})
    return _with_system(DESCRIPTION_SYSTEM, turns, system_role)


def layout_messages(ids: list[str], caption: str, shots: int = len(EXAMPLES),
                    system_role: bool = True) -> list[dict[str, str]]:
    """Stage 2 conversation: instructions, ``shots`` worked examples, then the unit's ids and its caption."""
    turns: list[dict[str, str]] = []
    for ex_ids, desc, layout in EXAMPLES[:max(0, shots)]:
        turns += [{"role": "user", "content": layout_user(ex_ids, desc["caption"])},
                  {"role": "assistant", "content": _dump(layout)}]
    turns.append({"role": "user", "content": layout_user(ids, caption)})
    return _with_system(LAYOUT_SYSTEM, turns, system_role)


# A rejected answer is sent back (as the assistant turn before the feedback) cut to this many characters: a runaway
# answer of megabytes must not become a request of megabytes.
ECHO_CHARS = 2000


def echo(answer: str) -> str:
    """A rejected answer as it is sent back on retry: at most ``ECHO_CHARS`` characters, the cut said."""
    if len(answer) <= ECHO_CHARS:
        return answer
    return f"{answer[:ECHO_CHARS]}\n[... {len(answer) - ECHO_CHARS} more characters cut]"


def feedback_message(problems: str, shorter: bool = False) -> dict[str, str]:
    """The user turn that sends a rejected answer's problems back to the model on retry; ``shorter`` (the answer was
    cut at the token limit or was far too long) asks for a shorter one."""
    ask = ("Your answer was too long and was cut off. Answer again much more briefly: the JSON only, no explanation "
           "or reasoning, one to three words per attribute and a one-sentence caption." if shorter else
           "Correct these problems and answer again with the complete JSON only.")
    return {"role": "user", "content": f"Your answer was rejected: {problems}. {ask}"}
