"""tools/train_net.py fails fast with one clear message: config values, then data files, then the model."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
from helpers import TRAIN_NET, run_train_net, tiny_dataset_overrides, tiny_model_overrides


@pytest.fixture(scope="module")
def train_net():
    """tools/train_net.py imported as a module (its ``cli(argv)`` returns the exit status)."""
    spec = importlib.util.spec_from_file_location("acp_train_net", TRAIN_NET)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(train_net, capsys, argv) -> str:
    rc = train_net.cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("train_net.py: error: ") and "Traceback" not in err
    return err


def tiny(*extra: str) -> list[str]:
    return ["--config", "tiny/mask_rcnn_R18_tiny.yaml", *tiny_dataset_overrides(), *extra]


def test_missing_lvis_names_variable_and_every_path(tmp_path):
    empty = tmp_path / "datasets"
    empty.mkdir()
    t0 = time.monotonic()
    r = run_train_net(["--config-file", "configs/acp_lvis.yaml"], datasets_root=empty, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
    err = r.stderr
    assert "Traceback" not in err and err.count("train_net.py: error:") == 1
    assert f"DETECTRON2_DATASETS={empty}" in err
    for p in ("lvis/lvis_v1_train.json", "lvis/lvis_v1_val.json", "coco/train2017", "coco/val2017"):
        assert str(empty / p) in err, p
    assert "output/acp_cache/lvis_rare" in err and "acp-data prebuild --config" in err


def test_bad_config_value_names_key(train_net, capsys):
    err = run_cli(train_net, capsys, ["--config", "acp_lvis.yaml", "ACP.SELECT", "best"])
    assert "ACP.SELECT = 'best'" in err and "clis" in err
    err = run_cli(train_net, capsys, ["--config", "acp_lvis.yaml", "SEED", "-1"])
    assert "SEED = -1" in err
    err = run_cli(train_net, capsys, ["--config", "acp_lvis.yaml", "ACP.NO_SUCH_KEY", "1"])
    assert "ACP.NO_SUCH_KEY" in err
    err = run_cli(train_net, capsys, ["--config", "acp_lvis.yaml", "ACP.SYNTH_RATIO", "lots"])
    assert "ACP.SYNTH_RATIO" in err


def test_unknown_config_file_lists_configs(train_net, capsys):
    err = run_cli(train_net, capsys, ["--config", "nope.yaml"])
    assert "'nope.yaml' not found" in err and "acp_lvis.yaml" in err and "tiny/mask_rcnn_R18_tiny.yaml" in err


def test_cache_without_manifest_names_build_command(train_net, capsys, tiny_lvis, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_lvis["root"])
    cache = tmp_path / "my_cache"
    cache.mkdir()
    err = run_cli(train_net, capsys, tiny("ACP.ENABLED", "True", "ACP.CACHE_DIRS", json.dumps([str(cache)]),
                                          "SEED", "3"))
    assert f"{cache} has no manifest.json" in err
    assert f"acp-data prebuild --config PREBUILD_CONFIG.yaml --out {cache}" in err


def test_acp_never_trains_silently_without_synthetic_data(tiny_lvis, tmp_path):
    """A cache dir with a manifest that is not a real cache: without an ACP loader in this build the run refuses
    ("not yet supported"); with one, the loader's own error comes out as one message. Never a trained model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    out = tmp_path / "out"
    r = run_train_net(tiny("ACP.ENABLED", "True", "ACP.CACHE_DIRS", json.dumps([str(cache)]), "SEED", "3",
                           "OUTPUT_DIR", str(out)), datasets_root=tiny_lvis["root"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("train_net.py: error:") == 1 and "Traceback" not in r.stderr + r.stdout
    if importlib.util.find_spec("acp_data.d2.loader") is None:
        assert "ACP training is not yet supported in this build" in r.stderr
    else:
        assert str(cache) in r.stderr
    assert not (out / "model_final.pth").exists()


def test_unregistered_dataset(train_net, capsys):
    err = run_cli(train_net, capsys, ["--config", "lvis_baseline_12ep.yaml", "DATASETS.TRAIN", "('my_set',)"])
    assert "dataset 'my_set' in DATASETS.TRAIN is not registered" in err and "ACP.REGISTER_LVIS" in err


def test_broken_dataset_json_named(train_net, capsys, tmp_path, monkeypatch):
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    (root / "bad.json").write_text("{")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    reg = json.dumps([["broken_set", "bad.json", "imgs"]])
    err = run_cli(train_net, capsys, ["--config", "tiny/mask_rcnn_R18_tiny.yaml", "ACP.REGISTER_LVIS", reg,
                                      "DATASETS.TRAIN", "('broken_set',)", "DATASETS.TEST", "()"])
    assert str(root / "bad.json") in err


def test_model_checks(train_net, capsys, tiny_lvis, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_lvis["root"])
    err = run_cli(train_net, capsys, tiny(*tiny_model_overrides(), "MODEL.ROI_HEADS.NUM_CLASSES", "1203"))
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 1203" in err and "has 6 categories" in err
    err = run_cli(train_net, capsys, tiny("MODEL.WEIGHTS", str(tmp_path / "missing.pth")))
    assert "MODEL.WEIGHTS" in err and "missing.pth" in err
    err = run_cli(train_net, capsys, ["--eval-only", *tiny("OUTPUT_DIR", str(tmp_path / "o"))])
    assert "--eval-only needs a checkpoint" in err
    err = run_cli(train_net, capsys, tiny("MODEL.RESNETS.RES2_OUT_CHANNELS", "256"))  # R-18 needs 64
    assert "cannot build the model" in err
