"""Training plumbing of ``tools/train_net.py``, kept in the library as detectron2 keeps ``DefaultTrainer`` in
``engine/defaults.py``: the ``Trainer`` (ACP train loader, LVIS evaluation writing ``metrics.json``, training
scalars in ``train_metrics.json``, ``train_status.json``, DDP on CPU), the per-process ``setup`` and the argument
parser."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger

from . import lvis_format
from .checks import build_cfg
from .evaluation import METRICS_FILE, build_lvis_evaluator
from .runstatus import COMPLETE, FAILED, RUNNING, write_status

logger = logging.getLogger("acp_data.train_net")

TRAIN_METRICS_FILE = "train_metrics.json"


@contextlib.contextmanager
def _ddp_on_cpu(cfg: CfgNode) -> Iterator[None]:
    """While ``DefaultTrainer.__init__`` runs: wrap a CPU model in DDP without ``device_ids`` (detectron2's
    ``create_ddp_model`` passes ``[local rank]``, which DDP refuses for a CPU module). Nothing changes on GPU or in
    one process."""
    from detectron2.engine import defaults

    if comm.get_world_size() == 1 or not str(cfg.MODEL.DEVICE).startswith("cpu"):
        yield
        return
    original = defaults.create_ddp_model
    defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def _buffers_from_rank0(model) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics): detectron2 wraps the model in DDP with
    ``broadcast_buffers=False``, so each rank's statistics follow its own batches, and ranks evaluating their share
    of the test set with them would not evaluate the model the checkpoint (written by rank 0) holds."""
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    module = getattr(model, "module", model)
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


class FinishedEvalHook(hooks.EvalHook):
    """detectron2's ``EvalHook``, but the evaluation after training runs only when every iteration finished
    (``TrainerBase.train`` sets ``iter = max_iter`` then): detectron2's own test, ``iter + 1 >= max_iter``, also
    passes when the last iteration raised, and would evaluate a model that never finished training."""

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            self._eval_after_train = False
        super().after_train()


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the ACP train loader, LVIS evaluation that writes ``metrics.json``, and
    training scalars in ``train_metrics.json`` (``metrics.json`` is the evaluation contract of docs/design.md
    "Evaluation (contract)"). A training that raises is not evaluated: ``train_status.json`` says ``failed`` and
    no ``metrics.json`` stays at the contract path. Several processes on CPU (gloo) work as on GPUs."""

    def __init__(self, cfg: CfgNode):
        with _ddp_on_cpu(cfg):
            super().__init__(cfg)

    def train(self):
        """detectron2's training loop, with ``train_status.json`` written by rank 0 at the start and the end."""
        out = self.cfg.OUTPUT_DIR
        main = comm.is_main_process()
        if main:
            write_status(out, RUNNING, iter_done=self.start_iter, max_iter=self.max_iter, start_iter=self.start_iter)
        try:
            result = super().train()
        except BaseException as e:
            if main:
                self._mark_failed(f"{type(e).__name__}: {e}")
            raise
        if main:
            write_status(out, COMPLETE, iter_done=self.max_iter, max_iter=self.max_iter, start_iter=self.start_iter)
        return result

    def _mark_failed(self, error: str) -> None:
        """``train_status.json`` says ``failed``; a ``metrics.json`` left at the contract path (by an evaluation
        during training, or an earlier run in this directory) moves to ``metrics.before_failure.json``."""
        done = max(int(self.iter), self.start_iter)  # the iteration that raised had not finished
        write_status(self.cfg.OUTPUT_DIR, FAILED, iter_done=done, max_iter=self.max_iter,
                     start_iter=self.start_iter, error=error[:2000])
        metrics = os.path.join(self.cfg.OUTPUT_DIR, METRICS_FILE)
        if os.path.isfile(metrics):
            os.replace(metrics, os.path.join(self.cfg.OUTPUT_DIR, "metrics.before_failure.json"))
        logger.error("training failed at iteration %d of %d (%s): not evaluated; %s says so", done, self.max_iter,
                     error, os.path.join(self.cfg.OUTPUT_DIR, "train_status.json"))

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
        evaluators (it goes into ``metrics.json``) and evaluating after training only when training finished."""
        return [FinishedEvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_and_save_results)
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
        _buffers_from_rank0(self.model)
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
    if str(cfg.MODEL.DEVICE).startswith("cpu") and comm.get_local_size() > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch  # the processes of a CPU run share the machine's cores

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acp_data", abbrev_name="acp")
    return cfg


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--config NAME`` (a bare file name is looked up in configs/)."""
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="NAME",
                        help="alias of --config-file; a bare file name is looked up in configs/")
    return parser
