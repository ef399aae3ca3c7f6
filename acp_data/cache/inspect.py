"""``acp-data inspect CACHE --html OUT``: a static HTML gallery of a cache.

``OUT/index.html`` counts images and instances per category and frequency group (all stored vs kept under the
selection, by default the paper's recipe: the CLIS-selected candidate, CLIS-I >= 60); ``OUT/categories/c<id>_<name>.html``
shows, per category, kept and dropped samples as thumbnails with masks and boxes drawn (filled mask + solid box =
tight mask box, thin white box = layout box, grey = dropped instance), CLIS-L and CLIS-I per image and instance and why
something was dropped. Category names reach file names only through ``safe_name`` and HTML only escaped.
"""

from __future__ import annotations

import argparse
import colorsys
import html
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import GROUP_NAMES, safe_name
from .layout import BrokenSampleError, CacheError, member_stem

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;padding:6px;background:#fff;border:3px solid #3a3;width:var(--w);font-size:12px}
figure.dropped{border:3px dashed #c33;opacity:.85}figure img{display:block;width:100%}
figcaption ol{margin:.2em 0 0 1.2em;padding:0}.drop{color:#c33}.keep{color:#282}.muted{color:#777}
h2{margin-top:1.2em}
"""


def _colour(cid: int) -> tuple[int, int, int]:
    h = (cid * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _fmt(v: Any) -> str:
    return "unscored" if v is None else f"{float(v):.1f}"


def render_thumbnail(image: np.ndarray, record: dict[str, Any], inst_kept: list[bool], size: int) -> Any:
    """PIL image: ``image`` scaled to fit ``size``, masks filled (grey when dropped), tight boxes solid, layout
    boxes thin white, instance numbers at the top-left corners."""
    from PIL import Image, ImageDraw

    from ..masks import rle_to_mask

    h, w = image.shape[:2]
    s = min(1.0, size / max(h, w))
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    base = Image.fromarray(image).resize((tw, th), Image.BILINEAR).convert("RGBA")
    overlay = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
    for inst, kept in zip(record["instances"], inst_kept):
        m = Image.fromarray(rle_to_mask(inst["segmentation"]).astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)
        col = _colour(inst["category_id"]) if kept else (128, 128, 128)
        overlay.paste(Image.new("RGBA", (tw, th), (*col, 110)), (0, 0), m)
    out = Image.alpha_composite(base, overlay)
    draw = ImageDraw.Draw(out)
    for k, (inst, kept) in enumerate(zip(record["instances"], inst_kept), start=1):
        col = _colour(inst["category_id"]) if kept else (128, 128, 128)
        x, y, bw, bh = (v * s for v in inst["layout_bbox"])
        draw.rectangle([x, y, x + bw, y + bh], outline=(255, 255, 255, 255), width=1)
        x, y, bw, bh = (v * s for v in inst["bbox"])
        draw.rectangle([x, y, x + bw, y + bh], outline=(*col, 255), width=2)
        tx, ty = x + 2, y + 1
        draw.rectangle([tx - 1, ty, tx + 7 * len(str(k)) + 1, ty + 11], fill=(0, 0, 0, 180))
        draw.text((tx, ty), str(k), fill=(255, 255, 255, 255))
    return out.convert("RGB")


def write_gallery(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, selection: Any = None,
                  per_category: int = 24, thumb: int = 256) -> Path:
    """Write the gallery and return the path of ``index.html``."""
    from tqdm import tqdm

    from .reader import CacheReader, decode_image
    from .selection import Selection, select

    reader = CacheReader(cache_dir)
    table = reader.categories
    sel = selection or Selection()
    res = select(reader, sel, return_masks=True)
    chosen = select(reader, replace(sel, min_clis_i=0.0, min_clis_l=0.0, category_ids=None, max_images=0),
                    return_masks=True).sample_mask[0]
    uncapped = select(reader, replace(sel, max_images=0), return_masks=True).sample_mask[0] if sel.max_images \
        else np.zeros(len(reader), dtype=bool)
    s_keep, i_keep = res.sample_mask[0], res.inst_mask[0]
    inst_cat = reader.column("inst_category_id").astype(np.int64)
    inst_sample = reader.column("inst_sample")
    inst_clis = reader.column("inst_clis_i")
    clis_l = reader.column("clis_l")
    inst_start = reader.column("inst_start")
    k = len(table)
    n_inst = np.bincount(inst_cat, minlength=k + 1)
    n_inst_kept = np.bincount(inst_cat[i_keep], minlength=k + 1)
    pairs = np.unique(inst_sample * (k + 1) + inst_cat) if len(inst_cat) else np.zeros(0, np.int64)
    n_img = np.bincount(pairs % (k + 1), minlength=k + 1)
    kpairs = np.unique(inst_sample[i_keep] * (k + 1) + inst_cat[i_keep]) if i_keep.any() else np.zeros(0, np.int64)
    n_img_kept = np.bincount(kpairs % (k + 1), minlength=k + 1)

    out = Path(out_dir)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / "categories").mkdir(exist_ok=True)
    page_of = {c.id: f"c{c.id:04d}_{safe_name(c.name)}.html" for c in table}
    rendered: dict[int, str | None] = {}

    def sample_reason(row: int) -> str:
        if s_keep[row]:
            return ""
        if not chosen[row]:
            return f"not the candidate chosen by SELECT={sel.select}"
        v = clis_l[row]
        if not (v >= sel.min_clis_l or (np.isnan(v) and sel.min_clis_l <= 0)):
            return f"CLIS-L {_fmt(None if np.isnan(v) else v)} below {sel.min_clis_l:g}"
        return "over the MAX_IMAGES cap" if uncapped[row] else "no instance left after the instance filters"

    def inst_reason(row: int, j: int) -> str:
        g = int(inst_start[row]) + j
        if i_keep[g]:
            return ""
        if not s_keep[row]:
            return "image dropped"
        v = inst_clis[g]
        if not (v >= sel.min_clis_i or (np.isnan(v) and sel.min_clis_i <= 0)):
            return f"CLIS-I below {sel.min_clis_i:g}"
        return "category not selected"

    def tile(row: int) -> str:
        if row not in rendered:
            try:
                record, img = reader.read_sample(row)
                a = int(inst_start[row])
                kept = [bool(i_keep[a + j]) for j in range(len(record["instances"]))]
                name = f"{member_stem(record['key'], record['candidate_idx'])}.jpg"
                render_thumbnail(decode_image(img), record, kept, thumb).save(out / "thumbs" / name, quality=88)
                items = []
                for j, inst in enumerate(record["instances"]):
                    cid = inst["category_id"]
                    why = inst_reason(row, j)
                    items.append(f"<li><a href='{page_of[cid]}'>{html.escape(table[cid].name)}</a> CLIS-I "
                                 f"{_fmt(inst['clis_i'])} " + (f"<span class=drop>dropped: {html.escape(why)}</span>"
                                                               if why else "<span class=keep>kept</span>") + "</li>")
                why = sample_reason(row)
                rendered[row] = (
                    f"<figure class='{'dropped' if why else 'kept'}'><img src='../thumbs/{html.escape(name)}' "
                    f"alt='{html.escape(name)}'><figcaption><b>{'DROPPED' if why else 'KEPT'}</b>"
                    f"{': ' + html.escape(why) if why else ''}<br>CLIS-L {_fmt(record['clis_l'])} · CLIS-I "
                    f"{_fmt(record['clis_i'])} · {'selected' if record['selected'] else 'not selected'}<br>"
                    f"<span class=muted>unit {record['unit']} · candidate {record['candidate_idx']} · "
                    f"{html.escape(record['key'][:12])}</span><ol>{''.join(items)}</ol></figcaption></figure>")
            except (BrokenSampleError, KeyError, ValueError) as e:
                logger.warning("inspect: skipping broken sample row %d: %s", row, e)
                rendered[row] = None
        return rendered[row] or ""

    by_cat, by_cat_kept = _group(pairs, k + 1), _group(kpairs, k + 1)
    for c in tqdm(table, desc="inspect", unit="category", disable=None):
        rows = by_cat.get(c.id, np.zeros(0, np.int64))
        kept_rows = [int(r) for r in by_cat_kept.get(c.id, [])][:per_category]
        kset = set(by_cat_kept.get(c.id, np.zeros(0, np.int64)).tolist())
        dropped_rows = [int(r) for r in rows if int(r) not in kset][:per_category]
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(c.name)}</title>"
                 f"<style>{_CSS}</style></head><body style='--w:{thumb}px'><p><a href='../index.html'>all categories"
                 f"</a></p><h1>{html.escape(c.name)} <span class=muted>(id {c.id}, {GROUP_NAMES[c.frequency]})</span>"
                 f"</h1><p>{int(n_img[c.id])} images and {int(n_inst[c.id])} instances stored; "
                 f"{int(n_img_kept[c.id])} images and {int(n_inst_kept[c.id])} instances kept under {_sel_text(sel)}."
                 "</p>"]
        for title, rr in (("Kept", kept_rows), ("Dropped", dropped_rows)):
            parts.append(f"<h2>{title} ({len(rr)} shown)</h2><div class=grid>{''.join(tile(r) for r in rr)}</div>")
        parts.append("</body></html>")
        (out / "categories" / page_of[c.id]).write_text("".join(parts), encoding="utf-8")

    groups = []
    for g in ("r", "c", "f"):
        ids = [c.id for c in table if c.frequency == g]
        groups.append(f"<tr><td class=l>{GROUP_NAMES[g]}</td><td>{len(ids)}</td><td>{int(n_inst[ids].sum())}</td>"
                      f"<td>{int(n_inst_kept[ids].sum())}</td></tr>")
    rows_html = "".join(
        f"<tr><td>{c.id}</td><td class=l><a href='categories/{page_of[c.id]}'>{html.escape(c.name)}</a></td>"
        f"<td class=l>{GROUP_NAMES[c.frequency]}</td><td>{int(n_img[c.id])}</td><td>{int(n_inst[c.id])}</td>"
        f"<td>{int(n_img_kept[c.id])}</td><td>{int(n_inst_kept[c.id])}</td></tr>" for c in table)
    st = res.stats
    index = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>acp-data cache {html.escape(str(reader.cache_dir))}"
        f"</title><style>{_CSS}</style></head><body><h1>Cache {html.escape(str(reader.cache_dir))}</h1>"
        f"<p>{len(reader)} samples ({st['units']} units) in {len(reader.shards)} shards, {reader.num_instances} "
        f"instances. Kept under {_sel_text(sel)}: {st['kept_samples']} images, {st['kept_instances']} instances "
        f"({st['dropped_min_clis_i']} instances below CLIS-I, {st['empty_skipped']} images left empty).</p>"
        "<h2>Frequency groups</h2><table><tr><th class=l>group</th><th>categories</th><th>instances</th>"
        f"<th>kept instances</th></tr>{''.join(groups)}</table>"
        "<h2>Categories</h2><table><tr><th>id</th><th class=l>name</th><th class=l>group</th><th>images</th>"
        f"<th>instances</th><th>kept images</th><th>kept instances</th></tr>{rows_html}</table></body></html>")
    (out / "index.html").write_text(index, encoding="utf-8")
    return out / "index.html"


def _group(pairs: np.ndarray, base: int) -> dict[int, np.ndarray]:
    """``sample * base + category`` codes -> {category: sorted sample rows}."""
    if not len(pairs):
        return {}
    cats, rows = pairs % base, pairs // base
    order = np.argsort(cats, kind="stable")
    uniq, starts = np.unique(cats[order], return_index=True)
    return {int(c): rows[order[a:b]] for c, a, b in zip(uniq, starts, [*starts[1:], len(order)])}


def _sel_text(sel: Any) -> str:
    cats = "all categories" if sel.category_ids is None else f"{len(sel.category_ids)} categories"
    cap = f", at most {sel.max_images} images" if sel.max_images else ""
    return (f"SELECT={sel.select}, MIN_CLIS_I={sel.min_clis_i:g}, MIN_CLIS_L={sel.min_clis_l:g}, {cats}{cap}")


def cli_main(argv: list[str]) -> int:
    from .selection import SELECT_MODES, Selection

    d = Selection()
    p = argparse.ArgumentParser(prog="acp-data inspect", description="Write a static HTML gallery of a cache: counts "
                                "per category and frequency group, thumbnails with masks, boxes and scores, kept vs "
                                "dropped under a selection (default: the paper's recipe).")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--html", required=True, help="output directory (index.html is written there)")
    p.add_argument("--select", default=d.select, choices=SELECT_MODES)
    p.add_argument("--min-clis-i", type=float, default=d.min_clis_i)
    p.add_argument("--min-clis-l", type=float, default=d.min_clis_l)
    p.add_argument("--categories", default="all", help="'all', 'rare', 'rare+common', names, or @FILE")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-category", type=int, default=24, help="thumbnails per category and section")
    p.add_argument("--thumb", type=int, default=256, help="thumbnail size in pixels")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import load_manifest

    try:
        cats = load_manifest(a.cache).categories
        ids = None if a.categories.strip().lower() == "all" else tuple(cats.select(a.categories))
        sel = Selection(select=a.select, min_clis_i=a.min_clis_i, min_clis_l=a.min_clis_l, category_ids=ids,
                        max_images=a.max_images, seed=a.seed)
        path = write_gallery(a.cache, a.html, sel, per_category=a.per_category, thumb=a.thumb)
    except (CacheError, ValueError) as e:
        print(f"acp-data inspect: {e}")
        return 1
    print(f"wrote {path}")
    return 0
