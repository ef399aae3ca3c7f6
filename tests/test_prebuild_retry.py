"""A failed prebuild can be retried: a cache holding a manifest and no sample is taken over by the next run (and
says so), one that holds samples is still refused; ``--check`` compares against ``--out``'s manifest; a run that
stores nothing exits 1 with the counts of what rejected every unit; recipe data paths under ``datasets/`` resolve in
``$DETECTRON2_DATASETS`` and a missing priors file prints the command that builds it (docs/prebuild.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_prebuild import _shapes_config, shapes_inputs  # noqa: F401 (the fixture)

from acp_data.cache.layout import MANIFEST
from acp_data.cache.manifest import load_manifest
from acp_data.prebuild import PrebuildError, run_prebuild
from acp_data.prebuild.cli import cli_main


class ShapesFailingLoad:
    """A plug-in generator (``test_prebuild_retry:ShapesFailingLoad``) whose model cannot be loaded: a wrong path."""

    max_boxes = 30

    def __init__(self, ctx: Any, **options: Any) -> None:
        from acp_data.shapes.generator import ShapesGenerator

        self.inner = ShapesGenerator(ctx, **options)

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "name": "ShapesFailingLoad"}

    def load(self) -> None:
        raise OSError("no such checkpoint: /models/typo")

    def generate(self, scene: Any, n: int, seed: int) -> list[np.ndarray]:
        return self.inner.generate(scene, n, seed)


class ShapesAlwaysFailing(ShapesFailingLoad):
    """A plug-in generator that raises on every unit (``test_prebuild_retry:ShapesAlwaysFailing``)."""

    def load(self) -> None:
        pass

    def generate(self, scene: Any, n: int, seed: int) -> list[np.ndarray]:
        raise RuntimeError("CUDA out of memory (simulated)")


def _small(inputs: dict[str, str], **over: Any) -> dict[str, Any]:
    """One unit per rare concept (8), small Shapes images."""
    return _shapes_config(inputs, **{"images_per_category": 1,
                                     "generator": {"name": "shapes", "width": 64, "height": 64}, **over})


def _write(path: Path, cfg: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_failed_load_leaves_a_cache_the_next_run_takes_over(tmp_path, shapes_inputs, caplog):  # noqa: F811
    cache = tmp_path / "cache"
    broken = _small(shapes_inputs, generator={"name": "test_prebuild_retry:ShapesFailingLoad", "width": 64,
                                              "height": 64})
    with pytest.raises(PrebuildError, match="cannot load its model: OSError: no such checkpoint"):
        run_prebuild(broken, cache, progress=False)
    assert (cache / MANIFEST).is_file()  # the failed run had already created the manifest
    assert load_manifest(cache).generation["generator"]["name"] == "ShapesFailingLoad"

    fixed = _small(shapes_inputs)
    with caplog.at_level(logging.WARNING, logger="acp_data.cache.manifest"):
        s = run_prebuild(fixed, cache, progress=False)
    assert s["status"] == "complete" and s["kept"] > 0
    assert any("taking over" in r.getMessage() and "generator.name" in r.getMessage() for r in caplog.records)
    assert load_manifest(cache).generation["generator"]["name"] == "ShapesGenerator"

    # with samples in it, another recipe is refused as before, naming the difference
    with pytest.raises(PrebuildError, match=r"(?s)refusing to write into .*generator\.width: cache has 64, given 80"):
        run_prebuild(_small(shapes_inputs, generator={"name": "shapes", "width": 80, "height": 64}), cache,
                     progress=False)


def test_unfinished_shard_blocks_the_takeover(tmp_path, shapes_inputs):  # noqa: F811
    cache = tmp_path / "cache"
    with pytest.raises(PrebuildError):
        run_prebuild(_small(shapes_inputs, generator={"name": "test_prebuild_retry:ShapesFailingLoad"}), cache,
                     progress=False)
    (cache / "shards" / "0-0123456789abcdef-0.tar.tmp").write_bytes(b"partial")  # a writer may be running
    with pytest.raises(PrebuildError, match=r"only shards/0-0123456789abcdef-0\.tar\.tmp: a writer may still be "
                                            r"running\. If none is, delete them"):
        run_prebuild(_small(shapes_inputs), cache, progress=False)


def test_check_compares_against_the_out_manifest(tmp_path, shapes_inputs, capsys):  # noqa: F811
    cache = tmp_path / "cache"
    conf = _write(tmp_path / "c.yaml", _small(shapes_inputs))
    assert cli_main(["--config", conf, "--out", str(cache), "--check"]) == 0
    assert "no cache yet" in json.loads(capsys.readouterr().out)["cache"]
    assert not cache.exists()

    assert cli_main(["--config", conf, "--out", str(cache), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["--config", conf, "--out", str(cache), "--check"]) == 0
    assert "an existing cache with these generation settings" in json.loads(capsys.readouterr().out)["cache"]

    other = _write(tmp_path / "o.yaml", _small(shapes_inputs, candidates=2))
    assert cli_main(["--config", other, "--out", str(cache), "--check"]) == 2
    err = capsys.readouterr().err
    assert "refusing to write into" in err and "generator.candidates: cache has 3, given 2" in err

    empty = tmp_path / "empty"  # a manifest and no sample: --check says a run would take it over
    with pytest.raises(PrebuildError):
        run_prebuild(_small(shapes_inputs, generator={"name": "test_prebuild_retry:ShapesFailingLoad"}), empty,
                     progress=False)
    assert cli_main(["--config", conf, "--out", str(empty), "--check"]) == 0
    assert "a run takes it over" in json.loads(capsys.readouterr().out)["cache"]


def test_a_run_that_stores_nothing_exits_1_with_the_reasons(tmp_path, shapes_inputs, capsys):  # noqa: F811
    cfg = _small(shapes_inputs, max_errors=100,
                 generator={"name": "test_prebuild_retry:ShapesAlwaysFailing", "width": 64, "height": 64})
    conf = _write(tmp_path / "c.yaml", cfg)
    assert cli_main(["--config", conf, "--out", str(tmp_path / "cache"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "acp-data prebuild: error: stored nothing:" in err
    assert "by reason: error 8" in err and "generate.error:RuntimeError 8" in err

    # some samples stored: success
    conf = _write(tmp_path / "ok.yaml", _small(shapes_inputs))
    assert cli_main(["--config", conf, "--out", str(tmp_path / "ok"), "--no-progress"]) == 0


def test_recipe_data_paths_resolve_in_detectron2_datasets(tmp_path, shapes_inputs, monkeypatch):  # noqa: F811
    root = tmp_path / "d2data"
    (root / "lvis").mkdir(parents=True)
    Path(root / "lvis" / "priors.npz").write_bytes(Path(shapes_inputs["priors"]).read_bytes())
    Path(root / "lvis" / "cats.json").write_bytes(Path(shapes_inputs["json"]).read_bytes())
    monkeypatch.chdir(tmp_path)  # no ./datasets here: only $DETECTRON2_DATASETS can find them
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    cfg = _small(shapes_inputs, priors="datasets/lvis/priors.npz", categories="datasets/lvis/cats.json")
    from acp_data.prebuild import prepare

    prep = prepare(cfg)
    assert prep.priors is not None and len(prep.targets) == 8

    with pytest.raises(PrebuildError) as e:
        prepare({**cfg, "priors": "datasets/lvis/acp_priors_v1.npz"})
    msg = str(e.value)
    assert f"priors file '{root}/lvis/acp_priors_v1.npz' does not exist" in msg
    assert f"DETECTRON2_DATASETS={root}" in msg
    assert (f"acp-data priors build --ann {root}/lvis/cats.json --out {root}/lvis/acp_priors_v1.npz") in msg
    with pytest.raises(PrebuildError) as e:
        prepare({**cfg, "categories": "lvis_v1", "priors": "datasets/lvis/acp_priors_v1.npz"})
    assert (f"acp-data priors build --ann {root}/lvis/lvis_v1_train.json --out {root}/lvis/acp_priors_v1.npz"
            in str(e.value))

    monkeypatch.delenv("DETECTRON2_DATASETS")  # detectron2's default root: ./datasets
    with pytest.raises(PrebuildError, match=r"priors file 'datasets/lvis/priors\.npz' does not exist \(.*\./datasets, "
                                            r"DETECTRON2_DATASETS being unset\)"):
        prepare(cfg)
    other = tmp_path / "elsewhere" / "priors.npz"  # a path not under datasets/ is taken as given
    other.parent.mkdir()
    other.write_bytes(Path(shapes_inputs["priors"]).read_bytes())
    assert prepare({**cfg, "priors": "elsewhere/priors.npz", "categories": shapes_inputs["json"]}).priors is not None


def test_lvis_recipe_priors_live_in_detectron2_datasets(tmp_path, monkeypatch):
    """configs/prebuild/lvis_rare.yaml as shipped: its priors are looked up in $DETECTRON2_DATASETS, and a missing
    file prints the command that builds it there from detectron2's LVIS v1 train json."""
    from acp_data.categories import CategoryTable
    from acp_data.prebuild import load_config, prepare
    from acp_data.priors import Priors

    root = tmp_path / "d2data"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/prebuild/lvis_rare.yaml")
    with pytest.raises(PrebuildError) as e:
        prepare(cfg)
    assert (f"acp-data priors build --ann {root}/lvis/lvis_v1_train.json --out {root}/lvis/acp_priors_v1.npz"
            in str(e.value))

    lvis = CategoryTable.from_lvis_v1()
    data = {"images": [{"id": 1, "width": 640, "height": 480}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 80], "iscrowd": 0}],
            "categories": [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "frequency": c.frequency,
                            "image_count": c.image_count} for c in lvis]}
    (root / "lvis").mkdir(parents=True)
    Priors.build(data).save(root / "lvis" / "acp_priors_v1.npz")
    assert len(prepare(cfg).targets) == 337
