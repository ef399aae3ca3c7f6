"""One rank's run of a prebuild: its units through planner -> generator -> segmenter -> CLIS-L -> CLIS-I ->
selection -> cache, with the counters and stage timers the summary is made from; ``run_prebuild`` is the entry point.

Each rank rebuilds the global unit list from the config (``make_units``), keeps the units with ``index % W == r``
(``shard_units``), skips those whose generation key is already in the cache, and writes its own shards (the cache's
manifest is the only shared state and refuses a writer with other generation settings).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..stages import Candidate, ImageScore, WorkUnit
from .config import PrebuildError, json_safe, load_config, stage_name
from .prepare import Prepared, build_layout, build_scorer, prepare, resolve_device
from .summary import STAGES, write_summary

logger = logging.getLogger(__name__)

__all__ = ["run_prebuild", "RETRY_REASONS"]

EMPTY_PLANNER = "planner_rejected"
EMPTY_ERROR = "error"
EMPTY_NOTHING_SELECTED = "nothing_selected"
EMPTY_NO_CANDIDATES = "no_candidates"
# Reasons for a unit that ended with nothing stored that a resumed run retries (the others are final).
RETRY_REASONS = frozenset({"request_failed", EMPTY_ERROR})


# select_unit reasons that reject a unit or an instance (the others are counts: kept, unscored, ...).
SELECT_REJECTIONS = ("no_candidates", "no_scored_candidate", "layout_below_min_clis_l",
                     "all_instances_below_min_clis_i", "instances_below_min_clis_i")


@dataclass
class _Stats:
    """Counters and timings of one run of one rank (the summary is made from them)."""

    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in ("load", *STAGES)})
    units_all: int = 0
    units_rank: int = 0
    units_skipped: int = 0
    units_processed: int = 0
    units_stored: int = 0
    units_selected: int = 0
    candidates: int = 0
    kept: int = 0
    instances: int = 0
    instances_dropped: int = 0
    instances_stored: int = 0
    errors: int = 0
    rejections: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in
                                                                    ("plan", "generate", "segment", "clis_l",
                                                                     "clis_i", "select")})
    repairs: Counter = field(default_factory=Counter)
    selection: Counter = field(default_factory=Counter)
    empty_units: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    t_start: float = field(default_factory=time.perf_counter)
    loop_start: float = 0.0  # wall clock (time.time) of the unit loop
    loop_end: float = 0.0
    loop_cpu_start: float = 0.0  # process CPU time (all threads)
    loop_cpu_end: float = 0.0

    def loop_started(self) -> None:
        self.loop_start = self.loop_end = time.time()
        self.loop_cpu_start = self.loop_cpu_end = time.process_time()

    def loop_tick(self) -> None:
        self.loop_end = time.time()
        self.loop_cpu_end = time.process_time()


class _Timer:
    def __init__(self, stats: _Stats, stage: str) -> None:
        self.stats, self.stage = stats, stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.seconds[self.stage] += time.perf_counter() - self.t0


@dataclass
class _UnitWork:
    unit: WorkUnit
    key: str
    plan: Any
    candidates: list[Candidate]
    clis_l: float | None


@contextlib.contextmanager
def _intra_op_threads(device: str, threads: int | None) -> Iterator[int | None]:
    """One intra-op thread per rank on CPU unless told otherwise (ranks share the machine's cores), for torch and
    OpenCV; the caller's settings are restored afterwards (``run_prebuild`` may run inside a training process)."""
    n = threads if threads is not None else (1 if device.startswith("cpu") else None)
    if n is None:
        yield None
        return
    import cv2
    import torch

    old = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(int(n))
    cv2.setNumThreads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(old[0])
        cv2.setNumThreads(old[1])


def _encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _check_images(images: Any, n: int, generator_name: str) -> list[np.ndarray]:
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = len(images) if hasattr(images, "__len__") else type(images).__name__
        raise PrebuildError(f"generator {generator_name!r} returned {got} images for n = {n} (the plug-in contract: "
                            "a list of exactly n H x W x 3 uint8 arrays)")
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise PrebuildError(f"generator {generator_name!r} returned an image of shape {a.shape} and dtype "
                                f"{a.dtype}; expected H x W x 3 uint8")
        out.append(np.ascontiguousarray(a))
    return out


def _previous_empty_units(cache_dir: Path, scoring: dict[str, Any]) -> dict[str, str]:
    """Units that earlier runs finished with nothing to store (from every ``summary/*.json``), minus those worth
    retrying: a request that failed, and "nothing selected" decided under other scoring settings."""
    from ..cache.writer import read_summaries

    out: dict[str, str] = {}
    try:
        summaries = read_summaries(cache_dir)
    except Exception as e:  # a damaged summary only costs recomputation
        logger.warning("cannot read the summaries of %s (%s); empty units will be redone", cache_dir, e)
        return out
    for s in summaries:
        same_scoring = s.get("scoring_settings") == scoring
        for k, reason in (s.get("empty_units") or {}).items():
            if reason in RETRY_REASONS or (reason == EMPTY_NOTHING_SELECTED and not same_scoring):
                continue
            out[str(k)] = str(reason)
    return out


class _Runner:
    """One rank's loop over its units (stages built and loaded once)."""

    def __init__(self, prep: Prepared, writer: Any, scorer: Any, layout: Any, rank: int, world: int,
                 stats: _Stats) -> None:
        self.prep, self.writer, self.scorer, self.layout = prep, writer, scorer, layout
        self.rank, self.world, self.stats = rank, world, stats
        c = prep.config
        self.n = int(c["candidates"])
        self.keep = c["keep"]
        self.fmt, self.quality = c["image_format"], int(c["jpeg_quality"])
        self.sel = c["selection"]
        self.max_errors = int(c["max_errors"])
        self.host = socket.gethostname()
        from .. import __version__
        from ..generate.common import plain_caption

        self._plain_caption = plain_caption
        self.scorer_settings = json_safe(scorer.settings()) if scorer is not None else None
        self.layout_settings = json_safe(layout.settings()) if layout is not None else None
        self.tool = {"name": "acp-data", "version": __version__}
        self.generator_name = stage_name(c, "generator")
        self._candidate_provenance: dict[str, list[dict[str, Any]]] = {}  # by key, from generate_with_provenance

    # -- stages ------------------------------------------------------------------------------------------------------
    def _unit_failed(self, stage: str, unit: WorkUnit, key: str, error: Exception) -> None:
        """Count a unit that a backend raised on (logged with its traceback); too many abort the run. The unit is
        retried by the next run. Contract violations (``PrebuildError``) are never swallowed."""
        if isinstance(error, PrebuildError):
            raise error
        self._candidate_provenance.pop(key, None)
        st = self.stats
        st.errors += 1
        st.rejections[stage][f"error:{type(error).__name__}"] += 1
        st.empty_units[key] = EMPTY_ERROR
        logger.error("unit %d (key %s) failed in %s: %s: %s", unit.index, key, stage, type(error).__name__, error,
                     exc_info=error)
        if st.errors > self.max_errors:
            raise PrebuildError(f"{st.errors} units failed, more than max_errors = {self.max_errors}; the last one "
                                f"(unit {unit.index}) in {stage}: {type(error).__name__}: {error}") from error

    def _plan(self, chunk: Sequence[tuple[WorkUnit, str]]) -> list[Any]:
        """Plan results in order (None for a unit whose planner raised)."""
        planner = self.prep.planner
        units = [u for u, _ in chunk]
        with _Timer(self.stats, "plan"):
            try:
                return list(planner.plan_many(units))
            except PrebuildError:
                raise
            except Exception:  # one unit broke the batch: plan one by one to find it and keep the others
                out = []
                for unit, key in chunk:
                    try:
                        out.append(planner.plan(unit))
                    except Exception as e:
                        self._unit_failed("plan", unit, key, e)
                        out.append(None)
                return out

    def _generate(self, unit: WorkUnit, key: str, scene: Any) -> list[np.ndarray] | None:
        from ..generate.common import TooManyBoxes

        st = self.stats
        with _Timer(st, "generate"):
            try:
                gen = self.prep.generator
                if hasattr(gen, "generate_with_provenance"):  # a generator that records what it drew (Shapes)
                    images, self._candidate_provenance[key] = gen.generate_with_provenance(scene, self.n, unit.seed)
                else:
                    images = gen.generate(scene, self.n, unit.seed)
            except TooManyBoxes as e:
                st.rejections["generate"][e.reason] += 1
                st.empty_units[key] = e.reason
                logger.warning("unit %d: %s", unit.index, e)
                return None
            return _check_images(images, self.n, self.generator_name)

    def _segment(self, scene: Any, images: list[np.ndarray]) -> list[Candidate]:
        """Candidates with their masks; an empty mask becomes None (a dropped instance, counted)."""
        st = self.stats
        with _Timer(st, "segment"):
            boxes = [scene.boxes_xyxy(im.shape[1], im.shape[0]) for im in images]
            masks_all = self.prep.segmenter.segment_batch(images, boxes)
            cands = []
            for im, bx, masks in zip(images, boxes, masks_all):
                if len(masks) != len(scene.objects):
                    raise PrebuildError(f"segmenter {stage_name(self.prep.config, 'segmenter')!r} returned "
                                        f"{len(masks)} masks for {len(scene.objects)} boxes")
                kept: list[np.ndarray | None] = []
                for m in masks:
                    m = np.asarray(m, dtype=bool)
                    if m.shape != im.shape[:2]:
                        raise PrebuildError(f"segmenter {stage_name(self.prep.config, 'segmenter')!r} returned a "
                                            f"mask of shape {m.shape} for an image of shape {im.shape[:2]}")
                    kept.append(m if m.any() else None)
                st.instances += len(kept)
                st.instances_dropped += sum(m is None for m in kept)
                st.rejections["segment"]["empty_mask"] += sum(m is None for m in kept)
                cands.append(Candidate(im, scene, bx, kept))
            return cands

    def _unit_work(self, unit: WorkUnit, key: str, plan: Any) -> _UnitWork | None:
        """Generate, segment and CLIS-L one planned unit (None: rejected or failed, recorded)."""
        stage = "generate"
        try:
            images = self._generate(unit, key, plan.scene)
            if images is None:
                return None
            self.stats.candidates += len(images)
            stage = "segment"
            cands = self._segment(plan.scene, images)
            clis_l = None
            if self.layout is not None:
                stage = "clis_l"
                with _Timer(self.stats, "clis_l"):
                    clis_l = self.layout.score(plan.scene).score
        except Exception as e:
            self._unit_failed(stage, unit, key, e)
            return None
        return _UnitWork(unit, key, plan, cands, None if clis_l is None else float(clis_l))

    def _score(self, works: list[_UnitWork]) -> list[tuple[_UnitWork, list[ImageScore]]]:
        """CLIS-I of every candidate of ``works`` in one call (unit by unit if that call raises, to keep the others)."""
        if self.scorer is None:
            return [(w, [ImageScore(None, [None] * len(c.scene.objects)) for c in w.candidates]) for w in works]
        if not works:
            return []
        with _Timer(self.stats, "clis_i"):
            try:
                scores = list(self.scorer.score([c for w in works for c in w.candidates]))
                groups = [(w, len(w.candidates)) for w in works]
            except Exception as e:
                if len(works) == 1:
                    self._unit_failed("clis_i", works[0].unit, works[0].key, e)
                    return []
                scores, groups = [], []
                for w in works:
                    try:
                        got = list(self.scorer.score(w.candidates))
                    except Exception as e1:
                        self._unit_failed("clis_i", w.unit, w.key, e1)
                        continue
                    scores += got
                    groups.append((w, len(got)))
        if sum(n for _, n in groups) != len(scores) or any(n != len(w.candidates) for w, n in groups):
            raise PrebuildError(f"scorer {stage_name(self.prep.config, 'scorer')!r} returned {len(scores)} scores "
                                f"for {sum(len(w.candidates) for w, _ in groups)} candidates")
        out, i = [], 0
        for w, n in groups:
            out.append((w, scores[i:i + n]))
            i += n
        return out

    # -- records -----------------------------------------------------------------------------------------------------
    def _provenance(self, w: _UnitWork) -> dict[str, Any]:
        p, scene = w.plan, w.plan.scene
        return {
            "planner": {"settings": self.prep.planner_settings, "attempts": int(p.attempts),
                        "rejections": dict(p.rejections), "repairs": dict(p.repairs), "prompts": list(p.prompts)},
            "generator": {"settings": self.prep.generator_settings, "prompt": self._plain_caption(scene),
                          "phrases": scene.phrases(), "seed": int(w.unit.seed)},
            "segmenter": {"settings": self.prep.segmenter_settings},
            "scorer": self.scorer_settings, "layout_scorer": self.layout_settings,
            "selection": dict(self.sel), "tool": self.tool,
            "run": {"rank": self.rank, "world": self.world, "host": self.host, "created": time.time()},
        }

    def _records(self, w: _UnitWork, scores: list[ImageScore], selected: int | None) -> tuple[list[dict], list[bytes]]:
        from ..masks import mask_to_rle, tight_box_xywh

        scene = w.plan.scene
        scene_dict = scene.to_dict()
        prov = self._provenance(w)
        extra = self._candidate_provenance.pop(w.key, None)
        records, blobs = [], []
        for c, (cand, sc) in enumerate(zip(w.candidates, scores)):
            if self.keep == "selected" and c != selected:
                continue
            h, wd = cand.image.shape[:2]
            layout_abs = scene.boxes_xywh() * np.array([wd, h, wd, h], dtype=np.float64)
            inst_scores = list(sc.instances) + [None] * (len(scene.objects) - len(sc.instances))
            instances = []
            for i, (o, m) in enumerate(zip(scene.objects, cand.masks)):
                if m is None:
                    continue
                instances.append({
                    "object_id": o.id, "category_id": int(o.category_id), "bbox": list(tight_box_xywh(m)),
                    "layout_bbox": [float(v) for v in layout_abs[i]], "segmentation": mask_to_rle(m),
                    "area": float(m.sum()), "clis_i": _score_or_none(inst_scores[i]),
                })
            records.append({
                "key": w.key, "unit": int(w.unit.index), "candidate_idx": c, "seed": int(w.unit.seed),
                "target": int(w.unit.target), "combo": [int(x) for x in w.unit.combo], "scene_graph": scene_dict,
                "width": int(wd), "height": int(h), "clis_l": w.clis_l, "clis_i": _score_or_none(sc.image),
                "selected": c == selected, "provenance": {**prov, **extra[c]} if extra else prov,
                "instances": instances,
            })
            blobs.append(_encode_image(cand.image, self.fmt, self.quality))
            self.stats.instances_stored += len(instances)
        return records, blobs

    # -- one chunk of units ------------------------------------------------------------------------------------------
    def run_chunk(self, chunk: Sequence[tuple[WorkUnit, str]]) -> int:
        """Plan, generate, segment, score, select and write a few units; returns the number of units finished."""
        from ..clis.select import select_unit

        st = self.stats
        works: list[_UnitWork] = []
        for (unit, key), plan in zip(chunk, self._plan(chunk)):
            if plan is None:  # the planner raised (counted)
                continue
            st.rejections["plan"].update(plan.rejections)
            st.repairs.update(plan.repairs)
            if plan.scene is None:
                reason = "request_failed" if plan.rejections.get("request_failed") else EMPTY_PLANNER
                st.rejections["plan"]["no_scene"] += 1
                st.empty_units[key] = reason
                continue
            w = self._unit_work(unit, key, plan)
            if w is not None:
                works.append(w)
        for w, scores in self._score(works):
            with _Timer(st, "select"):
                res = select_unit([s.image for s in scores], w.clis_l, [list(s.instances) for s in scores],
                                  min_clis_i=self.sel["min_clis_i"], min_clis_l=self.sel["min_clis_l"])
            st.selection.update(res.reasons)
            st.rejections["select"].update({k: v for k, v in res.reasons.items() if k in SELECT_REJECTIONS and v})
            if res.selected_idx is not None:
                st.units_selected += 1
            with _Timer(st, "encode"):
                records, blobs = self._records(w, scores, res.selected_idx)
            if not records:
                st.empty_units[w.key] = EMPTY_NOTHING_SELECTED if self.keep == "selected" else EMPTY_NO_CANDIDATES
                continue
            with _Timer(st, "write"):
                if self.writer.add_unit(records, blobs):
                    st.units_stored += 1
                    st.kept += len(records)
        st.units_processed += len(chunk)
        return len(chunk)


def _score_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if not np.isfinite(f) else f



def run_prebuild(config: dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike, rank: int = 0, world: int = 1,
                 max_units: int | None = None, *, device: str | None = None, threads: int | None = None,
                 keep: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run rank ``rank`` of ``world`` of the prebuild described by ``config`` (a mapping as in the YAML file, or the
    file's path) into the cache ``out_dir``; returns the summary (also written to ``out_dir/summary/``).

    ``max_units`` caps the global unit list (the first N units, before sharding, so W sharded runs cover the same
    units as one run). ``device``, ``threads`` and ``keep`` override the config. Units already in the cache are
    skipped; an interrupted run loses at most the units of its open shard.
    """
    from ..cache.writer import CacheWriter
    from .units import shard_units

    t_start = time.perf_counter()
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if world < 1 or not 0 <= rank < world:
        raise PrebuildError(f"rank {rank} / world {world}: need world >= 1 and 0 <= rank < world")
    if max_units is not None and int(max_units) < 1:
        raise PrebuildError(f"max_units = {max_units} must be >= 1")
    prep = prepare(config, device=device, keep=keep, threads=threads)
    cfg = prep.config
    all_units = prep.make_units(max_units)
    mine = shard_units(all_units, rank, world)
    keys = [prep.key(u) for u in mine]

    dev = resolve_device(cfg["device"])
    prep.ctx.device = dev
    if cfg["dtype"] == "auto":
        prep.ctx.dtype = "float16" if dev.startswith("cuda") else "float32"
    out = Path(out_dir)
    try:
        writer = CacheWriter(out, prep.categories, prep.generation_settings(), rank,
                             scoring_settings=json_safe(prep.scoring_settings()),
                             shard_max_samples=int(cfg["shard_size"]),
                             shard_max_bytes=int(cfg["shard_max_mb"]) << 20)
    except RuntimeError as e:  # CacheError: another recipe's cache, a damaged manifest
        raise PrebuildError(str(e)) from e
    done = writer.done_keys | writer.damaged_keys  # damaged units wait for `acp-data verify --repair`
    empty_before = _previous_empty_units(out, json_safe(prep.scoring_settings()))
    todo = [(u, k) for u, k in zip(mine, keys) if k not in done and k not in empty_before]
    stats = _Stats(units_all=len(all_units), units_rank=len(mine), units_skipped=len(mine) - len(todo),
                   t_start=t_start)
    logger.info("prebuild rank %d/%d: %d units in all, %d for this rank, %d already done, %d to do", rank, world,
                len(all_units), len(mine), stats.units_skipped, len(todo))
    base = {"rank": rank, "world": world, "host": socket.gethostname(), "pid": os.getpid(), "device": dev,
            "config": json_safe(cfg), "generation_settings": prep.generation_settings(),
            "scoring_settings": json_safe(prep.scoring_settings()), "started": time.time()}
    status, error = "running", None
    try:
        with writer:
            if todo:
                with _intra_op_threads(dev, cfg["threads"]) as n_threads:
                    stats.threads = n_threads
                    scorer, layout = _load_models(prep, stats)
                    runner = _Runner(prep, writer, scorer, layout, rank, world, stats)
                    base.update(scorer_settings=runner.scorer_settings, layout_settings=runner.layout_settings)
                    _loop(runner, todo, int(cfg["unit_batch"]),
                          lambda: write_summary(writer, base, stats, "running"),
                          _progress(len(todo), rank, world, progress))
        status = "complete"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except BaseException as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        summary = write_summary(writer, base, stats, status, error)
    logger.info("prebuild rank %d/%d %s: %d units processed, %d samples kept; summary %s", rank, world, status,
                stats.units_processed, stats.kept, summary.get("summary_path"))
    return summary


def _load_models(prep: Prepared, stats: _Stats) -> tuple[Any, Any]:
    """Load every stage's model once (timed as ``load``); returns the CLIS-I scorer (None: unscored) and the CLIS-L
    scorer (None: off)."""
    cfg = prep.config
    with _Timer(stats, "load"):
        for section in ("planner", "generator", "segmenter"):
            try:
                getattr(prep, section).load()
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise PrebuildError(f"{section} {stage_name(cfg, section)!r}: cannot load its model: "
                                    f"{type(e).__name__}: {e}") from e
        scorer = build_scorer(prep)
        layout = build_layout(prep)
    return scorer, layout


def _loop(runner: _Runner, todo: list[tuple[WorkUnit, str]], step: int, checkpoint: Any, bar: Any) -> None:
    """Run the units ``step`` at a time; ``checkpoint()`` (the summary) after every chunk that closed a shard."""
    stats, writer = runner.stats, runner.writer
    stats.loop_started()
    try:
        for i in range(0, len(todo), step):
            shards_before = len(writer.shards_closed)
            bar.update(runner.run_chunk(todo[i:i + step]))
            bar.set_postfix(kept=stats.kept, refresh=False)
            stats.loop_tick()
            if len(writer.shards_closed) != shards_before:
                checkpoint()
    finally:
        bar.close()
        stats.loop_tick()


def _progress(total: int, rank: int, world: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # ranks sharing a terminal (torchrun on one node) get one line each
    local = os.environ.get("LOCAL_RANK", "0")
    position = int(local) if world > 1 and local.isdigit() else 0
    return tqdm(total=total, desc=f"prebuild {rank}/{world}", unit="unit", position=position, disable=not enabled,
                dynamic_ncols=True, leave=True)


