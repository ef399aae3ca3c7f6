"""One LVIS evaluation task (bbox or segm) through a chosen backend, with the input checks both backends share.

``lvis`` is lvis-api, the reference. ``hotcoco`` (Rust, the default) gives lvis-api's numbers to the last bit once it
is fed the way lvis-api sees the data (docs/design.md "Evaluation (contract)"): zero-area ground truth and detections
are left out (lvis-api's ``get_ann_ids`` keeps ``area > 0`` only), segm areas are mask areas (detectron2 drops the
boxes), and at most ``max_dets`` detections per image are kept before that. A results *file* is parsed by hotcoco
itself; any sign of bad input there sends the file through the same Python checks as lvis-api's path, so both
backends raise the same ``EvaluationError`` for the same file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..categories import CategoryError, CategoryTable

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
TASKS = ("bbox", "segm")
LVIS_MAX_DETS = 300
BACKENDS = ("hotcoco", "lvis")
DEFAULT_BACKEND = "hotcoco"
# lvis-api's area ranges, with 0 replaced by the smallest positive double: a zero-area detection is then ignored
# (never a false positive), as lvis-api, which drops it, never counts it.
_HOTCOCO_AREA_RNG = [[5e-324, 1e10], [5e-324, 32.0 ** 2], [32.0 ** 2, 96.0 ** 2], [96.0 ** 2, 1e10]]


class EvaluationError(ValueError):
    """Ground truth or detections that cannot be evaluated; the message names the file or entry at fault."""


def _numpy_float_shim() -> None:
    """lvis 0.5.3 calls ``np.float``, removed in numpy 2."""
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


_fallback_logged = False


def resolve_backend(name: str | None) -> str:
    """``name`` checked against ``BACKENDS`` (``None``/empty: the default). Without hotcoco installed the default
    falls back to ``lvis`` with one log line."""
    global _fallback_logged
    name = (name or DEFAULT_BACKEND).strip().lower()
    if name not in BACKENDS:
        raise EvaluationError(f"unknown evaluation backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "hotcoco":
        try:
            import hotcoco  # noqa: F401
        except ImportError:
            if not _fallback_logged:
                logger.warning("hotcoco is not installed (pip install hotcoco); LVIS evaluation falls back to "
                               "lvis-api (same numbers, slower)")
                _fallback_logged = True
            return "lvis"
    return name


# ----- ground truth ------------------------------------------------------------------------------------------------
class GroundTruth:
    """An LVIS-format ground truth, normalized once, with each backend's index built on first use.

    Categories without ``frequency`` get it from their train image counts (CategoryTable's rule); images without
    ``neg_category_ids`` / ``not_exhaustive_category_ids`` get empty lists (then false positives on categories absent
    from an image are never counted: a validation set should list its verified negatives).
    """

    def __init__(self, dataset: dict[str, Any], source: str = "ground truth", lvis_api: Any = None) -> None:
        self.dataset = dataset
        self.source = source
        self._lvis = lvis_api
        self._hotcoco = None
        self.img_ids = {int(i["id"]) for i in dataset["images"]}
        self.cat_ids = {int(c["id"]) for c in dataset["categories"]}

    @classmethod
    def load(cls, gt: str | os.PathLike | dict[str, Any] | Any) -> GroundTruth:
        """From a json path, a loaded dict (copied, not changed) or an ``lvis.LVIS`` (used as it is)."""
        if isinstance(gt, GroundTruth):
            return gt
        if type(gt).__name__ == "LVIS" and hasattr(gt, "dataset") and hasattr(gt, "img_ann_map"):
            return cls(gt.dataset, "ground truth", lvis_api=gt)
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
        if not isinstance(gt, dict):
            raise EvaluationError(f"{source} is not a json object; is it an LVIS-format json?")
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
        return cls(gt, source)

    def has_annotations(self) -> bool:
        return len(self.dataset["annotations"]) > 0

    def lvis(self):
        """lvis-api's ``LVIS`` over the normalized dataset."""
        if self._lvis is None:
            _numpy_float_shim()
            from lvis import LVIS

            api = LVIS.__new__(LVIS)
            api.logger = logging.getLogger("lvis.lvis")
            api.dataset = self.dataset
            api._create_index()
            self._lvis = api
        return self._lvis

    def hotcoco(self):
        """hotcoco's ``COCO`` over the normalized dataset without zero-area annotations (lvis-api never sees them)."""
        if self._hotcoco is None:
            import hotcoco

            data = dict(self.dataset)
            data["annotations"] = [a for a in self.dataset["annotations"] if a.get("area", 0) > 0]
            self._hotcoco = hotcoco.COCO(data)
        return self._hotcoco


# ----- detections --------------------------------------------------------------------------------------------------
def load_results(results: str | os.PathLike | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Detections as a list of (shallow-copied) dicts, from a list or a json file."""
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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_results(gt: GroundTruth, results: list[dict[str, Any]], tasks: Sequence[str] = ()) -> None:
    """Every detection has ids, a finite score (and a finite 4-number box where it has one), ids known to ``gt`` and
    what each of ``tasks`` needs (bbox: a box; segm: an RLE mask). The first fault raises ``EvaluationError``."""
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score") if k not in r]
        if missing:
            raise EvaluationError(f"detection #{i} has no {', '.join(missing)} (keys: {sorted(r)})")
        if not _finite(r["score"]):
            raise EvaluationError(f"detection #{i} (image {r['image_id']}) has score {r['score']!r}; scores must be "
                                  "finite numbers")
        box = r.get("bbox")
        if box is not None and not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_finite, box))):
            raise EvaluationError(f"detection #{i} (image {r['image_id']}) has bbox {box!r}; expected 4 finite "
                                  "numbers [x, y, w, h]")
    bad_img = sorted({r["image_id"] for r in results} - gt.img_ids, key=repr)
    if bad_img:
        raise EvaluationError(f"detections refer to {len(bad_img)} image ids not in the ground truth, e.g. "
                              f"{bad_img[:5]}")
    bad_cat = sorted({r["category_id"] for r in results} - gt.cat_ids, key=repr)
    if bad_cat:
        raise EvaluationError(f"detections use category ids not in the ground truth: {bad_cat[:10]} (ground truth "
                              f"has {min(gt.cat_ids)}..{max(gt.cat_ids)}; are contiguous ids off by one?)")
    for task in tasks:
        if task not in TASKS:
            raise EvaluationError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if task == "segm" and not all(isinstance(r.get("segmentation"), dict) for r in results):
            raise EvaluationError("segm evaluation needs a 'segmentation' (RLE) in every detection")
        if task == "bbox" and any("bbox" not in r for r in results):
            raise EvaluationError("bbox evaluation needs a 'bbox' in every detection")


def default_tasks(results: list[dict[str, Any]]) -> tuple[str, ...]:
    """bbox, plus segm when any detection has a mask."""
    return ("bbox", "segm") if any("segmentation" in d for d in results) else ("bbox",)


# ----- one task ----------------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """One task's numbers: ``stats`` (the nine metrics as lvis-api gives them: 0..1, -1 where undefined) and the
    precision array ``(IoU thresholds, recall points, categories, area ranges)`` over ``cat_ids``."""

    task: str
    backend: str
    stats: dict[str, float]
    precision: np.ndarray
    cat_ids: list[int]


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


def _empty_lvis_results(lvis_gt):
    """An ``LVISResults`` holding no detection (lvis-api's constructor indexes the first result)."""
    from lvis import LVISResults

    dt = LVISResults.__new__(LVISResults)
    dt.logger = logging.getLogger("lvis.results")
    dt.dataset = copy.deepcopy(lvis_gt.dataset)
    dt.dataset["annotations"] = []
    dt._create_index()
    return dt


def lvis_task(gt: GroundTruth, dets: list[dict[str, Any]], task: str, max_dets: int = LVIS_MAX_DETS):
    """lvis-api on checked detections; returns the ``LVISEval`` after ``run()``. As in detectron2, segm drops the
    boxes (APs/APm/APl use mask areas)."""
    _numpy_float_shim()
    from lvis import LVISEval, LVISResults

    task_dets = copy.deepcopy(dets)
    if task == "segm":
        for d in task_dets:
            d.pop("bbox", None)
    lvis_gt = gt.lvis()
    with _quiet_lvis():
        dt = LVISResults(lvis_gt, task_dets, max_dets=max_dets) if task_dets else _empty_lvis_results(lvis_gt)
    ev = LVISEval(lvis_gt, dt, task)
    ev.params.max_dets = max_dets
    ev.run()
    return ev


def _lvis_result(ev, task: str) -> TaskResult:
    res = ev.get_results()
    return TaskResult(task, "lvis", {m: float(res[m]) for m in METRICS}, np.asarray(ev.eval["precision"]),
                      list(ev.params.cat_ids))


_RLE_COUNTS = re.compile(rb'"counts"\s*:\s*"([^"]*)"')
# hotcoco.mask.area checks the runs against h*w; the area (the sum of the odd runs) does not depend on the size, and
# pycocotools (lvis-api) checks nothing, so the areas are taken with a size no mask exceeds
_ANY_SIZE = [46340, 46340]


def _scan_keys(path: str, keys: Sequence[str], chunk: int = 1 << 24,
               rle: bool = False) -> tuple[dict[str, int], bool, list[bytes] | None]:
    """How often each ``"key"`` occurs in the file, and whether it starts with ``[`` (read in chunks: a results
    file can be gigabytes; no chunk is copied). With ``rle``, also every ``"counts"`` string in file order (JSON
    escapes decoded), or ``None`` where some ``"counts"`` is not such a string."""
    pats = {k: b'"%s"' % k.encode() for k in keys}
    counts = dict.fromkeys(keys, 0)
    tails = dict.fromkeys(keys, b"")
    first = b""
    rle_keys = _RleKeys() if rle else None
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if block and not first.strip():
                first = (first + block[:64]).lstrip()
            for k, pat in pats.items():
                m = len(pat) - 1  # a key split between two blocks lies in the last m bytes and the first m
                counts[k] += block.count(pat) + (tails[k] + block[:m]).count(pat)
                tails[k] = (tails[k] + block[-m:])[-m:]
            if rle_keys is not None:
                rle_keys.feed(block)
            if not block:
                break
    return counts, first[:1] == b"[", rle_keys.strings() if rle_keys is not None else None


class _RleKeys:
    """Every ``"counts": "..."`` string of a json text fed in blocks, without copying the blocks: each block from its
    first ``"counts"`` key to its last goes to the regex in place; the few bytes around a block boundary are joined."""

    KEY = b'"counts"'

    def __init__(self) -> None:
        self.found: list[bytes] = []
        self.carry = b""
        self.n_keys = 0
        self.ok = True

    def _scan(self, buf: bytes, lo: int = 0, hi: int | None = None) -> None:
        hi = len(buf) if hi is None else hi
        self.n_keys += buf.count(self.KEY, lo, hi)
        # backslash, an RLE character, is written "\\\\" in JSON; any other escape means these are not plain RLEs
        n_bs = buf.count(b"\\", lo, hi)
        if n_bs and n_bs != 2 * buf.count(b"\\\\", lo, hi):
            self.ok = False
        self.found += _RLE_COUNTS.findall(buf, lo, hi)

    def feed(self, block: bytes) -> None:
        if not self.ok:
            return
        if not block:  # end of file
            self._scan(self.carry)
            self.carry = b""
            return
        j = block.find(self.KEY, len(self.KEY))  # the first key wholly inside the block, past any split one
        if j < 0:  # no key starts here: hold the block (a key's string may go on), or scan all but a split key
            if len(self.carry) + len(block) <= 1 << 20:
                self.carry += block
            else:
                self._scan(self.carry + block[:-7])
                self.carry = block[-7:]
            return
        self._scan(self.carry + block[:j])
        cut = block.rfind(self.KEY)
        self._scan(block, j, cut)
        self.carry = block[cut:]

    def strings(self) -> list[bytes] | None:
        if not self.ok or len(self.found) != self.n_keys:
            return None
        return [c.replace(b"\\\\", b"\\") if b"\\" in c else c for c in self.found]


class HotcocoResults:
    """Detections loaded into hotcoco once (from a checked list, or parsed from the file in Rust) and capped per image
    the way lvis-api caps them; ``evaluate(task)`` runs one task on them. ``rle_counts``: each detection's RLE
    ``counts`` in results order (detection ``i`` is hotcoco's annotation ``i + 1``, as in lvis-api), for segm's mask
    areas without a round trip through hotcoco's annotation dicts."""

    def __init__(self, gt: GroundTruth, dt: Any, n: int, max_dets: int,
                 rle_counts: Sequence[bytes | str] | None = None) -> None:
        self.gt, self._dt, self.n, self.max_dets = gt, dt, n, max_dets
        self._rle_counts = rle_counts if rle_counts is not None and len(rle_counts) == n else None
        self._mask_areas = False

    @classmethod
    def from_list(cls, gt: GroundTruth, dets: list[dict[str, Any]], max_dets: int = LVIS_MAX_DETS) -> HotcocoResults:
        import hotcoco

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dt = hotcoco.LVISResults(gt.hotcoco(), list(dets), max_dets=max_dets) if dets else None
        counts = [d["segmentation"]["counts"] if isinstance(d.get("segmentation"), dict) else None for d in dets]
        ok = all(isinstance(c, (bytes, str)) for c in counts)
        return cls(gt, dt, len(dets), max_dets, counts if ok else None)

    @classmethod
    def from_file(cls, gt: GroundTruth, path: str | os.PathLike, tasks: Sequence[str] | None,
                  max_dets: int = LVIS_MAX_DETS) -> tuple[HotcocoResults, tuple[str, ...]]:
        """Parse ``path`` with hotcoco; on any sign of input lvis-api's path would reject (a parse error, ids not in
        the ground truth, a key missing from some detection), run those checks on the file so the same error is
        raised. Returns the results and the tasks (default: bbox, plus segm when detections have masks)."""
        path = os.fspath(path)
        # hotcoco rejects a detection without image_id / category_id itself; the keys it would fill in are counted
        want = ["score", "bbox", "counts"] if tasks is None or len(set(tasks)) > 1 else \
            ["score", {"bbox": "bbox", "segm": "counts"}[tasks[0]]]
        try:
            keys, is_list, rle_counts = _scan_keys(path, want + (["segmentation"] if tasks is None else []),
                                                   rle=tasks is None or "segm" in tasks)
        except OSError as e:
            raise EvaluationError(f"cannot read detections {path!r}: {e}") from e
        if tasks is None:
            tasks = ("bbox", "segm") if keys["segmentation"] else ("bbox",)
        dt, why = None, "" if is_list else "not a json list"
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                dt = gt.hotcoco().load_res(path)
            n = len(dt.get_ann_ids())
            need = ["score"] + [{"bbox": "bbox", "segm": "counts"}[t] for t in tasks]
            if why:
                pass
            elif dt.load_warnings:
                why = "; ".join(dt.load_warnings)
            elif any(keys[k] != n for k in need):
                why = "a key is missing from some detection"
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
            why = str(e)
        if why:
            dets = load_results(path)  # the reference checks raise the error lvis-api's path raises
            check_results(gt, dets, tasks)
            raise EvaluationError(f"cannot evaluate detections {path!r}: {why}")
        if n == 0:
            return cls(gt, None, 0, max_dets), tuple(tasks)
        if max_dets >= 0:
            dt = dt.cap_detections_per_image(max_dets)
        return cls(gt, dt, n, max_dets, rle_counts if "segm" in tasks else None), tuple(tasks)

    def _use_mask_areas(self) -> None:
        """segm: areas from the masks, as lvis-api computes them for results without boxes."""
        if self._mask_areas or self._dt is None:
            return
        import hotcoco.mask

        # only detections lvis-api evaluates: on a category annotated in, or a verified negative of, their image
        evaluated: dict[int, set[int]] = {}
        for a in self.gt.dataset["annotations"]:
            if a.get("area", 0) > 0:
                evaluated.setdefault(int(a["image_id"]), set()).add(int(a["category_id"]))
        ids: list[int] = []
        for img in self.gt.dataset["images"]:
            cats = evaluated.get(int(img["id"]), set()) | {int(c) for c in img["neg_category_ids"]}
            if cats:
                ids += self._dt.get_ann_ids(img_ids=[int(img["id"])], cat_ids=sorted(cats))
        if not ids:
            self._mask_areas = True
            return
        if self._rle_counts is not None:  # the counts as read, by results order (about 3x faster)
            counts = self._rle_counts
            segs = [{"size": _ANY_SIZE, "counts": counts[i - 1]} for i in ids]
        else:  # the segmentations back from hotcoco
            segs = [a["segmentation"] for a in self._dt.load_anns(ids)]
        self._dt.update_anns(ids=np.asarray(ids), area=np.asarray(hotcoco.mask.area(segs), dtype=np.float64))
        self._rle_counts = None  # no longer needed: free the strings
        self._mask_areas = True

    def evaluate(self, task: str) -> TaskResult:
        import hotcoco

        if task == "segm":
            self._use_mask_areas()
        gt = self.gt.hotcoco()
        dt = self._dt if self._dt is not None else gt.load_res([])
        ev = hotcoco.COCOeval(gt, dt, task, lvis_style=True)
        p = ev.params
        p.area_rng = _HOTCOCO_AREA_RNG
        # lvis-api caps per image only (done above); never a second cap per image and category
        p.max_dets = [self.max_dets if self.max_dets > 0 else 2 ** 31 - 1]
        ev.params = p
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # hotcoco warns that the area ranges / max_dets are not its defaults: they are lvis-api's (see above)
            warnings.filterwarnings("ignore", message="hotcoco:", category=UserWarning)
            ev.run()
        res = ev.get_results()
        prec = np.asarray(ev.eval["precision"])
        if prec.ndim == 5:
            prec = prec[..., -1]
        return TaskResult(task, "hotcoco", {m: float(res[m]) for m in METRICS}, prec, list(ev.params.cat_ids))


def _check_not_empty(n: int, results: Any, allow_empty: bool) -> None:
    if n == 0 and not allow_empty:
        where = repr(os.fspath(results)) if isinstance(results, (str, os.PathLike)) else "the results list"
        raise EvaluationError(f"no detections in {where}: nothing to evaluate (an empty results list is usually the "
                              "wrong file or a model that detected nothing)")


def evaluate_tasks(
    gt: GroundTruth,
    results: str | os.PathLike | Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    max_dets: int = LVIS_MAX_DETS,
    backend: str | None = None,
    allow_empty: bool = True,
) -> tuple[list[TaskResult], int]:
    """Each of ``tasks`` (default: bbox, plus segm when detections have masks) through ``backend``; returns the
    results and the number of detections. Bad input (and no detections at all unless ``allow_empty``) raises the
    same ``EvaluationError`` on either backend."""
    backend = resolve_backend(backend)
    for t in tasks or ():
        if t not in TASKS:
            raise EvaluationError(f"unknown task {t!r}; expected one of {', '.join(TASKS)}")
    if backend == "hotcoco" and isinstance(results, (str, os.PathLike)):
        hot, tasks = HotcocoResults.from_file(gt, results, tasks, max_dets)
        _check_not_empty(hot.n, results, allow_empty)
        return [hot.evaluate(t) for t in tasks], hot.n
    dets = load_results(results)
    tasks = tuple(tasks) if tasks else default_tasks(dets)
    check_results(gt, dets, tasks)
    _check_not_empty(len(dets), results, allow_empty)
    if backend == "lvis":
        return [_lvis_result(lvis_task(gt, dets, t, max_dets), t) for t in tasks], len(dets)
    hot = HotcocoResults.from_list(gt, dets, max_dets)
    return [hot.evaluate(t) for t in tasks], len(dets)
