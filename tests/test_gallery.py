"""``acp-data inspect``: what a browser would show, checked without one: object pixels keep their generated colours,
the legend is there, thumbnails link to the full-size image, the index has thumbnail strips and dropped counts, a
category's Dropped section names the dropped instance; defaults follow the cache; a bad ``--html`` stops first."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import GENERATION_SETTINGS, make_categories, make_sample
from PIL import Image, ImageFilter

from acp_data.cache.inspect import FILL_ALPHA, render_fill, write_gallery
from acp_data.cache.reader import CacheReader, decode_image
from acp_data.cache.selection import Selection, select
from acp_data.cache.writer import CacheWriter
from acp_data.categories import safe_name
from acp_data.cli import main as cli
from acp_data.masks import rle_to_mask

THRESHOLD = 50.0


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    """Units of one candidate: single-instance images (one per category) and two-instance images whose second
    instance scores below ``THRESHOLD`` while the first is above (kept image, dropped instance)."""
    cats = make_categories()
    d = tmp_path / "cache"
    rng = np.random.default_rng(7)
    scoring = {"selection": {"min_clis_i": THRESHOLD, "min_clis_l": 0}}
    with CacheWriter(d, cats, GENERATION_SETTINGS, scoring_settings=scoring) as w:
        for u, cid in enumerate(c.id for c in cats):
            rec, img = make_sample(u, 0, cats, rng, category_ids=[cid], size=(120, 160), quality=95, selected=True)
            rec["instances"][0]["clis_i"] = rec["clis_i"] = 90.0
            w.add_unit([rec], [img])
        for u in range(len(cats), len(cats) + 4):
            while True:
                rec, img = make_sample(u, 0, cats, rng, category_ids=[1, 2], size=(120, 160), selected=True)
                if len(rec["instances"]) == 2:
                    break
            rec["instances"][0]["clis_i"], rec["instances"][1]["clis_i"] = 80.0, 10.0
            w.add_unit([rec], [img])
    return d


def _thumb_of(out: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(out / "thumbs" / f"{rec['key']}.c{rec['candidate_idx']}.jpg").convert("RGB"))


def test_kept_thumbnail_keeps_object_colours_and_outlines_the_mask(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    write_gallery(cache, out, Selection(min_clis_i=THRESHOLD), thumb=200)
    r = CacheReader(cache)
    checked = 0
    for row in range(len(r)):
        rec, img = r.read_sample(row)
        if len(rec["instances"]) != 1:
            continue
        src = decode_image(img)
        thumb = _thumb_of(out, rec)
        th, tw = thumb.shape[:2]
        ref = np.asarray(Image.fromarray(src).resize((tw, th), Image.BILINEAR)).astype(int)
        m = rle_to_mask(rec["instances"][0]["segmentation"]).astype(np.uint8) * 255
        small = Image.fromarray(m).resize((tw, th), Image.NEAREST)
        inner = np.asarray(small.filter(ImageFilter.MinFilter(5))) > 0  # the object minus a 2-pixel border
        ring = (np.asarray(small.filter(ImageFilter.MaxFilter(5))) > 0) & ~(np.asarray(small) > 0)
        assert inner.sum() > 20
        diff = np.abs(thumb.astype(int) - ref)[inner]
        # the generated colour, as a browser shows it: no tint (a 43 % category-colour tint moves it by ~50 levels)
        assert diff.mean() < 6 and (diff.max(axis=1) <= 20).mean() > 0.97, (row, diff.mean())
        # the outline is drawn just outside the mask, away from the source pixels
        assert np.abs(thumb.astype(int) - ref)[ring].mean() > 25
        checked += 1
        # the fill layer (the page's toggle) covers exactly the mask
        alpha = np.asarray(render_fill(rec, [True], src.shape[:2], 200))[..., 3]
        assert (alpha[np.asarray(small) > 0] == FILL_ALPHA).all() and (alpha[np.asarray(small) == 0] == 0).all()
    assert checked == len(r.categories)


def test_pages_have_legend_links_strip_and_dropped_counts(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    index = write_gallery(cache, out, Selection(min_clis_i=THRESHOLD)).read_text()
    r = CacheReader(cache)
    cats = r.categories
    pages = sorted((out / "categories").glob("*.html"))
    for html in [index] + [p.read_text() for p in pages]:
        assert "id=legend" in html
        for words in ("mask outline", "mask box", "layout box", "dropped instance"):
            assert words in html
        assert "<input type=checkbox id=fill>" in html  # the outline/fill toggle
    # every thumbnail links to the full-size image, stored byte for byte
    page = (out / "categories" / f"c0001_{safe_name(cats[1].name)}.html").read_text()
    links = re.findall(r"<a class=thumb href='\.\./full/([^']+)'", page)
    assert links
    by_name = {f"{r.key(i)}.c{int(r.value('candidate_idx', i))}.jpg": i for i in range(len(r))}
    for name in links:
        assert (out / "full" / name).read_bytes() == r.read_image_bytes(by_name[name])
    # index: per category a strip of thumbnails and the dropped counts
    res = select(r, Selection(min_clis_i=THRESHOLD), return_masks=True)
    ic = r.column("inst_category_id")
    dropped = np.bincount(ic[~res.inst_mask[0]], minlength=len(cats) + 1)
    assert dropped[2] == 4 and dropped[1] == 0
    for c in cats:
        row = re.search(rf"<tr><td>{c.id}</td>.*?</tr>", index).group(0)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert int(cells[8]) == dropped[c.id], c.name
        assert re.search(r"<div class=strip>(<a href='categories/[^']+'><img [^>]*src='thumbs/[^']+'[^>]*></a>)+"
                         "</div>", row), c.name


def test_dropped_section_names_the_dropped_instance(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    write_gallery(cache, out, Selection(min_clis_i=THRESHOLD))
    cats = make_categories()
    page = (out / "categories" / f"c0002_{safe_name(cats[2].name)}.html").read_text()
    kept_part, dropped_part = page.split("<h2>Dropped")
    cards = re.findall(r"<figure class='(\w+)'>.*?<div class=head>(.*?)</div>(image \w+)", dropped_part)
    assert len(cards) == 4
    for cls, head, image in [c for c in cards]:
        assert cls == "dropped" and image == "image kept"  # the image stays; its blue-square instance does not
        assert f"DROPPED {cats[2].name} #2: CLIS-I 10.0 below {THRESHOLD:g}" in head
    # on the page of the instance that was kept, the same images are kept cards
    page1 = (out / "categories" / f"c0001_{safe_name(cats[1].name)}.html").read_text()
    assert page1.split("<h2>Dropped")[0].count(f"KEPT {cats[1].name} #1") == 5


def test_cli_defaults_follow_the_cache_and_bad_html_stops_first(cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "site"
    assert cli(["inspect", str(cache), "--html", str(out)]) == 0
    assert f"MIN_CLIS_I={THRESHOLD:g}" in (out / "index.html").read_text()  # the cache's 50, not the paper's 60
    capsys.readouterr()
    a_file = tmp_path / "file.html"
    a_file.write_text("x")
    assert cli(["inspect", str(cache), "--html", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("acp-data inspect: error: --html") and "not a directory" in err[0]
    assert a_file.read_text() == "x"
    assert cli(["inspect", str(tmp_path / "nowhere"), "--html", str(tmp_path / "o2")]) == 2
    assert "not an acp-data cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["inspect", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("--per-category", "--thumb", "--strip", "--max-images", "--seed", "--select", "--categories"):
        assert re.search(rf"{opt}.*?\(default: [^)]+\)", help_text, re.S), opt
    assert "the one the cache records" in help_text
