"""``add_acp_config(cfg)`` adds every ``ACP.*`` key of docs/design.md "detectron2 integration (contract)" with its
default; ``validate_acp_config(cfg)`` rejects bad values with a message naming the key and the value, before any data
or model is built; ``load_cfg(file, opts)`` is the one config loader of ``tools/train_net.py``, the demo and the
ablation driver (file lookup, ``KEY VALUE`` overrides, validation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode as CN

from .eval_backends import BACKENDS as EVAL_BACKENDS

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"  # a bare --config name is looked up here

MIX_MODES = ("ratio", "concat", "paste", "ratio+paste")
SELECTORS = ("clis", "stored", "random", "first", "all", "oracle")  # oracle: Shapes caches only (generator truth)
MIN_CLIS_I_RULES = ("absolute", "per_category")
CATEGORIES_APPLY_TO = ("samples", "instances")
BOX_MODES = ("mask", "layout")
SAMPLING_POLICIES = ("uniform", "class_balanced")
MASK_FORMATS = ("polygon", "bitmask")
BATCH_COMPOSITIONS = ("stream", "exact")  # acp_data.d2.batching.COMPOSITIONS
DROPPED_POLICIES = ("background", "ignore", "erase")
# ACP.DROPPED_INSTANCES: ignore swaps these stock modules for the registered pair of acp_data/d2/modeling.py
IGNORE_MODULES = (("PROPOSAL_GENERATOR", "RPN", "IgnoreRPN"), ("ROI_HEADS", "StandardROIHeads", "IgnoreStandardROIHeads"))


class ConfigError(ValueError):
    """A config file, override or value that cannot work; the message names the file, the key and the value."""


def add_acp_config(cfg: CN) -> CN:
    """Add the ``ACP`` node (in place) and return ``cfg``. Defaults: ACP off, the paper's recipe when switched on."""
    _C = cfg
    _C.ACP = CN()
    # Off: plain detectron2 training; nothing below is read.
    _C.ACP.ENABLED = False
    # Caches written by `acp-data prebuild` (a list of directories).
    _C.ACP.CACHE_DIRS = []
    # Concepts whose synthetic data is used: "rare", "rare+common", "all", comma-separated names, or "@FILE".
    _C.ACP.CATEGORIES = "rare"
    # What ACP.CATEGORIES chooses: "samples" (the images whose work unit was drawn for one of them, its `target`;
    # every instance of a kept image keeps its label, companions included: the paper's whole-image annotation) or
    # "instances" (only instances of those categories keep a label; the others stay in the image unlabelled).
    # Paste modes always build their pool per instance: only the chosen categories' cut-outs are pasted.
    _C.ACP.CATEGORIES_APPLY_TO = "samples"
    # Priors file from `acp-data priors build` (paste scale; CLIS-L when rescoring). Empty: none.
    _C.ACP.PRIORS = ""
    # Which candidates of a work unit are used: "clis" (best of N by CLIS-I, recomputed from the stored scores with
    # the MIN_CLIS_L / MIN_CLIS_I below), "stored" (the `selected` flag the prebuild or the last rescore stored, with
    # its own thresholds), "random" (one seeded random candidate per unit), "first", "all".
    _C.ACP.SELECT = "clis"
    # Instances with CLIS-I below this are dropped at load time (0-100; 60 is the paper's threshold for both the
    # `clip` and `vlm` scorers, whose scores are calibrated so 60 means "clearly this category"). 0 = keep all.
    # Unscored instances/images pass only a threshold of 0.
    _C.ACP.MIN_CLIS_I = 60.0
    # "absolute": MIN_CLIS_I for every category. "per_category": per category min(MIN_CLIS_I, the
    # MIN_CLIS_I_QUANTILE quantile of that category's scored instances in the cache), for scorers whose scale
    # differs by category (a CLIP softmax over many names): a category scored low everywhere keeps its best instances
    # instead of being emptied. Computed from the cache's scores, never from ground truth; needs per-instance scores.
    _C.ACP.MIN_CLIS_I_RULE = "absolute"
    _C.ACP.MIN_CLIS_I_QUANTILE = 0.5
    # Images with CLIS-L below this are dropped at load time (0-100; 50 in the paper's multimodal setting). 0 = off.
    _C.ACP.MIN_CLIS_L = 0.0
    # What a kept synthetic image's dropped instances (below MIN_CLIS_I, or outside CATEGORIES) become, since they
    # stay in its pixels: "background" (the paper: unlabelled, so negatives), "ignore" (no RPN or ROI-head loss where
    # they are; load_cfg switches the model to IgnoreRPN / IgnoreStandardROIHeads), "erase" (inpainted away before
    # augmentation). docs/mixing.md "Dropped instances (ACP.DROPPED_INSTANCES)".
    _C.ACP.DROPPED_INSTANCES = "background"
    # ignore: an anchor or proposal whose intersection with a dropped instance's box covers more than this fraction
    # of its own area (IoA) is not a negative. (0, 1].
    _C.ACP.IGNORE_IOA = 0.5
    # Cap on synthetic images used (0 = all), chosen deterministically from SEED.
    _C.ACP.MAX_IMAGES = 0
    # Instance boxes: "mask" (tight box of the final mask) or "layout" (the planner's box).
    _C.ACP.BOX = "mask"
    # "concat" (paper: append to the real set, repeat-factor sampling over the union), "ratio" (a fixed fraction of
    # the global image stream), "paste" (instances pasted onto real images), "ratio+paste".
    _C.ACP.MIX_MODE = "concat"
    # ratio modes: fraction of the global image stream that is synthetic.
    _C.ACP.SYNTH_RATIO = 0.5
    # ratio modes: "uniform" over synthetic images or "class_balanced" over the categories they contain.
    _C.ACP.SYNTH_SAMPLING = "uniform"
    # ratio modes: "stream" (the ratio holds over the image stream) or "exact" (every batch of every rank holds
    # floor or ceil of SYNTH_RATIO x images per rank's batch synthetic images, exact in the long run). concat refuses
    # "exact". Either way batches are formed in the sampler: the same for any DATALOADER.NUM_WORKERS.
    _C.ACP.BATCH_COMPOSITION = "stream"
    _C.ACP.PASTE = CN()
    # Probability that an image gets pasted instances.
    _C.ACP.PASTE.PROB = 0.5
    # At most this many cut-outs per image (uniform in 1..MAX_INSTANCES).
    _C.ACP.PASTE.MAX_INSTANCES = 10
    # Target size from the priors' per-category sqrt(box area / image area) statistics (needs ACP.PRIORS).
    _C.ACP.PASTE.SCALE_FROM_PRIORS = True
    # Otherwise sqrt(area fraction) uniform in this range.
    _C.ACP.PASTE.SCALE_RANGE = (0.1, 0.5)
    # Aspect ratio of a pasted cut-out is scaled by a factor uniform in [1 - ASPECT_JITTER, 1 + ASPECT_JITTER].
    _C.ACP.PASTE.ASPECT_JITTER = 0.2
    # An occluded annotation is dropped when less than this fraction of its mask, or fewer pixels, remain visible.
    _C.ACP.PASTE.MIN_VISIBLE_FRAC = 0.25
    _C.ACP.PASTE.MIN_VISIBLE_PIXELS = 32
    # Pick up shards closed by a running prebuild every ONLINE_REFRESH_ITERS iterations.
    _C.ACP.ONLINE = False
    _C.ACP.ONLINE_REFRESH_ITERS = 500
    # Replay an online run exactly: the run directory whose recorded snapshots are used (or $ACP_ONLINE_REPLAY).
    _C.ACP.ONLINE_REPLAY = ""
    # LVIS-format datasets to register before training: a list of [name, json_file, image_root]; relative paths are
    # resolved under $DETECTRON2_DATASETS (default "datasets"). Names must not contain "v1", "v0.5" or "cocofied".
    _C.ACP.REGISTER_LVIS = []
    # LVIS evaluation backend (training-time evaluation and --eval-only): "hotcoco" (fast) or "lvis" (lvis-api, the
    # reference); the same numbers (docs/design.md "Evaluation (contract)"). metrics.json records the one used.
    _C.ACP.EVAL_BACKEND = "hotcoco"
    return cfg


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key} = {value!r}: {why}")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"must be one of {', '.join(choices)}")


def _in_range(key: str, value: Any, lo: float, hi: float) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        _fail(key, value, "must be a number")
    if not lo <= v <= hi:
        _fail(key, value, f"must be in [{lo}, {hi}]")


def validate_acp_config(cfg: CN) -> None:
    """Raise ``ConfigError`` for the first bad ``ACP.*`` (or ``SEED``) value; cheap, touches no files."""
    a = cfg.ACP
    for name in a.REGISTER_LVIS:
        if not (isinstance(name, (list, tuple)) and len(name) == 3 and all(isinstance(x, str) for x in name)):
            _fail("ACP.REGISTER_LVIS", name, "each entry must be [name, json_file, image_root]")
        low = name[0].lower()
        if any(s in low for s in ("v1", "v0.5", "cocofied")):
            _fail("ACP.REGISTER_LVIS", name[0], "dataset names containing 'v1', 'v0.5' or 'cocofied' are taken over "
                  "by detectron2's built-in LVIS metadata; choose another name")
    mask_format = getattr(cfg.INPUT, "MASK_FORMAT", "polygon")
    _one_of("INPUT.MASK_FORMAT", mask_format, MASK_FORMATS)
    backend = a.get("EVAL_BACKEND", "hotcoco")
    _one_of("ACP.EVAL_BACKEND", backend, EVAL_BACKENDS)
    if not a.ENABLED:
        return
    if cfg.SEED is None or int(cfg.SEED) < 0:
        _fail("SEED", cfg.SEED, "ACP derives every sampling choice from (SEED, sample index); set a fixed SEED >= 0 "
              "(-1 would give a different stream per run)")
    _one_of("ACP.MIX_MODE", a.MIX_MODE, MIX_MODES)
    _one_of("ACP.SELECT", a.SELECT, SELECTORS)
    _one_of("ACP.MIN_CLIS_I_RULE", a.MIN_CLIS_I_RULE, MIN_CLIS_I_RULES)
    _in_range("ACP.MIN_CLIS_I_QUANTILE", a.MIN_CLIS_I_QUANTILE, 0.0, 1.0)
    _one_of("ACP.CATEGORIES_APPLY_TO", a.CATEGORIES_APPLY_TO, CATEGORIES_APPLY_TO)
    _one_of("ACP.BOX", a.BOX, BOX_MODES)
    _one_of("ACP.SYNTH_SAMPLING", a.SYNTH_SAMPLING, SAMPLING_POLICIES)
    _in_range("ACP.SYNTH_RATIO", a.SYNTH_RATIO, 0.0, 1.0)
    _one_of("ACP.BATCH_COMPOSITION", a.BATCH_COMPOSITION, BATCH_COMPOSITIONS)
    if a.BATCH_COMPOSITION == "exact" and a.MIX_MODE == "concat":
        _fail("ACP.BATCH_COMPOSITION", a.BATCH_COMPOSITION, "is refused with ACP.MIX_MODE = 'concat' (repeat-factor "
              "sampling over the union of real and synthetic images has no per-batch ratio); use MIX_MODE 'ratio' "
              "or 'ratio+paste' with SYNTH_RATIO, or BATCH_COMPOSITION 'stream'")
    _in_range("ACP.MIN_CLIS_I", a.MIN_CLIS_I, 0.0, 100.0)
    _in_range("ACP.MIN_CLIS_L", a.MIN_CLIS_L, 0.0, 100.0)
    _check_dropped_instances(cfg)
    if not isinstance(a.MAX_IMAGES, int) or a.MAX_IMAGES < 0:
        _fail("ACP.MAX_IMAGES", a.MAX_IMAGES, "must be an integer >= 0 (0 = all)")
    if not isinstance(a.CATEGORIES, str) or not a.CATEGORIES.strip():
        _fail("ACP.CATEGORIES", a.CATEGORIES, "must be 'rare', 'rare+common', 'all', comma-separated names or @FILE")
    if not isinstance(a.CACHE_DIRS, (list, tuple)) or not a.CACHE_DIRS:
        _fail("ACP.CACHE_DIRS", a.CACHE_DIRS, "is empty while ACP.ENABLED is on; build a cache with "
              "`acp-data prebuild --config FILE --out CACHE` and list it here")
    if not isinstance(a.ONLINE_REFRESH_ITERS, int) or a.ONLINE_REFRESH_ITERS <= 0:
        _fail("ACP.ONLINE_REFRESH_ITERS", a.ONLINE_REFRESH_ITERS, "must be a positive integer")
    p = a.PASTE
    if "paste" in a.MIX_MODE:
        _in_range("ACP.PASTE.PROB", p.PROB, 0.0, 1.0)
        if not isinstance(p.MAX_INSTANCES, int) or p.MAX_INSTANCES < 1:
            _fail("ACP.PASTE.MAX_INSTANCES", p.MAX_INSTANCES, "must be an integer >= 1")
        sr = tuple(p.SCALE_RANGE)
        if len(sr) != 2 or not (0.0 < float(sr[0]) <= float(sr[1]) <= 1.0):
            _fail("ACP.PASTE.SCALE_RANGE", p.SCALE_RANGE, "must be (lo, hi) with 0 < lo <= hi <= 1 "
                  "(sqrt of the fraction of the image area)")
        _in_range("ACP.PASTE.ASPECT_JITTER", p.ASPECT_JITTER, 0.0, 0.99)
        _in_range("ACP.PASTE.MIN_VISIBLE_FRAC", p.MIN_VISIBLE_FRAC, 0.0, 1.0)
        if not isinstance(p.MIN_VISIBLE_PIXELS, int) or p.MIN_VISIBLE_PIXELS < 0:
            _fail("ACP.PASTE.MIN_VISIBLE_PIXELS", p.MIN_VISIBLE_PIXELS, "must be an integer >= 0")
        if p.SCALE_FROM_PRIORS and not a.PRIORS:
            _fail("ACP.PASTE.SCALE_FROM_PRIORS", True, "needs ACP.PRIORS (a priors file from `acp-data priors "
                  "build`); set ACP.PRIORS or turn SCALE_FROM_PRIORS off to use SCALE_RANGE")


def _check_dropped_instances(cfg: CN) -> None:
    a = cfg.ACP
    _one_of("ACP.DROPPED_INSTANCES", a.DROPPED_INSTANCES, DROPPED_POLICIES)
    try:
        ioa = float(a.IGNORE_IOA)
    except (TypeError, ValueError):
        ioa = -1.0
    if not 0.0 < ioa <= 1.0:
        _fail("ACP.IGNORE_IOA", a.IGNORE_IOA, "must be in (0, 1] (the fraction of an anchor's or proposal's area "
              "inside a dropped instance's box above which it is not a negative)")
    if a.DROPPED_INSTANCES != "ignore":
        return
    for node, stock, ours in IGNORE_MODULES:
        key, name = f"MODEL.{node}.NAME", cfg.MODEL.get(node).NAME
        if name not in (stock, ours):
            _fail(key, name, f"ACP.DROPPED_INSTANCES: ignore needs {ours} (it extends detectron2's {stock}); set "
                  f"{key} to {stock} or {ours}, or choose ACP.DROPPED_INSTANCES background or erase")


def use_ignore_modules(cfg: CN) -> list[str]:
    """With ``ACP.DROPPED_INSTANCES: ignore`` (ACP on): set ``MODEL.PROPOSAL_GENERATOR.NAME`` / ``MODEL.ROI_HEADS.NAME``
    from detectron2's ``RPN`` / ``StandardROIHeads`` to the registered ``IgnoreRPN`` / ``IgnoreStandardROIHeads``
    (in place) and register them; returns the keys changed. Call on a validated config."""
    if not (cfg.ACP.ENABLED and cfg.ACP.DROPPED_INSTANCES == "ignore"):
        return []
    from . import modeling  # noqa: F401  (registers the pair)

    changed = []
    for node, stock, ours in IGNORE_MODULES:
        if cfg.MODEL.get(node).NAME == stock:
            cfg.MODEL.get(node).NAME = ours
            changed.append(f"MODEL.{node}.NAME {stock} -> {ours}")
    return changed


def get_acp_cfg() -> CN:
    """detectron2's default config with the ACP node added."""
    from detectron2.config import get_cfg

    return add_acp_config(get_cfg())


def resolve_config_file(name: str) -> str:
    """A path as given, else relative to the checkout, else a file of that name under ``configs/`` (``.yaml``
    optional)."""
    for cand in (Path(name), REPO_ROOT / name, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return str(cand)
    available = ", ".join(sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml")))
    raise ConfigError(f"config file {name!r} not found (looked in {os.getcwd()} and {CONFIG_DIR}); "
                      f"configs/ has: {available}")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        out += _flat_keys(v, f"{name}.") if isinstance(v, dict) else [name]
    return out


def merge_overrides(cfg: CN, opts: Sequence[str]) -> CN:
    """Merge command-line ``KEY VALUE`` pairs into ``cfg`` like yacs' ``merge_from_list``, but friendlier: an int is
    accepted for a float key (``ACP.MIN_CLIS_I 3``), and an unknown key names the closest known ones. Every failure is
    a ``ConfigError`` naming the key and the value."""
    import difflib

    opts = [str(o) for o in opts]
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, value in zip(opts[0::2], opts[1::2]):
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                close = difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.75)
                raise ConfigError(f"command-line override {key} {value}: unknown config key {key!r}"
                                  + (f"; did you mean {' or '.join(close)}?" if close else ""))
            node = node[part]
        new = CN._decode_cfg_value(value)
        if isinstance(node, float) and isinstance(new, int) and not isinstance(new, bool):
            value = repr(float(new))
        try:
            cfg.merge_from_list([key, value])
        except Exception as e:  # yacs: type mismatch, a node replaced by a value, ...
            raise ConfigError(f"command-line override {key} {value}: expected {type(node).__name__} like "
                              f"{node!r}: {type(e).__name__}: {e}") from e
    return cfg


def load_cfg(path: str, opts: Sequence[str] = ()) -> CN:
    """``add_acp_config(get_cfg())`` + the config file ``path`` (as found by :func:`resolve_config_file`) + trailing
    ``KEY VALUE`` overrides; values validated. Every failure is a ``ConfigError`` naming the file or the override."""
    opts = list(opts)
    cfg = get_acp_cfg()
    try:
        cfg.merge_from_file(path)
    except Exception as e:  # yaml errors, unknown keys, type mismatches: all name the file
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
    merge_overrides(cfg, opts)
    try:
        validate_acp_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} (config {path}{' + command-line overrides' if opts else ''})") from e
    changed = use_ignore_modules(cfg)
    if changed:
        import logging

        logging.getLogger(__name__).info("ACP.DROPPED_INSTANCES ignore: %s (no negatives inside the dropped "
                                         "instances' boxes)", "; ".join(changed))
    return cfg
