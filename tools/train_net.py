#!/usr/bin/env python
"""Train or evaluate Mask R-CNN with acp-data's config keys, in the style of detectron2's ``tools/train_net.py``.

    tools/train_net.py --config acp_lvis.yaml                      # a bare name is looked up in configs/
    tools/train_net.py --config-file configs/lvis_baseline_12ep.yaml --num-gpus 8
    tools/train_net.py --config lvis_baseline_12ep.yaml --eval-only MODEL.WEIGHTS output/x/model_final.pth

Before anything heavy runs it checks, in design.md's order, the config values, the data files (dataset json and
image directories under $DETECTRON2_DATASETS, the ACP cache manifests) and the model; a failure prints one message
and exits with status 2 (as do acp_data's own errors raised later, e.g. by the ACP loader; ``ACP_DEBUG=1`` shows
their traceback). Evaluation writes ``metrics.json`` (AP, APr, APc, APf, ...) into OUTPUT_DIR; detectron2's
per-iteration training scalars go to ``train_metrics.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))
# detectron2 decorates a few functions with torch.jit.script at import; newer torch warns on each. Keep the
# output (and the one-message check failures) readable.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, JSONWriter  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from acp_data.d2 import lvis_format  # noqa: E402
from acp_data.d2.config import ConfigError, add_acp_config, validate_acp_config  # noqa: E402
from acp_data.d2.evaluation import build_lvis_evaluator  # noqa: E402

logger = logging.getLogger("acp_data.train_net")

TRAIN_METRICS_FILE = "train_metrics.json"
ACP_LOADER = "acp_data.d2.loader"


class CheckError(RuntimeError):
    """A problem found before training: printed as one message, exit status 2."""


# ----- config ------------------------------------------------------------------------------------------------------
def resolve_config_file(name: str) -> str:
    """A path as given, else relative to the checkout, else a file of that name under ``configs/`` (``.yaml``
    optional)."""
    if not name:
        raise CheckError("no config given: use --config-file FILE (or --config NAME for a file in configs/)")
    for cand in (Path(name), REPO_ROOT / name, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return str(cand)
    available = ", ".join(sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml")))
    raise CheckError(f"config file {name!r} not found (looked in {os.getcwd()} and {CONFIG_DIR}); "
                     f"configs/ has: {available}")


def build_cfg(args):
    """``add_acp_config(get_cfg())`` + the config file + trailing ``KEY VALUE`` overrides; values validated."""
    path = resolve_config_file(args.config_file)
    args.config_file = path
    cfg = add_acp_config(get_cfg())
    try:
        cfg.merge_from_file(path)
    except Exception as e:  # yaml errors, unknown keys, type mismatches: all name the file
        raise CheckError(f"config file {path}: {type(e).__name__}: {e}") from e
    try:
        cfg.merge_from_list(args.opts or [])
    except Exception as e:
        raise CheckError(f"command-line override {' '.join(args.opts or [])!r}: {type(e).__name__}: {e}") from e
    try:
        validate_acp_config(cfg)
    except ConfigError as e:
        raise CheckError(f"{e} (config {path}{' + command-line overrides' if args.opts else ''})") from e
    return cfg


# ----- data --------------------------------------------------------------------------------------------------------
def _cache_build_hint(cache_dir: str) -> str:
    guess = CONFIG_DIR / "prebuild" / f"{Path(cache_dir).name}.yaml"
    cfg_arg = os.path.relpath(guess) if guess.is_file() else "PREBUILD_CONFIG.yaml"
    return f"acp-data prebuild --config {cfg_arg} --out {cache_dir}"


def check_data(cfg, eval_only: bool) -> None:
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


def acp_train_loader_builder():
    """``acp_data.d2.loader.build_acp_train_loader``, or a CheckError when this build has no ACP loader."""
    if importlib.util.find_spec(ACP_LOADER) is None:
        raise CheckError("ACP training is not yet supported in this build (acp_data.d2.loader is missing); "
                         "set ACP.ENABLED False to train the baseline")
    fn = getattr(importlib.import_module(ACP_LOADER), "build_acp_train_loader", None)
    if fn is None:
        raise CheckError(f"ACP training is not yet supported in this build ({ACP_LOADER} has no "
                         "build_acp_train_loader); set ACP.ENABLED False to train the baseline")
    return fn


def check_acp_data(cfg) -> None:
    """The ACP loader's start-up checks (crop store, usable synthetic samples, category tables) as one message."""
    from acp_data.d2.loader import check_acp_train_data

    try:
        check_acp_train_data(cfg)
    except Exception as e:  # acp_data's own errors (loader, cache format, categories) carry a complete message
        if type(e).__module__.startswith("acp_data.") and not os.environ.get("ACP_DEBUG"):
            raise CheckError(str(e)) from None
        raise


# ----- model -------------------------------------------------------------------------------------------------------
def check_model(cfg, args) -> None:
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
    elif args.num_gpus > 1:
        raise CheckError(f"--num-gpus {args.num_gpus} needs MODEL.DEVICE cuda (it is {device!r})")
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


def run_checks(args):
    """Config values, then data files, then the ACP loader, then the model. Returns the config."""
    cfg = build_cfg(args)
    check_data(cfg, args.eval_only)
    if cfg.ACP.ENABLED and not args.eval_only:
        acp_train_loader_builder()
        check_acp_data(cfg)
    check_model(cfg, args)
    return cfg


# ----- trainer -----------------------------------------------------------------------------------------------------
class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the ACP train loader, LVIS evaluation that writes ``metrics.json``, and
    training scalars in ``train_metrics.json`` (``metrics.json`` is the evaluation contract)."""

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.ACP.ENABLED:
            try:
                build_acp_train_loader = acp_train_loader_builder()
            except CheckError as e:
                raise RuntimeError(str(e)) from None
            logger.info("ACP on: mix mode %s, caches %s", cfg.ACP.MIX_MODE, list(cfg.ACP.CACHE_DIRS))
            return build_acp_train_loader(cfg)
        return super().build_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, iteration=None):
        """``metrics.json`` goes to OUTPUT_DIR for the first test dataset (to ``inference/<name>/`` for others);
        detections to ``inference/<name>/lvis_instances_results.json``."""
        from detectron2.data import MetadataCatalog

        if not MetadataCatalog.get(dataset_name).get("json_file"):
            raise NotImplementedError(f"dataset {dataset_name!r} has no json_file in its metadata; only LVIS-format "
                                      "datasets are evaluated")
        det_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        primary = len(cfg.DATASETS.TEST) > 0 and dataset_name == cfg.DATASETS.TEST[0]
        metrics_dir = output_folder or (cfg.OUTPUT_DIR if primary else det_dir)
        return build_lvis_evaluator(cfg, dataset_name, metrics_dir, iteration=iteration, detections_dir=det_dir)

    def build_hooks(self):
        """detectron2's hooks, with the evaluation hook passing the number of finished iterations to the
        evaluators (it goes into ``metrics.json``)."""
        from detectron2.engine import hooks

        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_and_save_results)
                if isinstance(h, hooks.EvalHook) else h for h in super().build_hooks()]

    @classmethod
    def build_evaluators(cls, cfg, iteration: int | None) -> list:
        """One evaluator per ``DATASETS.TEST`` entry; a dataset without a json gets none (inference only)."""
        from detectron2.evaluation import DatasetEvaluators

        out = []
        for name in cfg.DATASETS.TEST:
            try:
                out.append(cls.build_evaluator(cfg, name, iteration=iteration))
            except NotImplementedError as e:
                logger.warning("%s", e)
                out.append(DatasetEvaluators([]))
        return out

    def _test_and_save_results(self):
        done = min(self.iter + 1, self.max_iter)  # after_step: iter is the finished index; after_train: max_iter
        self._last_eval_results = self.test(self.cfg, self.model, self.build_evaluators(self.cfg, iteration=done))
        return self._last_eval_results

    def build_writers(self):
        writers = [CommonMetricPrinter(self.max_iter),
                   JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, TRAIN_METRICS_FILE))]
        if importlib.util.find_spec("tensorboard") is not None:
            from detectron2.utils.events import TensorboardXWriter

            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        return writers


def setup(args):
    """Per process: config, dataset registration, detectron2's logging/seeding/config dump."""
    cfg = build_cfg(args)
    lvis_format.register_from_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acp_data", abbrev_name="acp")
    return cfg


def main(args):
    cfg = setup(args)
    logger.info("Mask format: %s (INPUT.MASK_FORMAT)", cfg.INPUT.MASK_FORMAT)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        ckpt = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                    resume=args.resume)
        it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
        iteration = None if it is None else int(it) + 1  # the checkpoint stores the last finished iteration index
        return Trainer.test(cfg, model, Trainer.build_evaluators(cfg, iteration))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="NAME",
                        help="alias of --config-file; a bare file name is looked up in configs/")
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        run_checks(args)
    except CheckError as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        return 2
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except Exception as e:
        # acp_data's own error classes (ConfigError, DatasetFormatError, ACPLoaderError, ...) carry a complete
        # message naming the key, file or value at fault: show it as one line, not a traceback.
        if type(e).__module__.startswith("acp_data.") and not os.environ.get("ACP_DEBUG"):
            print(f"train_net.py: error: {e} (ACP_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
