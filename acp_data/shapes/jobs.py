"""Training runs as child processes of ``tools/train_net.py``, for the demo (``acp_data.shapes.demo``) and the
long-tail ablation (``benchmarks/longtail_ablation.py``): start one, watch its iteration and phase, wait for several
with progress bars, read its seconds per iteration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
RUN_STATE = "demo_run.json"  # the command and inputs a finished run was made from


class JobError(RuntimeError):
    """A training run could not start or failed; the message says which and where its log is."""


def read_json(path: Path) -> Any:
    """The JSON content of ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def child_env(datasets: Path, threads: int | None) -> dict[str, str]:
    """Environment of a training process: ``datasets`` as DETECTRON2_DATASETS, ``threads`` intra-op threads (None:
    torch's)."""
    env = dict(os.environ)
    env["DETECTRON2_DATASETS"] = str(datasets)
    env.setdefault("PYTHONWARNINGS", "ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class TrainJob:
    """One ``tools/train_net.py`` child process: started, watched (iteration from ``train_metrics.json``, phase from
    its log) and checked."""

    def __init__(self, name: str, args: list[str], run_dir: Path, inputs: dict[str, Any], iters: int):
        self.name, self.args, self.run_dir, self.iters = name, args, run_dir, iters
        self.state = {"args": args, "inputs": inputs}
        self.proc: subprocess.Popen | None = None
        self.log_path = run_dir / "stdout.log"
        self.t0 = self.t1 = 0.0
        self.cpu_s: float | None = None  # CPU seconds of the child (and its workers), sampled while it runs
        self.reused = False
        self._log_offset = 0
        self.phase = "waiting"

    def done_before(self) -> bool:
        """``metrics.json`` exists and was made by this very command from these inputs."""
        return (self.run_dir / "metrics.json").is_file() and read_json(self.run_dir / RUN_STATE) == \
            json.loads(json.dumps(self.state))

    def start(self, env: dict[str, str]) -> None:
        if not TRAIN_NET.is_file():
            raise JobError(f"{TRAIN_NET} is missing: the demo runs from an acp-data checkout")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RUN_STATE, "metrics.json", "train_metrics.json", "last_checkpoint"):
            (self.run_dir / stale).unlink(missing_ok=True)
        log = open(self.log_path, "w")
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(TRAIN_NET), *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env)
        log.close()
        self.phase = "training"

    def iteration(self) -> int:
        """Iterations finished, from the last line of ``train_metrics.json`` (written every 20 iterations)."""
        p = self.run_dir / "train_metrics.json"
        try:
            with open(p, "rb") as f:
                f.seek(max(0, os.path.getsize(p) - 4096))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                return int(json.loads(line)["iteration"]) + 1
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def poll(self) -> int | None:
        """Return code once finished; updates the phase from the log."""
        assert self.proc is not None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read()
            self._log_offset += len(chunk)
            if b"Start inference on" in chunk:
                self.phase = "evaluating"
        except OSError:
            pass
        self._sample_cpu()
        rc = self.proc.poll()
        if rc is not None and not self.t1:
            self.t1 = time.time()
            self.phase = "done" if rc == 0 else "failed"
            if rc == 0:
                atomic_write_json(self.run_dir / RUN_STATE, self.state, default=str)
        return rc

    def _sample_cpu(self) -> None:
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
            self.cpu_s = sum(sum(q.cpu_times()[:2]) for q in procs)
        except (psutil.Error, OSError):  # exited between two samples: keep the last value
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_for(jobs: Sequence[TrainJob], progress: bool = True, poll_s: float = 2.0) -> None:
    """Show one progress bar per running job until all have finished; a failure stops the others and raises."""
    from tqdm import tqdm

    live = [j for j in jobs if j.proc is not None]
    bars = {j.name: tqdm(total=j.iters, desc=f"{j.name:>8}", unit="it", position=i, disable=not progress,
                         dynamic_ncols=True, leave=True) for i, j in enumerate(live)}
    try:
        while True:
            running = False
            for j in live:
                rc = j.poll()
                bar = bars[j.name]
                it = j.iters if j.phase in ("evaluating", "done") else min(j.iteration(), j.iters)
                if it > bar.n or getattr(bar, "postfix", None) != j.phase:  # redraw on change only (logs stay short)
                    bar.set_postfix_str(j.phase, refresh=False)
                    bar.update(it - bar.n)
                    bar.refresh()
                if rc is None:
                    running = True
                elif rc != 0:
                    for other in live:
                        other.kill()
                    raise JobError(f"training run {j.name!r} failed (exit status {rc}); last lines of "
                                    f"{j.log_path}:\n{j.log_tail()}")
            if not running:
                return
            time.sleep(poll_s)
    finally:
        for b in bars.values():
            b.close()


def seconds_per_iter(run_dir: Path) -> float | None:
    """Mean of detectron2's per-iteration ``time`` (20-iteration medians) over ``train_metrics.json``."""
    vals = []
    try:
        for line in (run_dir / "train_metrics.json").read_text().splitlines():
            try:
                t = json.loads(line).get("time")
            except ValueError:
                continue
            if isinstance(t, (int, float)):
                vals.append(float(t))
    except OSError:
        return None
    return sum(vals) / len(vals) if vals else None
