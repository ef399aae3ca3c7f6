"""CLIS-I image scorers, registered as ``clip`` (:class:`ClipScorer`) and ``vlm`` (:class:`VLMScorer`).

Both score every candidate's whole image against its caption and each instance against its name and attributes, on
0-100, and combine them the paper's way (configurable):

    instance = 0.8 x region + 0.2 x crop          image = 0.5 x global + 0.5 x mean(scored instances)

*region* looks at the instance's box inside the whole image, *crop* at the box cut out. An instance whose mask is
None or empty (the segmenter rejected it) is unscored (None); so is any part whose model call failed. An image is
unscored when its global part is, or when no instance is scored. Unscored never means 0.

The box is the layout box (``box: layout``, default, the paper's) or the tight box of the final mask (``box: mask``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from ..categories import normalize_name
from ..scene import SceneGraph
from ..stages import Candidate, ImageScore, ImageScorer, StageContext, stable_hash

logger = logging.getLogger(__name__)

_TAG_RE = re.compile(r"\(([a-z0-9_()'.&/+:,\-]+?-\d+)\)")


# ----- shared helpers -----------------------------------------------------------------------------------------------
def caption_text(scene: SceneGraph) -> str:
    """The scene's caption without object tags (``a dog(dog-1)`` -> ``a dog``); without a caption, "a photo of" and
    the object phrases."""
    cap = _TAG_RE.sub("", scene.caption or "")
    cap = " ".join(cap.split())
    if cap:
        return cap
    return "a photo of " + ", ".join(scene.phrases())


def instance_phrase(scene: SceneGraph, i: int, name: str) -> str:
    """Attributes then name (``striped red star``): what an instance should look like."""
    return " ".join([*scene.objects[i].attributes, name]).strip()


def weighted(parts: list[tuple[float, float | None]]) -> float | None:
    """Weighted mean of (weight, value) with weights normalised to sum 1; None if any weighted value is None."""
    total = sum(w for w, _ in parts if w > 0)
    if total <= 0:
        return None
    acc = 0.0
    for w, v in parts:
        if w <= 0:
            continue
        if v is None:
            return None
        acc += w * v
    return acc / total


def combine(global_score: float | None, instance_scores: list[float | None], global_weight: float,
            instance_weight: float) -> float | None:
    """Image score: weighted global and mean of the scored instances; None without either."""
    scored = [s for s in instance_scores if s is not None]
    if instance_weight > 0 and not scored:
        return None
    mean = float(np.mean(scored)) if scored else 0.0
    return weighted([(global_weight, global_score), (instance_weight, mean)])


def instance_box(cand: Candidate, i: int, mode: str) -> tuple[int, int, int, int] | None:
    """Integer XYXY pixel box of instance ``i`` (layout box or tight mask box), clipped to the image, at least 1 px;
    None when the mask is None or empty (unscored)."""
    mask = cand.masks[i] if i < len(cand.masks) else None
    if mask is None or not np.any(mask):
        return None
    h, w = cand.image.shape[:2]
    if mode == "mask":
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        x0, y0, x1, y1 = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
    else:
        b = np.asarray(cand.boxes_xyxy[i], dtype=np.float64)
        if not np.isfinite(b).all():
            return None
        x0, y0, x1, y1 = np.floor(b[0]), np.floor(b[1]), np.ceil(b[2]), np.ceil(b[3])
    x0, x1 = int(min(max(x0, 0), w - 1)), int(min(max(x1, 1), w))
    y0, y1 = int(min(max(y0, 0), h - 1)), int(min(max(y1, 1), h))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _check_options(options: dict[str, Any], defaults: dict[str, Any], scorer: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"scorer {scorer!r}: unknown options {unknown}; known: {sorted(defaults)}")
    opts = {**defaults, **options}
    for k in ("region_weight", "crop_weight", "global_weight", "instance_weight"):
        if float(opts[k]) < 0:
            raise ValueError(f"scorer {scorer!r}: {k} = {opts[k]} must be >= 0")
    if float(opts["region_weight"]) + float(opts["crop_weight"]) <= 0:
        raise ValueError(f"scorer {scorer!r}: region_weight + crop_weight must be > 0")
    if float(opts["global_weight"]) + float(opts["instance_weight"]) <= 0:
        raise ValueError(f"scorer {scorer!r}: global_weight + instance_weight must be > 0")
    if opts["box"] not in ("layout", "mask"):
        raise ValueError(f"scorer {scorer!r}: box = {opts['box']!r} must be 'layout' or 'mask'")
    return opts


def _image_input_dtype(model: Any) -> Any:
    """The dtype an open_clip image tower takes: that of its first conv/linear weight. open_clip's ``fp16``/``bf16``
    precision casts only conv/linear weights and projections (embeddings, LayerNorms and ``logit_scale`` stay float32),
    so the model's first parameter is float32 while the patch embedding wants half precision."""
    import torch

    visual = getattr(model, "visual", model)
    for m in visual.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight.dtype
    return next(model.parameters()).dtype


# ----- clip ---------------------------------------------------------------------------------------------------------
class ClipScorer(ImageScorer):
    """CLIS-I with an open_clip model (pretrained tag, ``hf-hub:``, ``local-dir:`` or a directory).

    Calibration (so that a threshold such as 60 means the same across models): an instance view (crop or region)
    scores ``100 x softmax`` of its image-text similarities at the model's logit scale over the whole category
    vocabulary of ``ctx.categories``, taking the probability of its own category, whose prompt carries the object's
    attributes ("a photo of a striped red star."); 60 thus means "clearly this category and not any other". The global
    view scores ``100 x softmax`` of the caption against ``global_negatives`` (32) distractor captions: the same
    caption with every object's name replaced by other categories (drawn deterministically from the caption), so 60
    means "clearly these objects". Vocabulary prompts are averaged over ``templates`` and computed once; all text
    embeddings are cached.

    Views: *crop* is the box cut out; *region* is the box with ``context`` (0.5) of its size added on each side and
    the pixels outside the box dimmed by ``dim_outside`` (0.5), the object in its surroundings. Every view is padded
    to a square with the model's mean colour (nothing is cropped away) and resized to the model's input size. All
    views of all candidates of a call are encoded in batches of ``batch_size``.
    """

    DEFAULTS: dict[str, Any] = {
        "model": None, "pretrained": None, "allow_random_init": False, "batch_size": 64, "templates": ["a photo of a {}."],
        "region_weight": 0.8, "crop_weight": 0.2, "global_weight": 0.5, "instance_weight": 0.5,
        "context": 0.5, "dim_outside": 0.5, "box": "layout", "global_negatives": 32, "device": None,
        "precision": None, "cache_dir": None, "text_cache_size": 20000,
    }

    @staticmethod
    def check_weights(options: dict[str, Any]) -> None:
        """``ValueError`` unless the options name weights (``model`` a checkpoint, or an architecture with
        ``pretrained``) or opt in to ``allow_random_init``; cheap (no import of open_clip), so prebuild checks it
        before loading anything."""
        from .openclip_io import check_weights_named

        try:
            check_weights_named(options.get("model"), options.get("pretrained"),
                                bool(options.get("allow_random_init")))
        except ValueError as e:
            raise ValueError(f"scorer 'clip': {e} (docs/plugins.md \"No random weights\")") from None

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        import torch

        from .openclip_io import load_open_clip

        self.opts = _check_options(options, self.DEFAULTS, "clip")
        if int(self.opts["batch_size"]) < 1:
            raise ValueError(f"scorer 'clip': batch_size = {self.opts['batch_size']} must be >= 1")
        if not self.opts["templates"] or any("{}" not in t for t in self.opts["templates"]):
            raise ValueError(f"scorer 'clip': templates {self.opts['templates']!r} must each contain '{{}}'")
        self.device = self.opts["device"] or ctx.device
        precision = self.opts["precision"] or {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
            ctx.dtype, "fp32")
        if str(self.device).startswith("cpu"):
            precision = "fp32"
        self.check_weights(self.opts)
        try:
            self.model, self.tokenizer, pp = load_open_clip(
                self.opts["model"], self.opts["pretrained"], device=self.device, precision=precision,
                cache_dir=self.opts["cache_dir"], allow_random_init=bool(self.opts["allow_random_init"]))
        except FileNotFoundError:
            raise
        except (ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"scorer 'clip': cannot load model {self.opts['model']!r}"
                             + (f" (pretrained {self.opts['pretrained']!r})" if self.opts["pretrained"] else "")
                             + f": {e}") from e
        self.input_size: tuple[int, int] = pp["size"]
        self.mean = np.asarray(pp["mean"], dtype=np.float32)
        self.std = np.asarray(pp["std"], dtype=np.float32)
        self._fill = tuple(int(round(255 * m)) for m in self.mean)
        self._dtype = _image_input_dtype(self.model)
        with torch.no_grad():
            self.logit_scale = float(self.model.logit_scale.exp().clamp(max=100).item())
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._neg_cache: dict[str, np.ndarray] = {}
        self.names = [normalize_name(c.name) for c in ctx.categories]
        self.vocab = self._vocab_embeddings(self.names)

    # ----- text ---------------------------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (n, D), float64, through the cache."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        bs = int(self.opts["batch_size"])
        for i in range(0, len(missing), bs):
            chunk = missing[i:i + bs]
            with torch.inference_mode():
                tok = self.tokenizer(chunk).to(self.device)
                emb = self.model.encode_text(tok).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy().astype(np.float64)
            for t, e in zip(chunk, emb):
                self._text_cache[t] = e
        out = np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, self.vocab_dim))
        for t in texts:
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > int(self.opts["text_cache_size"]):
            self._text_cache.popitem(last=False)
        return out

    def _prompt_embedding(self, phrases: list[str]) -> np.ndarray:
        """Template-averaged, re-normalised embedding of each phrase: (n, D)."""
        temps = list(self.opts["templates"])
        e = self.encode_texts([t.format(p) for p in phrases for t in temps]).reshape(len(phrases), len(temps), -1)
        e = e.mean(axis=1)
        return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)

    def _vocab_embeddings(self, names: list[str]) -> np.ndarray:
        self.vocab_dim = 0
        v = self._prompt_embedding(names)
        self.vocab_dim = int(v.shape[1])
        return v

    def caption_matrix(self, scene: SceneGraph) -> np.ndarray:
        """(1 + negatives, D) text embeddings of the caption and its distractors, cached per scene caption."""
        key = self._caption_key(scene)
        hit = self._neg_cache.get(key)
        if hit is None:
            hit = self.encode_texts([caption_text(scene), *self.negative_captions(scene)])
            self._neg_cache[key] = hit
            while len(self._neg_cache) > 4096:
                self._neg_cache.pop(next(iter(self._neg_cache)))
        return hit

    @staticmethod
    def _caption_key(scene: SceneGraph) -> str:
        return stable_hash([scene.caption, [(o.id, o.category_id, o.attributes) for o in scene.objects]], n=32)

    def negative_captions(self, scene: SceneGraph) -> list[str]:
        """``global_negatives`` captions: the caption with each object's name replaced by another category's name
        (categories not in the scene, drawn with replacement, seeded by the caption), falling back to "a photo of"
        other names when the caption does not name its objects."""
        key = self._caption_key(scene)
        n = int(self.opts["global_negatives"])
        cats = {o.category_id for o in scene.objects}
        pool = [c for c in range(1, len(self.names) + 1) if c not in cats]
        if n <= 0 or not pool:
            return []
        rng = np.random.default_rng(int(key[:15], 16))
        cap = scene.caption or ""
        out: list[str] = []
        for _ in range(n):
            picks = rng.choice(pool, size=len(scene.objects), replace=len(pool) < len(scene.objects))
            text, changed = cap, False
            for o, c in zip(scene.objects, picks):
                new = self.names[int(c) - 1]
                text, k = _replace_object(text, o.id, o.name, new)
                changed = changed or k > 0
            text = " ".join(_TAG_RE.sub("", text).split())
            if not changed:
                text = "a photo of " + ", ".join(self.names[int(c) - 1] for c in picks)
            out.append(text)
        return out

    # ----- images -------------------------------------------------------------------------------------------------
    def _letterbox(self, pyr: _Pyramid, box: tuple[int, int, int, int], out: np.ndarray) -> tuple[float, ...]:
        """Write the ``box`` (XYXY pixels) of an image into ``out`` (H, W, 3, pre-filled with the mean colour):
        resized (bicubic, as CLIP's own preprocessing) to fit and centred, nothing cropped away. Returns the
        (scale x, scale y, offset x, offset y) that map box pixels into ``out``. Normalisation happens per batch."""
        th, tw = self.input_size
        w, h = box[2] - box[0], box[3] - box[1]
        scale = min(tw / w, th / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        oy, ox = (th - nh) // 2, (tw - nw) // 2
        out[oy:oy + nh, ox:ox + nw] = pyr.resize(box, nw, nh)
        return nw / w, nh / h, ox, oy

    def views(self, cand: Candidate) -> tuple[np.ndarray, list[tuple[int, int] | None]]:
        """(V, H, W, 3) uint8 views: the whole image, then (crop, region) per scored instance; per instance the
        indices of its two views, or None (unscored)."""
        from PIL import Image

        img = cand.image
        h, w = img.shape[:2]
        boxes = [instance_box(cand, i, self.opts["box"]) for i in range(len(cand.scene.objects))]
        th, tw = self.input_size
        out = np.empty((1 + 2 * sum(b is not None for b in boxes), th, tw, 3), dtype=np.uint8)
        out[:] = self._fill
        pil = _Pyramid(Image.fromarray(np.ascontiguousarray(img)))
        self._letterbox(pil, (0, 0, w, h), out[0])
        idx: list[tuple[int, int] | None] = []
        ctx_frac, keep = float(self.opts["context"]), 1.0 - float(self.opts["dim_outside"])
        k = 1
        for b in boxes:
            if b is None:
                idx.append(None)
                continue
            x0, y0, x1, y1 = b
            self._letterbox(pil, b, out[k])
            mx, my = ctx_frac * (x1 - x0), ctx_frac * (y1 - y0)
            rb = (int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my))),
                  int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my))))
            region = out[k + 1]
            sx, sy, ox, oy = self._letterbox(pil, rb, region)
            if keep < 1.0:  # dim everything but the box (on the small view: cheap)
                bx0, by0 = ox + round((x0 - rb[0]) * sx), oy + round((y0 - rb[1]) * sy)
                bx1, by1 = ox + round((x1 - rb[0]) * sx), oy + round((y1 - rb[1]) * sy)
                inside = region[by0:by1, bx0:bx1].copy()
                region[:] = (region * np.float32(keep)).round()
                region[by0:by1, bx0:bx1] = inside
            idx.append((k, k + 1))
            k += 2
        return out, idx

    def encode_views(self, views: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings (n, D), float64, of letterboxed uint8 views (n, H, W, 3), in batches of
        ``batch_size``."""
        import torch

        views = np.asarray(views) if isinstance(views, list) else views
        bs = int(self.opts["batch_size"])
        mean = torch.as_tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(views), bs):
            x = torch.from_numpy(np.ascontiguousarray(views[i:i + bs])).to(self.device).permute(0, 3, 1, 2).float()
            x = ((x / 255.0 - mean) / std).to(self._dtype)
            with torch.inference_mode():
                e = self.model.encode_image(x).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.vocab_dim))

    # ----- scores -------------------------------------------------------------------------------------------------
    def _softmax_prob(self, logits: np.ndarray, col: np.ndarray) -> np.ndarray:
        m = logits.max(axis=1, keepdims=True)
        p = np.exp(logits - m)
        return p[np.arange(len(col)), col] / p.sum(axis=1)

    def score(self, candidates: list[Candidate]) -> list[ImageScore]:
        blocks: list[np.ndarray] = []
        per_cand: list[tuple[int, list[tuple[int, int] | None]]] = []
        base = 0
        for c in candidates:
            v, idx = self.views(c)
            blocks.append(v)
            per_cand.append((base, [None if t is None else (base + t[0], base + t[1]) for t in idx]))
            base += len(v)
        emb = self.encode_views(np.concatenate(blocks) if blocks else np.zeros((0, 1, 1, 3), np.uint8))
        s = self.logit_scale

        # instances: crop and region views against the vocabulary, own column replaced by the attribute prompt
        rows, cols, targets = [], [], []
        for c, (_, idx) in zip(candidates, per_cand):
            for i, t in enumerate(idx):
                if t is None:
                    continue
                cid = c.scene.objects[i].category_id
                phrase = instance_phrase(c.scene, i, self.names[cid - 1])
                rows += [t[0], t[1]]
                cols += [cid - 1, cid - 1]
                targets += [phrase, phrase]
        inst_prob: dict[int, float] = {}
        if rows:
            e = emb[rows]
            logits = s * (e @ self.vocab.T)
            tgt = self._prompt_embedding(list(dict.fromkeys(targets)))
            tmap = {p: k for k, p in enumerate(dict.fromkeys(targets))}
            own = s * np.einsum("nd,nd->n", e, tgt[[tmap[p] for p in targets]])
            col = np.asarray(cols)
            logits[np.arange(len(col)), col] = own
            prob = self._softmax_prob(logits, col)
            inst_prob = {r: 100.0 * float(p) for r, p in zip(rows, prob)}

        # global: caption against its distractor captions
        results: list[ImageScore] = []
        rw, cw = float(self.opts["region_weight"]), float(self.opts["crop_weight"])
        gw, iw = float(self.opts["global_weight"]), float(self.opts["instance_weight"])
        for c, (gidx, idx) in zip(candidates, per_cand):
            gl = s * (self.caption_matrix(c.scene) @ emb[gidx])
            g = float(100.0 * self._softmax_prob(gl[None, :], np.array([0]))[0])
            crops = [None if x is None else inst_prob[x[0]] for x in idx]
            regions = [None if x is None else inst_prob[x[1]] for x in idx]
            inst = [None if x is None else weighted([(rw, r), (cw, k)]) for x, r, k in zip(idx, regions, crops)]
            results.append(ImageScore(combine(g, inst, gw, iw), inst,
                                      {"scorer": "clip", "global": g, "region": regions, "crop": crops,
                                       "unscored_instances": sum(x is None for x in idx)}))
        return results

    def settings(self) -> dict[str, Any]:
        opts = {k: v for k, v in self.opts.items() if k != "allow_random_init" or v}  # same rescore ids as before
        return {"name": "clip", **opts, "input_size": list(self.input_size), "logit_scale": self.logit_scale}


class _Pyramid:
    """An image and its 2x box-filter reductions, built on demand and shared by all views of one image: a view is
    resized (bicubic) from the smallest level that still leaves a downscale of at least 2x, as Pillow's
    ``reducing_gap=2`` does per call, so large images with many views are reduced once."""

    def __init__(self, image: Any) -> None:
        self.levels = [image]

    def resize(self, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
        from PIL import Image

        ratio = min((box[2] - box[0]) / width, (box[3] - box[1]) / height)
        k = 0
        while ratio / 2 ** (k + 1) >= 2.0 and min(self.levels[k].size) >= 4:
            k += 1
            if k == len(self.levels):
                self.levels.append(self.levels[-1].reduce(2))
        f = 2 ** k
        src = self.levels[k]
        b = (box[0] / f, box[1] / f, min(box[2] / f, src.size[0]), min(box[3] / f, src.size[1]))
        return np.asarray(src.resize((width, height), Image.BICUBIC, box=b))


def _replace_object(text: str, oid: str, name: str, new: str) -> tuple[str, int]:
    """Replace an object's mention in a caption: ``name(oid)`` (name as words, spaces or underscores), else the word
    before ``(oid)``, else (untagged caption) the name as a whole word. Returns the text and the replacements."""
    words = [re.escape(w) for w in name.split()]
    named = r"[ _]".join(words)
    tag = re.escape(f"({oid})")
    text2, k = re.subn(rf"(?i)\b{named}\s*{tag}", new, text)
    if k:
        return text2, k
    text2, k = re.subn(rf"[^\s(]+\s*{tag}", new, text)
    if k:
        return text2, k
    if "(" not in text and words:
        return re.subn(rf"(?i)\b{named}\b", new, text)
    return text, 0


# ----- vlm ----------------------------------------------------------------------------------------------------------
CAPTION_PROMPT = "Describe this image in one or two sentences: the objects, their colours and how they are arranged."
REGION_PROMPT = "Describe the object in {box} in one short sentence: what it is and its colour, material and shape."
CROP_PROMPT = "Describe the object in this image in one short sentence: what it is and its colour, material and shape."


class VLMScorer(ImageScorer):
    """CLIS-I the paper's way: a VLM captions the image and each instance (the box given to the model in its
    family's format, and the crop), an LLM judge scores each caption against the scene-graph text from 0 to 5,
    x20 -> 0-100 (global: the caption; instance: attributes and name).

    Options: ``captioner`` and ``judge`` (sections with ``backend: openai | transformers``, ``model``, and for
    openai ``base_url``, ``api_key_env`` (the *name* of the environment variable holding the key), ``timeout``,
    ``retries``, ``concurrency``; for transformers ``device``, ``dtype``, ``batch_size``; both ``max_new_tokens``;
    the captioner's ``box_format``: ``auto`` or one of ``vlm_backends.BOX_FORMATS``). Without ``judge`` the
    captioner's model judges too. A judge answer that is not JSON with a ``score`` in 0-5 is retried
    ``judge_retries`` times with the error fed back, then recorded as a failure: the part is unscored, never 0.
    Failures are listed in ``ImageScore.details["failures"]`` and counted in ``self.failures``.
    """

    DEFAULTS: dict[str, Any] = {
        "captioner": None, "judge": None, "judge_retries": 2, "region_weight": 0.8, "crop_weight": 0.2,
        "global_weight": 0.5, "instance_weight": 0.5, "box": "layout", "min_crop_side": 64,
        "caption_prompt": CAPTION_PROMPT, "region_prompt": REGION_PROMPT, "crop_prompt": CROP_PROMPT,
    }

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        from .vlm_backends import BOX_FORMATS, auto_box_format, build_backend

        self.opts = _check_options(options, self.DEFAULTS, "vlm")
        cap_cfg = dict(self.opts["captioner"] or {})
        if not cap_cfg:
            raise ValueError("scorer 'vlm': the 'captioner' section is required (backend, model, ...)")
        if "{box}" not in self.opts["region_prompt"]:
            raise ValueError("scorer 'vlm': region_prompt must contain '{box}'")
        self.captioner = build_backend(cap_cfg, "vlm", ctx.device, "vlm.captioner")
        self.caption_tokens = int(cap_cfg.get("max_new_tokens", 96))
        fmt = cap_cfg.get("box_format", "auto")
        self.box_format = auto_box_format(self.captioner.model_type) if fmt == "auto" else fmt
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"vlm.captioner.box_format = {fmt!r}: must be 'auto' or one of {', '.join(BOX_FORMATS)}")
        judge_cfg = self.opts["judge"]
        if judge_cfg:
            self.judge = build_backend(dict(judge_cfg), "llm", ctx.device, "vlm.judge")
            self.judge_tokens = int(judge_cfg.get("max_new_tokens", 32))
        else:
            self.judge, self.judge_tokens = self.captioner, 32
        self.judge_retries = int(self.opts["judge_retries"])
        self.failures: Counter = Counter()
        self._qwen_pixels = self._processor_pixels()

    def _processor_pixels(self) -> tuple[int, int]:
        """Qwen's (min_pixels, max_pixels) from a local processor, else the Qwen2.5-VL defaults."""
        proc = getattr(getattr(self.captioner, "processor", None), "image_processor", None)
        lo = getattr(proc, "min_pixels", None) or (getattr(proc, "size", None) or {}).get("shortest_edge")
        hi = getattr(proc, "max_pixels", None) or (getattr(proc, "size", None) or {}).get("longest_edge")
        return int(lo or 56 * 56), int(hi or 12845056)

    def settings(self) -> dict[str, Any]:
        opts = {k: v for k, v in self.opts.items() if k not in ("captioner", "judge")}
        return {"name": "vlm", **opts, "captioner": self.captioner.settings(), "judge": self.judge.settings(),
                "box_format": self.box_format}

    def _crop(self, img: np.ndarray, b: tuple[int, int, int, int]) -> np.ndarray:
        from PIL import Image

        crop = np.ascontiguousarray(img[b[1]:b[3], b[0]:b[2]])
        side = min(crop.shape[:2])
        lo = int(self.opts["min_crop_side"])
        if side < lo:
            f = lo / side
            crop = np.asarray(Image.fromarray(crop).resize((max(1, round(crop.shape[1] * f)),
                                                            max(1, round(crop.shape[0] * f))), Image.BICUBIC))
        return crop

    def score(self, candidates: list[Candidate]) -> list[ImageScore]:
        from .vlm_backends import JUDGE_RETRY, JudgeAnswerError, judge_conversation, parse_judge, region_query

        # 1. caption requests: (candidate, part, instance) -> conversation
        keys: list[tuple[int, str, int | None]] = []
        convs: list[list[dict[str, Any]]] = []
        refs: list[str] = []
        for ci, c in enumerate(candidates):
            keys.append((ci, "global", None))
            convs.append([{"role": "user", "content": [{"type": "image", "image": c.image},
                                                       {"type": "text", "text": self.opts["caption_prompt"]}]}])
            refs.append(caption_text(c.scene))
            for i, o in enumerate(c.scene.objects):
                b = instance_box(c, i, self.opts["box"])
                if b is None:
                    continue
                ref = instance_phrase(c.scene, i, normalize_name(self.ctx.categories[o.category_id].name))
                img, where = region_query(c.image, b, self.box_format, self._qwen_pixels)
                keys.append((ci, "region", i))
                convs.append([{"role": "user", "content": [
                    {"type": "image", "image": img},
                    {"type": "text", "text": self.opts["region_prompt"].format(box=where)}]}])
                refs.append(ref)
                keys.append((ci, "crop", i))
                convs.append([{"role": "user", "content": [{"type": "image", "image": self._crop(c.image, b)},
                                                           {"type": "text", "text": self.opts["crop_prompt"]}]}])
                refs.append(ref)
        captions = self.captioner.chat_many(convs, self.caption_tokens)

        failures: list[list[dict[str, Any]]] = [[] for _ in candidates]

        def fail(k: int, stage: str, err: str) -> None:
            ci, part, inst = keys[k]
            failures[ci].append({"part": part, "instance": inst, "stage": stage, "error": err})
            self.failures[f"{stage}:{part}"] += 1

        # 2. judge every caption, retrying unusable answers with the error fed back
        scores: dict[int, float] = {}
        pending: dict[int, list[dict[str, Any]]] = {}
        for k, cap in enumerate(captions):
            if isinstance(cap, Exception):
                fail(k, "caption", str(cap))
            elif not cap.strip():
                fail(k, "caption", "empty caption")
            else:
                pending[k] = judge_conversation(refs[k], cap.strip())
        for attempt in range(self.judge_retries + 1):
            if not pending:
                break
            order = list(pending)
            answers = self.judge.chat_many([pending[k] for k in order], self.judge_tokens)
            nxt: dict[int, list[dict[str, Any]]] = {}
            for k, ans in zip(order, answers):
                if isinstance(ans, Exception):
                    fail(k, "judge", str(ans))
                    continue
                try:
                    scores[k] = 20.0 * parse_judge(ans)
                except JudgeAnswerError as e:
                    if attempt == self.judge_retries:
                        fail(k, "judge", f"{e} (after {attempt + 1} attempts)")
                    else:
                        nxt[k] = [*pending[k], {"role": "assistant", "content": ans},
                                  {"role": "user", "content": JUDGE_RETRY.format(error=e)}]
            pending = nxt

        # 3. combine
        rw, cw = float(self.opts["region_weight"]), float(self.opts["crop_weight"])
        gw, iw = float(self.opts["global_weight"]), float(self.opts["instance_weight"])
        parts: list[dict[tuple[str, int | None], float | None]] = [{} for _ in candidates]
        for k, (ci, part, inst) in enumerate(keys):
            parts[ci][(part, inst)] = scores.get(k)
        results = []
        for ci, c in enumerate(candidates):
            p = parts[ci]
            n = len(c.scene.objects)
            regions = [p.get(("region", i)) for i in range(n)]
            crops = [p.get(("crop", i)) for i in range(n)]
            inst = [weighted([(rw, r), (cw, k)]) if ("region", i) in p else None
                    for i, (r, k) in enumerate(zip(regions, crops))]
            g = p.get(("global", None))
            results.append(ImageScore(combine(g, inst, gw, iw), inst,
                                      {"scorer": "vlm", "global": g, "region": regions, "crop": crops,
                                       "failures": failures[ci], "box_format": self.box_format}))
        total = sum(len(f) for f in failures)
        if total:
            logger.warning("vlm scorer: %d failed parts over %d candidates (%s)", total, len(candidates),
                           ", ".join(f"{k} {v}" for k, v in sorted(Counter(
                               f"{f['stage']}:{f['part']}" for fs in failures for f in fs).items())))
        return results


__all__ = ["ClipScorer", "VLMScorer", "caption_text", "combine", "instance_box", "weighted"]
