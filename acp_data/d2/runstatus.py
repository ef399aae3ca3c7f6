"""``train_status.json``: whether a training run finished. Rank 0 writes it when training starts (``running``) and
when it ends (``complete`` or ``failed``, with the iterations done and the error), so a run that raised, was killed
or is still going never passes for a finished one: ``acp-data report`` refuses such a run's ``metrics.json``
(docs/design.md "Evaluation (contract)"). Light: no torch, no detectron2.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "train_status.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


def write_status(output_dir: str | os.PathLike, status: str, *, iter_done: int, max_iter: int,
                 start_iter: int = 0, error: str | None = None) -> Path:
    """Write ``output_dir/train_status.json`` crash-safe. ``iter_done``: training iterations finished (the
    iteration of the last model state: ``max_iter`` for a complete run)."""
    from ..fsio import atomic_write_json

    path = Path(output_dir) / STATUS_FILE
    atomic_write_json(path, {"status": status, "iter_done": int(iter_done), "max_iter": int(max_iter),
                             "start_iter": int(start_iter), "error": error, "host": socket.gethostname(),
                             "pid": os.getpid(), "time": time.time()})
    return path


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's status record, or ``None`` when it has none (an eval-only directory, a run from an older
    acp-data); ``ValueError`` naming the file when it cannot be parsed."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    if not isinstance(doc, dict) or "status" not in doc:
        raise ValueError(f"{path} has no 'status'")
    return doc


def unfinished_reason(status: dict[str, Any] | None, metrics: dict[str, Any]) -> str | None:
    """Why a run's ``metrics.json`` is not the result of its finished training (``None``: it is, as far as known):
    the status record says ``running`` or ``failed``, or ``metrics.json``'s ``iter`` is below the status record's
    ``max_iter`` (an earlier checkpoint evaluated into the run's directory). A directory without a status record
    (``--eval-only`` elsewhere, a run from an older acp-data) is taken as it is."""
    if status is None:
        return None
    st = status.get("status")
    if st == FAILED:
        err = status.get("error") or "an exception"
        return f"training failed after {status.get('iter_done')} of {status.get('max_iter')} iterations ({err})"
    if st != COMPLETE:
        return f"training has status {st!r} ({status.get('iter_done')} of {status.get('max_iter')} iterations)"
    it, max_iter = metrics.get("iter"), status.get("max_iter")
    if it is not None and isinstance(max_iter, int) and int(it) < max_iter:
        return f"metrics.json evaluates iteration {it} of the training's {max_iter}"
    return None
