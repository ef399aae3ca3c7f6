"""CategoryTable: LVIS v1 tables, json-built tables, round trips, frequencies, selection, errors."""

from __future__ import annotations

import json

import pytest

from acp_data.categories import Category, CategoryError, CategoryTable, frequency_from_count, normalize_name, safe_name


def _lvis_json(cats, anns=()):
    return {"images": [], "annotations": list(anns), "categories": cats}


@pytest.fixture(scope="module")
def lvis_v1() -> CategoryTable:
    return CategoryTable.from_lvis_v1()


def test_lvis_v1_counts_from_detectron2_tables(lvis_v1):
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    assert len(lvis_v1) == 1203
    assert lvis_v1.counts() == {"r": 337, "c": 461, "f": 405}
    assert [c.id for c in lvis_v1] == list(range(1, 1204))
    assert lvis_v1[1].name == LVIS_CATEGORIES[0]["name"]
    # image counts come from the second detectron2 table and agree with the frequency rule
    assert all(c.image_count > 0 for c in lvis_v1)
    assert all(frequency_from_count(c.image_count) == c.frequency for c in lvis_v1)
    assert len(lvis_v1.select("rare")) == 337
    assert len(lvis_v1.select("rare+common")) == 798
    assert len(lvis_v1.select("all")) == 1203


def test_json_built_table_equals_its_source_and_round_trips(lvis_v1, tmp_path):
    cats = [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "def": c.definition,
             "frequency": c.frequency, "image_count": c.image_count} for c in lvis_v1]
    path = tmp_path / "lvis_like.json"
    path.write_text(json.dumps(_lvis_json(cats)))
    from_file = CategoryTable.from_lvis_json(path)
    assert from_file == lvis_v1
    assert from_file.source == str(path)
    again = CategoryTable.from_json(from_file.to_json())
    assert again == lvis_v1
    assert again.categories[0] == lvis_v1.categories[0]  # every field, synonyms as tuples
    assert CategoryTable.from_dict(json.loads(lvis_v1.to_json())) == lvis_v1


def test_metadata_views_follow_ids():
    t = CategoryTable([Category(2, "b", image_count=50, frequency="c"), Category(1, "a", image_count=3)])
    assert t.thing_classes == ["a", "b"]
    assert t.class_image_count == [{"id": 1, "image_count": 3}, {"id": 2, "image_count": 50}]


def test_frequency_from_image_counts_when_absent():
    cats = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 3, "name": "three"},
            {"id": 4, "name": "given", "frequency": "f"}]
    anns = []
    for cid, n_images in ((1, 10), (2, 11), (3, 101), (4, 1)):
        anns += [{"image_id": i, "category_id": cid} for i in range(n_images)]
    anns.append({"image_id": 0, "category_id": 1})  # a second instance in the same image counts once
    t = CategoryTable.from_lvis_json(_lvis_json(cats, anns))
    assert [c.frequency for c in t] == ["r", "c", "f", "f"]
    assert [c.image_count for c in t] == [10, 11, 101, 1]
    assert [frequency_from_count(n) for n in (0, 1, 10, 11, 100, 101)] == ["r", "r", "r", "c", "c", "f"]


def test_unknown_name_suggests_closest(lvis_v1):
    with pytest.raises(CategoryError) as e:
        lvis_v1.id_of("aerosol cann")
    msg = str(e.value)
    assert "aerosol cann" in msg and "'aerosol_can'" in msg
    assert msg.count("'") >= 6  # three suggestions
    assert len(lvis_v1.closest("banan", n=3)) == 3


def test_names_match_ignoring_case_spaces_and_synonyms(lvis_v1):
    cid = lvis_v1.id_of("aerosol_can")
    assert lvis_v1.id_of("Aerosol  Can") == cid
    assert lvis_v1.id_of("spray_can") == cid  # a synonym of aerosol_can in LVIS v1
    assert normalize_name("  Red__Star ") == "red star"
    assert safe_name("../a/b") == "a_b" and safe_name("///") == "category"


def test_selection_by_group_list_and_file(lvis_v1, tmp_path):
    rare = lvis_v1.select("rare")
    assert all(lvis_v1[i].frequency == "r" for i in rare)
    assert lvis_v1.select(["rare"]) == rare
    assert set(lvis_v1.select("common+rare")) == set(lvis_v1.select("rare+common"))
    assert lvis_v1.select("frequent") == lvis_v1.frequency_ids(["f"])
    names = ["aerosol_can", "banana", "Aerosol Can"]
    assert lvis_v1.select(names) == [lvis_v1.id_of("aerosol_can"), lvis_v1.id_of("banana")]  # deduplicated
    assert lvis_v1.select("aerosol_can,banana") == lvis_v1.select(names)
    f = tmp_path / "concepts.txt"
    f.write_text("# my concepts\nbanana\n\naerosol can  # trailing comments are stripped\n")
    assert lvis_v1.select(str(f)) == [lvis_v1.id_of("banana"), lvis_v1.id_of("aerosol_can")]
    assert lvis_v1.select(f"@{f}") == lvis_v1.select(str(f))


def test_selection_errors_name_the_file_and_the_name(lvis_v1, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("banana\nbananna_split\n")
    with pytest.raises(CategoryError, match=r"bad\.txt.*bananna_split"):
        lvis_v1.select(str(f))
    with pytest.raises(CategoryError, match="does not exist"):
        lvis_v1.select(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(CategoryError, match="names no category"):
        lvis_v1.select(str(empty))
    with pytest.raises(CategoryError, match="empty"):
        lvis_v1.select([])


def test_non_contiguous_ids_rejected():
    with pytest.raises(CategoryError, match="contiguous"):
        CategoryTable.from_lvis_json(_lvis_json([{"id": 1, "name": "a"}, {"id": 3, "name": "c"}]))
    with pytest.raises(CategoryError, match="contiguous"):
        CategoryTable.from_lvis_json(_lvis_json([{"id": 0, "name": "a"}]))
    with pytest.raises(CategoryError, match="frequency"):
        CategoryTable([Category(1, "a", frequency="x")])


def test_bad_json_source_named(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(CategoryError, match="broken.json"):
        CategoryTable.from_lvis_json(p)
    with pytest.raises(CategoryError, match="categories"):
        CategoryTable.from_lvis_json({"images": []})


def test_check_same_names_both_sources(lvis_v1):
    small = CategoryTable([Category(1, "a"), Category(2, "b", frequency="c")])
    other = CategoryTable([Category(1, "a"), Category(2, "b", frequency="f")])
    small.check_same(other, "cache", "dataset", names_only=True)
    with pytest.raises(CategoryError, match="cache.*dataset"):
        small.check_same(other, "cache", "dataset")
    with pytest.raises(CategoryError, match="1203"):
        small.check_same(lvis_v1, "cache", "LVIS")
    with pytest.raises(CategoryError, match="outside"):
        small[3]
