"""``tools/train_net.py`` with a probe: every process appends each sample its ACP loader loaded (stream position,
source, index, pool version, image id) to ``$ACP_TEST_PROBE_DIR/rank<r>.jsonl``. Run as a script, so that the
processes detectron2's ``launch`` spawns import it (as ``__mp_main__``) and carry the probe too. Used by
tests/test_ddp_cpu.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import train_net  # noqa: E402

from acp_data.d2 import loader  # noqa: E402

_load = loader.MixedDataset.__getitem__


def _recording_getitem(self, ref):
    from detectron2.utils import comm

    out = _load(self, ref)
    ref = loader.SampleRef(*ref)
    line = {"position": int(ref.position), "source": int(ref.source), "index": int(ref.index),
            "version": int(ref.version), "image_id": int(out["image_id"])}
    with open(os.path.join(os.environ["ACP_TEST_PROBE_DIR"], f"rank{comm.get_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    return out


loader.MixedDataset.__getitem__ = _recording_getitem

if __name__ == "__main__":
    sys.exit(train_net.cli(sys.argv[1:]))
