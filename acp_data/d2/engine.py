"""Training plumbing of ``tools/train_net.py``, kept in the library as detectron2 keeps ``DefaultTrainer`` in
``engine/defaults.py``: the ``Trainer`` (ACP train loader, LVIS evaluation writing ``metrics.json``, training
scalars in ``train_metrics.json``), the per-process ``setup`` and the argument parser."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger

from . import lvis_format
from .checks import build_cfg
from .evaluation import build_lvis_evaluator

logger = logging.getLogger("acp_data.train_net")

TRAIN_METRICS_FILE = "train_metrics.json"


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the ACP train loader, LVIS evaluation that writes ``metrics.json``, and
    training scalars in ``train_metrics.json`` (``metrics.json`` is the evaluation contract of docs/design.md
    "Evaluation (contract)")."""

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.ACP.ENABLED:
            from .loader import build_acp_train_loader

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


def setup(args: argparse.Namespace) -> CfgNode:
    """Per process: config, dataset registration, detectron2's logging/seeding/config dump."""
    cfg = build_cfg(args)
    lvis_format.register_from_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acp_data", abbrev_name="acp")
    return cfg


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--config NAME`` (a bare file name is looked up in configs/)."""
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="NAME",
                        help="alias of --config-file; a bare file name is looked up in configs/")
    return parser
