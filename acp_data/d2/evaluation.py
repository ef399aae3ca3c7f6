"""LVIS evaluation on any dataset with a ``json_file``, through either backend, and ``metrics.json``.

AP, AP50, AP75, APs, APm, APl and APr/APc/APf use the ``frequency`` of the ground-truth json's own categories (taken
from its train image counts when the json has none). ``ACP.EVAL_BACKEND`` / ``--backend`` picks ``hotcoco`` (the
default, fast) or ``lvis`` (lvis-api, the reference); both give the same numbers (``eval_backends``). Values are in
percent; a metric lvis-api cannot compute (-1, e.g. an empty frequency group) is ``null`` in ``metrics.json`` and NaN
in what an evaluator returns to detectron2 (whose hooks need floats). No pickle is written: detections go to
``lvis_instances_results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..fsio import atomic_write_text
from .eval_backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    LVIS_MAX_DETS,
    METRICS,
    TASKS,
    EvaluationError,
    GroundTruth,
    TaskResult,
    evaluate_tasks,
    resolve_backend,
)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "LVIS_MAX_DETS", "METRICS", "TASKS", "EvaluationError", "GroundTruth",
           "Evaluation", "evaluate_lvis", "evaluate_lvis_results", "per_category_ap", "load_lvis_gt",
           "format_metrics_table", "config_sha", "write_metrics", "LVISMetricsEvaluator", "build_lvis_evaluator",
           "cli_main"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RESULTS_FILE = "lvis_instances_results.json"


def load_lvis_gt(gt: str | os.PathLike | dict[str, Any] | Any):
    """An ``lvis.LVIS`` for a json path or a loaded dict, normalized as ``GroundTruth.load`` does."""
    return GroundTruth.load(gt).lvis()


def _to_percent(v: float) -> float | None:
    v = float(v)
    return None if v < 0 or math.isnan(v) else v * 100.0


@dataclass
class Evaluation:
    """What one evaluation gives: ``results`` ``{task: {metric: percent or None}}``, the backend that ran, the
    number of detections and each task's ``TaskResult`` (precision arrays for per-category numbers)."""

    results: dict[str, dict[str, float | None]]
    backend: str
    num_dets: int
    tasks: dict[str, TaskResult] = field(default_factory=dict)


def evaluate_lvis(
    gt_json: str | os.PathLike | dict[str, Any] | GroundTruth | Any,
    results: str | os.PathLike | Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    max_dets: int = LVIS_MAX_DETS,
    backend: str | None = None,
    allow_empty: bool = True,
) -> Evaluation:
    """Evaluate LVIS-format detections on ``gt_json`` through ``backend`` (default: hotcoco).

    ``results`` is a list of ``{"image_id", "category_id" (json id), "score", "bbox" (XYWH), "segmentation" (RLE)}``
    or a path to such a json. ``tasks`` defaults to bbox, plus segm when any result has a segmentation. As in
    detectron2, at most ``max_dets`` detections per image are kept and segm is evaluated without the boxes. No
    detections at all: every AP is 0 with a warning, or an ``EvaluationError`` when ``allow_empty`` is off.
    """
    gt = GroundTruth.load(gt_json)
    backend = resolve_backend(backend)
    runs, n = evaluate_tasks(gt, results, tasks, max_dets, backend, allow_empty=allow_empty)
    if n == 0:
        logger.warning("no detections to evaluate on %s: every AP is 0", gt.source)
    out: dict[str, dict[str, float | None]] = OrderedDict()
    for r in runs:
        out[r.task] = OrderedDict((m, _to_percent(r.stats[m])) for m in METRICS)
    return Evaluation(out, backend, n, {r.task: r for r in runs})


def evaluate_lvis_results(
    gt_json: str | os.PathLike | dict[str, Any] | Any,
    results: str | os.PathLike | Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    max_dets: int = LVIS_MAX_DETS,
    backend: str | None = None,
) -> dict[str, dict[str, float | None]]:
    """The numbers of ``evaluate_lvis``: ``{task: {metric: percent or None}}``."""
    return evaluate_lvis(gt_json, results, tasks, max_dets, backend).results


def per_category_ap(task: TaskResult) -> dict[int, float | None]:
    """AP (percent, all areas) of every category of one task, from its precision array; ``None`` where the
    category has no ground truth."""
    out: dict[int, float | None] = {}
    for k, cid in enumerate(task.cat_ids):
        p = task.precision[:, :, k, 0]
        p = p[p > -1]
        out[int(cid)] = 100.0 * float(p.mean()) if p.size else None
    return out


# ----- reporting ---------------------------------------------------------------------------------------------------
def format_metrics_table(task: str, metrics: dict[str, float | None]) -> str:
    """One table row of the nine metrics (``-`` where there is no value)."""
    from tabulate import tabulate

    row = ["-" if metrics.get(m) is None else f"{metrics[m]:.2f}" for m in METRICS]
    return f"{task}:\n" + tabulate([row], headers=list(METRICS), tablefmt="pipe", stralign="right")


def config_sha(cfg) -> str:
    """Short sha256 of the config as run, without OUTPUT_DIR and ACP.EVAL_BACKEND (where a run is written and which
    backend evaluates it change neither the model nor the numbers; configs from before that key hash as before)."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = ""
    if "ACP" in c:
        c.ACP.pop("EVAL_BACKEND", None)
    return hashlib.sha256(c.dump().encode()).hexdigest()[:16]


def write_metrics(
    output_dir: str | os.PathLike,
    results: dict[str, dict[str, float | None]],
    dataset: str,
    iteration: int | None = None,
    config_sha: str | None = None,
    eval_backend: str | None = None,
    synthetic_set: str | None = None,
) -> str:
    """Write ``metrics.json`` (docs/design.md "Evaluation (contract)") into ``output_dir`` atomically; return its path.

    Keys ``bbox`` and ``segm`` (``null`` for a task not evaluated), ``dataset``, ``iter`` (training iterations done,
    ``null`` if unknown), ``config_sha``, and ``eval_backend`` (the backend that computed the numbers) and
    ``synthetic_set`` (the sha of an ACP run's ``acp_samples.npz``) when given; metric values in percent, ``null``
    where lvis-api gives -1.
    """
    doc: dict[str, Any] = {}
    for task in TASKS:
        m = results.get(task)
        doc[task] = None if m is None else {k: _json_number(m.get(k)) for k in METRICS}
    doc.update({"dataset": dataset, "iter": None if iteration is None else int(iteration), "config_sha": config_sha})
    if eval_backend is not None:
        doc["eval_backend"] = eval_backend
    if synthetic_set is not None:
        doc["synthetic_set"] = synthetic_set
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
    ``acp-data eval`` import no torch) running the LVIS evaluation on a dataset with ``json_file`` metadata.

    Works like detectron2's ``LVISEvaluator`` (gathers predictions from all ranks, maps contiguous ids back to json
    ids, 300 detections per image, segm without boxes) but writes detections as json instead of a pickled ``.pth``,
    uses the dataset's own frequencies, runs through ``backend`` (hotcoco or lvis-api, the same numbers), logs the
    per-category AP table when ``per_category`` is on, and writes ``metrics.json`` into ``metrics_dir``.
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
        backend: str | None = None,
        per_category: bool = False,
        synthetic_set: str | None = None,
    ) -> None:
        from detectron2.data import MetadataCatalog

        self._dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name)
        json_file = meta.get("json_file")
        if not json_file:
            raise EvaluationError(f"dataset {dataset_name!r} has no json_file in its metadata; LVIS evaluation needs "
                                  "the ground-truth json (register it with ACP.REGISTER_LVIS)")
        self._backend = resolve_backend(backend)
        self._gt = GroundTruth.load(json_file)
        self._do_evaluation = self._gt.has_annotations()
        mapping = meta.get("thing_dataset_id_to_contiguous_id")
        self._contiguous_to_json = ({v: k for k, v in mapping.items()} if mapping
                                    else {i: i + 1 for i in range(len(meta.get("thing_classes", [])))})
        self._tasks = tuple(tasks)
        self._output_dir = output_dir
        self._metrics_dir = metrics_dir
        self._iteration = iteration
        self._config_sha = config_sha
        self._synthetic_set = synthetic_set
        self._max_dets = max_dets
        self._distributed = distributed
        self._per_category = per_category
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
        ev = evaluate_lvis(self._gt, dets, tasks=self._tasks, max_dets=self._max_dets, backend=self._backend)
        for task, m in ev.results.items():
            logger.info("LVIS evaluation (%s) of %s on %s (%d images, %d detections):\n%s", ev.backend, task,
                        self._dataset_name, len(predictions), len(dets), format_metrics_table(task, m))
            if self._per_category:
                logger.info("Per-category %s AP on %s:\n%s", task, self._dataset_name,
                            format_per_category_table(self._gt, per_category_ap(ev.tasks[task])))
        if self._metrics_dir:
            path = write_metrics(self._metrics_dir, ev.results, self._dataset_name, self._iteration,
                                 self._config_sha, eval_backend=ev.backend, synthetic_set=self._synthetic_set)
            logger.info("Wrote %s", path)
        # detectron2's hooks need floats: None -> NaN.
        return OrderedDict((t, {k: (math.nan if v is None else v) for k, v in m.items()})
                           for t, m in ev.results.items())


def format_per_category_table(gt: GroundTruth, ap: dict[int, float | None], columns: int = 3) -> str:
    """detectron2's per-category AP table: (category, frequency, AP) in ``columns`` column groups."""
    from tabulate import tabulate

    cats = {int(c["id"]): c for c in gt.dataset["categories"]}
    cells = [(cats[cid]["name"], cats[cid].get("frequency", ""), "-" if v is None else f"{v:.3f}")
             for cid, v in sorted(ap.items())]
    flat = list(itertools.chain(*cells))
    rows = itertools.zip_longest(*[flat[i::3 * columns] for i in range(3 * columns)])
    return tabulate(list(rows), headers=["category", "freq", "AP"] * columns, tablefmt="pipe", numalign="left")


def build_lvis_evaluator(cfg, dataset_name: str, output_dir: str, iteration: int | None = None,
                         detections_dir: str | None = None) -> LVISMetricsEvaluator:
    """The training-time evaluator: tasks from ``MODEL.MASK_ON``; backend from ``ACP.EVAL_BACKEND``;
    ``metrics.json`` (with the config sha, ``iteration``, the number of finished training iterations, ``null``
    if not given, and for an ACP run the sha of its synthetic set from ``OUTPUT_DIR/acp_run.json``) into
    ``output_dir``; detections into ``detections_dir`` (default ``output_dir``)."""
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    acp = cfg.get("ACP", None)
    backend = acp.get("EVAL_BACKEND", None) if acp is not None else None
    return LVISMetricsEvaluator(
        dataset_name, tasks=tasks, output_dir=detections_dir or output_dir, metrics_dir=output_dir,
        iteration=iteration, config_sha=config_sha(cfg), backend=backend,
        synthetic_set=_synthetic_set_sha(cfg) if acp is not None and acp.get("ENABLED", False) else None,
    )


def _synthetic_set_sha(cfg) -> str | None:
    """The ``synthetic_set.sha`` the ACP loader recorded in ``OUTPUT_DIR/acp_run.json`` (None without one)."""
    from .runfile import RUN_FILE

    try:
        with open(os.path.join(cfg.OUTPUT_DIR, RUN_FILE)) as f:
            sha = (json.load(f).get("synthetic_set") or {}).get("sha")
    except (OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) else None


# ----- CLI ---------------------------------------------------------------------------------------------------------
def cli_main(argv: list[str]) -> int:
    """``acp-data eval --gt FILE --dt FILE --out DIR``: evaluate a saved LVIS results file, write metrics.json."""
    p = argparse.ArgumentParser(prog="acp-data eval", description="Evaluate a saved LVIS results file (AP, AP50, "
                                "AP75, APs, APm, APl, APr, APc, APf per task) and write OUT/metrics.json.")
    p.add_argument("--gt", required=True, help="LVIS-format ground-truth json (with neg_category_ids)")
    p.add_argument("--dt", required=True, help="LVIS results json: a list of detections with json category ids")
    p.add_argument("--out", required=True, help="directory for metrics.json")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="default: bbox, plus segm if detections have masks")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help=f"evaluation backend (default {DEFAULT_BACKEND}; lvis = lvis-api, the reference: same numbers)")
    p.add_argument("--max-dets", type=int, default=LVIS_MAX_DETS, help="detections kept per image (LVIS: 300)")
    p.add_argument("--dataset", help="dataset name recorded in metrics.json (default: the --gt path)")
    p.add_argument("--iter", type=int, help="training iteration recorded in metrics.json")
    p.add_argument("--config-sha", help="config sha recorded in metrics.json")
    p.add_argument("--per-category", action="store_true", help="also print the AP of every category")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..cli import UsageError, check_output_path, fail

    try:
        check_output_path(args.out, "dir", "--out")  # before the evaluation, not after it
        ev = evaluate_lvis(args.gt, args.dt, tasks=args.tasks, max_dets=args.max_dets, backend=args.backend,
                           allow_empty=False)
    except (EvaluationError, UsageError) as e:
        return fail("acp-data eval", e)
    for task, m in ev.results.items():
        print(format_metrics_table(task, m) + "\n")
        if args.per_category:
            print(format_per_category_table(GroundTruth.load(args.gt), per_category_ap(ev.tasks[task])) + "\n")
    path = write_metrics(args.out, ev.results, args.dataset or os.fspath(args.gt), args.iter, args.config_sha,
                         eval_backend=ev.backend)
    print(f"wrote {path} ({ev.backend})")
    return 0
