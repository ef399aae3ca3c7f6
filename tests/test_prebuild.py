"""``acp-data prebuild``: end to end with tiny random models (GLIGEN, SAM, open_clip), resume after ``kill -9``, two
``--shard`` runs equal one run, bad input refused before any model loads (each with one clear message)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tiny_models_gen import make_tiny_gligen, make_tiny_llm, make_tiny_sam, synthetic_lvis

from acp_data.cache.layout import INDEX, SHARDS
from acp_data.cache.manifest import load_manifest
from acp_data.cache.reader import CacheReader
from acp_data.clis.select import select_unit
from acp_data.masks import rle_to_mask, tight_box_xywh
from acp_data.prebuild import PrebuildError, apply_overrides, load_config, prepare, run_prebuild
from acp_data.priors import Priors
from acp_data.scene import SceneGraph
from acp_data.shapes.world import world_category_table

ROOT = Path(__file__).resolve().parents[1]


# ----- inputs -----------------------------------------------------------------------------------------------------
def _shapes_lvis(n_images: int = 150, seed: int = 0) -> dict[str, Any]:
    """An LVIS-format json over the Shapes world's categories with random boxes (for priors: sizes, co-occurrence and
    box pairs); no images are needed."""
    cats = world_category_table("demo")
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 160, "height": 160})
        for _ in range(int(rng.integers(1, 4))):
            s = float(rng.uniform(0.15, 0.45)) * 160
            h = min(s * float(rng.uniform(0.7, 1.3)), 150.0)
            x, y = float(rng.uniform(0, 160 - s)), float(rng.uniform(0, 160 - h))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, len(cats) + 1)),
                         "bbox": [x, y, s, h], "area": s * h, "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "frequency": c.frequency,
                            "image_count": c.image_count} for c in cats]}


def write_inputs(d: Path, name: str, data: dict[str, Any]) -> dict[str, str]:
    """An LVIS-format json ``NAME.json`` and its priors in ``d``: a prebuild's inputs."""
    (d / f"{name}.json").write_text(json.dumps(data))
    Priors.build(data, seed=0).save(d / "priors.npz")
    return {"json": str(d / f"{name}.json"), "priors": str(d / "priors.npz"), "dir": str(d)}


@pytest.fixture(scope="module")
def shapes_inputs(tmp_path_factory) -> dict[str, str]:
    return write_inputs(tmp_path_factory.mktemp("shapes_inputs"), "shapes", _shapes_lvis())


def _shapes_config(inputs: dict[str, str], **over: Any) -> dict[str, Any]:
    cfg = {
        "categories": inputs["json"], "concepts": "rare", "priors": inputs["priors"], "images_per_category": 6,
        "seed": 3, "max_objects": 3, "candidates": 3, "planner": {"name": "prior"},
        "generator": {"name": "shapes", "width": 96, "height": 96}, "segmenter": {"name": "shapes"},
        "scorer": None, "layout_score": True, "selection": {"min_clis_i": 60, "min_clis_l": 0},
        "shard_size": 6, "unit_batch": 2, "device": "cpu",
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def lvis_inputs(tmp_path_factory) -> dict[str, str]:
    return write_inputs(tmp_path_factory.mktemp("lvis_inputs"), "lvis", synthetic_lvis())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    import torch

    torch.set_num_threads(1)
    from tiny_models import make_tiny_open_clip

    d = tmp_path_factory.mktemp("tiny_prebuild_models")
    return {"gligen": make_tiny_gligen(d / "gligen"), "sam": make_tiny_sam(d / "sam"),
            "clip": make_tiny_open_clip(d / "clip")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "acp_data.cli", "prebuild", *args, "--no-progress"]


def _read_cache(cache: Path) -> dict[tuple[str, int], tuple[dict[str, Any], bytes]]:
    """Every stored sample by (key, candidate_idx); a duplicate is a test failure."""
    reader = CacheReader(cache)
    out: dict[tuple[str, int], tuple[dict[str, Any], bytes]] = {}
    for row in range(len(reader)):
        rec, img = reader.read_sample(row)
        k = (rec["key"], rec["candidate_idx"])
        assert k not in out, f"sample {k} stored twice"
        out[k] = (rec, img)
    return out


def _comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """A record minus what legitimately differs between runs (the run's rank, host and time)."""
    r = json.loads(json.dumps(rec))
    r["provenance"].pop("run")
    return r


# ----- end to end with tiny models ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_prebuild_end_to_end_tiny_models(tmp_path: Path, lvis_inputs: dict[str, str],
                                         tiny_models: dict[str, str]) -> None:
    cfg = {
        "categories": lvis_inputs["json"], "concepts": ["armadillo", "hippopotamus", "bow_(weapon)"],
        "priors": lvis_inputs["priors"], "images_per_category": 2, "seed": 1, "max_objects": 3, "candidates": 2,
        "planner": {"name": "prior"},
        "generator": {"name": "gligen", "model": tiny_models["gligen"], "steps": 2, "height": 64, "width": 64,
                      "guidance": 5.0},
        "segmenter": {"name": "sam", "model": tiny_models["sam"]},
        "scorer": {"name": "clip", "model": tiny_models["clip"], "global_negatives": 4},
        "layout_score": True, "selection": {"min_clis_i": 0, "min_clis_l": 0}, "unit_batch": 4, "device": "cpu",
    }
    cache = tmp_path / "cache"
    s = run_prebuild(cfg, cache, progress=False)
    assert s["status"] == "complete" and s["units"]["total"] == 6 and s["units"]["processed"] == 6
    assert s["candidates"] == 12 and s["kept"] == 12
    assert s["instances"]["segmented"] >= 12 and s["instances"]["dropped"] == s["rejections"]["segment"].get(
        "empty_mask", 0)
    assert set(s["time_s"]) >= {"load", "plan", "generate", "segment", "clis_l", "clis_i", "write", "total"}
    assert s["time_s"]["generate"] > 0 and s["time_s"]["clis_i"] > 0
    assert abs(sum(s["time_share"].values()) - 1.0) < 0.01
    on_disk = json.loads(Path(s["summary_path"]).read_text())
    assert on_disk["kept"] == 12 and on_disk["writer"]["samples_written"] == 12

    man = load_manifest(cache)
    assert man.generation["generator"]["model"] == tiny_models["gligen"]
    assert man.generation["generator"]["candidates"] == 2
    assert man.scoring["scorer"]["name"] == "clip" and man.scoring["selection"]["min_clis_i"] == 0

    samples = _read_cache(cache)
    assert len(samples) == 12
    units: dict[str, list[dict[str, Any]]] = {}
    for (key, _), (rec, img) in samples.items():
        units.setdefault(key, []).append(rec)
        assert img[:3] == b"\xff\xd8\xff" and (rec["width"], rec["height"]) == (64, 64)
        scene = SceneGraph.from_dict(rec["scene_graph"])
        assert [o.category_id for o in scene.objects] == rec["combo"] and rec["combo"][0] == rec["target"]
        assert rec["clis_i"] is None or 0 <= rec["clis_i"] <= 100
        assert rec["clis_l"] is None or 0 <= rec["clis_l"] <= 100
        prov = rec["provenance"]
        assert prov["generator"]["settings"]["model"] == tiny_models["gligen"]
        assert prov["segmenter"]["settings"]["model"] == tiny_models["sam"]
        assert prov["scorer"]["name"] == "clip" and prov["generator"]["prompt"]
        layout = {o.id: np.array(o.bbox) * 64 for o in scene.objects}
        for inst in rec["instances"]:
            m = rle_to_mask(inst["segmentation"])
            assert m.shape == (64, 64) and m.sum() == inst["area"] > 0
            assert np.allclose(inst["bbox"], tight_box_xywh(m))
            assert np.allclose(inst["layout_bbox"], layout[inst["object_id"]])
            assert inst["category_id"] == scene.object(inst["object_id"]).category_id
    assert len(units) == 6
    for recs in units.values():
        recs.sort(key=lambda r: r["candidate_idx"])
        assert [r["candidate_idx"] for r in recs] == [0, 1]
        n_obj = len(recs[0]["scene_graph"]["objects"])
        inst = [[i["clis_i"] for i in r["instances"]] + [None] * (n_obj - len(r["instances"])) for r in recs]
        want = select_unit([r["clis_i"] for r in recs], recs[0]["clis_l"], inst, min_clis_i=0, min_clis_l=0)
        assert [r["selected"] for r in recs] == [i == want.selected_idx for i in range(2)]
        assert sum(r["selected"] for r in recs) == (1 if any(r["clis_i"] is not None for r in recs) else 0)

    # resume: nothing left to do, no model loaded
    again = run_prebuild(cfg, cache, progress=False)
    assert again["units"]["skipped_done"] == 6 and again["units"]["processed"] == 0 and again["kept"] == 0
    assert again["time_s"]["load"] == 0

    # another generation recipe into the same cache is refused before any model loads, naming the difference
    with pytest.raises(PrebuildError, match=r"generator\.steps: cache has 2, given 3"):
        run_prebuild(apply_overrides(cfg, ["generator.steps=3"]), cache, progress=False)
    # a scorer change is not a generation change: the units are already done
    assert run_prebuild(apply_overrides(cfg, ["scorer.global_negatives=8"]), cache, progress=False)["kept"] == 0

    # --keep selected stores exactly the selected candidates, identical to those of the full run
    sel_cache = tmp_path / "selected"
    s2 = run_prebuild(cfg, sel_cache, keep="selected", max_units=4, progress=False)
    got = _read_cache(sel_cache)
    assert s2["kept"] == len(got) == s2["units"]["selected"]
    assert all(rec["selected"] for rec, _ in got.values())
    for (key, c), (rec, img) in got.items():
        ref_rec, ref_img = samples[(key, c)]
        assert img == ref_img
        a, b = _comparable(rec), _comparable(ref_rec)
        assert a.pop("clis_i") == pytest.approx(b.pop("clis_i"), abs=1e-4)
        for ia, ib in zip(a["instances"], b["instances"]):
            assert ia.pop("clis_i") == pytest.approx(ib.pop("clis_i"), abs=1e-4)
        assert a["instances"] == b["instances"] and a["scene_graph"] == b["scene_graph"]


def test_planner_rejections_are_counted_and_not_redone(tmp_path: Path, shapes_inputs: dict[str, str]) -> None:
    """A random tiny LM writes garbage: every unit is rejected with counted reasons, nothing is stored, no crash; a
    rerun does not ask the LM again."""
    llm = make_tiny_llm(tmp_path / "llm")
    cfg = _shapes_config(shapes_inputs, concepts=["green star", "red triangle"], images_per_category=1,
                         planner={"name": "hf", "model": llm, "retries": 1, "max_tokens_description": 12,
                                  "max_tokens_layout": 12, "shots": 1})
    s = run_prebuild(cfg, tmp_path / "cache", progress=False)
    assert s["units"]["processed"] == 2 and s["kept"] == 0 and s["candidates"] == 0
    assert s["rejections"]["plan"]["no_scene"] == 2 and sum(s["rejections"]["plan"].values()) >= 2 + 2 * 2
    assert sorted(set(s["empty_units"].values())) == ["planner_rejected"]
    again = run_prebuild(cfg, tmp_path / "cache", progress=False)
    assert again["units"]["skipped_done"] == 2 and again["units"]["processed"] == 0


# ----- sharding and resume (Shapes stages: no model, fast) -----------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_reference(tmp_path_factory, shapes_inputs: dict[str, str]) -> dict[str, Any]:
    """One unsharded run (in process): the records every other layout of the same work must reproduce."""
    import torch

    cache = tmp_path_factory.mktemp("reference") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_prebuild(_shapes_config(shapes_inputs), cache, progress=False)
        assert torch.get_num_threads() == 2  # the rank's one thread was the run's, not the caller's
    finally:
        torch.set_num_threads(threads)
    assert summary["threads"] == 1
    assert summary["status"] == "complete" and summary["units"]["processed"] == 48
    samples = _read_cache(cache)
    assert len(samples) == summary["kept"] == 48 * 3
    return {"summary": summary, "samples": samples}


def _same_as_reference(cache: Path, reference: dict[str, Any]) -> None:
    got = _read_cache(cache)
    ref = reference["samples"]
    assert set(got) == set(ref)
    for k, (rec, img) in got.items():
        assert img == ref[k][1], f"image of {k} differs"
        assert _comparable(rec) == _comparable(ref[k][0]), f"record of {k} differs"


def _write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_shards_equal_one_run(tmp_path: Path, shapes_inputs: dict[str, str],
                                  shapes_reference: dict[str, Any]) -> None:
    conf = _write_config(tmp_path / "prebuild.yaml", _shapes_config(shapes_inputs))
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(_cli(["--config", str(conf), "--out", str(cache), "--shard", f"{r}/2"]), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        assert "[complete]" in out
    _same_as_reference(cache, shapes_reference)
    ranks = {p.name.split("-")[0] for p in (cache / SHARDS).glob("*.tar")}
    assert ranks == {"0", "1"}
    summaries = [json.loads(p.read_text()) for p in (cache / "summary").glob("*.json")]
    assert sorted((s["rank"], s["world"]) for s in summaries) == [(0, 2), (1, 2)]
    assert sum(s["units"]["processed"] for s in summaries) == 48


@pytest.mark.slow
def test_kill_9_then_resume_stores_every_unit_once(tmp_path: Path, shapes_inputs: dict[str, str],
                                                    shapes_reference: dict[str, Any]) -> None:
    conf = _write_config(tmp_path / "prebuild.yaml", _shapes_config(shapes_inputs))
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_cli(["--config", str(conf), "--out", str(cache)]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # wait until a few shards are closed and indexed, then kill mid-run
            if (cache / INDEX).is_dir() and len(list((cache / INDEX).iterdir())) >= 3:
                break
            assert proc.poll() is None, "prebuild finished before it could be killed"
            time.sleep(0.02)
        assert proc.poll() is None, "prebuild finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = _read_cache(cache)
    assert 0 < len(before) < 48 * 3

    res = subprocess.run(_cli(["--config", str(conf), "--out", str(cache)]), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (cache / "summary").glob("*.json")]
    final = [s for s in summaries if s["status"] == "complete"]
    assert len(final) == 1
    done_before = len({k for k, _ in before})
    units = final[0]["units"]
    assert units["skipped_done"] + units["processed"] == 48 and 0 < units["processed"] < 48
    # a shard renamed just before the kill but not yet indexed is an orphan: the rerun indexes it and skips its units
    assert units["skipped_done"] == done_before or final[0]["writer"]["reindexed_orphans"]
    _same_as_reference(cache, shapes_reference)


def test_keep_selected_resume_depends_on_scoring(tmp_path: Path, shapes_inputs: dict[str, str],
                                                  tiny_models: dict[str, str]) -> None:
    """Under ``keep: selected`` a unit that selects nothing stores nothing; a rerun with the same scoring skips it, a
    rerun with other thresholds redoes it (its candidates were never stored)."""
    with pytest.raises(PrebuildError, match="keep: selected needs a scorer"):
        run_prebuild(_shapes_config(shapes_inputs), tmp_path / "c", keep="selected", progress=False)
    assert not (tmp_path / "c").exists()

    cfg = _shapes_config(shapes_inputs, images_per_category=1, scorer={"name": "clip", "model": tiny_models["clip"]},
                         selection={"min_clis_i": 100, "min_clis_l": 0}, keep="selected")
    cache = tmp_path / "cache"
    s = run_prebuild(cfg, cache, progress=False)
    assert s["kept"] == 0 and s["units"]["processed"] == 8 and set(s["empty_units"].values()) == {"nothing_selected"}
    assert s["rejections"]["select"]["all_instances_below_min_clis_i"] + s["rejections"]["select"].get(
        "no_scored_candidate", 0) == 8
    again = run_prebuild(cfg, cache, progress=False)
    assert again["units"]["skipped_done"] == 8 and again["units"]["processed"] == 0
    looser = run_prebuild(apply_overrides(cfg, ["selection.min_clis_i=0"]), cache, progress=False)
    assert looser["units"]["processed"] == 8 and looser["kept"] == looser["units"]["selected"] > 0


class FailingShapes:
    """A plug-in generator (used by import path ``test_prebuild:FailingShapes``): the Shapes generator, raising on
    every unit whose seed is divisible by 4 (a backend bug that must not stop the run)."""

    max_boxes = 30

    def __init__(self, ctx: Any, **options: Any) -> None:
        from acp_data.shapes.generator import ShapesGenerator

        self.inner = ShapesGenerator(ctx, **options)

    def settings(self) -> dict[str, Any]:
        return {"name": "FailingShapes", **self.inner.settings()}

    def generate(self, scene: Any, n: int, seed: int) -> list[np.ndarray]:
        if seed % 4 == 0:
            raise RuntimeError(f"simulated backend failure for seed {seed}")
        return self.inner.generate(scene, n, seed)


def test_backend_errors_are_counted_retried_and_bounded(tmp_path: Path, shapes_inputs: dict[str, str]) -> None:
    cfg = _shapes_config(shapes_inputs, images_per_category=3, max_errors=100,
                         generator={"name": "test_prebuild:FailingShapes", "width": 64, "height": 64})
    prep_units = prepare(cfg).make_units()
    failing = sum(u.seed % 4 == 0 for u in prep_units)
    assert 0 < failing < len(prep_units)
    s = run_prebuild(cfg, tmp_path / "cache", progress=False)
    assert s["status"] == "complete" and s["units"]["errors"] == failing
    assert s["rejections"]["generate"]["error:RuntimeError"] == failing
    assert s["units"]["stored"] == len(prep_units) - failing
    again = run_prebuild(cfg, tmp_path / "cache", progress=False)  # failed units are retried (and fail again)
    assert again["units"]["processed"] == failing and again["units"]["errors"] == failing
    with pytest.raises(PrebuildError, match=r"units failed, more than max_errors = 0; the last one .* in generate: "
                                            r"RuntimeError: simulated backend failure"):
        run_prebuild(apply_overrides(cfg, ["max_errors=0"]), tmp_path / "cache", progress=False)
    last = max((json.loads(p.read_text()) for p in (tmp_path / "cache" / "summary").glob("*.json")),
               key=lambda d: d["finished"])
    assert last["status"] == "failed" and "max_errors" in last["error"]


# ----- bad input: refused before any model loads ---------------------------------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test."""
    from acp_data.clis import openclip_io
    from acp_data.generate.gligen import GligenGenerator
    from acp_data.segment.sam import SamSegmenter

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(GligenGenerator, "load", boom)
    monkeypatch.setattr(SamSegmenter, "load", boom)
    monkeypatch.setattr(openclip_io, "load_open_clip", boom)


def _model_config(tmp_path: Path, lvis_inputs: dict[str, str], **over: Any) -> dict[str, Any]:
    """Real-model stages pointing at existing (empty) directories: fine until something tries to load them."""
    for name in ("gligen", "sam", "clip"):
        (tmp_path / name).mkdir(exist_ok=True)
    cfg = {
        "categories": lvis_inputs["json"], "concepts": "rare", "priors": lvis_inputs["priors"], "device": "cpu",
        "max_objects": 4, "generator": {"name": "gligen", "model": str(tmp_path / "gligen")},
        "segmenter": {"name": "sam", "model": str(tmp_path / "sam")},
        "scorer": {"name": "clip", "model": f"local-dir:{tmp_path / 'clip'}"},
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over, message", [
    ({"concepts": ["armadilo", "hippopotamus"]}, r"concepts: unknown category 'armadilo'.*closest: 'armadillo'"),
    ({"generator": {"name": "gligen", "model": "/nonexistent/gligen-1-4"}},
     r"model path '/nonexistent/gligen-1-4' does not exist"),
    ({"scorer": {"name": "clip", "model": "local-dir:/nonexistent/clip"}},
     r"scorer 'clip'.model: model directory '/nonexistent/clip' does not exist"),
    ({"segmenter": {"name": "sam", "model": "./no/such/sam-vit-huge"}}, r"model path .*sam-vit-huge' does not exist"),
    ({"scorer": {"name": "vlm", "captioner": {"backend": "transformers", "model": "/nonexistent/qwen2-vl"}}},
     r"scorer 'vlm'.captioner.model: model path '/nonexistent/qwen2-vl' does not exist"),
    ({"priors": "BROKEN"}, r"priors: cannot read priors file"),
    ({"priors": "/nonexistent/priors.npz"}, r"priors file '/nonexistent/priors.npz' does not exist"),
    ({"max_objects": 5, "generator": {"name": "gligen", "model": "GLIGEN", "max_boxes": 4}},
     r"max_objects = 5 but generator 'gligen' draws at most 4 boxes"),
    ({"generator": {"name": "glign", "model": "x/y"}}, r"generator: unknown generator 'glign'; registered: .*gligen"),
    ({"scorer": {"name": "clip", "model": "ViT-B-32", "batchsize": 8}}, r"scorer 'clip': unknown option.*'batchsize'"),
    ({"images_per_category": 0}, r"'images_per_category' = 0 must be >= 1"),
    ({"candiates": 4}, r"unknown config key\(s\) 'candiates'"),
    ({"selection": {"min_clis_l": 50}, "layout_score": False}, r"min_clis_l = 50.0 needs layout_score: true"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path: Path, lvis_inputs: dict[str, str], no_model_loads,
                                                 over: dict[str, Any], message: str) -> None:
    if over.get("priors") == "BROKEN":
        bad = tmp_path / "priors.npz"
        bad.write_bytes(b"this is not an npz file")
        over = {**over, "priors": str(bad)}
    if over.get("generator", {}).get("model") == "GLIGEN":
        over = {**over, "generator": {**over["generator"], "model": str(tmp_path / "gligen")}}
    cfg = _model_config(tmp_path, lvis_inputs, **over)
    t0 = time.perf_counter()
    with pytest.raises(PrebuildError, match=message):
        run_prebuild(cfg, tmp_path / "cache", progress=False)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "cache").exists()  # nothing written either


def test_served_model_names_are_not_paths(tmp_path: Path, lvis_inputs: dict[str, str], no_model_loads) -> None:
    vlm = {"name": "vlm", "captioner": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                        "model": "models/qwen/qwen2.5-vl-7b"}}
    prep = prepare(_model_config(tmp_path, lvis_inputs, scorer=vlm))
    assert prep.scoring_settings()["scorer"]["captioner"]["model"] == "models/qwen/qwen2.5-vl-7b"


def test_cli_reports_bad_input_with_exit_code_2(tmp_path: Path, lvis_inputs: dict[str, str]) -> None:
    conf = _write_config(tmp_path / "bad.yaml", _model_config(tmp_path, lvis_inputs, concepts="hipopotamus"))
    t0 = time.perf_counter()
    res = subprocess.run(_cli(["--config", str(conf), "--out", str(tmp_path / "cache")]), env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "acp-data prebuild: error: concepts: unknown category 'hipopotamus'" in res.stderr
    assert "'hippopotamus'" in res.stderr and "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 20
    # --check validates and counts units without loading anything
    ok = _write_config(tmp_path / "ok.yaml", _model_config(tmp_path, lvis_inputs, images_per_category=3))
    res = subprocess.run(_cli(["--config", str(ok), "--out", str(tmp_path / "cache"), "--check", "--shard", "1/2"]),
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    n_rare = len([c for c in synthetic_lvis()["categories"] if c["frequency"] == "r"])
    assert info["units"] == 3 * n_rare and info["rank_units"] == (3 * n_rare) // 2
    assert not (tmp_path / "cache").exists()


def test_lvis_rare_recipe_validates(tmp_path: Path, no_model_loads) -> None:
    """The documented real-model recipe passes every check (hub ids are resolved only at load time) with a priors
    file over the LVIS v1 table; nothing is loaded."""
    from acp_data.categories import CategoryTable

    lvis = CategoryTable.from_lvis_v1()
    data = {"images": [{"id": 1, "width": 640, "height": 480}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 80], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [200, 50, 80, 120], "iscrowd": 0}],
            "categories": [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "frequency": c.frequency,
                            "image_count": c.image_count} for c in lvis]}
    Priors.build(data).save(tmp_path / "priors.npz")
    cfg = apply_overrides(load_config(ROOT / "configs/prebuild/lvis_rare.yaml"), [f"priors={tmp_path / 'priors.npz'}"])
    prep = prepare(cfg)
    assert len(prep.targets) == 337 and prep.candidates == 4
    gen = prep.generation_settings()
    assert gen["generator"]["model"] == "masterful/gligen-1-4-generation-text-box"
    assert gen["generator"]["refiner"]["strength"] == 0.3 and gen["segmenter"]["model"] == "facebook/sam-vit-huge"
    assert prep.config["selection"] == {"min_clis_i": 60.0, "min_clis_l": 50.0}
    assert prep.scoring_settings()["scorer"]["model"] == "ViT-L-14"


def test_pipeline_import_is_light() -> None:
    code = ("import sys, acp_data.prebuild; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'diffusers', 'transformers', 'open_clip', 'detectron2'}))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
