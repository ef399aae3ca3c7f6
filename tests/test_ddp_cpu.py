"""Two training processes on CPU (detectron2's ``launch``, gloo) through tools/train_net.py with ACP on: from what
each rank actually loaded (tests/ddp_probe.py), the ranks' samples are disjoint and are the global stream's
positions ``r, r + 2, ...``; the evaluation gathered over both ranks equals a one-process evaluation of the same
checkpoint (docs/design.md "The stream contract", "Scale beyond one machine")."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, run_train_net, subprocess_env, tiny_dataset_overrides, tiny_model_overrides
from test_loader_errors import build_mixing_world

from acp_data.d2.sampler import REAL, SYNTH

PROBE = Path(__file__).resolve().parent / "ddp_probe.py"
CONFIG = "configs/tiny/mask_rcnn_R18_tiny.yaml"
MAX_ITER = 3
WORLD = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_mixing_world(tmp_path_factory.mktemp("ddpworld"), n_units=8)


def _overrides(world, out) -> list[str]:
    return [
        *tiny_dataset_overrides(), *tiny_model_overrides(max_iter=MAX_ITER),
        "SOLVER.IMS_PER_BATCH", str(2 * WORLD), "OUTPUT_DIR", str(out), "SEED", "7",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still detects: the comparison has content
        "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", "DATALOADER.REPEAT_THRESHOLD", "0.3",
        "DATALOADER.ASPECT_RATIO_GROUPING", "False",  # batches in stream order: a rank loads a prefix of its share
        "ACP.ENABLED", "True", "ACP.CACHE_DIRS", json.dumps([world["cache"]]), "ACP.CATEGORIES", "all",
        "ACP.MIN_CLIS_I", "0.0", "ACP.MIX_MODE", "ratio", "ACP.SYNTH_RATIO", "0.5",
    ]


def _one_process_loader_parts(run_dir: Path, tmp: Path, monkeypatch, datasets_root: str) -> dict:
    """The loader's parts for the run's own config.yaml in this (one) process: its sampler is rank 0 of 1, so
    ``global_stream()`` is the stream every rank slices."""
    from acp_data.d2 import lvis_format
    from acp_data.d2.config import load_cfg
    from acp_data.d2.loader import _train_loader_from_config

    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    cfg = load_cfg(str(run_dir / "config.yaml"), ["OUTPUT_DIR", str(tmp)])
    lvis_format.register_from_config(cfg)
    return _train_loader_from_config(cfg)


@pytest.mark.slow
def test_two_cpu_processes_split_the_stream_and_evaluate_as_one(world, tmp_path, monkeypatch):
    out, probe = tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    res = subprocess.run([sys.executable, str(PROBE), "--num-gpus", str(WORLD), "--dist-url", "auto",
                          "--config-file", CONFIG, *_overrides(world, out)], cwd=str(REPO_ROOT),
                         env=subprocess_env(world["datasets_root"], ACP_TEST_PROBE_DIR=str(probe)),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    run = json.loads((out / "acp_run.json").read_text())
    assert run["world_size"] == WORLD
    assert json.loads((out / "train_status.json").read_text())["status"] == "complete"

    # what each rank loaded: its share of the global stream, in order, disjoint from the other rank's
    loaded = {r: [json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()]
              for r in range(WORLD)}
    for r, lines in loaded.items():
        assert len(lines) >= MAX_ITER * 2, (r, len(lines))  # two images per rank and iteration
    positions = [{d["position"] for d in lines} for lines in loaded.values()]
    assert not positions[0] & positions[1]
    parts = _one_process_loader_parts(out, tmp_path / "one", monkeypatch, world["datasets_root"])
    stream = parts["sampler"].global_stream()
    need = WORLD * max(len(v) for v in loaded.values())
    glob = list(itertools.islice(stream, need))
    synth = parts["synthetic"](0)
    by_position = {int(x.position): (int(x.source), int(x.index), int(x.version)) for x in glob}
    for r, lines in loaded.items():
        assert all(d["position"] % WORLD == r for d in lines), f"rank {r}"
        assert all(by_position[d["position"]] == (d["source"], d["index"], d["version"]) for d in lines)
        want = glob[r::WORLD][:len(lines)]
        assert [(d["position"], d["source"], d["index"], d["version"]) for d in lines] == \
            [(int(x.position), int(x.source), int(x.index), int(x.version)) for x in want], f"rank {r}"
        for d in lines:  # the sample behind each reference is the one this process resolves
            ref_id = (synth[d["index"]] if d["source"] == SYNTH else parts["dataset"][d["index"]])["image_id"]
            assert d["image_id"] == ref_id
    sources = {d["source"] for lines in loaded.values() for d in lines}
    assert sources == {REAL, SYNTH}

    # the synthetic samples the ranks drew are the ones acp_samples.npz lists, at the same dataset positions
    from acp_data.d2.synthset import SyntheticSet

    recorded = SyntheticSet.read(out)
    assert recorded.sha() == run["synthetic_set"]["sha"] == json.loads((out / "metrics.json").read_text())[
        "synthetic_set"]
    assert recorded.entries() == SyntheticSet.from_dataset(synth).entries()

    # evaluation gathered over both ranks = one process evaluating the same checkpoint
    one = tmp_path / "one_eval"
    ev = run_train_net(["--config-file", str(out / "config.yaml"), "--eval-only", "OUTPUT_DIR", str(one),
                        "MODEL.WEIGHTS", str(out / "model_final.pth")], datasets_root=world["datasets_root"])
    assert ev.returncode == 0, ev.stderr[-4000:]
    two_m, one_m = (json.loads((d / "metrics.json").read_text()) for d in (out, one))
    assert two_m["iter"] == one_m["iter"] == MAX_ITER
    for task in ("bbox", "segm"):
        assert two_m[task] == one_m[task], task
    dets = [sorted(json.loads((d / "inference" / "tiny_val" / "lvis_instances_results.json").read_text()),
                   key=lambda x: (x["image_id"], x["category_id"], -x["score"], x["bbox"])) for d in (out, one)]
    assert len(dets[0]) == len(dets[1]) > 0
    assert {d["image_id"] for d in dets[0]} == {im["id"] for im in world["lvis"]["val"]["images"]}
    for a, b in zip(*dets):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
