#!/usr/bin/env python
"""Long-tail ablation: train a grid of configs over seeds through ``tools/train_net.py``, then tabulate and plot.

    python benchmarks/longtail_ablation.py                        # the default Shapes grid (about 75 min, 2 cores)
    python benchmarks/longtail_ablation.py --grid full            # 3 seeds everywhere, + instance thresholds 0, 60
    python benchmarks/longtail_ablation.py --grid final --world-seed 1   # the held-out table (about 2 h, 2 cores)
    python benchmarks/longtail_ablation.py --grid my_grid.yaml    # any configs (e.g. the LVIS ones)
    python benchmarks/longtail_ablation.py --also mine=configs/shapes/acp.yaml:ACP.MIN_CLIS_I=0.0   # grid + a group
    python benchmarks/longtail_ablation.py --run base=configs/lvis_baseline_12ep.yaml \\
        --run acp=configs/acp_lvis.yaml:ACP.MIN_CLIS_I=50,ACP.MAX_IMAGES=20000 --seeds 1,2 --train-arg=--num-gpus=8
    python benchmarks/longtail_ablation.py --count-synthetic configs/shapes/acp.yaml [KEY=VALUE ...]

Each run is ``tools/train_net.py --config-file CONFIG KEY VALUE ... SEED s OUTPUT_DIR OUT/<name>_seed<s>``; a run
whose ``metrics.json`` exists is skipped, so an interrupted ablation resumes where it stopped. An override value
``@match:NAME`` is replaced by the number of synthetic images the load-time selection of run NAME (same seed) keeps
on its caches (used for ``ACP.MAX_IMAGES``: "as many images as the filtered run"). Outputs in ``--results``:
``ablation.csv`` (one row per run, with timings), ``report.md`` / ``report.csv`` / ``groups.csv`` / PNG plots from
``acp-data report`` (mean +- std over seeds) and ``ablation.md`` (the command and the group table). The last line on
stdout is one JSON object: ``apr_baseline``, ``apr_unfiltered``, ``apr_filtered`` (segm APr means of the groups so
named), ``apr_oracle``, ``apr_std`` (the largest seed std of those four), ``ap_*`` of the same groups, ``gap_closed``
(``(filtered - unfiltered) / (oracle - unfiltered)`` of segm APr), ``seeds`` (the fewest seeds of those groups),
``world_seed`` (the Shapes world the runs trained and evaluated on) and every group's means and stds; the same line
is ``results.json`` in ``--results``.

``--world-seed N`` builds (or reuses) a held-out world with another seed and the same sizes, with its own priors,
judge and cache, under ``output/ablation/worldN`` (runs in ``output/ablation/worldN/runs``). The ``final`` grid is
the held-out table of docs/design.md "The Shapes world": baseline, unfiltered, filtered and oracle
(``configs/shapes/oracle.yaml``: the candidate with the fewest failures by the generator's truth, ``@match:filtered``
images) with 3 seeds; with one seed each, filtered under the ``ACP.DROPPED_INSTANCES`` policies acp.yaml does not use,
and filtered on a copy of the cache rescored by the ``in_domain`` judge (``filtered_in_domain``). Its tables go to
``benchmarks/results/heldout/`` (the committed seed-0 tables stay as they are).

The default Shapes grid (inputs built or reused under ``--shapes-dir`` as by ``python -m acp_data.shapes.demo``):

| group | config | what it measures |
|---|---|---|
| baseline | shapes/baseline.yaml | real images only |
| unfiltered | shapes/acp_unfiltered.yaml, ``ACP.MAX_IMAGES @match:filtered`` | random candidate per unit, no thresholds |
| filtered | shapes/acp.yaml | CLIS: best of 4 by CLIS-I, instances >= 10 (chosen on world seed 0 against the generator's truth: benchmarks/selection_rules.py), dropped instances ignored |
| clip_only | shapes/acp.yaml on a rescored copy of the cache, ``MIN_CLIS_I 0``, ``MAX_IMAGES @match:filtered`` | best of 4 by the judge's whole-image caption score alone (``global_weight 1``, ``instance_weight 0``): no instance filter, no CLIS-L |
| filtered_minT | shapes/acp.yaml, ``ACP.MIN_CLIS_I T`` (60, one seed; ``full``: 0 and 60) | the same selected candidates as filtered with another instance threshold (60: the paper's number taken literally): what dropping instances (the objects stay in the image, unlabelled) costs or buys |
| ratio_R | shapes/acp.yaml, ``ACP.MIX_MODE ratio``, ``ACP.SYNTH_RATIO R`` (0.1, 0.25, 0.5; one seed, ``full``: 3) | synthetic share of the stream |

"random" selection is the unfiltered group (one random candidate per unit, as many images as CLIS keeps), so
random vs CLIP-only vs CLIS compares three ways of choosing the same number of images from the same candidates.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from acp_data.fsio import atomic_write_json, atomic_write_text  # noqa: E402
from acp_data.shapes.demo import CONFIG_DIR, DemoPaths, prepare_inputs  # noqa: E402
from acp_data.shapes.jobs import TrainJob, child_env, read_json, seconds_per_iter  # noqa: E402

MATCH_PREFIX = "@match:"
TASKS = ("segm", "bbox")
METRICS = ("AP", "APr", "APc", "APf")
HEADLINE = ("baseline", "unfiltered", "filtered", "oracle")
DEFAULT_SEEDS = (1, 2)
FULL_SEEDS = (1, 2, 3)
RATIOS = (0.1, 0.25, 0.5)
INSTANCE_THRESHOLDS = (0, 60)
_KEY_START = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_.]*=)")


class AblationError(ValueError):
    """A bad run spec or grid file; the message names the argument or the file."""


# ----- run specs ------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One group of the ablation: a config plus overrides, trained once per seed."""

    name: str
    config: str
    overrides: dict[str, str] = field(default_factory=dict)
    seeds: tuple[int, ...] = DEFAULT_SEEDS

    def run_name(self, seed: int) -> str:
        return f"{self.name}_seed{seed}"


def _check_name(name: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise AblationError(f"{where}: run name {name!r} must be letters, digits, '_', '.' or '-'")
    if "_seed" in name:
        raise AblationError(f"{where}: run name {name!r} must not contain '_seed' (run directories are NAME_seedS)")
    return name


def parse_run(text: str, seeds: Sequence[int] = DEFAULT_SEEDS) -> RunSpec:
    """``NAME=CONFIG[:KEY=VAL,KEY=VAL...]`` -> RunSpec. A value may contain commas (``ACP.CACHE_DIRS=["a","b"]``):
    a comma starts a new override only when ``KEY=`` follows it."""
    if "=" not in text:
        raise AblationError(f"--run {text!r} must look like NAME=CONFIG[:KEY=VALUE,...]")
    name, rest = text.split("=", 1)
    _check_name(name.strip(), f"--run {text!r}")
    config, _, over = rest.partition(":")
    if not config.strip():
        raise AblationError(f"--run {text!r} names no config file")
    overrides: dict[str, str] = {}
    if over.strip():
        for item in _KEY_START.split(over):
            if "=" not in item:
                raise AblationError(f"--run {text!r}: override {item!r} must look like KEY=VALUE")
            k, v = item.split("=", 1)
            overrides[k.strip()] = v.strip()
    return RunSpec(name.strip(), config.strip(), overrides, tuple(seeds))


def _seed_list(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        seeds = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise AblationError(f"{where}: seeds {value!r} must be integers") from e
    if not seeds or any(s < 0 for s in seeds):
        raise AblationError(f"{where}: seeds {value!r} must be a non-empty list of integers >= 0")
    return seeds


def load_grid(path: str | os.PathLike) -> tuple[list[RunSpec], dict[str, str], int | None]:
    """A grid file: ``seeds`` (default 1, 2), ``iters`` (optional SOLVER.MAX_ITER), ``common`` (overrides for every
    run) and ``runs``: a list of ``{name, config, overrides: {KEY: VALUE}, seeds}``. Relative config paths are
    relative to the grid file, else to the checkout."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AblationError(f"cannot read grid file {p}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list) or not doc["runs"]:
        raise AblationError(f"grid file {p}: needs a non-empty 'runs' list")
    unknown = set(doc) - {"seeds", "iters", "common", "runs"}
    if unknown:
        raise AblationError(f"grid file {p}: unknown keys {sorted(unknown)} (known: seeds, iters, common, runs)")
    seeds = _seed_list(doc.get("seeds", list(DEFAULT_SEEDS)), f"grid file {p}")
    common = {str(k): _yaml_value(v) for k, v in (doc.get("common") or {}).items()}
    specs = []
    for i, r in enumerate(doc["runs"]):
        where = f"grid file {p}, runs[{i}]"
        if not isinstance(r, dict) or "name" not in r or "config" not in r:
            raise AblationError(f"{where}: each run needs 'name' and 'config'")
        bad = set(r) - {"name", "config", "overrides", "seeds"}
        if bad:
            raise AblationError(f"{where}: unknown keys {sorted(bad)} (known: name, config, overrides, seeds)")
        cfg = Path(str(r["config"]))
        if not cfg.is_absolute() and (p.parent / cfg).is_file():
            cfg = p.parent / cfg
        over = {str(k): _yaml_value(v) for k, v in (r.get("overrides") or {}).items()}
        specs.append(RunSpec(_check_name(str(r["name"]), where), str(cfg), over,
                             _seed_list(r["seeds"], where) if "seeds" in r else seeds))
    iters = doc.get("iters")
    return specs, common, None if iters is None else int(iters)


def _yaml_value(v: Any) -> str:
    """A grid value as the string detectron2's ``merge_from_list`` parses (lists as JSON, strings as they are)."""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _core_groups(cache: str, seeds: Sequence[int]) -> list[RunSpec]:
    """baseline, unfiltered (one random candidate, capped at filtered's image count) and filtered over ``cache``."""
    return [
        RunSpec("baseline", str(CONFIG_DIR / "baseline.yaml"), {}, seeds),
        RunSpec("unfiltered", str(CONFIG_DIR / "acp_unfiltered.yaml"),
                {"ACP.CACHE_DIRS": cache, "ACP.MAX_IMAGES": f"{MATCH_PREFIX}filtered"}, seeds),
        RunSpec("filtered", str(CONFIG_DIR / "acp.yaml"), {"ACP.CACHE_DIRS": cache}, seeds),
    ]


def shapes_grid(paths: DemoPaths, clip_cache: Path, full: bool = False) -> list[RunSpec]:
    """The default Shapes ablation (module docstring): 12 runs; ``full``: 3 seeds everywhere and both instance
    threshold groups (24 runs)."""
    seeds = FULL_SEEDS if full else DEFAULT_SEEDS
    cache = json.dumps([str(paths.cache)])
    match = f"{MATCH_PREFIX}filtered"
    specs = [
        *_core_groups(cache, seeds),
        RunSpec("clip_only", str(CONFIG_DIR / "acp.yaml"),
                {"ACP.CACHE_DIRS": json.dumps([str(clip_cache)]), "ACP.MIN_CLIS_I": "0.0", "ACP.MAX_IMAGES": match},
                seeds),
    ]
    # the instance threshold at load time over the same selected candidates (filtered is 20); default: 60 only
    for t in INSTANCE_THRESHOLDS if full else INSTANCE_THRESHOLDS[-1:]:
        specs.append(RunSpec(f"filtered_min{t}", str(CONFIG_DIR / "acp.yaml"),
                             {"ACP.CACHE_DIRS": cache, "ACP.MIN_CLIS_I": f"{t}.0"}, seeds if full else seeds[:1]))
    for r in RATIOS:
        specs.append(RunSpec(f"ratio_{r}", str(CONFIG_DIR / "acp.yaml"),
                             {"ACP.CACHE_DIRS": cache, "ACP.MIX_MODE": "ratio", "ACP.SYNTH_RATIO": str(r)},
                             seeds if full else seeds[:1]))
    return specs


def final_grid(paths: DemoPaths, in_domain_cache: Path, filtered_policy: str) -> list[RunSpec]:
    """The held-out table (module docstring): baseline, unfiltered, filtered, oracle with 3 seeds; filtered with the
    other dropped-instance policies and with the in_domain judge's scores, one seed each (15 runs)."""
    from acp_data.d2.config import DROPPED_POLICIES

    seeds = FULL_SEEDS
    cache = json.dumps([str(paths.cache)])
    match = f"{MATCH_PREFIX}filtered"
    specs = [
        *_core_groups(cache, seeds),
        RunSpec("oracle", str(CONFIG_DIR / "oracle.yaml"), {"ACP.CACHE_DIRS": cache, "ACP.MAX_IMAGES": match}, seeds),
    ]
    for policy in DROPPED_POLICIES:
        if policy != filtered_policy:
            specs.append(RunSpec(f"filtered_{policy}", str(CONFIG_DIR / "acp.yaml"),
                                 {"ACP.CACHE_DIRS": cache, "ACP.DROPPED_INSTANCES": policy}, seeds[:1]))
    specs.append(RunSpec("filtered_in_domain", str(CONFIG_DIR / "acp.yaml"),
                         {"ACP.CACHE_DIRS": json.dumps([str(in_domain_cache)])}, seeds[:1]))
    return specs


# ----- synthetic image counts -----------------------------------------------------------------------------------------
def load_cfg(config: str, overrides: dict[str, str] | Sequence[str]):
    """The detectron2 config a run trains with, read by ``tools/train_net.py``'s loader (``add_acp_config`` + file
    + ``KEY VALUE`` overrides, validated)."""
    from acp_data.d2 import config as d2_config

    flat = [x for kv in overrides.items() for x in kv] if isinstance(overrides, dict) else list(overrides)
    try:
        return d2_config.load_cfg(str(_resolve_config(config)), flat)
    except d2_config.ConfigError as e:
        raise AblationError(str(e)) from e


def _resolve_config(config: str) -> Path:
    """The config file as ``tools/train_net.py`` finds it, absolute (the runs train with the checkout as working
    directory)."""
    from acp_data.d2.config import ConfigError, resolve_config_file

    try:
        return Path(resolve_config_file(config)).absolute()
    except ConfigError as e:
        raise AblationError(str(e)) from e


def count_synthetic(cfg) -> int:
    """Synthetic images the load-time selection of ``cfg`` keeps on ``ACP.CACHE_DIRS`` (what the ACP loader uses)."""
    from acp_data.cache.reader import CacheReader
    from acp_data.cache.selection import select, selection_from_cfg

    if not cfg.ACP.ENABLED or not cfg.ACP.CACHE_DIRS:
        raise AblationError("counting synthetic images needs a config with ACP.ENABLED and ACP.CACHE_DIRS")
    readers = [CacheReader(d) for d in cfg.ACP.CACHE_DIRS]
    return len(select(readers, selection_from_cfg(cfg, readers[0].categories)))


# ----- planning ---------------------------------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    spec: RunSpec
    seed: int
    run_dir: Path
    overrides: dict[str, str]
    status: str = "pending"  # pending | done (metrics.json existed) | trained | failed
    wall_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.run_name(self.seed)


def plan(specs: Sequence[RunSpec], out: Path, common: dict[str, str], iters: int | None,
         seeds: Sequence[int] | None = None) -> list[PlannedRun]:
    """One PlannedRun per (spec, seed); those whose ``metrics.json`` exists are ``done``."""
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AblationError(f"run names must be unique; repeated: {', '.join(dup)}")
    runs = []
    for spec in specs:
        for v in spec.overrides.values():
            if v.startswith(MATCH_PREFIX) and v[len(MATCH_PREFIX):] not in names:
                raise AblationError(f"run {spec.name!r}: {v!r} names no run of this ablation ({', '.join(names)})")
        over = {**common, **spec.overrides}
        if iters:
            over.update({"SOLVER.MAX_ITER": str(iters), "SOLVER.WARMUP_ITERS": str(max(1, iters // 10))})
        for seed in (tuple(seeds) if seeds else spec.seeds):
            d = out / spec.run_name(seed)
            r = PlannedRun(spec, seed, d, dict(over))
            if (d / "metrics.json").is_file():
                r.status = "done"
            runs.append(r)
    return runs


def config_changes(run: PlannedRun) -> list[str]:
    """Keys where a finished run's saved ``config.yaml`` differs from the config it would train with now (its file,
    the files that file inherits, the overrides); ``OUTPUT_DIR`` and ``@match`` keys (counted again) are not compared.
    A finished run with changes is stale: its metrics describe another experiment."""
    import yaml

    from acp_data.report import flatten_config

    saved_path = run.run_dir / "config.yaml"
    if not saved_path.is_file():
        return ["config.yaml: missing"]
    try:
        saved = flatten_config(yaml.safe_load(saved_path.read_text()) or {})
    except yaml.YAMLError as e:
        return [f"config.yaml: unreadable ({e})"]
    skip = {"OUTPUT_DIR", "ACP.EVAL_BACKEND"} | {k for k, v in run.overrides.items() if v.startswith(MATCH_PREFIX)}
    over = {k: v for k, v in run.overrides.items() if not v.startswith(MATCH_PREFIX)}
    want = flatten_config(yaml.safe_load(load_cfg(run.spec.config, {**over, "SEED": str(run.seed)}).dump()))
    changes = []
    for k in sorted(set(saved) | set(want)):
        if k in skip:
            continue
        a, b = saved.get(k, "<absent>"), want.get(k, "<absent>")
        if a != b:
            changes.append(f"{k}: {a!r} -> {b!r}")
    return changes


def mark_stale(runs: Sequence[PlannedRun], retrain: bool) -> None:
    """Finished runs whose config changed since they trained: retrained (the old directory moved aside to
    ``NAME.stale-<time>``) with ``retrain``, else an error that names the run and the keys, before any training."""
    stale = []
    for r in runs:
        if r.status != "done":
            continue
        changes = config_changes(r)
        if changes:
            stale.append((r, changes))
    if not stale:
        return
    lines = [f"{r.name} ({r.run_dir}): " + "; ".join(c[:5]) + (f"; ... {len(c) - 5} more" if len(c) > 5 else "")
             for r, c in stale]
    if not retrain:
        raise AblationError("finished runs were trained with another config than they would get now:\n  "
                            + "\n  ".join(lines) + "\nrerun with --retrain-stale to train them again (their "
                            "directories are moved aside), or restore the configs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for (r, _), line in zip(stale, lines):
        r.run_dir.rename(r.run_dir.with_name(f"{r.run_dir.name}.stale-{stamp}"))
        r.status = "pending"
        print(f"[ablation] stale, trained again: {line}", flush=True)


def resolve_overrides(run: PlannedRun, specs: dict[str, RunSpec], common: dict[str, str]) -> dict[str, str]:
    """``@match:NAME`` values -> the number of synthetic images run NAME keeps at this run's seed."""
    out = {}
    for k, v in run.overrides.items():
        if v.startswith(MATCH_PREFIX):
            ref = specs[v[len(MATCH_PREFIX):]]
            ref_over = {**common, **ref.overrides, "SEED": str(run.seed)}
            if any(x.startswith(MATCH_PREFIX) for x in ref_over.values()):
                raise AblationError(f"run {run.spec.name!r}: {v} refers to a run that itself uses {MATCH_PREFIX}")
            v = str(count_synthetic(load_cfg(ref.config, ref_over)))
            print(f"[ablation] {run.name}: {k} = {v} (images kept by {ref.name!r} at seed {run.seed})", flush=True)
        out[k] = v
    return out


def train_args(run: PlannedRun, overrides: dict[str, str], extra: Sequence[str]) -> list[str]:
    flat = [x for kv in overrides.items() for x in kv]
    return [*extra, "--config-file", str(_resolve_config(run.spec.config)), *flat, "SEED", str(run.seed),
            "OUTPUT_DIR", str(run.run_dir)]


# ----- running ----------------------------------------------------------------------------------------------------------
def execute(runs: list[PlannedRun], specs: list[RunSpec], common: dict[str, str], env: dict[str, str], jobs: int,
            extra: Sequence[str], progress: bool = True, poll_s: float = 5.0) -> None:
    """Train the pending runs, ``jobs`` at a time; a failed run is reported and the others go on."""
    from tqdm import tqdm

    by_name = {s.name: s for s in specs}
    todo = [r for r in runs if r.status == "pending"]
    active: list[tuple[PlannedRun, TrainJob]] = []
    bar = tqdm(total=len(todo), desc="ablation runs", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        while todo or active:
            while todo and len(active) < jobs:
                r = todo.pop(0)
                try:
                    over = resolve_overrides(r, by_name, common)
                    cfg = load_cfg(r.spec.config, {**over, "SEED": str(r.seed)})
                except Exception as e:  # a bad config or cache: this run fails, the others go on
                    r.status = "failed"
                    print(f"[ablation] {r.name}: cannot start: {type(e).__name__}: {e}", flush=True)
                    bar.update(1)
                    continue
                job = TrainJob(r.name, train_args(r, over, extra), r.run_dir,
                               {"overrides": over}, int(cfg.SOLVER.MAX_ITER))
                job.start(env)
                print(f"[ablation] {r.name}: started ({job.iters} iterations; log {job.log_path})", flush=True)
                active.append((r, job))
            time.sleep(poll_s)
            for r, job in list(active):
                rc = job.poll()
                if rc is None:
                    continue
                active.remove((r, job))
                r.wall_s = job.t1 - job.t0
                bar.update(1)
                if rc == 0 and (r.run_dir / "metrics.json").is_file():
                    r.status = "trained"
                    m = json.loads((r.run_dir / "metrics.json").read_text())
                    print(f"[ablation] {r.name}: done in {r.wall_s / 60:.1f} min; segm AP {_f(m, 'segm', 'AP')} "
                          f"APr {_f(m, 'segm', 'APr')}", flush=True)
                else:
                    r.status = "failed"
                    print(f"[ablation] {r.name}: FAILED (exit status {rc}); last lines of {job.log_path}:\n"
                          f"{job.log_tail(20)}", flush=True)
            if progress:
                bar.set_postfix_str(" ".join(f"{r.name}:{j.iteration()}/{j.iters}" for r, j in active))
    except BaseException:
        for _, job in active:
            job.kill()
        raise
    finally:
        bar.close()


def _f(m: dict[str, Any], task: str, metric: str) -> str:
    v = (m.get(task) or {}).get(metric)
    return "n/a" if v is None else f"{v:.1f}"


# ----- results ----------------------------------------------------------------------------------------------------------
def group_stats(runs: Sequence[PlannedRun]) -> dict[str, dict[str, Any]]:
    """Per group (spec name): mean and sample std over seeds of every task/metric (``acp-data report``'s
    ``Group.stats``), and the seeds used."""
    from acp_data.report import Group, Run

    groups: dict[str, tuple[Group, list[int]]] = {}
    for r in runs:
        if r.status not in ("done", "trained"):
            continue
        m = json.loads((r.run_dir / "metrics.json").read_text())
        g, seeds = groups.setdefault(r.spec.name, (Group(label=r.spec.name), []))
        g.runs.append(Run(path=r.run_dir, name=r.name, metrics=m, config={}))
        seeds.append(r.seed)
    out: dict[str, dict[str, Any]] = {}
    for name, (g, seeds) in groups.items():
        out[name] = {"seeds": seeds}
        for t in TASKS:
            for k in METRICS:
                mean, std, n = g.stats(t, k)
                if n:
                    out[name][f"{t}_{k}_mean"], out[name][f"{t}_{k}_std"] = mean, std
    return out


def gap_closed(unfiltered: float | None, filtered: float | None, oracle: float | None) -> float | None:
    """``(filtered - unfiltered) / (oracle - unfiltered)``: the share of the gap between random choice and the
    generator-truth oracle that the filter closes; None without the three or when the oracle is no better."""
    if unfiltered is None or filtered is None or oracle is None or oracle - unfiltered <= 1e-9:
        return None
    return round((filtered - unfiltered) / (oracle - unfiltered), 3)


def headline(groups: dict[str, dict[str, Any]], world_seed: int | None = None) -> dict[str, Any]:
    """The last line's JSON: segm APr and AP of baseline / unfiltered / filtered / oracle, their largest seed std,
    ``gap_closed``, ``seeds``, ``world_seed``, all groups."""
    def get(name: str, key: str) -> float | None:
        v = groups.get(name, {}).get(key)
        return None if v is None else round(float(v), 2)

    stds = [s for n in HEADLINE if (s := get(n, "segm_APr_std")) is not None]
    out: dict[str, Any] = {f"apr_{n}": get(n, "segm_APr_mean") for n in HEADLINE}
    out["apr_std"] = max(stds) if stds else None
    out.update({f"ap_{n}": get(n, "segm_AP_mean") for n in HEADLINE})
    mean = {n: (groups.get(n) or {}).get("segm_APr_mean") for n in ("unfiltered", "filtered", "oracle")}
    out["gap_closed"] = gap_closed(mean["unfiltered"], mean["filtered"], mean["oracle"])
    counts = [len(groups[n]["seeds"]) for n in HEADLINE if n in groups]
    out["seeds"] = min(counts) if counts else None
    out["world_seed"] = world_seed
    out["groups"] = {n: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in g.items()}
                     for n, g in groups.items()}
    return out


def write_results(runs: Sequence[PlannedRun], results: Path, command: str, elapsed_s: float,
                  world_seed: int | None = None) -> dict[str, Any]:
    """``ablation.csv``, ``acp-data report`` outputs, ``ablation.md`` and ``results.json`` (the headline) in
    ``results``; returns the headline."""
    from acp_data.report import make_report

    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in runs:
        m = json.loads((r.run_dir / "metrics.json").read_text()) if r.status in ("done", "trained") else {}
        row = {"run": r.name, "group": r.spec.name, "seed": r.seed, "status": r.status,
               "wall_s": None if r.wall_s is None else round(r.wall_s, 1),
               "s_per_iter": _round(seconds_per_iter(r.run_dir)), "iter": m.get("iter"),
               "config": r.spec.config, "overrides": " ".join(f"{k}={v}" for k, v in r.overrides.items())}
        for t in TASKS:
            for k in METRICS:
                row[f"{t}_{k}"] = (m.get(t) or {}).get(k)
        rows.append(row)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(results / "ablation.csv", buf.getvalue())
    done = [r for r in runs if r.status in ("done", "trained")]
    if done:
        make_report([r.run_dir for r in done], results, labels={r.name: r.spec.name for r in done})
    groups = group_stats(runs)
    head = headline(groups, world_seed)
    lines = ["# Long-tail ablation", "", "Command:", "", f"    {command}", "",
             f"{len(done)} of {len(runs)} runs have metrics ({sum(r.status == 'trained' for r in runs)} trained by this "
             f"invocation, the others found finished); this invocation took {elapsed_s / 60:.1f} min.", ""]
    for t, title in (("segm", "mask"), ("bbox", "box")):
        lines += [f"## {title} AP ({t}), mean ± std over seeds", "", "| group | seeds | AP | APr | APc | APf |",
                  "|---|---|---|---|---|---|"]
        for name, g in groups.items():
            cells = []
            for k in METRICS:
                mean, std = g.get(f"{t}_{k}_mean"), g.get(f"{t}_{k}_std")
                # one seed: no spread to show (a "± 0.0" would read as a measured spread)
                cells.append("n/a" if mean is None else f"{mean:.1f}" if len(g["seeds"]) < 2 else f"{mean:.1f} ± {std:.1f}")
            lines.append(f"| {name} | {','.join(map(str, g['seeds']))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Headline:", "", "```json", json.dumps({k: v for k, v in head.items() if k != "groups"}), "```", ""]
    (results / "ablation.md").write_text("\n".join(lines))
    atomic_write_text(results / "results.json", json.dumps({k: v for k, v in head.items() if k != "groups"}) + "\n")
    return head


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# ----- Shapes inputs ------------------------------------------------------------------------------------------------------
def rescored_copy(paths: DemoPaths, name: str, source_fp: str, judge_fp: str, rescore_args: list[str],
                  progress: bool) -> Path:
    """A copy of the cache ``paths.out/name`` (made again when the cache or the judge changed), rescored with
    ``acp-data rescore`` and ``rescore_args`` (resumable: shards already rescored with these settings are skipped)."""
    from acp_data.clis.rescore import cli_main as rescore_main

    copy = paths.out / name
    stamp = paths.out / f"{name}.stamp.json"
    want = {"source": source_fp, "judge": judge_fp}
    if copy.exists() and read_json(stamp) != want:
        shutil.rmtree(copy)
    if not copy.exists():
        tmp = paths.out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(paths.cache, tmp)
        os.rename(tmp, copy)
        atomic_write_json(stamp, want, default=str)
    args = [str(copy), "--scorer", "clip", *rescore_args] + ([] if progress else ["--no-progress"])
    if rescore_main(args) != 0:
        raise AblationError(f"rescoring the copy {copy} failed (see above)")
    return copy


def prepare_shapes(shapes_dir: Path, progress: bool, world_seed: int = 0,
                   in_domain: bool = False) -> tuple[DemoPaths, Path, Path | None]:
    """The world (seed ``world_seed``), priors, judge and cache (built or reused, as the demo builds them), the
    CLIP-only copy of the cache (rescored with the judge's whole-image score alone, ``global_weight 1``,
    ``instance_weight 0``, no instance threshold: its ``selected`` flag is the best candidate by CLIP image-caption
    score) and with ``in_domain`` a copy rescored by the ``in_domain`` judge (trained on the world's real images)
    with the prebuild's scorer settings."""
    from acp_data.shapes.demo import file_sha256
    from acp_data.shapes.judge import JudgeOptions, train_judge

    paths = DemoPaths(shapes_dir.absolute())
    inputs = prepare_inputs(paths, world_seed=world_seed, threads=None, progress=progress)
    fp = inputs.fingerprint
    clip = rescored_copy(paths, "cache_clip_only", fp["cache"], fp["judge"],
                         ["--set", f"model={inputs.judge_spec}", "--set", "global_weight=1", "--set",
                          "instance_weight=0", "--min-clis-i", "0", "--min-clis-l", "0"], progress)
    if not in_domain:
        return paths, clip, None
    spec = train_judge(paths.world, paths.out / "judge_in_domain", JudgeOptions(variant="in_domain"),
                       progress=progress)
    config = (read_json(paths.cache_stamp) or {}).get("config") or {}  # the prebuild config the cache was built from
    scorer = {k: v for k, v in (config.get("scorer") or {}).items() if k != "name"}
    sets: list[str] = []
    for k, v in {**scorer, "model": spec}.items():
        sets += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    sel = config.get("selection") or {}
    sets += ["--min-clis-i", str(sel.get("min_clis_i", 0)), "--min-clis-l", str(sel.get("min_clis_l", 0))]
    judge_fp = file_sha256(paths.out / "judge_in_domain" / "open_clip_model.safetensors")
    return paths, clip, rescored_copy(paths, "cache_in_domain", fp["cache"], judge_fp, sets, progress)



# ----- main -------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--grid", default=None,
                   help="'default', 'full' or 'final' (the Shapes grids; final: the held-out table) or a YAML grid "
                        "file")
    p.add_argument("--world-seed", type=int, default=0,
                   help="Shapes world seed (default 0, the demo's world); another seed builds a held-out world of the "
                        "same sizes under output/ablation/worldN")
    p.add_argument("--run", action="append", default=[], metavar="NAME=CONFIG[:KEY=VAL,...]",
                   help="a run group (repeatable); replaces the default grid")
    p.add_argument("--also", action="append", default=[], metavar="NAME=CONFIG[:KEY=VAL,...]",
                   help="a run group added to the grid (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every run (default: the grid's, 1,2)")
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER of every run (warmup: 10 %%)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--out", default=None,
                   help="run directories NAME_seedS (checkpoints: kept out of git; default output/ablation/runs, "
                        "with --world-seed N output/ablation/worldN/runs)")
    p.add_argument("--results", default=None,
                   help="tables, CSVs and plots (default benchmarks/results; --grid final: benchmarks/results/heldout)")
    p.add_argument("--shapes-dir", default=None,
                   help="Shapes inputs (world, priors, judge, caches; default output/demo, with --world-seed N "
                        "output/ablation/worldN)")
    p.add_argument("--datasets", default=None,
                   help="DETECTRON2_DATASETS of the runs (default: SHAPES_DIR/datasets for the Shapes grid, else the "
                        "environment's)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per run (default: CPUs / jobs; 0 = the library's default)")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra tools/train_net.py argument (repeatable), e.g. --train-arg=--num-gpus=8")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--retrain-stale", action="store_true",
                   help="train finished runs again when their config changed since (default: stop with an error)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--count-synthetic", metavar="CONFIG", default=None,
                   help="print how many synthetic images CONFIG's selection keeps (trailing KEY=VALUE overrides) and "
                        "exit")
    p.add_argument("count_overrides", nargs="*", help=argparse.SUPPRESS)
    return p


def _kv(items: Sequence[str], where: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise AblationError(f"{where} {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve_dirs(args: argparse.Namespace) -> None:
    """Defaults of ``--shapes-dir``, ``--out`` and ``--results`` that depend on ``--world-seed`` and ``--grid``."""
    held_out = args.world_seed != 0
    if args.world_seed < 0:
        raise AblationError(f"--world-seed {args.world_seed} must be >= 0")
    base = Path("output/ablation") / f"world{args.world_seed}"
    args.shapes_dir = args.shapes_dir or str(base if held_out else Path("output/demo"))
    args.out = args.out or str(base / "runs" if held_out else Path("output/ablation/runs"))
    args.results = args.results or ("benchmarks/results/heldout" if args.grid == "final" else "benchmarks/results")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.time()
    command = "python benchmarks/longtail_ablation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    world_seed: int | None = None
    try:
        resolve_dirs(args)
        if args.count_synthetic:
            n = count_synthetic(load_cfg(args.count_synthetic, _kv(args.count_overrides, "override")))
            print(json.dumps({"config": args.count_synthetic, "synthetic_images": n}))
            return 0
        if args.count_overrides:
            raise AblationError(f"unexpected arguments {args.count_overrides} (KEY=VALUE only with --count-synthetic)")
        seeds = _seed_list(args.seeds, "--seeds") if args.seeds else None
        common = _kv(args.set, "--set")
        iters = args.iters
        env_root = os.environ.get("DETECTRON2_DATASETS")
        datasets = args.datasets
        if args.run:
            if args.grid:
                raise AblationError("give either --grid or --run, not both")
            specs = [parse_run(r, seeds or DEFAULT_SEEDS) for r in args.run]
        elif args.grid and args.grid not in ("default", "full", "final"):
            specs, grid_common, grid_iters = load_grid(args.grid)
            common = {**grid_common, **common}
            iters = iters or grid_iters
        else:
            shapes = Path(args.shapes_dir)
            final = args.grid == "final"
            world_seed = args.world_seed
            if args.dry_run:
                paths = DemoPaths(shapes.absolute())
                clip, in_domain = paths.out / "cache_clip_only", paths.out / "cache_in_domain"
            else:
                paths, clip, in_domain = prepare_shapes(shapes, not args.no_progress, args.world_seed, final)
            if final:
                policy = str(load_cfg(str(CONFIG_DIR / "acp.yaml"), {}).ACP.DROPPED_INSTANCES)
                specs = final_grid(paths, in_domain, policy)
            else:
                specs = shapes_grid(paths, clip, full=args.grid == "full")
            datasets = datasets or str(paths.datasets)
        specs += [parse_run(r, seeds or DEFAULT_SEEDS) for r in args.also]
        runs = plan(specs, Path(args.out).absolute(), common, iters, seeds)
        mark_stale(runs, retrain=args.retrain_stale and not args.dry_run)
        for r in runs:
            print(f"[ablation] {r.name:<24} {r.status:<8} {r.spec.config} "
                  + " ".join(f"{k}={v}" for k, v in r.overrides.items()), flush=True)
        if args.dry_run:
            return 0
        threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        env = child_env(DemoPaths(Path(args.shapes_dir).absolute()).datasets, threads or None)
        if datasets:
            env["DETECTRON2_DATASETS"] = str(Path(datasets).absolute())
        elif env_root is None:
            env.pop("DETECTRON2_DATASETS", None)
        else:
            env["DETECTRON2_DATASETS"] = env_root
        execute(runs, specs, common, env, max(1, args.jobs), args.train_arg, progress=not args.no_progress)
        head = write_results(runs, Path(args.results), command, time.time() - t0, world_seed)
    except AblationError as e:
        print(f"longtail_ablation: error: {e}", file=sys.stderr)
        return 2
    failed = [r.name for r in runs if r.status == "failed"]
    if failed:
        print(f"[ablation] failed runs: {', '.join(failed)}", file=sys.stderr)
    print(json.dumps(head), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
