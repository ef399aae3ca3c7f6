"""Parsing real-looking LLM answers: a corpus of description and layout answers, each with the verdict it must get."""

from __future__ import annotations

import json

import pytest
from tiny_models_gen import synthetic_lvis

from acp_data.categories import CategoryTable
from acp_data.plan import prompts
from acp_data.plan.common import display_name, requested_objects
from acp_data.plan.parse import ParseError, extract_json, parse_description, parse_layout

CATS = CategoryTable.from_lvis_json(synthetic_lvis())
REQ = requested_objects(CATS, (CATS.id_of("dog"), CATS.id_of("frisbee"), CATS.id_of("person")))

GOOD_DESC = {
    "attributes": {"dog-1": ["golden", "fluffy"], "frisbee-2": ["red", "plastic"], "person-3": ["smiling"]},
    "groups": {"group-1": ["dog-1", "frisbee-2"], "group-2": ["person-3"]},
    "layers of depth": {"Foreground": ["group-1"], "Midground": ["group-2"]},
    "relations": [{"subjects": ["dog-1"], "objects": ["frisbee-2"], "relation": "catching"},
                  {"subjects": ["person-3"], "objects": ["dog-1"], "relation": "behind"}],
    "caption": "A golden fluffy dog(dog-1) leaps to catch a red frisbee(frisbee-2) while a smiling "
               "person(person-3) watches from behind.",
}
GOOD_LAYOUT = {"Layout": [{"object": "dog-1", "bbox": [0.12, 0.38, 0.42, 0.4]},
                          {"object": "frisbee-2", "bbox": [0.46, 0.22, 0.14, 0.08]},
                          {"object": "person-3", "bbox": [0.62, 0.15, 0.22, 0.7]}]}

DESCRIPTIONS: list[tuple[str, str, set[str]]] = [
    ("plain", json.dumps(GOOD_DESC), set()),
    ("fenced with prose", "Sure! Here is the description of the scene:\n\n```json\n" + json.dumps(GOOD_DESC, indent=2)
     + "\n```\n\nLet me know if you would like any changes!", set()),
    ("python literals, single quotes, trailing commas", """{
  'attributes': {'dog-1': ['golden', 'fluffy',], 'frisbee-2': ['red'], 'person-3': ['smiling'],},
  'groups': {'group-1': ['dog-1', 'frisbee-2'], 'group-2': ['person-3']},
  'layers of depth': {'Foreground': ['group-1'], 'Midground': ['group-2'], 'Background': None},
  'relations': [{'subjects': ['dog-1'], 'objects': ['frisbee-2'], 'relation': 'catching', 'visible': True},],
  'caption': 'A golden dog(dog-1) catches a red frisbee(frisbee-2) as a person(person-3) cheers.',
}""", set()),
    ("reasoning with braces before the answer", "<think>The ids are dog-1, frisbee-2 and person-3. I need the format "
     "{attributes, groups, ...} and every id in the caption.</think>\n" + json.dumps(GOOD_DESC), set()),
    ("snake_case keys and comments", """{
  "Attributes": {"dog-1": "golden, fluffy", "frisbee-2": "red", "person-3": "smiling"},  // colours
  "layers_of_depth": {"foreground": ["dog-1", "frisbee-2"], "midground": ["person-3"]},
  "Relations": [["dog-1", "jumping for", "frisbee-2"]],
  "Caption": "A golden dog(dog-1) jumps for a red frisbee(frisbee-2) thrown by a smiling person(person-3)."
}""", set()),
    ("uppercase ids are normalised", json.dumps({**GOOD_DESC, "attributes": {"Dog-1": ["golden"]},
                                                 "caption": GOOD_DESC["caption"].replace("(dog-1)", "(Dog-1)")}),
     set()),
    ("truncated mid-caption", json.dumps(GOOD_DESC)[:-60], {"truncated"}),
    ("truncated inside a fence", "```json\n" + json.dumps(GOOD_DESC, indent=2)[:200], {"truncated"}),
    ("refusal without json", "I'm sorry, but I can't describe this scene.", {"no_json"}),
    ("empty", "", {"no_json"}),
    ("unbalanced garbage", '{"caption": "a dog(dog-1)" "attributes": }', {"bad_json"}),
    ("wrong type for relations", json.dumps({**GOOD_DESC, "relations": "the dog catches the frisbee"}),
     {"bad_schema"}),
    ("json of another shape", '{"answer": 42, "confidence": 0.9}', {"bad_schema"}),
    ("caption misses an object", json.dumps({**GOOD_DESC, "caption": "A golden dog(dog-1) catches a red "
                                                                     "frisbee(frisbee-2)."}),
     {"caption_missing_object"}),
    # a dangling id drops just that relation; an object the request did not ask for is dropped (both counted)
    ("relation names an unknown id", json.dumps({**GOOD_DESC, "relations": [
        {"subjects": ["cat-4"], "objects": ["dog-1"], "relation": "chasing"}]}), set()),
    ("extra object in attributes", json.dumps({**GOOD_DESC, "attributes": {
        **GOOD_DESC["attributes"], "ball-4": ["blue"]}}), set()),
    ("requested object neither described nor in the caption", json.dumps({
        **GOOD_DESC, "attributes": {"dog-1": ["golden"], "frisbee-2": ["red"]},
        "caption": "A golden dog(dog-1) catches a red frisbee(frisbee-2)."}), {"caption_missing_object"}),
]


@pytest.mark.parametrize("name,text,expected", DESCRIPTIONS, ids=[d[0] for d in DESCRIPTIONS])
def test_description_verdicts(name: str, text: str, expected: set[str]) -> None:
    v = parse_description(text, REQ)
    assert set(v.codes) == expected, v.message()
    assert v.ok == (not expected)
    if v.ok:
        assert v.scene is not None
        assert v.scene.ids == list(REQ)
        assert [o.category_id for o in v.scene.objects] == list(REQ.values())
        assert all(f"({oid})" in v.scene.caption for oid in REQ)
        assert v.scene.object("dog-1").attributes[0] == "golden"


def test_description_complete_despite_token_limit() -> None:
    assert parse_description(json.dumps(GOOD_DESC), REQ, finish_reason="length").ok
    assert parse_description("Here it is: " + json.dumps(GOOD_DESC)[:-5], REQ, finish_reason="length").codes == [
        "truncated"]


@pytest.fixture(scope="module")
def desc_scene():
    v = parse_description(json.dumps(GOOD_DESC), REQ)
    assert v.ok
    return v.scene


def _layout(*entries: tuple[str, list]) -> str:
    return json.dumps({"Layout": [{"object": o, "bbox": b} for o, b in entries]})


OK3 = [("dog-1", [0.12, 0.38, 0.42, 0.4]), ("frisbee-2", [0.46, 0.22, 0.14, 0.08]), ("person-3", [0.62, 0.15, 0.22, 0.7])]
LAYOUTS: list[tuple[str, str, set[str]]] = [
    ("plain", json.dumps(GOOD_LAYOUT), set()),
    ("fenced with prose", "Here is a plausible layout for the scene:\n```\n" + json.dumps(GOOD_LAYOUT, indent=1)
     + "\n```\nThe dog is in the lower left, the frisbee above it.", set()),
    ("bare list, entries in another order", json.dumps(GOOD_LAYOUT["Layout"][::-1]), set()),
    ("string numbers and x/y/w/h objects", json.dumps({"layout": [
        {"object": "dog-1", "bbox": ["0.12", "0.38", "0.42", "0.4"]},
        {"object": "frisbee-2", "box": {"x": 0.46, "y": 0.22, "w": 0.14, "h": 0.08}},
        {"object": "Person-3", "bbox": [0.62, 0.15, 0.22, 0.7]}]}), set()),
    ("slight overshoot is clipped", _layout(OK3[0], OK3[1], ("person-3", [0.6, 0.15, 0.42, 0.7])), set()),
    ("box far outside", _layout(OK3[0], OK3[1], ("person-3", [0.7, 0.2, 0.5, 0.3])), {"box_out_of_range"}),
    ("pixel coordinates", _layout(("dog-1", [61, 194, 215, 205]), ("frisbee-2", [235, 112, 72, 41]),
                                  ("person-3", [317, 77, 113, 358])), {"box_out_of_range"}),
    ("zero width", _layout(OK3[0], ("frisbee-2", [0.46, 0.22, 0.0, 0.08]), OK3[2]), {"box_zero_area"}),
    ("missing object", _layout(OK3[0], OK3[1]), {"missing_object"}),
    ("extra object is dropped", _layout(*OK3, ("ball-4", [0.1, 0.1, 0.1, 0.1])), set()),
    ("duplicate object", _layout(*OK3, ("dog-1", [0.1, 0.5, 0.3, 0.3])), {"duplicate_object"}),
    ("wrong id separator is renamed", _layout(("dog_1", OK3[0][1]), OK3[1], OK3[2]), set()),
    # dog-2: the name says dog-1, the number frisbee-2 (also placed): ambiguous, dropped, so dog-1 is missing
    ("wrong id number", _layout(("dog-2", OK3[0][1]), OK3[1], OK3[2]), {"missing_object"}),
    ("another object in a requested one's place", _layout(("cat-1", OK3[0][1]), OK3[1], OK3[2]),
     {"missing_object"}),
    ("three numbers", _layout(("dog-1", [0.1, 0.2, 0.3]), OK3[1], OK3[2]), {"bad_schema"}),
    ("truncated", json.dumps(GOOD_LAYOUT)[:-40], {"truncated"}),
    ("description instead of layout", json.dumps(GOOD_DESC), {"bad_schema"}),
    ("no json", "The dog should be on the left and the person on the right.", {"no_json"}),
]


@pytest.mark.parametrize("name,text,expected", LAYOUTS, ids=[d[0] for d in LAYOUTS])
def test_layout_verdicts(name: str, text: str, expected: set[str], desc_scene) -> None:
    v = parse_layout(text, desc_scene, REQ)
    assert set(v.codes) == expected, v.message()
    assert v.ok == (not expected)
    if v.ok:
        s = v.scene
        assert s.ids == list(REQ)  # requested order whatever the answer's order
        assert [o.category_id for o in s.objects] == list(REQ.values())
        assert s.object("dog-1").bbox == pytest.approx((0.12, 0.38, 0.42, 0.4))
        assert s.object("dog-1").attributes == ["golden", "fluffy"]
        assert s.caption == GOOD_DESC["caption"] and len(s.relations) == 2
        assert s.validate(list(REQ)).ok
        x, y, w, h = s.object("person-3").bbox
        assert 0 <= x and x + w <= 1 + 1e-9


def test_repairs_are_counted(desc_scene) -> None:
    v = parse_layout(_layout(OK3[0], OK3[1], ("Person-3", [0.6, 0.15, 0.42, 0.7])), desc_scene, REQ)
    assert v.ok and v.repairs["clip_box"] == 1 and v.repairs["normalize_id"] == 1


def test_extract_json_edge_cases() -> None:
    assert extract_json("x = {'a': 1e-3, 'b': -.5, 'c': None}") == {"a": 0.001, "b": -0.5, "c": None}
    assert extract_json('{"caption": "the dog\'s toy"}') == {"caption": "the dog's toy"}
    assert extract_json("{'caption': 'the dog's toy'}") == {"caption": "the dog's toy"}
    assert extract_json('Use {x: y} format.\n{"Layout": []}', accept=lambda v: "Layout" in v) == {"Layout": []}
    with pytest.raises(ParseError) as e:
        extract_json('{"a": [1, 2}')
    assert e.value.code == "bad_json"


@pytest.mark.parametrize("k", range(len(prompts.EXAMPLES)))
def test_few_shot_examples_are_valid(k: int) -> None:
    """Our in-context examples must pass our own parser (a bad example teaches the model bad answers)."""
    ids, desc, layout = prompts.EXAMPLES[k]
    req = {oid: i for i, oid in enumerate(ids, start=1)}
    v = parse_description(json.dumps(desc), req)
    assert v.ok, v.message()
    lv = parse_layout(json.dumps(layout), v.scene, req)
    assert lv.ok and not lv.repairs, lv.message()
    for o in lv.scene.objects:  # strictly inside (0, 1), as the prompt demands
        x, y, w, h = o.bbox
        assert 0 < x < x + w < 1 and 0 < y < y + h < 1


def test_prompt_messages() -> None:
    ids = list(REQ)
    msgs = prompts.description_messages(ids, shots=2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert json.dumps(ids) in msgs[-1]["content"]
    no_sys = prompts.layout_messages(ids, GOOD_DESC["caption"], shots=0, system_role=False)
    assert [m["role"] for m in no_sys] == ["user"]
    assert no_sys[0]["content"].startswith(prompts.LAYOUT_SYSTEM) and GOOD_DESC["caption"] in no_sys[0]["content"]


def test_object_ids_from_lvis_names() -> None:
    assert display_name("bow_(weapon)") == "bow weapon"
    assert display_name("Crème_Brûlée") == "creme brulee"
    req = requested_objects(CATS, (CATS.id_of("bow_(weapon)"), CATS.id_of("fire_hydrant"), CATS.id_of("dog"),
                                   CATS.id_of("dog")))
    assert list(req) == ["bow_weapon-1", "fire_hydrant-2", "dog-3", "dog-4"]


# ----- the ACP repository's answer shape and the noise real answers carry ------------------------------------------
def _acp_desc(attributes: list[tuple[str, str]], groups: list[list[str]], layers: dict, blocks: list[tuple[str, list]],
              caption: str) -> str:
    """A description in ACP's shape: attribute and group lists, relations as per-caption blocks."""
    return json.dumps({
        "attributes": [{"name": n, "attributes": a} for n, a in attributes],
        "groups": [{"id": f"group-{i}", "group": g} for i, g in enumerate(groups, start=1)],
        "layers of depth": layers,
        "relations": [{"caption": c, "relations": [{"subject": s, "object": o, "relation": r} for s, o, r in rels]}
                      for c, rels in blocks],
        "caption": caption})


STREET = {"person-1": 1, "person-2": 1, "phone-3": 2, "backpack-4": 3, "scarf-5": 4, "flower-6": 5}


def test_acp_shape_with_renamed_and_misspelt_ids() -> None:
    text = _acp_desc(
        [("person-1", "a tall man"), ("person-2", "a girl"), ("phone-3", "a black phone"),
         ("backpack-4", "a red backpack"), ("scarf-5", "a woollen scarf"), ("flowr-6", "a pot of tulips")],
        [["man-1", "phone-3", "backpack-4"], ["girl-2", "scarf-5"], ["flowr-6"]],
        {"Foreground": ["group-1", "group-2"], "Midground": [], "Background": ["group-3"]},
        [("a man(man-1) holding a phone(phone-3)", [(["man-1"], ["phone-3"], "holding"),
                                                   (["man-1"], ["backpack-4"], "carrying")]),
         ("a girl(girl-2) in a scarf(scarf-5)", [(["girl-2"], ["scarf-5"], "wearing")])],
        "A man(man-1) with a red backpack(backpack-4) checks his phone(phone-3) next to a girl(girl-2) in a "
        "woollen scarf(scarf-5); a pot of tulips(flowr-6) stands behind them(man-1, girl-2).")
    v = parse_description(text, STREET)
    assert v.ok, v.message()
    assert dict(v.repairs) == {"acp_shape": 1, "rename_id": 3}  # man-1, girl-2, flowr-6
    s = v.scene
    assert s.ids == list(STREET) and [o.category_id for o in s.objects] == list(STREET.values())
    assert s.object("person-1").attributes == ["a tall man"] and s.object("flower-6").attributes == ["a pot of tulips"]
    assert s.groups == {"group-1": ["person-1", "phone-3", "backpack-4"], "group-2": ["person-2", "scarf-5"],
                        "group-3": ["flower-6"]}
    assert s.layers["Foreground"] == ["group-1", "group-2"]
    assert [(r.subjects, r.objects, r.phrase) for r in s.relations] == [
        (["person-1"], ["phone-3"], "holding"), (["person-1"], ["backpack-4"], "carrying"),
        (["person-2"], ["scarf-5"], "wearing")]
    assert "A man(person-1)" in s.caption and "tulips(flower-6)" in s.caption and "(person-1, person-2)" in s.caption
    assert "man-1" not in s.caption and "girl-2" not in s.caption


def test_acp_shape_dangling_and_ambiguous_ids_drop_the_relation() -> None:
    req = {"dog-1": 1, "collar-2": 2, "bell-3": 3, "steps-4": 4, "bag-5": 5}
    text = _acp_desc(
        [("dog-1", "a brown dog"), ("collar-2", "a leather collar"), ("bell-3", "a small bell"),
         ("steps-4", "stone steps"), ("bag-5", "a paper bag")],
        [["dog-1", "collar-2", "bell-3", "steps-4"], ["bag-5", "ghost-9"]],
        {"Foreground": ["group-1"], "Background": ["group-2", "group-7"]},
        # collar-4: the name says collar-2, the number steps-4: ambiguous, so that relation goes (not the answer)
        [("a dog(dog-1) on steps(steps-4)", [(["dog-1"], ["steps-4"], "sitting on"),
                                             (["dog-1"], ["collar-4"], "wearing"),
                                             (["bell-3"], ["collar-2"], "attached to"),
                                             (["cat-8"], ["dog-1"], "watching")])],
        "A brown dog(dog-1) wearing a collar(collar-2) with a bell(bell-3) sits on stone steps(steps-4) next to a "
        "paper bag(bag-5).")
    v = parse_description(text, req)
    assert v.ok, v.message()
    assert dict(v.repairs) == {"acp_shape": 1, "drop_relation": 2, "drop_dangling_id": 2}
    assert [r.phrase for r in v.scene.relations] == ["sitting on", "attached to"]
    assert v.scene.groups["group-2"] == ["bag-5"] and v.scene.layers["Background"] == ["group-2"]


def test_declared_objects_are_not_merged() -> None:
    """woman-1 described as an object of its own next to person-1 is an extra object, not person-1 renamed; an
    object described in place of a requested one (cat-2 for frisbee-2) leaves that one missing from the caption."""
    desc = {**GOOD_DESC, "attributes": {**GOOD_DESC["attributes"], "woman-1": ["tall"]}}
    v = parse_description(json.dumps(desc), REQ)
    assert v.ok and dict(v.repairs) == {"drop_extra_object": 1} and v.scene.object("dog-1").attributes[0] == "golden"
    desc = {**GOOD_DESC, "attributes": {"dog-1": ["golden"], "cat-2": ["grey"], "person-3": ["smiling"]},
            "caption": "A golden dog(dog-1) chases a grey cat(cat-2) past a smiling person(person-3)."}
    v = parse_description(json.dumps(desc), REQ)
    assert set(v.codes) == {"caption_missing_object"} and "frisbee-2" in v.message()


def test_acp_pixel_layout_is_normalised(desc_scene) -> None:
    text = json.dumps({"width": 640, "height": 480, "Layout": [
        {"object": "dog-1", "bbox": [76.8, 182.4, 268.8, 192.0]}, {"object": "frisbee-2", "bbox": [294.4, 105.6, 89.6,
                                                                                                    38.4]},
        {"object": "person-3", "bbox": [396.8, 72.0, 140.8, 336.0]}]})
    v = parse_layout(text, desc_scene, REQ)
    assert v.ok, v.message()
    assert dict(v.repairs) == {"acp_shape": 1}
    assert v.scene.object("dog-1").bbox == pytest.approx((0.12, 0.38, 0.42, 0.4))
    # normalised boxes with a canvas size are left as they are
    v = parse_layout(json.dumps({"width": 640, "height": 480, **GOOD_LAYOUT}), desc_scene, REQ)
    assert v.ok and not v.repairs


@pytest.mark.parametrize("box,ok", [
    ([0.95, 0.22, 0.1, 0.08], True),  # 0.05 of the image past the right edge (half the box's own width): clipped
    ([0.46, -0.09, 0.14, 0.3], True),  # 0.09 above the top: clipped
    ([0.46, 0.22, 0.14, 0.9], False),  # 0.12 below the bottom: rejected
    ([-0.3, 0.22, 0.5, 0.08], False),  # 0.3 left of the image: rejected
])
def test_overshoot_is_measured_against_the_image(desc_scene, box: list, ok: bool) -> None:
    v = parse_layout(_layout(OK3[0], ("frisbee-2", box), OK3[2]), desc_scene, REQ)
    assert v.ok == ok, v.message()
    if ok:
        assert v.repairs["clip_box"] == 1
        x, y, w, h = v.scene.object("frisbee-2").bbox
        assert 0 <= x and 0 <= y and x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
    else:
        assert v.codes == ["box_out_of_range"]


def test_layout_repairs_are_counted(desc_scene) -> None:
    v = parse_layout(_layout(("Dog_1", OK3[0][1]), OK3[1], ("persn-3", OK3[2][1]), ("ball-7", [0.1, 0.1, 0.1, 0.1])),
                     desc_scene, REQ)
    assert v.ok, v.message()
    assert dict(v.repairs) == {"rename_id": 2, "drop_extra_object": 1}
    assert v.scene.ids == list(REQ)


# ----- long, cut-off and runaway answers: bounded work -------------------------------------------------------------
def test_scanner_is_linear_below_the_cap() -> None:
    """200 K unclosed brackets: every one of them a candidate; the old per-candidate rescans took seconds."""
    import time

    from acp_data.plan.parse import MAX_ANSWER_CHARS

    text = "[" * 200_000
    assert len(text) < MAX_ANSWER_CHARS
    t0 = time.perf_counter()
    with pytest.raises(ParseError) as e:
        extract_json(text)
    assert e.value.code == "truncated" and time.perf_counter() - t0 < 1.0
    # 62 unclosed candidates 4 K apart, then the answer: one pass, not 62 passes over 250 K
    t0 = time.perf_counter()
    assert extract_json(("[" + "a" * 4000) * 62 + json.dumps(GOOD_LAYOUT), accept=lambda v: isinstance(v, dict)) == \
        GOOD_LAYOUT
    assert time.perf_counter() - t0 < 1.0


def test_megabyte_answers_cost_a_bounded_time() -> None:
    import time

    cases = [("[" * (2 << 20), None, "too_long"), ("[" * (2 << 20), "length", "truncated"),
             ("{x y} " * 400_000, None, "too_long"), ("[" * 120_000 + "]" * 120_000, None, "bad_json")]
    for text, finish, code in cases:
        t0 = time.perf_counter()
        v = parse_description(text, REQ, finish_reason=finish)
        assert v.codes == [code] and time.perf_counter() - t0 < 2.0, (code, v.message())
    # a complete answer followed by a runaway tail is read (its JSON lies within the characters read)
    v = parse_layout(json.dumps(GOOD_LAYOUT) + " ha" * 1_000_000, parse_description(json.dumps(GOOD_DESC), REQ).scene,
                     REQ, finish_reason="length")
    assert v.ok, v.message()


def test_echo_and_feedback_are_capped() -> None:
    big = "x" * 2_000_000
    assert len(prompts.echo(big)) < prompts.ECHO_CHARS + 64 and prompts.echo("short") == "short"
    assert "more characters cut" in prompts.echo(big)
    assert "much more briefly" in prompts.feedback_message("truncated: ...", shorter=True)["content"]
    assert "briefly" not in prompts.feedback_message("missing_object: dog-1 is missing")["content"]
