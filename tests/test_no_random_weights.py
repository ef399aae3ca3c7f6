"""No stage runs on random weights unless a test opts in (``allow_random_init: true``): no weights named, or
weights that do not load, stop with one clear error before any work (docs/plugins.md "No random weights")."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import make_categories, write_cache
from tiny_models import drop_weight, make_tiny_judge_llm, register_tiny_open_clip_arch
from tiny_models_gen import make_tiny_gligen, make_tiny_llm, make_tiny_sam

from acp_data.cache.index import list_generations
from acp_data.clis.image import ClipScorer
from acp_data.generate.common import BackendOptionError
from acp_data.stages import StageContext


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ctx():
    return StageContext(make_categories())


def test_clip_needs_named_weights():
    with pytest.raises(ValueError, match="no model named"):
        ClipScorer(_ctx())
    with pytest.raises(ValueError, match="'ViT-B-32' is an open_clip architecture name and no weights are named"):
        ClipScorer(_ctx(), model="ViT-B-32")
    arch = register_tiny_open_clip_arch()
    with pytest.raises(ValueError, match="random weights"):
        ClipScorer(_ctx(), model=arch)
    with pytest.raises(ValueError, match="cannot load model 'acp-tiny-clip' \\(pretrained 'no-such-tag'\\)"):
        ClipScorer(_ctx(), model=arch, pretrained="no-such-tag")
    sc = ClipScorer(_ctx(), model=arch, allow_random_init=True)  # the explicit opt-in of a test
    assert sc.settings()["allow_random_init"] is True and sc.input_size == (32, 32)


def test_rescore_without_weights_stops_before_any_work(tmp_path, capsys):
    from acp_data.clis.rescore import cli_main

    cache = tmp_path / "cache"
    write_cache(cache, make_categories(), n_units=2, n_cand=2, fsync=False)
    gens = list_generations(cache)
    assert cli_main([str(cache), "--scorer", "clip", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acp-data rescore: error: scorer 'clip': no model named") and err.count("\n") == 1
    assert list_generations(cache) == gens  # nothing published


def test_prebuild_refuses_a_clip_scorer_without_weights(monkeypatch):
    from acp_data.clis import openclip_io
    from acp_data.prebuild.config import PrebuildError
    from acp_data.prebuild.prepare import _check_scoring

    monkeypatch.setattr(openclip_io, "load_open_clip", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = {"layout_score": False, "selection": {"min_clis_i": 60, "min_clis_l": 0}, "keep": "all",
           "scorer": {"name": "clip", "model": "ViT-B-32"}}
    with pytest.raises(PrebuildError, match="no weights are named"):
        _check_scoring(cfg, None)
    cfg["scorer"]["pretrained"] = "openai"
    assert _check_scoring(cfg, None)[0] == ("clip", {"model": "ViT-B-32", "pretrained": "openai"})


def test_hf_planner_and_sam_refuse_missing_weights(tmp_path):
    from acp_data.plan.hf import HFPlanner
    from acp_data.segment.sam import SamSegmenter

    llm = make_tiny_llm(tmp_path / "llm")
    key = drop_weight(llm)
    with pytest.raises(BackendOptionError, match=f"planner hf: .*no weights for 1 parameter\\(s\\) \\({key}\\)"):
        HFPlanner(_ctx(), model=llm).load()
    planner = HFPlanner(_ctx(), model=llm, allow_random_init=True)
    planner.load()
    assert planner.settings()["allow_random_init"] is True
    assert "allow_random_init" not in HFPlanner(_ctx(), model=llm).settings()  # generation keys as before

    sam = make_tiny_sam(tmp_path / "sam")
    drop_weight(sam)
    with pytest.raises(BackendOptionError, match="segmenter sam: .*randomly initialised"):
        SamSegmenter(_ctx(), model=sam).load()
    SamSegmenter(_ctx(), model=sam, allow_random_init=True).load()


def test_vlm_transformers_backend_refuses_missing_weights(tmp_path):
    from acp_data.clis.vlm_backends import build_backend

    judge = make_tiny_judge_llm(tmp_path / "judge")
    drop_weight(judge)
    with pytest.raises(BackendOptionError, match="scorer vlm \\(transformers backend\\)"):
        build_backend({"backend": "transformers", "model": judge}, "llm", "cpu", "judge")
    build_backend({"backend": "transformers", "model": judge, "allow_random_init": True}, "llm", "cpu", "judge")


def test_gligen_refuses_a_component_without_weights(tmp_path):
    from acp_data.generate.gligen import GligenGenerator

    g = make_tiny_gligen(tmp_path / "gligen")
    drop_weight(g, "unet")
    with pytest.raises(BackendOptionError, match="generator gligen \\(unet\\): .*randomly initialised"):
        GligenGenerator(_ctx(), model=g, height=64, width=64).load()
