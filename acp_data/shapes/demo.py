"""``python -m acp_data.shapes.demo`` (``make demo``): the whole acp-data loop on the Shapes world, on a CPU.

Builds the world, its priors, the judge (CLIS-I model) and the synthetic cache, each reused when already built
from the same inputs; trains Mask R-CNN on real data only (``configs/shapes/baseline.yaml``) and with CLIS-selected
synthetic images of the rare categories (``configs/shapes/acp.yaml``) through ``tools/train_net.py``; prints one
side-by-side table of AP / APr / APc / APf (mask and box) with the difference, and under it what the CLIS filter
removed (from the ACP run's ``acp_run.json`` selection report). The judge is the ``web`` variant (trained on its own
web corpus, as a real CLIP learned from web data; ``--judge-variant in_domain`` trains it on the world's real images).
Everything goes under ``--out`` (default ``output/demo``)::

    datasets/shapes/        the world (DETECTRON2_DATASETS=OUT/datasets, as the configs expect)
    priors.npz              `acp-data priors build` of the world's train.json (+ priors.npz.stamp.json)
    judge/                  the open_clip judge (local-dir checkpoint, judge.json stamp)
    cache/                  the synthetic cache (`acp-data prebuild`, configs/shapes/prebuild.yaml; cache.stamp.json)
    runs/baseline, runs/acp detectron2 output dirs (metrics.json, log.txt, stdout.log)
    report/                 `acp-data report` of the two runs (markdown, CSV, plots)
    summary.json            the table's numbers, stage timings and seconds per iteration

The baseline trains in a child process while the main process builds the priors, judge and cache, then the ACP run
trains beside it: two processes with one intra-op thread each use two cores fully (``--jobs 1`` trains one run at a
time with all threads instead). A run is reused when its ``metrics.json`` exists and was made from the same command
and inputs (``--retrain`` forces training). The child processes are started and watched by ``acp_data.shapes.jobs``
(shared with ``benchmarks/longtail_ablation.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_json
from ..stages import stable_hash
from .jobs import JobError, TrainJob, child_env, read_json, seconds_per_iter, wait_for

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "shapes"
DEFAULT_OUT = "output/demo"
RUN_CONFIGS: dict[str, str] = {"baseline": "baseline.yaml", "acp": "acp.yaml"}
PRIORS_SETTINGS: dict[str, Any] = {"seed": 0}
TASKS = (("segm", "mask"), ("bbox", "box"))
METRICS = ("AP", "APr", "APc", "APf")


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


# ----- files and stamps -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoPaths:
    """Where each artefact of the demo lives under ``out``."""

    out: Path

    @property
    def datasets(self) -> Path:
        return self.out / "datasets"

    @property
    def world(self) -> Path:
        return self.datasets / "shapes"

    @property
    def priors(self) -> Path:
        return self.out / "priors.npz"

    @property
    def judge(self) -> Path:
        return self.out / "judge"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def cache_stamp(self) -> Path:
        return self.out / "cache.stamp.json"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def report(self) -> Path:
        return self.out / "report"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the demo's stamps name the world, priors and judge they were made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----- the inputs: world, priors, judge, cache ------------------------------------------------------------------------
def build_priors(train_json: Path, out: Path) -> bool:
    """Build the priors file from ``train_json`` unless ``out`` was built from the same bytes with the same settings
    (``out.stamp.json``). Returns whether it was built."""
    from ..priors import Priors

    stamp = out.with_name(out.name + ".stamp.json")
    want = {"format": "acp-data demo priors", "ann": str(train_json), "ann_sha256": file_sha256(train_json),
            "settings": PRIORS_SETTINGS}
    if out.is_file() and read_json(stamp) == want:
        logger.info("priors %s are up to date", out)
        return False
    Priors.build(train_json, **PRIORS_SETTINGS).save(out)
    atomic_write_json(stamp, want, default=str)
    return True


def prebuild_config(paths: DemoPaths, world_train_json: Path, judge_spec: str, overrides: Sequence[str] = (),
                    config_file: Path | None = None) -> dict[str, Any]:
    """``configs/shapes/prebuild.yaml`` pointed at this demo's world, priors and judge, plus ``KEY=VALUE``
    overrides (docs/prebuild.md)."""
    from ..prebuild import apply_overrides, load_config

    cfg = load_config(config_file or CONFIG_DIR / "prebuild.yaml")
    cfg["categories"] = str(world_train_json)  # the built world's own table (any world size)
    cfg["priors"] = str(paths.priors)
    scorer = cfg.get("scorer")
    if isinstance(scorer, dict):
        cfg["scorer"] = {**scorer, "model": judge_spec}
    return apply_overrides(cfg, overrides)


def build_cache(paths: DemoPaths, config: dict[str, Any], inputs: dict[str, str], max_units: int | None = None,
                threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the prebuild into ``paths.cache``. A cache made from other inputs (config, priors, judge,
    world) is deleted first: the stamp ``cache.stamp.json`` is written before the prebuild starts, so an interrupted
    build resumes instead. Returns the prebuild summary."""
    from ..prebuild import run_prebuild

    want = {"format": "acp-data demo cache", "config": config, "inputs": inputs, "max_units": max_units}
    want = json.loads(json.dumps(want, default=str))
    if paths.cache.exists() and read_json(paths.cache_stamp) != want:
        if paths.cache.is_dir() and (not any(paths.cache.iterdir()) or (paths.cache / "manifest.json").is_file()):
            logger.info("the cache %s was built from other inputs; rebuilding it", paths.cache)
            shutil.rmtree(paths.cache)
        else:
            raise DemoError(f"{paths.cache} exists and is not an acp-data cache; move it away or choose another --out")
    atomic_write_json(paths.cache_stamp, want, default=str)
    return run_prebuild(config, paths.cache, max_units=max_units, threads=threads, progress=progress)


@dataclass
class Inputs:
    """What the trainings need, with the time each step took."""

    world_train_json: Path
    judge_spec: str
    cache_summary: dict[str, Any]
    fingerprint: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


# ----- training runs --------------------------------------------------------------------------------------------------
def train_args(run: str, paths: DemoPaths, iters: int | None, seed: int, workers: int,
               opts: Sequence[str] = ()) -> list[str]:
    """Arguments of ``tools/train_net.py`` for run ``baseline`` or ``acp`` of this demo."""
    cfg = CONFIG_DIR / RUN_CONFIGS[run]
    args = ["--config-file", str(cfg), "OUTPUT_DIR", str(paths.runs / run), "SEED", str(seed),
            "DATALOADER.NUM_WORKERS", str(workers)]
    if iters:
        args += ["SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", str(max(1, iters // 10))]
    if run != "baseline":
        args += ["ACP.CACHE_DIRS", json.dumps([str(paths.cache)])]
    return args + list(opts)


def resolved_config_hash(targs: Sequence[str]) -> str:
    """Hash of the config ``tools/train_net.py`` would train with from ``train_args``' arguments (``--config-file``
    then ``KEY VALUE`` overrides), so a run is reused only while its config file and its bases are unchanged."""
    from ..d2.config import load_cfg

    i = list(targs).index("--config-file")
    opts = [a for j, a in enumerate(targs) if j not in (i, i + 1)]
    cfg = load_cfg(targs[i + 1], opts)
    cfg.OUTPUT_DIR = ""  # where the run writes is part of the command already
    return hashlib.sha256(cfg.dump().encode()).hexdigest()


# ----- the table --------------------------------------------------------------------------------------------------------
def _cell(v: Any, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def format_table(metrics: dict[str, dict[str, Any]], title: str = "") -> str:
    """Side-by-side table of ``metrics`` (run name -> metrics.json content) with the difference of the last run
    minus the first: AP, APr, APc, APf for masks (segm) and boxes (bbox)."""
    names = list(metrics)
    width = max(10, *(len(n) for n in names))
    head1 = " " * width + " | " + " | ".join(f"{f'{label} AP ({task})':^27}" for task, label in TASKS)
    head2 = f"{'run':<{width}} | " + " | ".join(" ".join(f"{m:>6}" for m in METRICS) for _ in TASKS)
    rule = "-" * len(head2)
    lines = [title] if title else []
    lines += [head1, head2, rule]
    for n in names:
        cells = [" ".join(f"{_cell((metrics[n].get(t) or {}).get(m)):>6}" for m in METRICS) for t, _ in TASKS]
        lines.append(f"{n:<{width}} | " + " | ".join(cells))
    if len(names) >= 2:
        a, b = metrics[names[0]], metrics[names[-1]]
        diff = []
        for t, _ in TASKS:
            row = []
            for m in METRICS:
                x, y = (a.get(t) or {}).get(m), (b.get(t) or {}).get(m)
                row.append(f"{_cell(None if x is None or y is None else y - x, signed=True):>6}")
            diff.append(" ".join(row))
        lines += [rule, f"{'difference':<{width}} | " + " | ".join(diff)]
    return "\n".join(lines)


# ----- main -------------------------------------------------------------------------------------------------------------
class _Clock:
    """``with clock(name):`` records the wall seconds of a step in ``timings[name]`` and its CPU seconds (this
    process) in ``timings[name + "_cpu"]``."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t, c = time.time(), time.process_time()
        try:
            yield
        finally:
            self.timings[name] = time.time() - t
            self.timings[f"{name}_cpu"] = time.process_time() - c


def prepare_inputs(paths: DemoPaths, size: str = "demo", world_seed: int = 0, judge_steps: int | None = None,
                   prebuild_overrides: Sequence[str] = (), max_units: int | None = None, threads: int | None = 1,
                   progress: bool = True, after_world: Any = None, judge_variant: str | None = None) -> Inputs:
    """World, priors, judge and cache under ``paths`` (each reused when up to date). ``after_world()`` is called
    once the world exists (the demo starts the baseline there)."""
    from .judge import JudgeOptions, train_judge
    from .world import build_world

    timings: dict[str, float] = {}
    clock = _Clock(timings)
    with clock("world"):
        world = build_world(paths.world, seed=world_seed, size=size, progress=progress)
    if after_world is not None:
        after_world()
    with clock("priors"):
        build_priors(world.train_json, paths.priors)
    opts = JudgeOptions()
    if judge_steps is not None:
        opts = replace(opts, steps=judge_steps)
    if judge_variant is not None:
        opts = replace(opts, variant=judge_variant)
    with clock("judge"):
        judge_spec = train_judge(world.root, paths.judge, opts, progress=progress, threads=threads)
    fingerprint = {"world": file_sha256(world.train_json), "val": file_sha256(world.val_json),
                   "priors": file_sha256(paths.priors),
                   "judge": file_sha256(paths.judge / "open_clip_model.safetensors")}
    config = prebuild_config(paths, world.train_json, judge_spec, prebuild_overrides)
    with clock("cache"):
        summary = build_cache(paths, config, fingerprint, max_units=max_units, threads=threads, progress=progress)
    fingerprint["cache"] = stable_hash(read_json(paths.cache_stamp))
    return Inputs(world.train_json, judge_spec, summary, fingerprint, timings)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m acp_data.shapes.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Trailing KEY VALUE pairs are detectron2 config overrides for both runs.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--iters", type=int, default=None,
                   help="training iterations of each run (default: the configs' SOLVER.MAX_ITER, configs/shapes/Base-Shapes.yaml)")
    p.add_argument("--seed", type=int, default=42, help="training seed (SEED) of both runs")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's images")
    p.add_argument("--size", default="demo", choices=("demo", "small"), help="world size (small: for tests)")
    p.add_argument("--judge-steps", type=int, default=None, help="judge training steps (default: the judge's)")
    p.add_argument("--judge-variant", default=None, choices=("web", "in_domain"),
                   help="what the judge learns from: web (its own web corpus, default) or in_domain (the world's real "
                        "training images, where a rare category has 1-10 images)")
    p.add_argument("--max-units", type=int, default=None, help="cap on prebuild work units (default: all)")
    p.add_argument("--prebuild-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of configs/shapes/prebuild.yaml (docs/prebuild.md)")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="2: the runs train side by side, one thread each (default); 1: one after the other")
    p.add_argument("--workers", type=int, default=0, help="DATALOADER.NUM_WORKERS of each run (default 0)")
    p.add_argument("--retrain", action="store_true", help="train even when a run's metrics.json is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE detectron2 overrides for both runs")
    return p


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's steps; returns what ``summary.json`` holds."""
    t_start = time.time()
    paths = DemoPaths(Path(args.out).absolute())
    paths.out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    threads = 1 if args.jobs == 2 else None
    env = child_env(paths.datasets, threads)
    iters = args.iters or _max_iter(args.opts)
    jobs: dict[str, TrainJob] = {}

    def make_job(run: str, inputs: dict[str, Any]) -> TrainJob:
        targs = train_args(run, paths, args.iters, args.seed, args.workers, args.opts)
        # the config as train_net resolves it (file, _BASE_ chain, overrides): an edited acp.yaml retrains its run
        inputs = {**inputs, "config": resolved_config_hash(targs)}
        job = TrainJob(run, targs, paths.runs / run, inputs, iters)
        if not args.retrain and job.done_before():
            job.reused, job.phase = True, "reused"
            print(f"[demo] {run}: reusing {job.run_dir / 'metrics.json'} (same command and inputs; --retrain to "
                  "train again)", flush=True)
        return job

    def start(job: TrainJob) -> None:
        if not job.reused:
            job.start(env)
            print(f"[demo] {job.name}: training in a child process ({iters} iterations; log {job.log_path})",
                  flush=True)

    def start_baseline() -> None:
        from .world import world_paths

        w = world_paths(paths.world)
        jobs["baseline"] = make_job("baseline", {"world": file_sha256(w.train_json), "val": file_sha256(w.val_json)})
        if args.jobs == 2:
            start(jobs["baseline"])

    print(f"[demo] output directory {paths.out}", flush=True)
    try:
        inputs = prepare_inputs(paths, size=args.size, world_seed=args.world_seed, judge_steps=args.judge_steps,
                                prebuild_overrides=args.prebuild_set, max_units=args.max_units, threads=threads,
                                progress=progress, after_world=start_baseline, judge_variant=args.judge_variant)
        jobs["acp"] = make_job("acp", inputs.fingerprint)
        t_train = time.time()
        if args.jobs == 2:
            start(jobs["acp"])
            wait_for(list(jobs.values()), progress)
        else:
            for job in jobs.values():
                start(job)
                wait_for([job], progress)
    except BaseException:
        for job in jobs.values():
            job.kill()
        raise
    t_end = time.time()

    metrics = {}
    for name, job in jobs.items():
        m = read_json(job.run_dir / "metrics.json")
        if not isinstance(m, dict):
            raise DemoError(f"run {name!r} finished without a readable {job.run_dir / 'metrics.json'}; see "
                            f"{job.log_path}")
        metrics[name] = m
    acp_run = read_json(jobs["acp"].run_dir / "acp_run.json") or {}
    summary = {
        "metrics": metrics, "iters": iters, "seed": args.seed, "world_size": args.size,
        "real_images": acp_run.get("real_images"), "synthetic_images": acp_run.get("synthetic_images"),
        "effective_synthetic_fraction": acp_run.get("effective_synthetic_fraction"),
        "cache": {k: inputs.cache_summary.get(k) for k in ("units", "candidates", "kept", "rejections")},
        "timings_s": {**{k: round(v, 1) for k, v in inputs.timings.items()},
                      "training_and_eval": round(t_end - t_train, 1), "total": round(t_end - t_start, 1)},
        "runs": {n: {"reused": j.reused, "wall_s": round(j.t1 - j.t0, 1) if j.t1 else None,
                     "cpu_s": None if j.cpu_s is None else round(j.cpu_s, 1),
                     "s_per_iter": seconds_per_iter(j.run_dir), "dir": str(j.run_dir)} for n, j in jobs.items()},
    }
    summary["idle_estimate_s"] = idle_estimate(summary["timings_s"], summary["runs"], args.jobs)
    atomic_write_json(paths.out / "summary.json", summary, default=str)
    try:
        from ..report import make_report

        make_report([jobs["baseline"].run_dir, jobs["acp"].run_dir], paths.report,
                    labels={"baseline": "baseline", "acp": "acp"})
    except Exception as e:  # the table below is the demo's result; a plotting problem must not hide it
        logger.warning("acp-data report failed: %s", e)
    syn = summary["synthetic_images"]
    batch = _run_config(jobs["acp"].run_dir).get("SOLVER", {}).get("IMS_PER_BATCH", "?")
    title = (f"Shapes world, Mask R-CNN R-18-FPN from scratch, {iters} iterations x batch {batch}, seed {args.seed}: "
             f"{summary['real_images']} real training images"
             + (f" (acp: + {syn} synthetic images of the rare categories, {_selection_words(acp_run)})"
                if syn is not None else ""))
    print("\n" + format_table(metrics, title), flush=True)
    removed = filter_line(acp_run)
    if removed:
        print(removed, flush=True)
    print(flush=True)
    t = summary["timings_s"]
    print(f"[demo] wall time {t['total'] / 60:.1f} min (world {t['world']:.0f} s, priors {t['priors']:.0f} s, judge "
          f"{t['judge']:.0f} s, cache {t['cache']:.0f} s, training + evaluation {t['training_and_eval']:.0f} s); "
          f"report in {paths.report}, numbers in {paths.out / 'summary.json'}", flush=True)
    if summary["idle_estimate_s"] is not None:
        print(f"[demo] from the CPU seconds each step used, the same work takes about "
              f"{summary['idle_estimate_s'] / 60:.1f} min on an idle 2-core machine", flush=True)
    return summary


def idle_estimate(timings: dict[str, float], runs: dict[str, dict[str, Any]], jobs: int) -> float | None:
    """Wall seconds the demo would take on an idle 2-core machine, from the CPU seconds each step used: the world,
    then the baseline on one core beside priors + judge + cache + the ACP run on the other (``--jobs 2``), or
    everything in a row (``--jobs 1``, where CPU seconds over-count multi-threaded steps). None when a run was reused
    or not measured."""
    cpu = [runs[n].get("cpu_s") for n in ("baseline", "acp")]
    if any(c is None or runs[n].get("reused") for c, n in zip(cpu, ("baseline", "acp"))):
        return None
    prep = sum(timings.get(f"{k}_cpu", 0.0) for k in ("priors", "judge", "cache"))
    world = timings.get("world_cpu", 0.0)
    if jobs == 2:
        return round(world + max(cpu[0], prep + cpu[1]), 1)
    return round(world + prep + cpu[0] + cpu[1], 1)


def _selection_words(acp_run: dict[str, Any]) -> str:
    """How the ACP run chose its synthetic images, from its ``acp_run.json``."""
    sel = acp_run.get("selection") or {}
    mode, min_i = sel.get("select"), sel.get("min_clis_i")
    if mode == "clis":
        what = "best of 4 by CLIS"
    else:
        what = {"random": "one random candidate per unit", "first": "first candidate",
                "all": "every candidate"}.get(str(mode), f"ACP.SELECT {mode}")
    return what + (f", instances with CLIS-I >= {min_i:g}" if min_i else ", no CLIS-I threshold")


def filter_line(acp_run: dict[str, Any]) -> str | None:
    """One line on what the ACP run's instance and layout thresholds removed, per frequency group: its selection
    (``acp_run.json``'s ``selection_report``) against the same selection with the thresholds at 0, on its caches."""
    report = acp_run.get("selection_report") or {}
    settings = report.get("settings")
    caches = acp_run.get("caches") or []
    if not settings or not caches:
        return None
    from ..cache.reader import CacheReader
    from ..cache.select_report import selection_report
    from ..cache.selection import Selection, select

    try:
        readers = [CacheReader(c) for c in caches]
        ids = settings.get("category_ids")
        loose = Selection(**{**settings, "min_clis_i": 0.0, "min_clis_l": 0.0, "max_images": 0,
                             "category_ids": None if ids is None else tuple(ids)})
        before = selection_report(select(readers, loose), readers[0].categories)
    except Exception as e:  # a moved cache: the table above is the result, this line only explains it
        logger.warning("cannot recount the selection without thresholds: %s", e)
        return None
    after = report.get("per_group") or {}
    parts = []
    for group, b in (before.get("per_group") or {}).items():
        a = after.get(group) or {}
        if not b.get("instances"):
            continue
        parts.append(f"{group} {b['images'] - a.get('images', 0)} of {b['images']} images, "
                     f"{b['instances'] - a.get('instances', 0)} of {b['instances']} instances")
    if not parts:
        return None
    kept, total = report.get("kept_images", 0), before.get("kept_images", 0)
    inst_kept, inst_total = report.get("kept_instances", 0), before.get("kept_instances", 0)
    return (f"CLIS filter (MIN_CLIS_I {settings['min_clis_i']:g}, MIN_CLIS_L {settings['min_clis_l']:g}) removed "
            f"{total - kept} of {total} images and {inst_total - inst_kept} of {inst_total} instances; per group "
            "(images containing it, its instances): " + "; ".join(parts)
            + f"; dropped objects stay in their images, ACP.DROPPED_INSTANCES {report.get('dropped_instances_policy')}")


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The full config detectron2 saved for a run (empty if unreadable)."""
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _max_iter(opts: Sequence[str]) -> int:
    """SOLVER.MAX_ITER the runs train with: the baseline run's config plus the trailing overrides, read by
    ``tools/train_net.py``'s own loader."""
    from ..d2.config import load_cfg

    return int(load_cfg(str(CONFIG_DIR / RUN_CONFIGS["baseline"]), opts).SOLVER.MAX_ITER)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.opts and len(args.opts) % 2:
        print(f"demo: error: trailing overrides must be KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        # acp_data's own steps at INFO; libraries (open_clip logs on the root logger) at WARNING
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("acp_data").setLevel(logging.INFO)
    try:
        run_demo(args)
    except (DemoError, JobError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # PrebuildError, world/judge input errors
        print(f"demo: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
