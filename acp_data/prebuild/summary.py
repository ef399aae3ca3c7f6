"""The summary of one rank's run (``<cache>/summary/*.json``): written from the runner's counters and timers, added
up over ranks, and printed as a few human lines."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import _Stats

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "write_summary", "merge_summaries", "format_summary", "nothing_stored"]

# Stages timed separately (the summary's ``time_s`` and ``time_share`` keys, plus ``load``, ``loop`` and ``total``).
STAGES = ("plan", "generate", "segment", "clis_l", "clis_i", "select", "encode", "write")


def write_summary(writer: Any, base: dict[str, Any], stats: _Stats, status: str,
                   error: str | None = None) -> dict[str, Any]:
    loop_s = max(stats.loop_end - stats.loop_start, 0.0)
    staged = {s: stats.seconds[s] for s in STAGES}
    total_staged = sum(staged.values())
    summary = {
        **base, "status": status, "error": error, "threads": stats.threads, "finished": time.time(),
        "units": {"total": stats.units_all, "rank": stats.units_rank, "skipped_done": stats.units_skipped,
                  "processed": stats.units_processed, "stored": stats.units_stored,
                  "selected": stats.units_selected, "empty": len(stats.empty_units), "errors": stats.errors},
        "candidates": stats.candidates, "kept": stats.kept,
        "instances": {"segmented": stats.instances, "dropped": stats.instances_dropped,
                      "stored": stats.instances_stored},
        "rejections": {k: dict(sorted(v.items())) for k, v in stats.rejections.items()},
        "repairs": dict(sorted(stats.repairs.items())),
        "selection": dict(sorted(stats.selection.items())),
        "time_s": {**{k: round(v, 4) for k, v in stats.seconds.items()}, "loop": round(loop_s, 4),
                   "loop_cpu": round(max(stats.loop_cpu_end - stats.loop_cpu_start, 0.0), 4),
                   "total": round(time.perf_counter() - stats.t_start, 4)},
        "time_share": {s: (round(v / total_staged, 4) if total_staged > 0 else 0.0) for s, v in staged.items()},
        "loop_start": stats.loop_start, "loop_end": stats.loop_end,
        "kept_per_s": round(stats.kept / loop_s, 4) if loop_s > 0 else 0.0,
        "empty_units": dict(stats.empty_units),
    }
    try:
        path = writer.write_summary(summary)
        summary["summary_path"] = str(path)
    except OSError as e:  # the summary is a report: never hide the run's own outcome behind it
        logger.error("cannot write the prebuild summary: %s", e)
    return summary


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several ranks' summaries (units, candidates, kept, instances, rejections, stage time)."""
    out: dict[str, Any] = {"ranks": len(summaries), "units": Counter(), "candidates": 0, "kept": 0,
                           "instances": Counter(), "rejections": {}, "time_s": Counter()}
    for s in summaries:
        out["units"].update({k: v for k, v in s.get("units", {}).items() if k != "total"})
        out["candidates"] += int(s.get("candidates", 0))
        out["kept"] += int(s.get("kept", 0))
        out["instances"].update(s.get("instances", {}))
        for stage, reasons in s.get("rejections", {}).items():
            out["rejections"].setdefault(stage, Counter()).update(reasons)
        out["time_s"].update({k: v for k, v in s.get("time_s", {}).items()})
    out["units"] = dict(out["units"])
    out["instances"] = dict(out["instances"])
    out["rejections"] = {k: dict(v) for k, v in out["rejections"].items()}
    out["time_s"] = {k: round(v, 4) for k, v in out["time_s"].items()}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: counts, rejections by reason, time per stage."""
    u = summary["units"]
    inst = summary["instances"]
    lines = [
        f"prebuild rank {summary['rank']}/{summary['world']} [{summary['status']}]: {u['rank']} of {u['total']} "
        f"units for this rank, {u['skipped_done']} already done, {u['processed']} processed ({u['stored']} stored, "
        f"{u['selected']} with a selected candidate, {u['empty']} with nothing stored, {u['errors']} failed)",
        f"  candidates {summary['candidates']}, kept {summary['kept']}, instances {inst['segmented']} "
        f"({inst['dropped']} dropped: empty mask), {summary['kept_per_s']:.3g} kept/s",
    ]
    rej = [f"{stage}.{r} {n}" for stage, d in summary["rejections"].items() for r, n in d.items() if n]
    if rej:
        lines.append("  rejections: " + ", ".join(rej))
    t = summary["time_s"]
    share = summary["time_share"]
    lines.append("  time: " + ", ".join(f"{s} {t[s]:.2f}s ({100 * share[s]:.0f}%)" for s in STAGES if t[s] > 0)
                 + f"; load {t['load']:.2f}s, total {t['total']:.2f}s")
    if summary.get("summary_path"):
        lines.append(f"  summary: {summary['summary_path']}")
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    return "\n".join(lines)


def nothing_stored(summary: dict[str, Any], cache_dir: Any) -> str | None:
    """The error of a complete run after which the cache holds no sample at all, with the counts of what rejected
    every unit (this run's, else the earlier runs' that this one skipped); ``None`` otherwise."""
    from ..cache.layout import list_shard_files
    from ..cache.writer import read_summaries

    if summary.get("status") != "complete" or not summary["units"]["rank"] or list_shard_files(cache_dir):
        return None
    empty = dict(summary.get("empty_units") or {})
    rejections = {f"{stage}.{r}": n for stage, d in summary.get("rejections", {}).items() for r, n in d.items() if n}
    if not summary["units"]["processed"]:  # skipped as rejected by earlier runs: their summaries say why
        earlier = [s for s in read_summaries(cache_dir) if s.get("summary_path") != summary.get("summary_path")]
        for s in earlier:
            empty.update(s.get("empty_units") or {})
        counts: Counter = Counter()
        for s in earlier:
            counts.update({f"{stage}.{r}": int(n) for stage, d in s.get("rejections", {}).items()
                           for r, n in d.items() if n})
        rejections = dict(counts)
    reasons = ", ".join(f"{r} {n}" for r, n in Counter(empty.values()).most_common()) or "none recorded"
    detail = ", ".join(f"{k} {n}" for k, n in sorted(rejections.items(), key=lambda kv: -kv[1]))
    return (f"stored nothing: {cache_dir} holds no sample. All {summary['units']['rank']} units of this rank ended "
            f"without one, by reason: {reasons}" + (f"; rejections: {detail}" if detail else "")
            + ". Fix what rejects them (docs/prebuild.md \"Summary\") and rerun: units that failed with an error "
            "are retried")

