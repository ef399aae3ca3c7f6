"""The start-up checks of ``tools/train_net.py``, in the order of docs/design.md "detectron2 integration (contract)":
config values, then data files (dataset json and image directories under $DETECTRON2_DATASETS, the ACP cache
manifests, the ACP loader's own checks), then the model. Each failure is one ``CheckError`` whose message says what
is wrong and how to fix it, raised before anything heavy runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from detectron2.config import CfgNode

from . import lvis_format
from .config import CONFIG_DIR, ConfigError, load_cfg, resolve_config_file


class CheckError(RuntimeError):
    """A problem found before training: printed as one message, exit status 2."""


def build_cfg(args: argparse.Namespace) -> CfgNode:
    """The run's config from ``args.config_file`` and ``args.opts`` (see ``config.load_cfg``); ``args.config_file``
    becomes the file found."""
    if not args.config_file:
        raise CheckError("no config given: use --config-file FILE (or --config NAME for a file in configs/)")
    try:
        args.config_file = resolve_config_file(args.config_file)
        return load_cfg(args.config_file, args.opts or [])
    except ConfigError as e:
        raise CheckError(str(e)) from e


# ----- data --------------------------------------------------------------------------------------------------------
def _cache_build_hint(cache_dir: str) -> str:
    guess = CONFIG_DIR / "prebuild" / f"{Path(cache_dir).name}.yaml"
    cfg_arg = os.path.relpath(guess) if guess.is_file() else "PREBUILD_CONFIG.yaml"
    return f"acp-data prebuild --config {cfg_arg} --out {cache_dir}"


def check_data(cfg: CfgNode, eval_only: bool) -> None:
    """Every dataset json and image directory, and every ACP cache manifest, exists; then register
    ``ACP.REGISTER_LVIS`` datasets (which reads their categories)."""
    from detectron2.data import DatasetCatalog

    ours = {name: (j, r) for name, j, r in lvis_format.config_lvis_entries(cfg)}
    names = [("DATASETS.TEST", n) for n in cfg.DATASETS.TEST]
    if not eval_only:
        names = [("DATASETS.TRAIN", n) for n in cfg.DATASETS.TRAIN] + names
    problems: list[str] = []
    missing: list[tuple[str, str]] = []
    for key, name in names:
        if name in ours:
            j, r = ours[name]
            missing += lvis_format.missing_files([(f"{name} annotations", j), (f"{name} images", r)])
        elif name in DatasetCatalog.list():
            missing += lvis_format.missing_files(lvis_format.required_files(name))
        else:
            problems.append(f"dataset {name!r} in {key} is not registered; add [name, json_file, image_root] to "
                            "ACP.REGISTER_LVIS (relative paths are under $DETECTRON2_DATASETS)")
    by_path: dict[str, list[str]] = {}
    for what, p in missing:
        by_path.setdefault(p, []).append(what)
    if by_path:
        root = os.environ.get("DETECTRON2_DATASETS")
        where = (f"DETECTRON2_DATASETS={root}" if root else
                 f"DETECTRON2_DATASETS is not set, so datasets are looked up under ./{lvis_format.DEFAULT_DATASETS_ROOT}")
        problems.append(f"missing dataset files ({where}; it should hold lvis/ and coco/ for LVIS v1, see README):\n"
                        + "\n".join(f"    {p}  ({', '.join(dict.fromkeys(whats))})" for p, whats in by_path.items()))
    if cfg.ACP.ENABLED and not eval_only:
        for d in cfg.ACP.CACHE_DIRS:
            if not os.path.isfile(os.path.join(d, "manifest.json")):
                state = "does not exist" if not os.path.exists(d) else "has no manifest.json"
                problems.append(f"ACP.CACHE_DIRS entry {d} {state}; build the cache with: {_cache_build_hint(d)}")
    if problems:
        raise CheckError("\n  ".join(["data check failed:", *problems]))
    try:
        lvis_format.register_from_config(cfg)
    except lvis_format.DatasetFormatError as e:
        raise CheckError(str(e)) from e


def check_acp_data(cfg: CfgNode) -> None:
    """The ACP loader's start-up checks (crop store, usable synthetic samples, category tables) as one message."""
    from .loader import check_acp_train_data

    try:
        check_acp_train_data(cfg)
    except Exception as e:  # acp_data's own errors (loader, cache format, categories) carry a complete message
        if type(e).__module__.startswith("acp_data.") and not os.environ.get("ACP_DEBUG"):
            raise CheckError(str(e)) from None
        raise


# ----- model -------------------------------------------------------------------------------------------------------
def check_model(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Device, class count against the data, weights file; then build the model once on CPU (catches bad shapes)."""
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CheckError(f"MODEL.DEVICE = {device!r} but no CUDA device is visible; add `MODEL.DEVICE cpu`")
        if args.num_gpus > torch.cuda.device_count():
            raise CheckError(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA devices are "
                             "visible")
    elif device != "cpu":
        if args.num_gpus > 1:
            raise CheckError(f"--num-gpus {args.num_gpus} runs one process per device: MODEL.DEVICE must be cuda "
                             f"or cpu (it is {device!r})")
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise CheckError(f"config key MODEL.ROI_HEADS.NUM_CLASSES = {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
                             f"dataset {name!r} has {len(classes)} categories; set MODEL.ROI_HEADS.NUM_CLASSES "
                             f"{len(classes)}")
    weights = str(cfg.MODEL.WEIGHTS)
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise CheckError(f"config key MODEL.WEIGHTS = {weights!r}: no such file")
    if args.eval_only and not weights:
        last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if not (args.resume and os.path.isfile(last)):
            raise CheckError("--eval-only needs a checkpoint: set MODEL.WEIGHTS PATH (or --resume with "
                             f"{last} present)")
    if args.eval_only and not cfg.DATASETS.TEST:
        raise CheckError("--eval-only with an empty DATASETS.TEST: nothing to evaluate")
    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    try:
        model = build_model(cpu_cfg)
    except Exception as e:
        raise CheckError(f"cannot build the model from {args.config_file}: {type(e).__name__}: {e}") from e
    del model


def run_checks(args: argparse.Namespace) -> CfgNode:
    """Config values, then data files, then the ACP loader's checks, then the model. Returns the config."""
    cfg = build_cfg(args)
    check_data(cfg, args.eval_only)
    if cfg.ACP.ENABLED and not args.eval_only:
        check_acp_data(cfg)
    check_model(cfg, args)
    return cfg
