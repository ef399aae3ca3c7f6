"""The Shapes judge: a small open_clip model trained from scratch, saved as an open_clip ``local-dir`` checkpoint that
the ``clip`` CLIS-I scorer loads exactly as it loads a real CLIP.

Two variants (``JudgeOptions.variant``): ``web`` (default) trains on the judge's own web corpus
(``acp_data.shapes.webcorpus``: every category in about equal amounts, styles of its own, some caption noise), as a
real CLIP learned its words from web data and so knows rare categories; ``in_domain`` trains on the world's real
training images, where a rare category has 1-10 images, which is the real-world failure of a scorer that has not
seen a category (docs/design.md "The Shapes world").

It learns what the scorer asks: instance views (box crop, box in dimmed context) against one prompt per category
("a photo of a red star."), with categories sampled evenly (rare ones have one or two crops: augmentation makes up
the rest); the same views with their colours permuted against shape-only prompts ("a photo of a star."), so shape is
learned apart from the colours each shape happens to come in (a rare "green star" shares its shape with frequent
stars); object-free boxes against a uniform target over the categories (a missing object scores low for every name);
whole images against a planner-like caption and distractors with other names. Linear category and shape heads on
the image embedding (used in training only, not saved) let the image tower learn at a classifier's pace while the
text tower aligns the prompts to it; without them a from-scratch tower barely gets past colour in the time budget.
Training takes a few CPU minutes and is cached: ``judge.json`` in the output directory holds the world, options and validation metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fsio import build_lock
from .judge_data import (
    Instances,
    augment_batch,
    box_view,
    build_view_bank,
    caption_with_distractors,
    class_prompts,
    letterbox,
    load_instances,
    permute_colours,
)
from .webcorpus import WebOptions, web_corpus
from .world import load_world, parse_category

logger = logging.getLogger(__name__)

JUDGE_VERSION = 1
STAMP_NAME = "judge.json"
STAMP_FORMAT = "acp-data shapes judge"
MODEL_NAME = "acp-shapes-judge"
# A small ResNet image tower at 32 px (a CNN learns colour and shape from little data; 32 px keeps a CPU step cheap
# and shows an object crop well, a whole image coarsely) and a small text transformer with open_clip's CLIP BPE
# tokenizer (offline).
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_CFG: dict[str, Any] = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                                  "resize_mode": "shortest"}
EVAL_TEMPLATE = "a photo of a {}."  # the clip scorer's default template
VARIANTS = ("web", "in_domain")


@dataclass(frozen=True)
class JudgeOptions:
    """Training settings; all of them are part of the cache stamp."""

    steps: int = 900
    batch_instances: int = 64
    batch_shapes: int = 48
    batch_background: int = 8
    batch_images: int = 8
    distractors: int = 3
    lr: float = 2e-3
    aux_heads: bool = True
    weight_decay: float = 0.02
    seed: int = 0
    variant: str = "web"  # web: the web corpus; in_domain: the world's real training images
    web: WebOptions = WebOptions()

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"judge variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        self.web.validate()
        for k in ("steps", "batch_instances"):
            if getattr(self, k) < 1:
                raise ValueError(f"judge option {k} = {getattr(self, k)} must be >= 1")
        for k in ("batch_shapes", "batch_background", "batch_images", "distractors"):
            if getattr(self, k) < 0:
                raise ValueError(f"judge option {k} = {getattr(self, k)} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"judge option lr = {self.lr} must be > 0")


def register_model_config() -> None:
    """Register ``acp-shapes-judge`` with open_clip (this process only) so ``open_clip.create_model`` can build it."""
    import open_clip

    if MODEL_NAME in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"{MODEL_NAME}.json"
        p.write_text(json.dumps(MODEL_CFG))
        open_clip.add_model_config(p)


# ----- batches ----------------------------------------------------------------------------------------------------
class _Batches:
    """Draws training batches from a view bank: instances by evenly sampled category, colour-permuted instances by
    evenly sampled shape, object-free boxes, whole images with captions."""

    def __init__(self, inst: Instances, opts: JudgeOptions, size: int, rng: np.random.Generator) -> None:
        self.opts = opts
        self.names = inst.names
        kinds = [parse_category(n) for n in inst.names]
        self.shapes = sorted({k[0] for k in kinds}, key=[k[0] for k in kinds].index)
        self.colours = sorted({k[1] for k in kinds}, key=[k[1] for k in kinds].index)
        self.shape_of = np.array([self.shapes.index(k[0]) for k in kinds])
        self.colour_of = np.array([self.colours.index(k[1]) for k in kinds])
        self.bank = build_view_bank(rng, inst, size, tuple(int(round(255 * m)) for m in MEAN))
        by_class = [np.nonzero(self.bank.labels == c)[0] for c in range(len(inst.names))]
        self.class_pools = [p for p in by_class if len(p)]
        shape_of_inst = self.shape_of[self.bank.labels]
        self.shape_pools = [np.nonzero(shape_of_inst == k)[0] for k in range(len(self.shapes))]
        self.shape_pools = [p for p in self.shape_pools if len(p)]
        self.with_objects = [i for i, c in enumerate(self.bank.image_classes) if c]
        self.mean = torch_tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch_tensor(STD).view(1, 3, 1, 1)

    def _pick(self, rng: np.random.Generator, pools: list[np.ndarray], n: int) -> np.ndarray:
        return np.array([int(rng.choice(pools[int(rng.integers(len(pools)))])) for _ in range(n)], dtype=np.int64)

    def _views(self, rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
        return self.bank.views[idx, rng.integers(self.bank.views.shape[1], size=len(idx))]

    def _tensor(self, rng: np.random.Generator, u8: np.ndarray, permute: bool = False) -> Any:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))).float() / 255.0
        if permute:
            x = permute_colours(rng, x)
        return (augment_batch(rng, x) - self.mean) / self.std

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        import torch

        o, bank = self.opts, self.bank
        idx = self._pick(rng, self.class_pools, o.batch_instances)
        labels = bank.labels[idx]
        sidx = self._pick(rng, self.shape_pools, o.batch_shapes)
        parts = [self._tensor(rng, self._views(rng, idx))]
        if len(sidx):
            parts.append(self._tensor(rng, self._views(rng, sidx), permute=True))
        n_bg = min(o.batch_background, len(bank.background))
        if n_bg:
            parts.append(self._tensor(rng, bank.background[rng.integers(len(bank.background), size=n_bg)]))
        captions: list[str] = []
        n_img = min(o.batch_images, len(self.with_objects))
        if n_img:
            pick = rng.choice(self.with_objects, size=n_img)
            parts.append(self._tensor(rng, bank.images[pick]))
            for i in pick:
                captions += caption_with_distractors(rng, bank.image_classes[i], self.names, o.distractors)
        prompts = (class_prompts(rng, self.names) + class_prompts(rng, self.shapes)
                   + class_prompts(rng, [f"{c} object" for c in self.colours]))
        return {"images": torch.cat(parts), "labels": torch.from_numpy(labels),
                "colour_labels": torch.from_numpy(self.colour_of[labels]),
                "shape_labels": torch.from_numpy(self.shape_of[bank.labels[sidx]]),
                "n": (len(idx), len(sidx), n_bg, n_img), "prompts": prompts,
                "n_prompts": (len(self.names), len(self.shapes), len(self.colours)), "captions": captions}


def torch_tensor(values: Any) -> Any:
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float32))


# ----- training ---------------------------------------------------------------------------------------------------
def _loss(model: Any, tokenizer: Any, batch: dict[str, Any], n_distractors: int, heads: Any = None) -> Any:
    """Category CE on instance views (+ half a colour-only CE), shape-only CE on colour-permuted views, a uniform
    target over the categories for object-free boxes, caption-vs-distractors CE on whole images."""
    import torch
    import torch.nn.functional as F

    scale = model.logit_scale.exp().clamp(max=100)
    t = F.normalize(model.encode_text(tokenizer(batch["prompts"] + batch["captions"])), dim=-1)
    k_cls, k_shape, k_col = batch["n_prompts"]
    t_cls, t_shape = t[:k_cls], t[k_cls:k_cls + k_shape]
    t_col, t_cap = t[k_cls + k_shape:k_cls + k_shape + k_col], t[k_cls + k_shape + k_col:]
    raw = model.encode_image(batch["images"])
    e = F.normalize(raw, dim=-1)
    n_i, n_s, n_b, n_g = batch["n"]
    e_i, e_s = e[:n_i], e[n_i:n_i + n_s]
    e_b, e_g = e[n_i + n_s:n_i + n_s + n_b], e[n_i + n_s + n_b:]
    loss = F.cross_entropy(scale * e_i @ t_cls.T, batch["labels"])
    loss = loss + 0.5 * F.cross_entropy(scale * e_i @ t_col.T, batch["colour_labels"])
    if n_s:
        loss = loss + F.cross_entropy(scale * e_s @ t_shape.T, batch["shape_labels"])
    if heads is not None:  # supervised heads on the image embedding (not saved): the image tower learns at once
        loss = loss + F.cross_entropy(heads["category"](raw[:n_i]), batch["labels"])
        if n_s:
            loss = loss + F.cross_entropy(heads["shape"](raw[n_i:n_i + n_s]), batch["shape_labels"])
    if n_b:
        loss = loss - 0.5 * F.log_softmax(scale * e_b @ t_cls.T, dim=1).mean()  # no category in an empty box
    if n_g:
        caps = t_cap.view(n_g, n_distractors + 1, -1)
        logits = scale * torch.einsum("nd,nkd->nk", e_g, caps)
        loss = loss + 0.5 * F.cross_entropy(logits, torch.zeros(n_g, dtype=torch.long))
    return loss


def train_judge_model(inst: Instances, opts: JudgeOptions, progress: bool = True) -> Any:
    """Train a fresh judge on ``inst`` and return the open_clip model (eval mode)."""
    import open_clip
    import torch
    from tqdm import tqdm

    opts.validate()
    register_model_config()
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    model.train()
    # The CLIP BPE vocabulary has 49,408 tokens; updating that table costs more than the rest of the model, and fixed
    # random token vectors serve a vocabulary of a few dozen words just as well.
    model.token_embedding.weight.requires_grad_(False)
    dim = MODEL_CFG["embed_dim"]
    n_shapes = len({parse_category(n)[0] for n in inst.names})
    heads = torch.nn.ModuleDict({"category": torch.nn.Linear(dim, len(inst.names)),
                                 "shape": torch.nn.Linear(dim, n_shapes)}) if opts.aux_heads else None
    groups: dict[bool, list[Any]] = {}
    named = list(model.named_parameters()) + (list(heads.named_parameters()) if heads is not None else [])
    for n, p in named:
        if p.requires_grad:
            groups.setdefault(p.ndim >= 2 and "logit_scale" not in n, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": opts.weight_decay if decay else 0.0}
                             for decay, ps in groups.items()], lr=opts.lr)
    warmup = max(1, opts.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, opts.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = _Batches(inst, opts, MODEL_CFG["vision_cfg"]["image_size"], rng)
    bar = tqdm(range(opts.steps), desc="shapes judge", disable=not progress, unit="step")
    ema = None
    for _ in bar:
        loss = _train_step(model, tokenizer, opt, batches.draw(rng), opts.distractors, heads)
        sched.step()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        bar.set_postfix(loss=f"{ema:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    return model


def _train_step(model: Any, tokenizer: Any, opt: Any, batch: dict[str, Any], n_distractors: int,
                heads: Any = None) -> float:
    import torch

    loss = _loss(model, tokenizer, batch, n_distractors, heads)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, float(np.log(100)))
    return float(loss.item())


# ----- evaluation -------------------------------------------------------------------------------------------------
def evaluate_judge(model: Any, tokenizer: Any, inst: Instances, context: float = 0.0,
                   batch_size: int = 256) -> dict[str, float]:
    """On real instances: top-1 accuracy over the categories, mean probability of the right category (the
    scorer's calibration), and the fraction of (right crop, wrong-category crop) pairs that each category's prompt
    ranks the right way round (averaged over categories)."""
    import torch
    import torch.nn.functional as F

    size = MODEL_CFG["vision_cfg"]["image_size"]
    fill = tuple(int(round(255 * m)) for m in MEAN)
    views = [letterbox(box_view(inst.images[i], b, context, 0.5), size, fill)
             for i, b in zip(inst.inst_image, inst.inst_box)]
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    embs = []
    with torch.inference_mode():
        for s in range(0, len(views), batch_size):
            a = (np.stack(views[s:s + batch_size]).astype(np.float32) / 255.0 - mean) / std
            embs.append(F.normalize(model.encode_image(torch.from_numpy(a.transpose(0, 3, 1, 2).copy())), dim=-1))
        e = torch.cat(embs)
        t = F.normalize(model.encode_text(tokenizer([EVAL_TEMPLATE.format(n) for n in inst.names])), dim=-1)
        sim = (e @ t.T).numpy()
        scale = float(model.logit_scale.exp().clamp(max=100))
    y = inst.inst_class
    logits = scale * sim
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ranks = []
    for c in range(len(inst.names)):
        pos, neg = sim[y == c, c], sim[y != c, c]
        if len(pos) and len(neg):
            ranks.append(float((pos[:, None] > neg[None, :]).mean()))
    return {"top1": float((sim.argmax(axis=1) == y).mean()), "mean_prob": float(p[np.arange(len(y)), y].mean()),
            "pair_rank": float(np.mean(ranks)), "instances": int(len(y))}


# ----- cache and files --------------------------------------------------------------------------------------------
def _params(world_root: Path, opts: JudgeOptions) -> dict[str, Any]:
    ws = load_world(world_root).stamp_data()
    return {"format": STAMP_FORMAT, "version": JUDGE_VERSION, "model_cfg": MODEL_CFG,
            "world": {k: ws.get(k) for k in ("version", "seed", "size")}, "options": asdict(opts)}


def _read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STAMP_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def training_instances(train_json: Path, image_root: Path, opts: JudgeOptions) -> Instances:
    """What the judge trains on: the web corpus for the world's category names (``web``; nothing from the world's
    images) or the world's real training split (``in_domain``)."""
    if opts.variant == "in_domain":
        return load_instances(train_json, image_root)
    data = json.loads(Path(train_json).read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    return web_corpus(names, seed=opts.seed, opts=opts.web)


def train_judge(world_dir: str | os.PathLike, out_dir: str | os.PathLike, opts: JudgeOptions | None = None,
                force: bool = False, progress: bool = True, threads: int | None = None) -> str:
    """Train the judge on a built world (or reuse the cached one) and return its ``local-dir:PATH`` spec.

    ``out_dir`` gets ``open_clip_config.json``, ``open_clip_model.safetensors`` and the stamp ``judge.json``, all
    written under a temporary name and renamed together; an existing directory is replaced only if it is empty or
    holds a judge."""
    import torch

    from ..clis.openclip_io import save_open_clip_local_dir

    opts = opts or JudgeOptions()
    opts.validate()
    world = load_world(world_dir)
    out = Path(out_dir).absolute()
    params = _params(world.root, opts)
    with build_lock(out):
        stamp = _read_stamp(out)
        if (not force and stamp is not None and {k: stamp.get(k) for k in params} == json.loads(json.dumps(params))
                and (out / "open_clip_model.safetensors").is_file()):
            logger.info("Shapes judge at %s is up to date", out)
            return f"local-dir:{out}"
        if out.exists() and any(out.iterdir()) and (stamp is None or stamp.get("format") != STAMP_FORMAT):
            raise FileExistsError(f"--out {out} exists, is not empty and holds no Shapes judge; refusing to replace "
                                  "it: choose another directory")
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            t0 = time.time()
            train = training_instances(world.train_json, world.image_root, opts)
            model = train_judge_model(train, opts, progress=progress)
            seconds = time.time() - t0
            import open_clip

            tokenizer = open_clip.get_tokenizer(MODEL_NAME)
            val = load_instances(world.val_json, world.image_root)
            metrics = {"crop": evaluate_judge(model, tokenizer, val, context=0.0),
                       "region": evaluate_judge(model, tokenizer, val, context=0.5)}
        finally:
            torch.set_num_threads(old_threads)
        logger.info("Shapes judge: %.0f s training; val crop top-1 %.3f, pair rank %.3f; region top-1 %.3f",
                    seconds, metrics["crop"]["top1"], metrics["crop"]["pair_rank"], metrics["region"]["top1"])
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_open_clip_local_dir(model, MODEL_CFG, tmp, preprocess_cfg=PREPROCESS_CFG)
            data = json.dumps({**params, "metrics": metrics, "train_seconds": round(seconds, 1)}, indent=1).encode()
            with open(tmp / STAMP_NAME, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
            os.rename(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return f"local-dir:{out}"
