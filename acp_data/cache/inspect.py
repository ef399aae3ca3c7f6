"""``acp-data inspect CACHE --html OUT``: a static HTML gallery of a cache, made to judge generated images by eye.

``OUT/index.html`` counts images and instances per category and frequency group (all stored vs kept under the
selection, by default the thresholds the cache records, see ``recorded_selection_defaults``), with each category's
dropped counts and a strip of its thumbnails; ``OUT/categories/c<id>_<name>.html`` shows, per category, kept and
dropped samples. Thumbnails keep the generated pixels untouched inside every object (colour errors are the most
common generator failure, so nothing is tinted): a mask is drawn as an outline just outside it, its tight box as a
solid rectangle around it and the planned layout box dashed; a dropped instance is grey. A checkbox overlays a
translucent mask fill instead (a separate layer), and every thumbnail links to the full-size image as stored.
Category names reach file names only through ``safe_name`` and HTML only escaped.
"""

from __future__ import annotations

import argparse
import colorsys
import html
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..categories import GROUP_NAMES, safe_name
from .layout import BrokenSampleError, CacheError, member_stem

logger = logging.getLogger(__name__)

GREY = (128, 128, 128)
FILL_ALPHA = 110

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;padding:6px;background:#fff;border:3px solid #3a3;width:var(--w);font-size:12px}
figure.dropped{border:3px dashed #c33}a.thumb{position:relative;display:block;line-height:0}
a.thumb img{display:block;width:100%}a.thumb img.fill{position:absolute;left:0;top:0;display:none}
#fill:checked ~ main img.fill{display:block}
figcaption ol{margin:.2em 0 0 1.2em;padding:0}.drop{color:#c33}.keep{color:#282}.muted{color:#777}
.head{font-weight:bold;margin-bottom:.2em}h2{margin-top:1.2em}
.legend{display:flex;flex-wrap:wrap;gap:1.2em;align-items:center;margin:.4em 0 .8em;font-size:13px}
.legend span{display:inline-flex;align-items:center;gap:.35em}.legend svg{vertical-align:middle}
.strip{display:flex;gap:3px}.strip img{height:44px;border:2px solid #3a3}.strip img.dropped{border:2px dashed #c33}
"""


def _colour(cid: int) -> tuple[int, int, int]:
    h = (cid * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _fmt(v: Any) -> str:
    return "unscored" if v is None else f"{float(v):.1f}"


# ----- thumbnails ----------------------------------------------------------------------------------------------------
def _small_masks(record: dict[str, Any], tw: int, th: int) -> list[np.ndarray]:
    from PIL import Image

    from ..masks import rle_to_mask

    return [np.asarray(Image.fromarray(rle_to_mask(i["segmentation"]).astype(np.uint8) * 255)
                       .resize((tw, th), Image.NEAREST)) > 0 for i in record["instances"]]


def _thumb_size(h: int, w: int, size: int) -> tuple[float, int, int]:
    s = min(1.0, size / max(h, w))
    return s, max(1, round(w * s)), max(1, round(h * s))


def _dashed_rect(draw: Any, box: tuple[float, float, float, float], dash: int = 4) -> None:
    """A 1-pixel rectangle in alternating white and black dashes (visible on any background)."""
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        n = max(1, int(max(abs(bx - ax), abs(by - ay)) // dash))
        for k in range(n):
            t0, t1 = k / n, (k + 1) / n
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=(255, 255, 255, 255) if k % 2 == 0 else (0, 0, 0, 255), width=1)


def render_thumbnail(image: np.ndarray, record: dict[str, Any], inst_kept: list[bool], size: int) -> Any:
    """PIL image: ``image`` scaled to fit ``size`` with every object's pixels left as generated; each mask outlined
    just outside it (category colour, grey when dropped), its tight box as a solid rectangle around it, its layout
    box dashed, and its number above the box."""
    from PIL import Image, ImageDraw, ImageFilter

    h, w = image.shape[:2]
    s, tw, th = _thumb_size(h, w, size)
    out = Image.fromarray(image).resize((tw, th), Image.BILINEAR).convert("RGBA")
    masks = _small_masks(record, tw, th)
    ring = np.zeros((th, tw), dtype=bool)
    for m, inst, kept in zip(masks, record["instances"], inst_kept):
        grown = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))) > 0
        edge = grown & ~m
        ring |= edge
        col = _colour(inst["category_id"]) if kept else GREY
        out.paste(Image.new("RGBA", (tw, th), (*col, 255)), (0, 0), Image.fromarray(edge.astype(np.uint8) * 255))
    draw = ImageDraw.Draw(out)
    for k, (inst, kept) in enumerate(zip(record["instances"], inst_kept), start=1):
        col = _colour(inst["category_id"]) if kept else GREY
        x, y, bw, bh = (v * s for v in inst["layout_bbox"])
        _dashed_rect(draw, (x, y, x + bw, y + bh))
        x, y, bw, bh = (v * s for v in inst["bbox"])
        draw.rectangle([x - 3, y - 3, x + bw + 2, y + bh + 2], outline=(*col, 255), width=1)
        tx, ty = x - 3, (y - 15 if y >= 15 else y + bh + 4)
        draw.rectangle([tx, ty, tx + 7 * len(str(k)) + 3, ty + 11], fill=(0, 0, 0, 200))
        draw.text((tx + 2, ty), str(k), fill=(255, 255, 255, 255))
    return out.convert("RGB")


def render_fill(record: dict[str, Any], inst_kept: list[bool], shape: tuple[int, int], size: int) -> Any:
    """Transparent PIL layer of the thumbnail's size with each mask filled (category colour, grey when dropped),
    shown over the thumbnail by the page's "fill masks" checkbox."""
    from PIL import Image

    _, tw, th = _thumb_size(shape[0], shape[1], size)
    layer = np.zeros((th, tw, 4), dtype=np.uint8)
    for m, inst, kept in zip(_small_masks(record, tw, th), record["instances"], inst_kept):
        layer[m] = (*(_colour(inst["category_id"]) if kept else GREY), FILL_ALPHA)
    return Image.fromarray(layer, "RGBA")


def _swatch(kind: str) -> str:
    """A small inline SVG of one legend entry."""
    body = {
        "outline": "<path d='M6 16 Q6 4 16 4 Q26 4 26 16' fill='none' stroke='#e8a01c' stroke-width='2.5'/>",
        "maskbox": "<rect x='3' y='3' width='26' height='14' fill='none' stroke='#e8a01c' stroke-width='1.5'/>",
        "layout": "<rect x='3' y='3' width='26' height='14' fill='none' stroke='#000' stroke-width='1.5'/>"
                  "<rect x='3' y='3' width='26' height='14' fill='none' stroke='#fff' stroke-width='1.5' "
                  "stroke-dasharray='4 4'/>",
        "dropped": "<rect x='3' y='3' width='26' height='14' fill='none' stroke='#808080' stroke-width='1.5'/>"
                   "<path d='M8 14 Q8 7 16 7 Q24 7 24 14' fill='none' stroke='#808080' stroke-width='2'/>",
        "kept": "<rect x='2' y='2' width='28' height='16' fill='#fff' stroke='#3a3' stroke-width='3'/>",
        "dropcard": "<rect x='2' y='2' width='28' height='16' fill='#fff' stroke='#c33' stroke-width='3' "
                    "stroke-dasharray='5 3'/>",
    }[kind]
    return f"<svg width='32' height='20' viewBox='0 0 32 20' style='background:#bbb'>{body}</svg>"


def legend_html() -> str:
    """The legend every page shows: what each mark on a thumbnail and each card border means."""
    items = [("outline", "mask outline (kept instance; object pixels untouched)"),
             ("maskbox", "mask box (tight box of the mask)"), ("layout", "layout box (planned by the planner)"),
             ("dropped", "grey: dropped instance"), ("kept", "card: kept"), ("dropcard", "card: dropped")]
    spans = "".join(f"<span>{_swatch(k)} {html.escape(t)}</span>" for k, t in items)
    return f"<div class=legend id=legend><b>Legend</b>{spans}</div>"


def _page(title: str, body: str, thumb: int) -> str:
    # the checkbox precedes <main> so that CSS alone can show the fill layers (#fill:checked ~ main)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body style='--w:{thumb}px'><input type=checkbox id=fill> <label "
            f"for=fill>fill the masks (a translucent layer over the objects) instead of outlines only</label>"
            f"{legend_html()}<main>{body}</main></body></html>")


# ----- why something was dropped -------------------------------------------------------------------------------------
@dataclass
class _Reasons:
    """Selection masks at each rule, to say why a sample or an instance did not make it."""

    sel: Any
    res: Any
    chosen: np.ndarray
    after_l: np.ndarray
    after_cat: np.ndarray
    uncapped: np.ndarray
    s_keep: np.ndarray
    i_keep: np.ndarray
    inst_clis: np.ndarray
    clis_l: np.ndarray
    inst_start: np.ndarray
    inst_cat: np.ndarray
    drop_reason: dict[int, int]

    @classmethod
    def compute(cls, reader: Any, sel: Any) -> _Reasons:
        from .selection import select

        def mask(s: Any) -> np.ndarray:
            return select(reader, s, return_masks=True).sample_mask[0]

        res = select(reader, sel, return_masks=True)
        zero = replace(sel, min_clis_i=0.0, max_images=0)
        drop_row = np.asarray(getattr(res, "drop_row", np.zeros(0, np.int64)))
        drop_reason = np.asarray(getattr(res, "drop_reason", np.zeros(0, np.int8)))
        return cls(sel, res, mask(replace(zero, min_clis_l=0.0, category_ids=None)),
                   mask(replace(zero, category_ids=None)), mask(zero), mask(replace(sel, max_images=0)),
                   res.sample_mask[0], res.inst_mask[0], reader.column("inst_clis_i"), reader.column("clis_l"),
                   reader.column("inst_start"), reader.column("inst_category_id").astype(np.int64),
                   {int(r): int(w) for r, w in zip(drop_row.tolist(), drop_reason.tolist())})

    def sample(self, row: int) -> str:
        """Why sample ``row`` is not kept ("" if it is)."""
        sel = self.sel
        if self.s_keep[row]:
            return ""
        if not self.chosen[row]:
            return f"not the candidate chosen by SELECT={sel.select}"
        if not self.after_l[row]:
            v = self.clis_l[row]
            return (f"CLIS-L {_fmt(None if np.isnan(v) else v)} below {sel.min_clis_l:g}"
                    if not (v >= sel.min_clis_l) else f"another candidate chosen under MIN_CLIS_L {sel.min_clis_l:g}")
        if not self.after_cat[row]:
            return "its unit was drawn for a category outside CATEGORIES"
        return "over the MAX_IMAGES cap" if self.uncapped[row] else "no instance left after the instance filters"

    def threshold(self, cid: int) -> float:
        by_cat = getattr(self.res, "min_clis_i_by_category", None)
        if by_cat is not None and getattr(self.sel, "min_clis_i_rule", "absolute") != "absolute" \
                and 0 <= cid < len(by_cat) and not np.isnan(by_cat[cid]):
            return float(by_cat[cid])
        return float(self.sel.min_clis_i)

    def instance(self, row: int, j: int) -> str:
        """Why instance ``j`` of sample ``row`` is not kept ("" if it is)."""
        g = int(self.inst_start[row]) + j
        if self.i_keep[g]:
            return ""
        if not self.s_keep[row]:
            return f"with its image: {self.sample(row)}"
        code = self.drop_reason.get(g)
        v, thr = self.inst_clis[g], self.threshold(int(self.inst_cat[g]))
        from .selection import DROP_CATEGORY, DROP_ORACLE

        if code == DROP_CATEGORY or (code is None and (v >= thr or (np.isnan(v) and thr <= 0))):
            return "category not selected"
        if code == DROP_ORACLE:  # SELECT oracle (Shapes): the generator drew this object wrong
            return "drawn wrong (generator truth)"
        return f"CLIS-I {_fmt(None if np.isnan(v) else v)} below {thr:g}"


# ----- the gallery ---------------------------------------------------------------------------------------------------
@dataclass
class _Tile:
    thumb: str  # file name under thumbs/
    fill: str
    full: str  # file name under full/
    record: dict[str, Any]
    kept: list[bool]


def write_gallery(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, selection: Any = None,
                  per_category: int = 24, thumb: int = 256, strip: int = 4) -> Path:
    """Write the gallery and return the path of ``index.html``."""
    from tqdm import tqdm

    from .reader import CacheReader, decode_image
    from .records import image_format
    from .selection import Selection

    reader = CacheReader(cache_dir)
    table = reader.categories
    sel = selection or Selection()
    why = _Reasons.compute(reader, sel)
    res, i_keep, inst_cat = why.res, why.i_keep, why.inst_cat
    inst_sample = reader.column("inst_sample")
    k = len(table)
    n_inst = np.bincount(inst_cat, minlength=k + 1)
    n_inst_kept = np.bincount(inst_cat[i_keep], minlength=k + 1)
    pairs = np.unique(inst_sample * (k + 1) + inst_cat) if len(inst_cat) else np.zeros(0, np.int64)
    n_img = np.bincount(pairs % (k + 1), minlength=k + 1)
    kpairs = np.unique(inst_sample[i_keep] * (k + 1) + inst_cat[i_keep]) if i_keep.any() else np.zeros(0, np.int64)
    n_img_kept = np.bincount(kpairs % (k + 1), minlength=k + 1)

    out = Path(out_dir)
    for sub in ("thumbs", "full", "categories"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    page_of = {c.id: f"c{c.id:04d}_{safe_name(c.name)}.html" for c in table}
    tiles: dict[int, _Tile | None] = {}

    def tile(row: int) -> _Tile | None:
        if row not in tiles:
            try:
                record, img = reader.read_sample(row)
                image = decode_image(img)
                a = int(why.inst_start[row])
                kept = [bool(i_keep[a + j]) for j in range(len(record["instances"]))]
                stem = member_stem(record["key"], record["candidate_idx"])
                t = _Tile(f"{stem}.jpg", f"{stem}.fill.png", f"{stem}.{image_format(img) or 'jpg'}", record, kept)
                # 4:4:4 chroma: subsampled chroma would bleed the outlines' colour into the objects
                render_thumbnail(image, record, kept, thumb).save(out / "thumbs" / t.thumb, quality=92, subsampling=0)
                render_fill(record, kept, image.shape[:2], thumb).save(out / "thumbs" / t.fill)
                (out / "full" / t.full).write_bytes(img)
                tiles[row] = t
            except (BrokenSampleError, KeyError, ValueError) as e:
                logger.warning("inspect: skipping broken sample row %d: %s", row, e)
                tiles[row] = None
        return tiles[row]

    def card(row: int, cid: int | None) -> str:
        """A sample's card; on a category's page (``cid``) its headline says what happened to that category's
        instances: a card in the Dropped section names the dropped instance(s), not the image."""
        t = tile(row)
        if t is None:
            return ""
        rec = t.record
        items = []
        for j, inst in enumerate(rec["instances"]):
            c = inst["category_id"]
            w = why.instance(row, j)
            w = "dropped with its image" if w.startswith("with its image") else f"dropped: {w}"  # headline: why
            mark = f"<span class=drop>{html.escape(w)}</span>" if not i_keep[int(why.inst_start[row]) + j] \
                else "<span class=keep>kept</span>"
            items.append(f"<li><a href='{page_of[c]}'>{html.escape(table[c].name)}</a> CLIS-I "
                         f"{_fmt(inst['clis_i'])} {mark}</li>")
        img_why = why.sample(row)
        image_line = "image dropped" if img_why else "image kept"
        mine = [j for j, inst in enumerate(rec["instances"]) if inst["category_id"] == cid]
        if cid is not None and mine:
            dropped = [j for j in mine if not t.kept[j]]
            name = html.escape(table[cid].name)
            if dropped:
                parts = [f"#{j + 1}: {html.escape(why.instance(row, j))}" for j in dropped]
                head = f"<span class=drop>DROPPED {name} {'; '.join(parts)}</span>"
            else:
                head = f"<span class=keep>KEPT {name} {', '.join(f'#{j + 1}' for j in mine)}</span>"
            dropped_card = bool(dropped) and len(dropped) == len(mine)
        else:
            head = (f"<span class=drop>DROPPED image: {html.escape(img_why)}</span>" if img_why
                    else "<span class=keep>KEPT</span>")
            dropped_card = bool(img_why)
        return (
            f"<figure class='{'dropped' if dropped_card else 'kept'}'><a class=thumb href='../full/"
            f"{html.escape(t.full)}' title='full-size image'><img loading=lazy src='../thumbs/{html.escape(t.thumb)}' "
            f"alt='{html.escape(t.thumb)}'><img class=fill loading=lazy src='../thumbs/{html.escape(t.fill)}' alt=''>"
            f"</a><figcaption><div class=head>{head}</div>{image_line} · CLIS-L {_fmt(rec['clis_l'])} · CLIS-I "
            f"{_fmt(rec['clis_i'])} · {'selected' if rec['selected'] else 'not selected'}<br>"
            f"<span class=muted>unit {rec['unit']} · candidate {rec['candidate_idx']} · "
            f"{html.escape(rec['key'][:12])}</span><ol>{''.join(items)}</ol></figcaption></figure>")

    by_cat, by_cat_kept = _group(pairs, k + 1), _group(kpairs, k + 1)
    strips: dict[int, list[tuple[int, bool]]] = {}
    for c in tqdm(table, desc="inspect", unit="category", disable=None):
        rows = by_cat.get(c.id, np.zeros(0, np.int64))
        kept_rows = [int(r) for r in by_cat_kept.get(c.id, [])][:per_category]
        kset = set(by_cat_kept.get(c.id, np.zeros(0, np.int64)).tolist())
        # instances dropped from kept images first (the thresholds' work), then chosen images dropped, then the
        # candidates SELECT did not choose
        dropped_rows = sorted((int(r) for r in rows if int(r) not in kset),
                              key=lambda r: (not why.s_keep[r], not why.chosen[r], r))[:per_category]
        body = [f"<p><a href='../index.html'>all categories</a></p><h1>{html.escape(c.name)} <span class=muted>"
                f"(id {c.id}, {GROUP_NAMES[c.frequency]})</span></h1><p>{int(n_img[c.id])} images and "
                f"{int(n_inst[c.id])} instances stored; {int(n_img_kept[c.id])} images and "
                f"{int(n_inst_kept[c.id])} instances kept under {_sel_text(sel)}; "
                f"{int(n_inst[c.id] - n_inst_kept[c.id])} instances dropped.</p>"]
        for title, rr in (("Kept", kept_rows), ("Dropped", dropped_rows)):
            cards = "".join(card(r, c.id) for r in rr)
            note = "" if title == "Kept" else (" <span class=muted>(images with an instance of this category that "
                                               "was dropped; the headline says why)</span>")
            body.append(f"<h2>{title} ({len(rr)} shown){note}</h2><div class=grid>{cards}</div>")
        shown = [(r, True) for r in kept_rows] + [(r, False) for r in dropped_rows]
        strips[c.id] = [(r, ok) for r, ok in shown if tiles.get(r) is not None][:strip]
        (out / "categories" / page_of[c.id]).write_text(_page(c.name, "".join(body), thumb), encoding="utf-8")

    groups = []
    for g in ("r", "c", "f"):
        ids = [c.id for c in table if c.frequency == g]
        groups.append(f"<tr><td class=l>{GROUP_NAMES[g]}</td><td>{len(ids)}</td><td>{int(n_inst[ids].sum())}</td>"
                      f"<td>{int(n_inst_kept[ids].sum())}</td><td>{int(n_inst[ids].sum() - n_inst_kept[ids].sum())}"
                      "</td></tr>")

    def strip_html(cid: int) -> str:
        imgs = "".join(f"<a href='categories/{page_of[cid]}'><img loading=lazy class='{'kept' if ok else 'dropped'}' "
                       f"src='thumbs/{html.escape(tiles[r].thumb)}' alt=''></a>" for r, ok in strips.get(cid, []))
        return f"<div class=strip>{imgs}</div>"

    rows_html = "".join(
        f"<tr><td>{c.id}</td><td class=l><a href='categories/{page_of[c.id]}'>{html.escape(c.name)}</a></td>"
        f"<td class=l>{GROUP_NAMES[c.frequency]}</td><td>{int(n_img[c.id])}</td><td>{int(n_inst[c.id])}</td>"
        f"<td>{int(n_img_kept[c.id])}</td><td>{int(n_inst_kept[c.id])}</td>"
        f"<td>{int(n_img[c.id] - n_img_kept[c.id])}</td><td>{int(n_inst[c.id] - n_inst_kept[c.id])}</td>"
        f"<td class=l>{strip_html(c.id)}</td></tr>" for c in table)
    st = res.stats
    body = (
        f"<h1>Cache {html.escape(str(reader.cache_dir))}</h1>"
        f"<p>{len(reader)} samples ({st['units']} units) in {len(reader.shards)} shards, {reader.num_instances} "
        f"instances. Kept under {_sel_text(sel)}: {st['kept_samples']} images, {st['kept_instances']} instances "
        f"({st['dropped_min_clis_i']} instances below CLIS-I, {st['empty_skipped']} images left empty).</p>"
        "<h2>Frequency groups</h2><table><tr><th class=l>group</th><th>categories</th><th>instances</th>"
        f"<th>kept instances</th><th>dropped instances</th></tr>{''.join(groups)}</table>"
        "<h2>Categories</h2><table><tr><th>id</th><th class=l>name</th><th class=l>group</th><th>images</th>"
        "<th>instances</th><th>kept images</th><th>kept instances</th><th>images with it dropped</th>"
        f"<th>dropped instances</th><th class=l>thumbnails</th></tr>{rows_html}</table>")
    (out / "index.html").write_text(_page(f"acp-data cache {reader.cache_dir}", body, thumb), encoding="utf-8")
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
    rule = getattr(sel, "min_clis_i_rule", "absolute")
    rule_text = "" if rule == "absolute" else f" ({rule}, quantile {getattr(sel, 'min_clis_i_quantile', 0):g})"
    return (f"SELECT={sel.select}, MIN_CLIS_I={sel.min_clis_i:g}{rule_text}, MIN_CLIS_L={sel.min_clis_l:g}, "
            f"{cats}{cap}")


def cli_main(argv: list[str]) -> int:
    from ..cli import HelpFormatter, UsageError, check_output_path, fail
    from .selection import SELECT_MODES, Selection

    prog = "acp-data inspect"
    d = Selection()
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Write a static HTML gallery of a cache: counts per category and frequency group, thumbnails with mask\n"
        "outlines, boxes and scores (object pixels as generated), kept vs dropped under a selection."))
    p.add_argument("cache", help="cache directory")
    p.add_argument("--html", required=True, help="output directory (index.html is written there; created if needed)")
    p.add_argument("--select", default=d.select, choices=SELECT_MODES, help="candidate choice per unit")
    p.add_argument("--min-clis-i", type=float, default=None,
                   help="instance threshold (default: the one the cache records, from its last rescore or its "
                   f"prebuild settings, else {d.min_clis_i:g})")
    p.add_argument("--min-clis-l", type=float, default=None,
                   help=f"layout threshold (default: the one the cache records, else {d.min_clis_l:g})")
    p.add_argument("--categories", default="all", help="'all', 'rare', 'rare+common', names, or @FILE")
    p.add_argument("--max-images", type=int, default=0, help="cap on kept images, 0 = none")
    p.add_argument("--seed", type=int, default=0, help="seed of `random` selection and of the cap")
    p.add_argument("--per-category", type=int, default=24, help="thumbnails per category and section")
    p.add_argument("--thumb", type=int, default=256, help="thumbnail size in pixels")
    p.add_argument("--strip", type=int, default=4, help="thumbnails per category on the index page")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import load_manifest, recorded_selection_defaults

    try:
        if a.per_category < 0 or a.thumb < 16 or a.strip < 0 or a.max_images < 0:
            raise UsageError(f"--per-category {a.per_category}, --strip {a.strip}, --max-images {a.max_images} must "
                             f"be >= 0 and --thumb {a.thumb} >= 16")
        out = check_output_path(a.html, "dir", "--html")
        cats = load_manifest(a.cache).categories
        rec = recorded_selection_defaults(a.cache)
        min_i = rec.min_clis_i if a.min_clis_i is None else a.min_clis_i
        min_l = rec.min_clis_l if a.min_clis_l is None else a.min_clis_l
        if a.min_clis_i is None or a.min_clis_l is None:
            logger.info("inspect thresholds: MIN_CLIS_I %g, MIN_CLIS_L %g (defaults from %s)", min_i, min_l,
                        rec.source)
        ids = None if a.categories.strip().lower() == "all" else tuple(cats.select(a.categories))
        sel = Selection(select=a.select, min_clis_i=min_i, min_clis_l=min_l, category_ids=ids,
                        max_images=a.max_images, seed=a.seed)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--html {str(out)!r} cannot be created: {e.strerror}") from e
        path = write_gallery(a.cache, out, sel, per_category=a.per_category, thumb=a.thumb, strip=a.strip)
    except (UsageError, CacheError, ValueError) as e:
        return fail(prog, e)
    print(f"wrote {path}")
    return 0
