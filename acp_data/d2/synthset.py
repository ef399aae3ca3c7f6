"""``acp_samples.npz``: the exact synthetic samples an ACP run's load-time selection kept, written beside
``acp_run.json`` so two runs can be compared sample by sample and a result audited or reproduced from the caches
alone (docs/design.md "The stream contract").

Per kept sample, in the synthetic dataset's order (the ``index`` of a synthetic ``SampleRef``): its generation
``key``, ``candidate_idx``, the cache it came from (``cache``, an index into ``caches``) and the positions of its
kept instances in the record's ``instances`` list (``inst_offsets`` / ``inst_local``, CSR). The set's ``sha`` (16 hex
digits) covers the sorted ``(key, candidate_idx, kept instances)`` triples only: where the caches live and the
dataset order do not change it. An online run (``ACP.ONLINE``) records the pool it starts with; the snapshots in
``acp_online/`` record the later pools. Light: numpy only.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_FILE = "acp_samples.npz"
FORMAT = "acp-data synthetic set"
VERSION = 1


@dataclass
class SyntheticSet:
    """The kept synthetic samples of one run (see the module docstring)."""

    key: np.ndarray  # bytes (S), one per sample
    candidate_idx: np.ndarray  # int32
    cache: np.ndarray  # int16: index into ``caches``
    inst_offsets: np.ndarray  # int64, len n + 1
    inst_local: np.ndarray  # int32
    caches: list[str] = field(default_factory=list)
    _sha: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.key)

    @classmethod
    def from_dataset(cls, dataset: Any) -> SyntheticSet:
        """From a ``SyntheticDataset`` (its readers and selection result); reads index columns only."""
        res = dataset.result
        n = len(res)
        keys = np.empty(n, dtype="S64")
        cand = np.empty(n, dtype=np.int32)
        ci = np.asarray(res.cache_index, dtype=np.int64)
        rows = np.asarray(res.sample_row, dtype=np.int64)
        for c, reader in enumerate(dataset.readers):
            sel = np.flatnonzero(ci == c)
            if len(sel):
                keys[sel] = reader.column("key")[rows[sel]]
                cand[sel] = reader.column("candidate_idx")[rows[sel]]
        width = max((len(k) for k in keys.tolist()), default=1)
        return cls(key=keys.astype(f"S{max(width, 1)}"), candidate_idx=cand, cache=ci.astype(np.int16),
                   inst_offsets=np.asarray(res.inst_offsets, dtype=np.int64),
                   inst_local=np.asarray(res.inst_local, dtype=np.int32),
                   caches=[os.path.abspath(str(r.cache_dir)) for r in dataset.readers])

    def entries(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(key, candidate_idx, kept instance positions)`` per sample, in dataset order."""
        off, loc = self.inst_offsets.tolist(), self.inst_local.tolist()
        return [(k.decode(), int(c), tuple(loc[off[i]:off[i + 1]]))
                for i, (k, c) in enumerate(zip(self.key.tolist(), self.candidate_idx.tolist()))]

    def sha(self) -> str:
        """16 hex digits of the sha256 of the sorted ``key.c<candidate>:<instances>`` lines (computed once)."""
        if self._sha is None:
            lines = sorted(f"{k}.c{c}:{','.join(map(str, inst))}\n" for k, c, inst in self.entries())
            self._sha = hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
        return self._sha

    def to_bytes(self) -> bytes:
        import json

        meta = json.dumps({"format": FORMAT, "version": VERSION, "caches": self.caches, "sha": self.sha(),
                           "samples": len(self), "instances": int(len(self.inst_local))})
        buf = io.BytesIO()
        np.savez_compressed(buf, key=self.key, candidate_idx=self.candidate_idx, cache=self.cache,
                 inst_offsets=self.inst_offsets, inst_local=self.inst_local, meta=np.array(meta))
        return buf.getvalue()

    def write(self, run_dir: str | os.PathLike) -> Path:
        """``run_dir/acp_samples.npz``, written crash-safe (``acp_data/fsio.py``)."""
        from ..fsio import atomic_write_bytes

        path = Path(run_dir) / SAMPLES_FILE
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> SyntheticSet:
        """A run directory's ``acp_samples.npz`` (or the file itself); ``ValueError`` naming it when unreadable."""
        import json

        p = Path(path)
        if p.is_dir():
            p = p / SAMPLES_FILE
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                return cls(key=z["key"], candidate_idx=z["candidate_idx"], cache=z["cache"],
                           inst_offsets=z["inst_offsets"], inst_local=z["inst_local"],
                           caches=list(meta.get("caches", [])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read the synthetic sample record {p}: {e}") from e


def compare(a: SyntheticSet, b: SyntheticSet) -> dict[str, int]:
    """How two sets overlap, by ``(key, candidate_idx)``: ``common``, ``only_a``, ``only_b``, and ``instances_differ``
    (common samples whose kept instances differ)."""
    ea = {(k, c): inst for k, c, inst in a.entries()}
    eb = {(k, c): inst for k, c, inst in b.entries()}
    common = ea.keys() & eb.keys()
    return {"common": len(common), "only_a": len(ea.keys() - eb.keys()), "only_b": len(eb.keys() - ea.keys()),
            "instances_differ": sum(ea[k] != eb[k] for k in common)}
