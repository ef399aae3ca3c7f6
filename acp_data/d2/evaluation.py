"""LVIS evaluation (lvis-api, as detectron2 runs it) on any dataset with a ``json_file``, and ``metrics.json``.

AP, AP50, AP75, APs, APm, APl and APr/APc/APf use the ``frequency`` of the ground-truth json's own categories (taken
from its train image counts when the json has none). Values are in percent; a metric lvis-api cannot compute (-1,
e.g. an empty frequency group) is ``null`` in ``metrics.json`` and NaN in what an evaluator returns to detectron2
(whose hooks need floats). No pickle is written: detections go to ``lvis_instances_results.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..categories import CategoryError, CategoryTable
from ..fsio import atomic_write_text

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
TASKS = ("bbox", "segm")
LVIS_MAX_DETS = 300
METRICS_FILE = "metrics.json"
RESULTS_FILE = "lvis_instances_results.json"


class EvaluationError(ValueError):
    """Ground truth or detections that cannot be evaluated; the message names the file or entry at fault."""


def _numpy_float_shim() -> None:
    """lvis 0.5.3 calls ``np.float``, removed in numpy 2."""
    import numpy as np

    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


# ----- ground truth and detections ---------------------------------------------------------------------------------
def load_lvis_gt(gt: str | os.PathLike | dict[str, Any] | Any):
    """An ``lvis.LVIS`` for a json path or a loaded dict (an existing ``LVIS`` object is used as it is).

    Categories without ``frequency`` get it from their train image counts (CategoryTable's rule); images without
    ``neg_category_ids`` / ``not_exhaustive_category_ids`` get empty lists (then false positives on categories absent
    from an image are never counted: a validation set should list its verified negatives).
    """
    from lvis import LVIS

    if isinstance(gt, LVIS):
        return gt
    source = "ground truth"
    if not isinstance(gt, dict):
        source = os.fspath(gt)
        try:
            with open(source) as f:
                gt = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvaluationError(f"cannot read ground truth {source!r}: {e}") from e
    else:
        gt = copy.deepcopy(gt)
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise EvaluationError(f"{source} has no {key!r}; is it an LVIS-format json?")
    if any("frequency" not in c for c in gt["categories"]):
        try:
            table = CategoryTable.from_lvis_json(gt)
        except CategoryError as e:
            raise EvaluationError(f"{source}: {e}") from e
        freq = {c.id: c.frequency for c in table}
        for c in gt["categories"]:
            c.setdefault("frequency", freq[int(c["id"])])
    missing_neg = 0
    for img in gt["images"]:
        if "neg_category_ids" not in img:
            missing_neg += 1
        img.setdefault("neg_category_ids", [])
        img.setdefault("not_exhaustive_category_ids", [])
    if missing_neg:
        logger.warning("%s: %d of %d images list no neg_category_ids; false positives on categories absent from "
                       "those images are not counted", source, missing_neg, len(gt["images"]))
    api = LVIS.__new__(LVIS)
    api.logger = logging.getLogger("lvis.lvis")
    api.dataset = gt
    api._create_index()
    return api


def _load_results(results: str | os.PathLike | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(results, (str, os.PathLike)):
        try:
            with open(results) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvaluationError(f"cannot read detections {os.fspath(results)!r}: {e}") from e
        if not isinstance(results, list):
            raise EvaluationError("detections file must hold a json list of LVIS results")
    if not all(isinstance(r, dict) for r in results):
        raise EvaluationError("detections must be a list of dicts (LVIS results format)")
    return [dict(r) for r in results]


def _check_results(lvis_gt, results: list[dict[str, Any]]) -> None:
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score") if k not in r]
        if missing:
            raise EvaluationError(f"detection #{i} has no {', '.join(missing)} (keys: {sorted(r)})")
    img_ids, cat_ids = set(lvis_gt.get_img_ids()), set(lvis_gt.get_cat_ids())
    bad_img = sorted({r["image_id"] for r in results} - img_ids)
    if bad_img:
        raise EvaluationError(f"detections refer to {len(bad_img)} image ids not in the ground truth, e.g. "
                              f"{bad_img[:5]}")
    bad_cat = sorted({r["category_id"] for r in results} - cat_ids)
    if bad_cat:
        raise EvaluationError(f"detections use category ids not in the ground truth: {bad_cat[:10]} (ground truth "
                              f"has {min(cat_ids)}..{max(cat_ids)}; are contiguous ids off by one?)")


def _empty_results(lvis_gt):
    """An ``LVISResults`` holding no detection (lvis-api's constructor indexes the first result)."""
    from lvis import LVISResults

    dt = LVISResults.__new__(LVISResults)
    dt.logger = logging.getLogger("lvis.results")
    dt.dataset = copy.deepcopy(lvis_gt.dataset)
    dt.dataset["annotations"] = []
    dt._create_index()
    return dt


@contextmanager
def _quiet_lvis() -> Iterator[None]:
    """lvis-api warns "Assuming user provided the results in correct format" on every in-memory result list."""
    lg = logging.getLogger("lvis.results")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _to_percent(v: float) -> float | None:
    v = float(v)
    return None if v < 0 or math.isnan(v) else v * 100.0


def run_lvis_eval(lvis_gt: Any, dets: list[dict[str, Any]], task: str, max_dets: int = LVIS_MAX_DETS):
    """One lvis-api evaluation of checked detections (``_check_results``) on an ``LVIS`` ground truth; returns the
    ``LVISEval`` after ``run()`` (its ``eval["precision"]`` holds per-category curves). As in detectron2, segm drops
    the boxes so APs/APm/APl use mask areas, and at most ``max_dets`` per image are kept."""
    from lvis import LVISEval, LVISResults

    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    task_dets = copy.deepcopy(dets)
    if task == "segm":
        if any("segmentation" not in d for d in task_dets):
            raise EvaluationError("segm evaluation needs a 'segmentation' (RLE) in every detection")
        for d in task_dets:
            d.pop("bbox", None)
    elif any("bbox" not in d for d in task_dets):
        raise EvaluationError("bbox evaluation needs a 'bbox' in every detection")
    with _quiet_lvis():
        dt = LVISResults(lvis_gt, task_dets, max_dets=max_dets) if task_dets else _empty_results(lvis_gt)
    ev = LVISEval(lvis_gt, dt, task)
    ev.params.max_dets = max_dets
    ev.run()
    return ev


def load_checked(gt_json: str | os.PathLike | dict[str, Any] | Any,
                 results: str | os.PathLike | Sequence[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The ground truth as an ``LVIS`` and the detections, checked against it (ids, required keys)."""
    _numpy_float_shim()
    lvis_gt = load_lvis_gt(gt_json)
    dets = _load_results(results)
    _check_results(lvis_gt, dets)
    return lvis_gt, dets


def evaluate_lvis_results(
    gt_json: str | os.PathLike | dict[str, Any] | Any,
    results: str | os.PathLike | Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    max_dets: int = LVIS_MAX_DETS,
) -> dict[str, dict[str, float | None]]:
    """lvis-api's numbers for LVIS-format detections: ``{task: {metric: percent or None}}``.

    ``results`` is a list of ``{"image_id", "category_id" (json id), "score", "bbox" (XYWH), "segmentation" (RLE)}``
    or a path to such a json. ``tasks`` defaults to bbox, plus segm when any result has a segmentation. Each task
    runs through ``run_lvis_eval``.
    """
    lvis_gt, dets = load_checked(gt_json, results)
    if tasks is None:
        tasks = ("bbox", "segm") if any("segmentation" in d for d in dets) else ("bbox",)
    out: dict[str, dict[str, float | None]] = OrderedDict()
    for task in tasks:
        res = run_lvis_eval(lvis_gt, dets, task, max_dets).get_results()
        out[task] = OrderedDict((m, _to_percent(res[m])) for m in METRICS)
    return out


# ----- reporting ---------------------------------------------------------------------------------------------------
def format_metrics_table(task: str, metrics: dict[str, float | None]) -> str:
    """One table row of the nine metrics (``-`` where there is no value)."""
    from tabulate import tabulate

    row = ["-" if metrics.get(m) is None else f"{metrics[m]:.2f}" for m in METRICS]
    return f"{task}:\n" + tabulate([row], headers=list(METRICS), tablefmt="pipe", stralign="right")


def config_sha(cfg) -> str:
    """Short sha256 of the config as run, without OUTPUT_DIR (where a run is written does not change it)."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = ""
    return hashlib.sha256(c.dump().encode()).hexdigest()[:16]


def write_metrics(
    output_dir: str | os.PathLike,
    results: dict[str, dict[str, float | None]],
    dataset: str,
    iteration: int | None = None,
    config_sha: str | None = None,
) -> str:
    """Write design.md's ``metrics.json`` into ``output_dir`` (atomically) and return its path.

    Keys ``bbox`` and ``segm`` (``null`` for a task not evaluated), ``dataset``, ``iter`` (training iterations done,
    ``null`` if unknown), ``config_sha``; metric values in percent, ``null`` where lvis-api gives -1.
    """
    doc: dict[str, Any] = {}
    for task in TASKS:
        m = results.get(task)
        doc[task] = None if m is None else {k: _json_number(m.get(k)) for k in METRICS}
    doc.update({"dataset": dataset, "iter": None if iteration is None else int(iteration), "config_sha": config_sha})
    path = os.path.join(os.fspath(output_dir), METRICS_FILE)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def _json_number(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else round(v, 4)


# ----- detectron2 evaluator ----------------------------------------------------------------------------------------
class LVISMetricsEvaluator:
    """A detectron2 ``DatasetEvaluator`` (duck-typed: ``reset``/``process``/``evaluate``, so that this module and
    ``acp-data eval`` import no torch) running lvis-api on a dataset with ``json_file`` metadata.

    Works like detectron2's ``LVISEvaluator`` (gathers predictions from all ranks, maps contiguous ids back to json
    ids, 300 detections per image) but writes detections as json instead of a pickled ``.pth``, uses the dataset's
    own frequencies, and writes ``metrics.json`` into ``metrics_dir``.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] = TASKS,
        output_dir: str | None = None,
        metrics_dir: str | None = None,
        iteration: int | None = None,
        config_sha: str | None = None,
        max_dets: int = LVIS_MAX_DETS,
        distributed: bool = True,
    ) -> None:
        from detectron2.data import MetadataCatalog

        self._dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name)
        json_file = meta.get("json_file")
        if not json_file:
            raise EvaluationError(f"dataset {dataset_name!r} has no json_file in its metadata; LVIS evaluation needs "
                                  "the ground-truth json (register it with ACP.REGISTER_LVIS)")
        self._lvis_gt = load_lvis_gt(json_file)
        self._do_evaluation = len(self._lvis_gt.get_ann_ids()) > 0
        mapping = meta.get("thing_dataset_id_to_contiguous_id")
        self._contiguous_to_json = ({v: k for k, v in mapping.items()} if mapping
                                    else {i: i + 1 for i in range(len(meta.get("thing_classes", [])))})
        self._tasks = tuple(tasks)
        self._output_dir = output_dir
        self._metrics_dir = metrics_dir
        self._iteration = iteration
        self._config_sha = config_sha
        self._max_dets = max_dets
        self._distributed = distributed
        self._predictions: list[dict[str, Any]] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs, outputs) -> None:
        import torch
        from detectron2.evaluation.coco_evaluation import instances_to_coco_json

        for inp, out in zip(inputs, outputs):
            if "instances" in out:
                inst = out["instances"].to(torch.device("cpu"))
                self._predictions.append({"image_id": inp["image_id"],
                                          "instances": instances_to_coco_json(inst, inp["image_id"])})

    def evaluate(self) -> dict[str, dict[str, float]]:
        import detectron2.utils.comm as comm

        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        dets = list(itertools.chain(*[p["instances"] for p in predictions]))
        for d in dets:
            d["category_id"] = self._contiguous_to_json[d["category_id"]]
        if self._output_dir:
            path = os.path.join(self._output_dir, RESULTS_FILE)
            logger.info("Saving %d detections to %s", len(dets), path)
            atomic_write_text(path, json.dumps(dets))
        if not self._do_evaluation:
            logger.info("%s has no annotations; detections saved, nothing evaluated", self._dataset_name)
            return {}
        if not predictions:
            logger.warning("[LVISMetricsEvaluator] received no predictions for %s", self._dataset_name)
        results = evaluate_lvis_results(self._lvis_gt, dets, tasks=self._tasks, max_dets=self._max_dets)
        for task, m in results.items():
            logger.info("LVIS evaluation of %s on %s (%d images, %d detections):\n%s", task, self._dataset_name,
                        len(predictions), len(dets), format_metrics_table(task, m))
        if self._metrics_dir:
            path = write_metrics(self._metrics_dir, results, self._dataset_name, self._iteration, self._config_sha)
            logger.info("Wrote %s", path)
        # detectron2's hooks need floats: None -> NaN.
        return OrderedDict((t, {k: (math.nan if v is None else v) for k, v in m.items()}) for t, m in results.items())


def build_lvis_evaluator(cfg, dataset_name: str, output_dir: str, iteration: int | None = None,
                         detections_dir: str | None = None) -> LVISMetricsEvaluator:
    """The training-time evaluator: tasks from ``MODEL.MASK_ON``; ``metrics.json`` (with the config sha and
    ``iteration``, the number of finished training iterations, ``null`` if not given) into ``output_dir``;
    detections into ``detections_dir`` (default ``output_dir``)."""
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    return LVISMetricsEvaluator(
        dataset_name, tasks=tasks, output_dir=detections_dir or output_dir, metrics_dir=output_dir,
        iteration=iteration, config_sha=config_sha(cfg),
    )


# ----- CLI ---------------------------------------------------------------------------------------------------------
def cli_main(argv: list[str]) -> int:
    """``acp-data eval --gt FILE --dt FILE --out DIR``: evaluate a saved LVIS results file, write metrics.json."""
    p = argparse.ArgumentParser(prog="acp-data eval", description="Evaluate a saved LVIS results file with lvis-api "
                                "(AP, AP50, AP75, APs, APm, APl, APr, APc, APf per task) and write OUT/metrics.json.")
    p.add_argument("--gt", required=True, help="LVIS-format ground-truth json (with neg_category_ids)")
    p.add_argument("--dt", required=True, help="LVIS results json: a list of detections with json category ids")
    p.add_argument("--out", required=True, help="directory for metrics.json")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="default: bbox, plus segm if detections have masks")
    p.add_argument("--max-dets", type=int, default=LVIS_MAX_DETS, help="detections kept per image (LVIS: 300)")
    p.add_argument("--dataset", help="dataset name recorded in metrics.json (default: the --gt path)")
    p.add_argument("--iter", type=int, help="training iteration recorded in metrics.json")
    p.add_argument("--config-sha", help="config sha recorded in metrics.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = evaluate_lvis_results(args.gt, args.dt, tasks=args.tasks, max_dets=args.max_dets)
    except EvaluationError as e:
        print(f"acp-data eval: error: {e}", file=sys.stderr)
        return 2
    for task, m in results.items():
        print(format_metrics_table(task, m) + "\n")
    path = write_metrics(args.out, results, args.dataset or os.fspath(args.gt), args.iter, args.config_sha)
    print(f"wrote {path}")
    return 0
