"""Compare training runs: ``acp-data report RUN_DIR... --out DIR``.

Each run directory holds ``metrics.json`` (docs/design.md "Evaluation (contract)", with the ``eval_backend`` that
computed it) and the ``config.yaml`` detectron2 writes. Runs whose configs differ only by ``SEED`` / ``OUTPUT_DIR``
form one group and are reported as mean +- std (sample std, n-1). Outputs: ``report.md``, ``report.csv`` (one row per run), ``groups.csv`` and PNG plots:
per-group AP (APr/APc/APf) per run group, and APr against the synthetic ratio or image count when groups sweep it.

A run whose training did not finish (``train_status.json`` ``running`` or ``failed``, or a ``metrics.json`` of an
earlier iteration than the training's last) is refused, or reported marked with ``--allow-unfinished``. ACP runs
list their synthetic set (``acp_samples.npz``, its sha in ``acp_run.json``): the report says when compared runs used
different synthetic samples, and how many they share.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("segm", "bbox")
METRICS = ("AP", "APr", "APc", "APf")
# Config keys ignored when deciding whether two runs differ "only by seed" (the evaluation backend changes no
# number: docs/design.md "Evaluation (contract)").
_SEED_KEYS = ("SEED", "OUTPUT_DIR", "ACP.EVAL_BACKEND")


class ReportError(ValueError):
    pass


@dataclass
class Run:
    path: Path
    name: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    label: str = ""
    unfinished: str | None = None  # why metrics.json is not a finished training's result (None: it is)
    synthetic: dict[str, Any] | None = None  # acp_run.json's "synthetic_set" (ACP runs)

    @property
    def seed(self) -> Any:
        return self.config.get("SEED")

    @property
    def eval_backend(self) -> str:
        """The backend that computed the run's numbers; ``lvis`` for a metrics.json from before the key existed."""
        return str(self.metrics.get("eval_backend") or "lvis")

    def value(self, task: str, metric: str) -> float | None:
        v = (self.metrics.get(task) or {}).get(metric)
        return None if v is None else float(v)


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)
    varying: dict[str, Any] = field(default_factory=dict)

    def stats(self, task: str, metric: str) -> tuple[float | None, float | None, int]:
        vals = [v for r in self.runs if (v := r.value(task, metric)) is not None]
        if not vals:
            return None, None, 0
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return mean, std, len(vals)


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A loaded ``config.yaml`` as ``{"ACP.MIN_CLIS_I": value}``, lists as tuples (hashable, comparable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def load_run(path: str | os.PathLike) -> Run:
    """Read one run directory (``metrics.json`` required; ``config.yaml`` optional but needed for grouping)."""
    import yaml

    p = Path(path)
    mfile = p / "metrics.json"
    if not mfile.is_file():
        raise ReportError(f"{p}: no metrics.json (run `tools/train_net.py --eval-only` or `acp-data eval` first)")
    try:
        metrics = json.loads(mfile.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{mfile}: not valid JSON: {e}") from e
    config: dict[str, Any] = {}
    cfile = p / "config.yaml"
    if cfile.is_file():
        config = flatten_config(yaml.safe_load(cfile.read_text()) or {})
    from .d2.runstatus import read_status, unfinished_reason

    try:
        unfinished = unfinished_reason(read_status(p), metrics)
    except ValueError as e:
        unfinished = str(e)
    return Run(path=p, name=p.name, metrics=metrics, config=config, unfinished=unfinished,
               synthetic=_synthetic_set(p, metrics))


def _synthetic_set(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The run's synthetic set record: ``acp_run.json``'s ``synthetic_set``, else ``metrics.json``'s sha."""
    from .d2.runfile import RUN_FILE

    try:
        doc = json.loads((run_dir / RUN_FILE).read_text())
        if isinstance(doc.get("synthetic_set"), dict):
            return doc["synthetic_set"]
    except (OSError, ValueError, AttributeError):
        pass
    sha = metrics.get("synthetic_set")
    return {"sha": sha} if isinstance(sha, str) else None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs whose configs are equal except for the seed and output dir; label groups by what varies."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple(sorted((k, repr(v)) for k, v in r.config.items() if k not in _SEED_KEYS))
        if not r.config:  # no config: each run is its own group
            key = (("__path__", str(r.path)),)
        groups.setdefault(key, Group(label="")).runs.append(r)
    out = list(groups.values())
    all_keys = set().union(*(set(g.runs[0].config) for g in out)) - set(_SEED_KEYS)
    varying = sorted(k for k in all_keys if len({repr(g.runs[0].config.get(k)) for g in out}) > 1)
    for g in out:
        g.varying = {k: g.runs[0].config.get(k) for k in varying}
        interesting = {k: v for k, v in g.varying.items() if k.startswith("ACP.") or k.startswith("SOLVER.MAX_ITER")}
        if len(out) == 1:
            g.label = g.runs[0].name.rsplit("_seed", 1)[0]
        else:
            g.label = _common_prefix_label([r.name for r in g.runs]) or ", ".join(
                f"{k.split('.')[-1]}={v}" for k, v in interesting.items()
            )
    return out


def _common_prefix_label(names: list[str]) -> str:
    stems = {n.rsplit("_seed", 1)[0] for n in names}
    return stems.pop() if len(stems) == 1 else ""


def check_mask_formats(runs: Sequence[Run]) -> str | None:
    """Baseline and ACP runs of one comparison must use one mask format; returns it (None if unknown)."""
    from .d2.runfile import same_mask_format

    try:
        return same_mask_format({str(r.path): r.config.get("INPUT.MASK_FORMAT") for r in runs if r.config})
    except ValueError as e:
        raise ReportError(str(e)) from None


def eval_backends_line(runs: Sequence[Run]) -> str:
    """One report line naming the evaluation backend(s) of the runs. Both backends give lvis-api's numbers
    (docs/design.md "Evaluation (contract)"), so runs evaluated by different ones still compare; the line says so."""
    used = sorted({r.eval_backend for r in runs})
    if len(used) == 1:
        return f"Evaluation backend of all runs: `{used[0]}`."
    detail = ", ".join(f"{r.name}: {r.eval_backend}" for r in runs)
    logger.info("runs were evaluated by different backends (%s); their numbers are the same by contract", detail)
    return f"Evaluation backends: {detail} (the same numbers by contract: hotcoco equals lvis-api)."


def unfinished_lines(runs: Sequence[Run]) -> list[str]:
    """report.md lines marking the runs reported although their training did not finish (``--allow-unfinished``)."""
    bad = [r for r in runs if r.unfinished]
    if not bad:
        return []
    return ["**Unfinished runs** (their metrics.json is not a finished training's result):", "",
            *[f"- {r.name}: {r.unfinished}" for r in bad], ""]


def synthetic_set_lines(groups: Sequence[Group]) -> list[str]:
    """report.md section listing each ACP run's synthetic set (samples, sha) and saying where compared runs used
    different sets: within a group (seeds) that mixes data differences into the spread."""
    runs = [r for g in groups for r in g.runs]
    if not any(r.synthetic for r in runs):
        return []
    lines = ["## Synthetic sets", "", "| run | group | samples | sha | used as |", "|---|---|---|---|---|"]
    for g in groups:
        for r in g.runs:
            s = r.synthetic or {}
            lines.append(f"| {r.name} | {g.label} | {s.get('samples', '-')} | {s.get('sha', '-')} | "
                         f"{s.get('used_as', '-')} |")
    lines.append("")
    shas = {_sha(r) for r in runs if r.synthetic}
    if len(shas) == 1:
        return lines + ["All ACP runs used the same synthetic samples.", ""]
    for g in groups:
        acp = [r for r in g.runs if r.synthetic]
        if len({_sha(r) for r in acp}) > 1:
            pairs = [_overlap(acp[0], r) for r in acp[1:] if _sha(r) != _sha(acp[0])]
            lines.append(f"**Different synthetic sets within group {g.label}**: its seed spread includes a data "
                         "difference. " + "; ".join(pairs) + ".")
    lines += [f"The compared runs used {len(shas)} different synthetic sets.", ""]
    return lines


def _sha(r: Run) -> str | None:
    return (r.synthetic or {}).get("sha")


def _overlap(a: Run, b: Run) -> str:
    """How two runs' synthetic sets overlap (from their ``acp_samples.npz``; the shas when a file is missing)."""
    from .d2.synthset import SyntheticSet, compare

    try:
        c = compare(SyntheticSet.read(a.path), SyntheticSet.read(b.path))
    except ValueError:
        return f"{a.name} vs {b.name}: sha {_sha(a)} vs {_sha(b)}"
    return (f"{a.name} vs {b.name}: {c['common']} samples in common, {c['only_a']} only in {a.name}, {c['only_b']} "
            f"only in {b.name}, {c['instances_differ']} with other kept instances")


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def write_tables(groups: Sequence[Group], out: Path) -> tuple[Path, Path, Path]:
    runs = [r for g in groups for r in g.runs]
    header = ["run", "group", "seed"] + [f"{t}_{m}" for t in TASKS for m in METRICS] + ["eval_backend"]
    run_csv = out / "report.csv"
    with open(run_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for g in groups:
            for r in g.runs:
                w.writerow([r.name, g.label, r.seed] + [
                    "" if (v := r.value(t, m)) is None else f"{v:.4f}" for t in TASKS for m in METRICS]
                    + [r.eval_backend])
    group_csv = out / "groups.csv"
    with open(group_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n"] + [f"{t}_{m}_{s}" for t in TASKS for m in METRICS for s in ("mean", "std")])
        for g in groups:
            row: list[Any] = [g.label, len(g.runs)]
            for t in TASKS:
                for m in METRICS:
                    mean, std, _ = g.stats(t, m)
                    row += ["" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
            w.writerow(row)
    md = out / "report.md"
    lines = [f"# Run comparison ({len(runs)} runs, {len(groups)} groups)", ""]
    fmt = check_mask_formats(runs)
    if fmt:
        lines += [f"Mask format of all runs: `{fmt}`.", ""]
    lines += [eval_backends_line(runs), ""]
    lines += unfinished_lines(runs)
    lines += synthetic_set_lines(groups)
    for t in TASKS:
        title = "mask" if t == "segm" else "box"
        lines += [f"## {title} AP ({t}), mean ± std over seeds", "",
                  "| group | n | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for g in groups:
            cells = [_fmt(*g.stats(t, m)) for m in METRICS]
            lines.append(f"| {g.label} | {len(g.runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Runs", "", "| run | group | seed | " + " | ".join(f"{m} (segm)" for m in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for g in groups:
        for r in g.runs:
            cells = ["n/a" if (v := r.value("segm", m)) is None else f"{v:.1f}" for m in METRICS]
            name = f"{r.name} (unfinished)" if r.unfinished else r.name
            lines.append(f"| {name} | {g.label} | {r.seed} | " + " | ".join(cells) + " |")
    md.write_text("\n".join(lines) + "\n")
    return md, run_csv, group_csv


def _sweep_axis(groups: Sequence[Group]) -> tuple[str, list[tuple[float, Group]]] | None:
    """The sweep to plot: groups that differ only in ``ACP.SYNTH_RATIO`` (ratio mode) or in ``ACP.MAX_IMAGES`` (a
    cap; 0 means none, so it is no point), with at least two values. Groups that also differ in anything else (a
    selection rule, a cache) are not points of one curve: a random and a CLIS group with different caps are no sweep."""
    for key in ("ACP.SYNTH_RATIO", "ACP.MAX_IMAGES"):
        series: dict[tuple, list[tuple[float, Group]]] = {}
        for g in groups:
            if not g.runs[0].config.get("ACP.ENABLED"):
                continue
            if key == "ACP.SYNTH_RATIO" and g.runs[0].config.get("ACP.MIX_MODE") != "ratio":
                continue  # concat mode ignores SYNTH_RATIO: its runs are not points of a ratio sweep
            v = g.varying.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (key == "ACP.MAX_IMAGES" and v <= 0):
                continue
            rest = tuple(sorted((k, repr(x)) for k, x in g.varying.items() if k != key))
            series.setdefault(rest, []).append((float(v), g))
        best = max(series.values(), key=lambda pts: len({p[0] for p in pts}), default=[])
        if len({p[0] for p in best}) >= 2:
            return key, sorted(best, key=lambda p: p[0])
    return None


def write_plots(groups: Sequence[Group], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for t in TASKS:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2))
        width = 0.8 / len(METRICS)
        top = 0.0
        for j, m in enumerate(METRICS):
            means, stds = [], []
            for g in groups:
                mean, std, _ = g.stats(t, m)
                means.append(0.0 if mean is None else mean)
                # no error bar for a single run (a zero-length bar would read as "no seed spread")
                stds.append(float("nan") if std is None or len(g.runs) < 2 else std)
            xs = [i + (j - (len(METRICS) - 1) / 2) * width for i in range(len(groups))]
            top = max([top, *(a + (0.0 if b != b else b) for a, b in zip(means, stds))])
            bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=m)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g.label} (n={len(g.runs)})" for g in groups], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(f"{'mask' if t == 'segm' else 'box'} AP (%)")
        ax.set_title(f"AP by frequency group ({t}; mean ± std over seeds)")
        ax.set_ylim(0, max(top, 1.0) * 1.25)  # head room for the legend and bar labels
        ax.legend(ncol=4, fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out / f"ap_groups_{t}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    sweep = _sweep_axis(groups)
    if sweep:
        key, pts = sweep
        fig, ax = plt.subplots(figsize=(6, 4))
        base = [g for g in groups if not g.runs[0].config.get("ACP.ENABLED")]
        for m in ("APr", "AP"):
            ms = [g.stats("segm", m) for _, g in pts]
            errs = [float("nan") if s[1] is None or len(g.runs) < 2 else s[1] for s, (_, g) in zip(ms, pts)]
            line = ax.errorbar([x for x, _ in pts], [s[0] or 0.0 for s in ms], yerr=errs,
                               marker="o", capsize=3, label=f"{m} (segm)")
            mean = base[0].stats("segm", m)[0] if base else None
            if mean is not None:  # the real-only run, in the same colour
                ax.axhline(mean, color=line.lines[0].get_color(), ls="--", alpha=0.7, label=f"{m} baseline")
        ax.set_xlabel(key)
        ax.set_ylabel("mask AP (%)")
        ax.set_title(f"APr and AP against {key} (segm)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / "apr_sweep.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def make_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                labels: dict[str, str] | None = None, allow_unfinished: bool = False) -> dict[str, Any]:
    """Load runs, group them, write tables and plots into ``out_dir``; return the group statistics. A run whose
    training did not finish is a ``ReportError`` unless ``allow_unfinished`` (then it is marked in report.md)."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    bad = [r for r in runs if r.unfinished]
    if bad and not allow_unfinished:
        raise ReportError("refusing runs whose training did not finish (their metrics.json is not the trained "
                          "model's result; resume or rerun them, or pass --allow-unfinished to report them marked):"
                          "\n  " + "\n  ".join(f"{r.path}: {r.unfinished}" for r in bad))
    groups = group_runs(runs)
    for g in groups:
        if labels:
            for r in g.runs:
                if r.name in labels:
                    g.label = labels[r.name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, run_csv, group_csv = write_tables(groups, out)
    plots = write_plots(groups, out)
    summary = {
        g.label: {f"{t}_{m}": dict(zip(("mean", "std", "n"), g.stats(t, m))) for t in TASKS for m in METRICS}
        for g in groups
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("wrote %s, %s, %s and %d plots", md, run_csv, group_csv, len(plots))
    return summary


def cli_main(argv: list[str]) -> int:
    from .cli import UsageError, check_output_path, fail

    ap = argparse.ArgumentParser(prog="acp-data report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.json and config.yaml)")
    ap.add_argument("--out", required=True, help="output directory for report.md, CSVs and PNG plots")
    ap.add_argument("--allow-unfinished", action="store_true",
                    help="report runs whose training failed or has not finished, marked, instead of refusing them")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_output_path(args.out, "dir", "--out")  # before any run is read (one line, not a traceback)
        make_report(args.runs, args.out, allow_unfinished=args.allow_unfinished)
    except (ReportError, UsageError) as e:
        return fail("acp-data report", e)
    print((Path(args.out) / "report.md").read_text())
    return 0
