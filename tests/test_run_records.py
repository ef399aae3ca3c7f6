"""What a run leaves behind can be trusted: a training that raised is not evaluated and says so
(``train_status.json``), ``acp-data report`` refuses or marks unfinished runs, and every ACP run lists its exact
synthetic samples (``acp_samples.npz``, its sha in ``acp_run.json``, the log and ``metrics.json``), which the report
compares (docs/design.md "Evaluation (contract)", "The stream contract")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO_ROOT, tiny_dataset_overrides, tiny_model_overrides
from test_loader_errors import build_mixing_world, world_cfg

from acp_data.d2.runstatus import read_status, unfinished_reason
from acp_data.d2.synthset import SAMPLES_FILE, SyntheticSet, compare
from acp_data.report import ReportError, make_report

MAX_ITER = 4


# ----- a training that raises --------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_training_that_raises_on_its_last_iteration_is_not_evaluated(tiny_lvis, tmp_path, monkeypatch, one_thread):
    from detectron2.engine import HookBase

    from acp_data.d2.engine import Trainer, argument_parser, setup

    class DivergeAt(HookBase):
        def before_step(self):
            if self.trainer.iter == MAX_ITER - 1:
                raise FloatingPointError("Loss became infinite or NaN at iteration=3!")

    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_lvis["root"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"iter": 100, "bbox": None, "segm": None}))  # an earlier run's
    args = argument_parser().parse_args([
        "--config-file", str(REPO_ROOT / "configs/tiny/mask_rcnn_R18_tiny.yaml"), *tiny_dataset_overrides(),
        *tiny_model_overrides(max_iter=MAX_ITER), "OUTPUT_DIR", str(out)])
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.register_hooks([DivergeAt()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert not (out / "metrics.json").exists()  # neither evaluated nor left over at the contract path
    assert json.loads((out / "metrics.before_failure.json").read_text())["iter"] == 100
    assert not (out / "model_final.pth").exists()
    assert not (out / "inference").exists()  # no evaluation ran
    status = read_status(out)
    assert status["status"] == "failed" and status["iter_done"] == MAX_ITER - 1 and status["max_iter"] == MAX_ITER
    assert "FloatingPointError" in status["error"]

    # a metrics.json put back by hand is still refused by the report, or reported marked
    (out / "metrics.json").write_text((out / "metrics.before_failure.json").read_text())
    with pytest.raises(ReportError, match=r"(?s)did not finish.*run: training failed after 3 of 4 iterations "
                                          r"\(FloatingPointError"):
        make_report([out], tmp_path / "report")
    make_report([out], tmp_path / "report", allow_unfinished=True)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**Unfinished runs**" in md and "| run (unfinished) |" in md


def test_unfinished_reason():
    assert unfinished_reason({"status": "complete", "max_iter": 10}, {"iter": 10}) is None
    assert "status 'running'" in unfinished_reason({"status": "running", "iter_done": 2, "max_iter": 10}, {"iter": 2})
    assert unfinished_reason({"status": "complete", "max_iter": 10}, {"iter": 5}) == \
        "metrics.json evaluates iteration 5 of the training's 10"  # an earlier checkpoint evaluated into the run
    assert unfinished_reason({"status": "complete", "max_iter": 10}, {"iter": None}) is None
    assert unfinished_reason(None, {"iter": 5}) is None  # no status file: eval-only elsewhere, an older run


# ----- the synthetic set ------------------------------------------------------------------------------------------
def _set(keys, insts, caches=("/c",)) -> SyntheticSet:
    off = np.cumsum([0] + [len(i) for i in insts])
    return SyntheticSet(key=np.array([k for k, _ in keys], dtype="S32"),
                        candidate_idx=np.array([c for _, c in keys], np.int32), cache=np.zeros(len(keys), np.int16),
                        inst_offsets=off.astype(np.int64), inst_local=np.array(sum(map(list, insts), []), np.int32),
                        caches=list(caches))


def test_synthetic_set_sha_covers_samples_and_instances_only(tmp_path):
    a = _set([("k1", 0), ("k2", 1)], [(0, 1), (2,)])
    same = _set([("k2", 1), ("k1", 0)], [(2,), (0, 1)], caches=("/elsewhere",))  # other order, other location
    assert a.sha() == same.sha() and len(a.sha()) == 16
    assert a.sha() != _set([("k1", 0), ("k2", 1)], [(0,), (2,)]).sha()  # one instance fewer
    assert a.sha() != _set([("k1", 0), ("k2", 0)], [(0, 1), (2,)]).sha()  # another candidate
    path = a.write(tmp_path)
    assert path.name == SAMPLES_FILE
    back = SyntheticSet.read(tmp_path)
    assert back.entries() == a.entries() and back.caches == ["/c"] and back.sha() == a.sha()
    assert compare(a, _set([("k1", 0), ("k3", 0)], [(0,), (1,)])) == {"common": 1, "only_a": 1, "only_b": 1,
                                                                       "instances_differ": 1}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SAMPLES_FILE).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="cannot read the synthetic sample record"):
        SyntheticSet.read(tmp_path / "bad")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_mixing_world(tmp_path_factory.mktemp("recordworld"), n_units=8)


def test_the_loader_records_the_exact_samples(world, tmp_path, caplog):
    import logging

    from acp_data.d2.loader import _train_loader_from_config

    cfg = world_cfg(world, tmp_path / "all", "ratio", SYNTH_RATIO=0.5)
    with caplog.at_level(logging.INFO, logger="acp_data.d2.loader"):
        parts = _train_loader_from_config(cfg)
    run = json.loads((tmp_path / "all" / "acp_run.json").read_text())
    rec = SyntheticSet.read(tmp_path / "all")
    synth = parts["synthetic"](0)
    assert run["synthetic_set"] == {"file": SAMPLES_FILE, "sha": rec.sha(), "samples": len(synth),
                                    "instances": len(synth.result.inst_local), "used_as": "images"}
    assert any(f"sha {rec.sha()}" in r.getMessage() for r in caplog.records)
    for i in range(len(synth)):  # dataset position i is record entry i: its key, candidate and kept instances
        ci, row = synth.source(i)
        reader = synth.readers[ci]
        key, cand, inst = rec.entries()[i]
        assert key == reader.key(row) and cand == int(reader.value("candidate_idx", row))
        assert list(inst) == synth.result.inst_local[synth.result.instances(i)].tolist()

    capped = world_cfg(world, tmp_path / "capped", "ratio", SYNTH_RATIO=0.5, MAX_IMAGES=5)
    _train_loader_from_config(capped)
    fewer = SyntheticSet.read(tmp_path / "capped")
    assert fewer.sha() != rec.sha()
    assert compare(rec, fewer) == {"common": 5, "only_a": len(rec) - 5, "only_b": 0, "instances_differ": 0}


# ----- the report -------------------------------------------------------------------------------------------------
def _fake_run(root: Path, name: str, seed: int, sset: SyntheticSet | None, status: str | None = "complete",
              it: int = 10) -> Path:
    d = root / name
    d.mkdir(parents=True)
    seg = {"AP": 20.0 + seed, "APr": 10.0, "APc": 15.0, "APf": 30.0}
    (d / "metrics.json").write_text(json.dumps({"bbox": seg, "segm": seg, "dataset": "x", "iter": it}))
    (d / "config.yaml").write_text(yaml.safe_dump({"SEED": seed, "OUTPUT_DIR": str(d), "SOLVER": {"MAX_ITER": 10},
                                                   "ACP": {"ENABLED": sset is not None}}))
    if sset is not None:
        sset.write(d)
        (d / "acp_run.json").write_text(json.dumps({"synthetic_set": {"sha": sset.sha(), "samples": len(sset),
                                                                      "used_as": "images"}}))
    if status:
        (d / "train_status.json").write_text(json.dumps({"status": status, "iter_done": it, "max_iter": 10}))
    return d


def test_report_shows_different_synthetic_sets(tmp_path):
    a = _set([("k1", 0), ("k2", 1), ("k3", 0)], [(0,), (1,), (0,)])
    b = _set([("k1", 0), ("k2", 1), ("k4", 0)], [(0,), (1, 2), (0,)])
    runs = [_fake_run(tmp_path, "base_seed0", 0, None), _fake_run(tmp_path, "acp_seed0", 0, a),
            _fake_run(tmp_path, "acp_seed1", 1, a)]
    make_report(runs, tmp_path / "same")
    md = (tmp_path / "same" / "report.md").read_text()
    assert "## Synthetic sets" in md and f"| acp_seed0 | acp | 3 | {a.sha()} | images |" in md
    assert "All ACP runs used the same synthetic samples." in md

    runs.append(_fake_run(tmp_path, "acp_seed2", 2, b))
    make_report(runs, tmp_path / "diff")
    md = (tmp_path / "diff" / "report.md").read_text()
    assert "**Different synthetic sets within group acp**" in md
    assert ("acp_seed0 vs acp_seed2: 2 samples in common, 1 only in acp_seed0, 1 only in acp_seed2, 1 with other "
            "kept instances") in md
    assert "used 2 different synthetic sets" in md


def test_report_refuses_unfinished_runs(tmp_path):
    ok = _fake_run(tmp_path, "ok_seed0", 0, None)
    running = _fake_run(tmp_path, "ok_seed1", 1, None, status="running", it=6)
    early = _fake_run(tmp_path, "ok_seed2", 2, None, it=6)  # an earlier checkpoint evaluated into the run
    old = _fake_run(tmp_path, "ok_seed3", 3, None, status=None, it=6)  # no status file: taken as it is
    with pytest.raises(ReportError) as e:
        make_report([ok, running, early], tmp_path / "r")
    msg = str(e.value)
    assert f"{running}: training has status 'running' (6 of 10 iterations)" in msg
    assert f"{early}: metrics.json evaluates iteration 6 of the training's 10" in msg
    assert str(ok) + ":" not in msg and str(old) + ":" not in msg
    make_report([ok, old], tmp_path / "r")  # finished runs, and one without a status record, are fine
