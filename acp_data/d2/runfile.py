"""``acp_run.json``, the record the ACP train loader writes into ``OUTPUT_DIR``, and the one mask-format check over
runs to be compared: polygon and bitmask training differ in mask targets, so such runs are not comparable
(docs/design.md "The stream contract"). Light: no torch, no detectron2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

RUN_FILE = "acp_run.json"


def read_mask_format(run_dir: str | os.PathLike) -> str:
    """A run's mask format: from ``acp_run.json`` (ACP runs), else from detectron2's ``config.yaml`` dump
    (``INPUT.MASK_FORMAT``, detectron2's default ``polygon`` when absent)."""
    run_dir = Path(run_dir)
    acp = run_dir / RUN_FILE
    if acp.is_file():
        try:
            return str(json.loads(acp.read_text())["mask_format"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{acp} has no readable mask_format: {e}") from e
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            doc = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{cfg} cannot be parsed: {e}") from e
        return str(((doc.get("INPUT") or {}).get("MASK_FORMAT")) or "polygon")
    raise ValueError(f"{run_dir} has neither {RUN_FILE} nor config.yaml: not a training output directory")


def same_mask_format(formats: Mapping[str, str | None]) -> str | None:
    """The one mask format of ``{run: format}`` (``None``: unknown, not counted; ``None`` when none is known);
    ``ValueError`` listing each run's format when they differ."""
    known = {run: f for run, f in formats.items() if f is not None}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{run}: {f}" for run, f in known.items())
        raise ValueError(f"runs of one comparison must use the same INPUT.MASK_FORMAT; found {listing}. Retrain with "
                         "one mask format")
    return next(iter(known.values()), None)


def check_same_mask_format(run_dirs: Sequence[str | os.PathLike]) -> str:
    """The common ``INPUT.MASK_FORMAT`` of training output directories (see :func:`read_mask_format`);
    ``ValueError`` listing each run's format otherwise."""
    return same_mask_format({str(d): read_mask_format(d) for d in run_dirs}) or "polygon"
