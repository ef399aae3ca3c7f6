"""CLIS-I scorers: ``clip`` with a tiny open_clip saved as local-dir; ``vlm`` against a local OpenAI-compatible stub
and with a tiny local transformers judge."""

from __future__ import annotations

import base64
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from openai_stub import OpenAIStub, Reply
from tiny_models import make_tiny_judge_llm, make_tiny_open_clip, make_tiny_qwen2_vl

from acp_data.categories import Category, CategoryTable
from acp_data.clis.image import ClipScorer, VLMScorer, caption_text
from acp_data.registry import SCORERS
from acp_data.scene import SceneGraph, SceneObject
from acp_data.stages import Candidate, StageContext

NAMES = ["red circle", "blue square", "green star", "dog", "frisbee", "bench"]
KEY = "sk-vlm-secret-42"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


def ctx(names=NAMES):
    return StageContext(CategoryTable([Category(i + 1, n) for i, n in enumerate(names)]))


def candidate(seed, size=96, masks=(True, True)):
    rng = np.random.default_rng(seed)
    sg = SceneGraph([SceneObject("dog-1", 4, ["brown"], (0.1, 0.1, 0.3, 0.4)),
                     SceneObject("frisbee-2", 5, ["red"], (0.55, 0.5, 0.25, 0.2))],
                    caption="a brown dog(dog-1) jumps over a red frisbee(frisbee-2)")
    img = rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8)
    boxes = sg.boxes_xyxy(size + 16, size)
    ms = []
    for b, keep in zip(boxes, masks):
        m = np.zeros((size, size + 16), bool)
        m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
        ms.append(m if keep else None)
    return Candidate(img, sg, boxes, ms)


# ----- clip ---------------------------------------------------------------------------------------------------------
def test_clip_registered_and_scores_in_range(tiny_clip):
    assert SCORERS.get("clip") is ClipScorer and SCORERS.get("vlm") is VLMScorer
    sc = SCORERS.build("clip", ctx(), model=tiny_clip, batch_size=16)
    cands = [candidate(k, masks=(True, k % 2 == 0)) for k in range(5)]
    res = sc.score(cands)
    assert len(res) == 5
    for k, r in enumerate(res):
        assert 0 <= r.image <= 100
        assert 0 <= r.details["global"] <= 100
        assert all(0 <= s <= 100 for s in r.instances if s is not None)
        assert (r.instances[1] is None) == (k % 2 == 1)  # mask None -> unscored
        reg, crop = r.details["region"], r.details["crop"]
        assert r.instances[0] == pytest.approx(0.8 * reg[0] + 0.2 * crop[0])
        mean_inst = np.mean([s for s in r.instances if s is not None])
        assert r.image == pytest.approx(0.5 * r.details["global"] + 0.5 * mean_inst)
    again = sc.score(cands)
    assert [r.image for r in again] == [r.image for r in res]  # deterministic


def test_clip_batched_equals_one_by_one(tiny_clip):
    cands = [candidate(k) for k in range(6)]
    batched = ClipScorer(ctx(), model=tiny_clip, batch_size=64).score(cands)
    one = ClipScorer(ctx(), model=tiny_clip.removeprefix("local-dir:"), batch_size=1)  # a plain directory path
    singles = [one.score([c])[0] for c in cands]
    for a, b in zip(batched, singles):
        assert a.image == pytest.approx(b.image, abs=1e-4)
        np.testing.assert_allclose(a.instances, b.instances, atol=1e-4)


def test_clip_calibration_known_answers(tiny_clip):
    # a one-category vocabulary and no distractor captions: every softmax is over a single entry -> exactly 100
    sc = ClipScorer(ctx(["dog"]), model=tiny_clip, global_negatives=0)
    sg = SceneGraph([SceneObject("dog-1", 1, [], (0.2, 0.2, 0.5, 0.5))], caption="a dog(dog-1)")
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = np.zeros((64, 64), bool)
    m[20:40, 20:40] = True
    r = sc.score([Candidate(img, sg, sg.boxes_xyxy(64, 64), [m])])[0]
    assert r.image == pytest.approx(100.0) and r.instances == [pytest.approx(100.0)]
    # with the full vocabulary, the probabilities over categories sum to 1: scoring the same view as each category
    # in turn gives 100 in total
    sc = ClipScorer(ctx(), model=tiny_clip)
    total = 0.0
    for cid in range(1, len(NAMES) + 1):
        sg = SceneGraph([SceneObject("x-1", cid, [], (0.2, 0.2, 0.5, 0.5))], caption="x")
        total += sc.score([Candidate(img, sg, sg.boxes_xyxy(64, 64), [m])])[0].details["crop"][0]
    assert total == pytest.approx(100.0, abs=1e-6)


def test_clip_negative_captions_and_options(tiny_clip):
    sc = ClipScorer(ctx(), model=tiny_clip, global_negatives=4)
    sg = candidate(0).scene
    negs = sc.negative_captions(sg)
    assert len(negs) == 4 and negs == sc.negative_captions(sg)
    for n in negs:
        assert "dog" not in n and "frisbee" not in n and "(" not in n and "jumps over" in n
    assert caption_text(sg) == "a brown dog jumps over a red frisbee"
    with pytest.raises(ValueError, match="unknown options"):
        ClipScorer(ctx(), model=tiny_clip, regoin_weight=1)
    with pytest.raises(FileNotFoundError):
        ClipScorer(ctx(), model="local-dir:/nonexistent/dir")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_clip_input_dtype_follows_low_precision_towers(tiny_clip, dtype):
    """open_clip's fp16/bf16 precision casts conv/linear weights only (the class embedding stays float32): the images
    must be cast to the patch embedding's dtype, not the first parameter's (a CUDA-only crash before)."""
    import open_clip
    import torch

    from acp_data.clis.image import _image_input_dtype

    model, _, _ = open_clip.create_model_and_transforms(tiny_clip)
    assert _image_input_dtype(model) == torch.float32
    open_clip.model.convert_weights_to_lp(model, dtype=getattr(torch, dtype))
    assert next(model.parameters()).dtype == torch.float32  # what the scorer used to cast to
    assert _image_input_dtype(model) == getattr(torch, dtype)


# ----- vlm against the stub -----------------------------------------------------------------------------------------
def _image_of(url):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def coloured_candidate(global_tag):
    """Black image, dog box red, frisbee box green; the caption carries a tag the stub reads."""
    sg = SceneGraph([SceneObject("dog-1", 4, ["brown"], (0.1, 0.1, 0.3, 0.3)),
                     SceneObject("frisbee-2", 5, [], (0.5, 0.5, 0.3, 0.2))],
                    caption=f"{global_tag}: a brown dog(dog-1) and a frisbee(frisbee-2)")
    img = np.zeros((100, 100, 3), np.uint8)
    img[10:40, 10:40] = (255, 0, 0)
    img[50:70, 50:80] = (0, 255, 0)
    boxes = sg.boxes_xyxy(100, 100)
    ms = []
    for b in boxes:
        m = np.zeros((100, 100), bool)
        m[int(round(b[1])):int(round(b[3])), int(round(b[0])):int(round(b[2]))] = True
        ms.append(m)
    return Candidate(img, sg, boxes, ms)


def stub_responder(req, n):
    """Captions name the part; judge answers follow a script per caption and attempt."""
    text = OpenAIStub.text_of(req)
    if "Reference:" in text:
        desc = re.search(r"Description: (\S+)", text).group(1)
        ref = re.search(r"Reference: ([^\n]+)", text).group(1)
        attempt = sum(1 for m in req["messages"] if m["role"] == "assistant")
        if desc == "GLOBAL":
            return '{"score": 5}' if ref.startswith("good") else '{"score": 9}'  # "bad": out of range, always
        script = {"REGION-dog": ['{"score": 4}'], "CROP-dog": ['Sure! ```json\n{"score": 2}\n```'],
                  "REGION-frisbee": ["score is three", '{"score": 3}'],
                  "CROP-frisbee": ['{"score": 7}', '{"score": "5"}']}[desc]
        return script[min(attempt, len(script) - 1)]
    if "Describe this image" in text:
        return "GLOBAL"
    img = _image_of(OpenAIStub.images_of(req)[0])
    if "bbox_2d" in text:
        box = [int(v) for v in re.search(r"\[(\d+), (\d+), (\d+), (\d+)\]", text).groups()]
        return "REGION-dog" if box[0] < 30 else "REGION-frisbee"
    red = img[..., 0].mean() > img[..., 1].mean()
    return "CROP-dog" if red else "CROP-frisbee"


def vlm_options(url, **kw):
    return {"captioner": {"backend": "openai", "base_url": url, "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                          "api_key_env": "ACP_VLM_KEY", "timeout": 0.5, "retries": 1, "backoff": 0, **kw}}


def test_vlm_formula_failures_box_and_key(monkeypatch, caplog):
    monkeypatch.setenv("ACP_VLM_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(stub_responder, require_key=KEY) as stub:
        sc = SCORERS.build("vlm", ctx(), **vlm_options(stub.url))
        assert sc.box_format == "qwen2_5_vl"  # from the served model's name
        good, bad = coloured_candidate("good"), coloured_candidate("bad")
        res = sc.score([good, bad])
        # instance = 0.8 region + 0.2 crop, x20 per 0-5 judge score; image = 0.5 global + 0.5 mean instance
        dog = 0.8 * 80 + 0.2 * 40
        frisbee = 0.8 * 60 + 0.2 * 100  # both after one retry with the error fed back
        assert res[0].instances == [pytest.approx(dog), pytest.approx(frisbee)]
        assert res[0].image == pytest.approx(0.5 * 100 + 0.5 * (dog + frisbee) / 2)
        assert res[0].details["failures"] == []
        # the global judge answer stays out of range: recorded failure, image unscored (never 0), instances kept
        assert res[1].image is None and res[1].details["global"] is None
        assert res[1].instances == res[0].instances
        (f,) = res[1].details["failures"]
        assert f["part"] == "global" and f["stage"] == "judge" and "outside" in f["error"]
        assert sc.failures == {"judge:global": 1}
        reqs = [r for _, _, r in stub.requests]
    # the box is in the request, in Qwen2.5-VL's absolute pixels of the resized (112 x 112) image
    region_reqs = [r for r in reqs if "bbox_2d" in OpenAIStub.text_of(r)]
    texts = {OpenAIStub.text_of(r) for r in region_reqs}
    assert any('{"bbox_2d": [11, 11, 45, 45]}' in t for t in texts)  # dog (10, 10, 40, 40) x 1.12
    assert any('{"bbox_2d": [56, 56, 90, 78]}' in t for t in texts)  # frisbee (50, 50, 80, 70) x 1.12
    assert _image_of(OpenAIStub.images_of(region_reqs[0])[0]).shape == (112, 112, 3)
    # a retry carries the bad answer and the error
    retry = [r for r in reqs if any(m["role"] == "assistant" for m in r["messages"])]
    assert any("score is three" in json.dumps(r) and "no JSON object" in OpenAIStub.text_of(r) for r in retry)
    assert KEY not in caplog.text


def test_vlm_slow_and_failing_captioner(monkeypatch):
    monkeypatch.setenv("ACP_VLM_KEY", KEY)

    def responder(req, n):
        text = OpenAIStub.text_of(req)
        if "Reference:" in text:
            return '{"score": 5}'
        if "Describe this image" in text:
            return Reply(content="late", delay=2.0)  # every attempt times out
        return "an object"

    with OpenAIStub(responder) as stub:
        stub.script(Reply(content="x", delay=1.0))  # the first request times out once, its retry succeeds
        sc = VLMScorer(ctx(), **vlm_options(stub.url, box_format="draw", concurrency=1))
        (r,) = sc.score([coloured_candidate("good")])
    assert r.instances == [pytest.approx(100.0), pytest.approx(100.0)]
    assert r.image is None and r.details["global"] is None
    assert [(f["stage"], f["part"]) for f in r.details["failures"]] == [("caption", "global")]
    assert sc.failures["caption:global"] == 1


def test_vlm_box_formats_and_drawn_box(monkeypatch):
    from acp_data.clis.vlm_backends import JudgeAnswerError, auto_box_format, parse_judge, region_query

    img = np.zeros((100, 200, 3), np.uint8)
    _, t = region_query(img, (20, 10, 60, 50), "qwen2_vl")
    assert "<|box_start|>(100,100),(300,500)<|box_end|>" in t
    _, t = region_query(img, (20, 10, 60, 50), "abs")
    assert "[20, 10, 60, 50]" in t
    drawn, t = region_query(img, (20, 10, 60, 50), "draw")
    assert t == "the red box" and (drawn[10, 20:60] == (255, 0, 0)).all() and drawn[30, 40].sum() == 0
    assert img.sum() == 0  # the input is not modified
    assert auto_box_format("qwen2_5_vl") == "qwen2_5_vl" and auto_box_format("Qwen/Qwen2-VL-7B") == "qwen2_vl"
    assert auto_box_format("llava") == "draw"
    assert parse_judge('{"score": 0}') == 0.0 and parse_judge('x {"a": 1} {"score": 4.5} y') == 4.5
    for bad in ("", "4", '{"score": true}', '{"score": -1}', '{"s": 3}', '{"score": "high"}'):
        with pytest.raises(JudgeAnswerError):
            parse_judge(bad)
    with pytest.raises(ValueError, match="captioner"):
        VLMScorer(ctx())
    with pytest.raises(ValueError, match="unknown keys"):
        VLMScorer(ctx(), captioner={"backend": "openai", "base_url": "http://x/v1", "model": "m", "temprature": 0})


# ----- vlm with a local transformers judge ------------------------------------------------------------------------
@pytest.mark.slow
def test_vlm_local_transformers_judge(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("ACP_VLM_KEY", raising=False)
    fixed = make_tiny_judge_llm(tmp_path / "judge4", answer='{"score": 4}')
    rnd = make_tiny_judge_llm(tmp_path / "judge_rand", answer=None)
    with OpenAIStub(lambda req, n: "a thing") as stub:
        cap = {"backend": "openai", "base_url": stub.url, "model": "some-vlm", "backoff": 0}
        sc = VLMScorer(ctx(), captioner=cap, judge={"backend": "transformers", "model": fixed, "max_new_tokens": 8,
                                                    "batch_size": 8})
        (r,) = sc.score([coloured_candidate("good")])
        assert r.instances == [pytest.approx(80.0), pytest.approx(80.0)] and r.image == pytest.approx(80.0)
        assert sc.box_format == "draw"
        sc = VLMScorer(ctx(), captioner=cap, judge={"backend": "transformers", "model": rnd, "max_new_tokens": 6},
                       judge_retries=1)
        (r,) = sc.score([coloured_candidate("good")])
    # a random model answers garbage: every part fails after its retry, nothing is scored 0
    assert r.image is None and r.instances == [None, None]
    assert len(r.details["failures"]) == 5 and sum(sc.failures.values()) == 5


@pytest.mark.slow
def test_vlm_local_transformers_vlm(tmp_path):
    torch.set_num_threads(1)
    vlm = make_tiny_qwen2_vl(tmp_path / "qwen2vl", answer='{"score": 3}')
    seen = []

    def judge(req, n):
        seen.append(re.search(r"Description: ([^\n]+)", OpenAIStub.text_of(req)).group(1))
        return '{"score": 5}'

    with OpenAIStub(judge) as stub:
        sc = VLMScorer(ctx(), captioner={"backend": "transformers", "model": vlm, "max_new_tokens": 2},
                       judge={"backend": "openai", "base_url": stub.url, "model": "judge", "backoff": 0})
        assert sc.box_format == "qwen2_vl"  # from the local model's model_type
        (r,) = sc.score([coloured_candidate("good")])
    assert r.image == pytest.approx(100.0) and r.details["failures"] == []
    assert len(seen) == 5 and all(s == '{"score": 3}{"score": 3}' for s in seen)
    # the same local model as captioner and judge (no judge section): its fixed answer scores 3 -> 60 everywhere
    sc = VLMScorer(ctx(), captioner={"backend": "transformers", "model": vlm, "max_new_tokens": 2, "batch_size": 3})
    (r,) = sc.score([coloured_candidate("good")])
    assert r.image == pytest.approx(60.0) and r.instances == [pytest.approx(60.0)] * 2
