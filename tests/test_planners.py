"""Planners: ``prior`` (valid graphs from the priors), ``hf`` (a tiny random LM: garbage, rejected and counted),
``openai`` (a local stub server: valid, malformed, truncated, slow and failing responses; the key never logged)."""

from __future__ import annotations

import json
import logging
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from openai_stub import OpenAIStub, PeakConcurrency, Reply
from tiny_models_gen import make_tiny_llm, synthetic_lvis

from acp_data.generate.common import BackendOptionError
from acp_data.http_client import ChatError
from acp_data.plan.common import requested_objects
from acp_data.plan.hf import HFPlanner
from acp_data.plan.openai import OpenAIPlanner
from acp_data.plan.prior import PriorPlanner
from acp_data.prebuild.units import make_units
from acp_data.priors import BUCKET_PHRASES, Priors, geometric_bucket, relation_bucket
from acp_data.registry import PLANNERS
from acp_data.stages import StageContext, WorkUnit


@pytest.fixture(scope="module")
def priors() -> Priors:
    return Priors.build(synthetic_lvis(), seed=0)


# ----- prior ------------------------------------------------------------------------------------------------------
def test_registry_names() -> None:
    assert PLANNERS.get("prior") is PriorPlanner
    assert PLANNERS.get("hf") is HFPlanner
    assert PLANNERS.get("openai") is OpenAIPlanner


def test_prior_planner_valid_graphs_for_rare_categories(priors: Priors) -> None:
    cats = priors.categories
    ctx = StageContext(cats, priors)
    planner = PLANNERS.build("prior", ctx)
    rare = cats.select("rare")
    units = make_units(cats, rare, priors, images_per_category=12, seed=5, max_objects=4)
    phrases = set(BUCKET_PHRASES.values())
    layouts = set()
    for u in units:
        res = planner.plan(u)
        s = res.scene
        assert s is not None and res.attempts == 1 and not res.rejections
        req = requested_objects(cats, u.combo)
        assert s.validate(list(req)).ok
        assert s.ids == list(req) and [o.category_id for o in s.objects] == list(u.combo)
        b = s.boxes_xywh()
        assert (b[:, :2] >= 0).all() and (b[:, :2] + b[:, 2:] <= 1).all() and (b[:, 2:] > 0).all()
        assert np.sqrt(b[0, 2] * b[0, 3]) >= 0.2 - 1e-9  # the target is drawn large enough to be learnt from
        assert len(s.relations) == len(u.combo) - 1
        for r in s.relations:  # the written relation agrees with the boxes (what CLIS-L scores)
            assert r.phrase in phrases
            sb, ob = s.object(r.subjects[0]).bbox, s.object(r.objects[0]).bbox
            assert relation_bucket(r.phrase) == geometric_bucket(sb, ob)
        assert all(f"({oid})" in s.caption for oid in req)
        layers = {g for members in s.layers.values() for g in members}
        assert layers == set(s.groups)
        layouts.add(tuple(np.round(b[0], 4)))
    assert len(layouts) == len(units)  # every unit gets its own layout
    again = planner.plan(units[3]).scene
    assert again is not None and again.to_json() == planner.plan(units[3]).scene.to_json()


def test_prior_planner_uses_real_box_pairs() -> None:
    """Category 2 is always right above category 1 in the data: planned pairs keep that geometry."""
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(1, 41):
        images.append({"id": i, "width": 400, "height": 400})
        x, y = rng.uniform(40, 200), rng.uniform(200, 250)
        anns.append({"id": 2 * i - 1, "image_id": i, "category_id": 1, "bbox": [x, y, 120, 120]})
        anns.append({"id": 2 * i, "image_id": i, "category_id": 2, "bbox": [x + 10, y - 90, 100, 80]})
    cats = [{"id": 1, "name": "table"}, {"id": 2, "name": "lamp"}, {"id": 3, "name": "vase"}]
    pr = Priors.build({"images": images, "annotations": anns, "categories": cats})
    planner = PriorPlanner(StageContext(pr.categories, pr))
    for seed in range(20):
        s = planner.plan(WorkUnit(seed, (1, 2), seed, 1)).scene
        assert s is not None
        table, lamp = s.boxes_xywh()
        assert geometric_bucket(lamp, table) == "above"
        # the real pair's relative size and aspect, scaled uniformly
        assert lamp[2] * lamp[3] / (table[2] * table[3]) == pytest.approx(100 * 80 / 120**2, rel=1e-4)
        assert lamp[2] / lamp[3] == pytest.approx(100 / 80, rel=1e-4)
    # a pair never seen together still gets a valid layout (placed from size statistics, least overlap)
    s = planner.plan(WorkUnit(0, (1, 3), 7, 1)).scene
    assert s is not None and s.validate(["table-1", "vase-2"]).ok


def test_prior_planner_options_and_settings(priors: Priors) -> None:
    cats = priors.categories
    p = PriorPlanner(StageContext(cats, priors))
    s1 = p.settings()
    assert s1["priors"] and s1["name"] == "PriorPlanner"
    other = Priors.build(synthetic_lvis(seed=1), seed=0)
    assert PriorPlanner(StageContext(cats, other)).settings()["priors"] != s1["priors"]
    no_priors = PriorPlanner(StageContext(cats, None))
    assert no_priors.plan(WorkUnit(0, (5, 1, 2), 3, 5)).scene.validate(["bow_weapon-1", "person-2", "dog-3"]).ok
    with pytest.raises(BackendOptionError, match="unknown option"):
        PriorPlanner(StageContext(cats, priors), min_sise=0.1)
    with pytest.raises(ValueError, match="min_size"):
        PriorPlanner(StageContext(cats, priors), min_size=0.5, target_min_size=0.3)


# ----- hf -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> str:
    import torch

    torch.set_num_threads(1)
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


def test_hf_planner_tiny_random_lm_is_rejected_with_reasons(tiny_llm: str, priors: Priors) -> None:
    cats = priors.categories
    planner = PLANNERS.build("hf", StageContext(cats, priors), model=tiny_llm, shots=1, retries=2,
                             max_tokens_description=48, max_tokens_layout=48)
    units = make_units(cats, cats.select("rare")[:2], priors, 1, seed=0)
    results = [planner.plan(u) for u in units]
    for res in results:
        assert res.scene is None
        assert res.attempts == 3  # 1 + retries, all in the description stage
        assert sum(res.rejections.values()) == 3
        assert set(res.rejections) <= {"no_json", "truncated", "bad_json", "bad_schema"}
        assert res.prompts and "Objects:" in res.prompts[0]
    # seeded sampling: the same unit gives the same answers
    assert planner.plan(units[0]).rejections == results[0].rejections
    texts = [planner.chat([{"role": "user", "content": "hi"}], seed=s, max_tokens=24).text for s in (1, 1, 2)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert planner.settings()["model"] == tiny_llm and "device" not in planner.settings()


def test_hf_planner_bad_input_before_loading(tmp_path, priors: Priors) -> None:
    ctx = StageContext(priors.categories, priors)
    with pytest.raises(BackendOptionError, match="does not exist"):
        HFPlanner(ctx, model=str(tmp_path / "no_such_model"))
    with pytest.raises(BackendOptionError, match="missing required"):
        HFPlanner(ctx)
    with pytest.raises(BackendOptionError, match="unknown option"):
        HFPlanner(ctx, model="org/name", temprature=0.5)


# ----- openai -------------------------------------------------------------------------------------------------------
KEY = "sk-test-9f8e7d6c5b4a-SECRET"


def _ids_of(req: dict) -> list[str]:
    last = req["messages"][-1]["content"]
    first_user = [m for m in req["messages"] if m["role"] == "user"][-1]["content"]
    m = re.search(r"Objects: (\[.*?\])", last) or re.search(r"Objects: (\[.*?\])", first_user)
    return json.loads(m.group(1))


def _is_layout(req: dict) -> bool:
    return "You lay out" in json.dumps(req["messages"][0])


def _good_answer(req: dict) -> str:
    ids = _ids_of(req)
    if _is_layout(req):
        boxes = [{"object": oid, "bbox": [0.05 + 0.3 * (k % 3), 0.1 + 0.3 * (k // 3), 0.25, 0.25]}
                 for k, oid in enumerate(ids)]
        return "Here is the layout:\n```json\n" + json.dumps({"Layout": boxes}) + "\n```"
    desc = {"attributes": {oid: ["plain"] for oid in ids}, "groups": {"group-1": ids},
            "layers of depth": {"Foreground": ["group-1"]}, "relations": [],
            "caption": "A photo of " + " and ".join(f"a {oid.rsplit('-', 1)[0]}({oid})" for oid in ids) + "."}
    return json.dumps(desc)


def _planner(stub: OpenAIStub, priors: Priors, **kw) -> OpenAIPlanner:
    opts = dict(base_url=stub.url, model="qwen-test", api_key_env="ACP_TEST_KEY", max_retries=1, backoff=0.0,
                timeout=5.0, retries=1, shots=1)
    opts.update(kw)
    return PLANNERS.build("openai", StageContext(priors.categories, priors), **opts)


@pytest.fixture()
def key_env(monkeypatch):
    monkeypatch.setenv("ACP_TEST_KEY", KEY)


def test_openai_valid_and_retried_answers(priors: Priors, key_env, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    unit = WorkUnit(0, (2, 3), 11, 2)
    with OpenAIStub(lambda req, n: _good_answer(req), require_key=KEY) as stub:
        planner = _planner(stub, priors)
        res = planner.plan(unit)
        assert res.scene is not None and res.scene.validate(["dog-1", "frisbee-2"]).ok
        assert res.attempts == 2 and not res.rejections
        _, headers, req = stub.requests[0]
        assert req["model"] == "qwen-test" and isinstance(req["seed"], int) and req["max_tokens"] == 600
        assert headers["Authorization"] == f"Bearer {KEY}"
        # a refusal, then a valid description; a truncated layout, then a valid one
        stub.requests.clear()
        layout_ok = _good_answer({"messages": [{"role": "system", "content": "You lay out"},
                                               {"role": "user", "content": 'Objects: ["dog-1", "frisbee-2"]'}]})
        stub.script("I'm sorry, I can't help with that.", _good_answer(stub_req_desc()),
                    '{"Layout": [{"object": "dog-1", "bbox": [0.1, 0.2, 0.3', layout_ok)
        res = planner.plan(unit)
        assert res.scene is not None and res.attempts == 4
        assert dict(res.rejections) == {"no_json": 1, "truncated": 1}
        retry = stub.requests[1][2]["messages"]
        assert retry[-2]["role"] == "assistant" and "rejected: no_json" in retry[-1]["content"]
        # answers that stay bad exhaust the retries: rejected, counted, no crash
        stub.script("```json\n{\"attributes\": {\"dog-1\": [\"brown\"]},", "still not json")
        res = planner.plan(unit)
        assert res.scene is None and res.attempts == 2 and dict(res.rejections) == {"truncated": 1, "no_json": 1}
    assert KEY not in caplog.text
    assert KEY not in json.dumps(planner.settings()) and "ACP_TEST_KEY" not in json.dumps(planner.settings())


def stub_req_desc() -> dict:
    return {"messages": [{"role": "system", "content": "You design"},
                         {"role": "user", "content": 'Objects: ["dog-1", "frisbee-2"]'}]}


def test_openai_transport_failures_are_retried_then_rejected(priors: Priors, key_env, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    unit = WorkUnit(0, (2, 3), 11, 2)
    with OpenAIStub(lambda req, n: _good_answer(req)) as stub:
        planner = _planner(stub, priors, timeout=0.3)
        # malformed HTTP bodies and a 500 that echoes the key: the client retries once, then the unit is rejected
        stub.script(Reply(body="<html>bad gateway</html>"), Reply(status=500, body=f'{{"error": "token {KEY}"}}'))
        res = planner.plan(unit)
        assert res.scene is None and dict(res.rejections) == {"request_failed": 1}
        assert len(stub.requests) == 2
        # slow answers time out twice (request + 1 retry) -> rejected; a slow-but-in-time answer is fine
        stub.script(Reply(content=_good_answer(stub_req_desc()), delay=1.0),
                    Reply(content=_good_answer(stub_req_desc()), delay=1.0))
        t0 = time.monotonic()
        res = planner.plan(unit)
        assert res.scene is None and dict(res.rejections) == {"request_failed": 1}
        assert time.monotonic() - t0 < 2.0
        stub.script(Reply(content=_good_answer(stub_req_desc()), delay=0.1))
        assert planner.plan(unit).scene is not None
    assert KEY not in caplog.text and "***" in caplog.text


def test_openai_length_stop_and_runaway_answers(priors: Priors, key_env) -> None:
    """A ``length`` stop is ``truncated`` and the retry asks for a shorter answer; a 2 MB answer is read in bounded
    time and goes back to the model cut to ``prompts.ECHO_CHARS``."""
    from acp_data.plan.prompts import ECHO_CHARS

    unit = WorkUnit(0, (2, 3), 11, 2)
    good = _good_answer(stub_req_desc())
    with OpenAIStub(lambda req, n: _good_answer(req)) as stub:
        planner = _planner(stub, priors, retries=3)
        stub.script(Reply(content=good[:80], finish_reason="length"),
                    Reply(content="[" * (2 << 20), finish_reason="length"),
                    Reply(content="Sure. " + "[" * (2 << 20)), Reply(content=good))
        t0 = time.monotonic()
        res = planner.plan(unit)
        elapsed = time.monotonic() - t0
        assert res.scene is not None and res.attempts == 5, res.rejections
        assert dict(res.rejections) == {"truncated": 2, "too_long": 1}
        sizes = [len(json.dumps(r)) for _, _, r in stub.requests]
        for _, _, req in stub.requests[1:4]:
            assert req["messages"][-2]["role"] == "assistant" and len(req["messages"][-2]["content"]) < ECHO_CHARS + 64
            assert "much more briefly" in req["messages"][-1]["content"]
        assert max(sizes[1:4]) < sizes[0] + ECHO_CHARS + 2000  # never a 2 MB request
    assert elapsed < 10.0, elapsed


def test_openai_bad_key_raises(priors: Priors, key_env) -> None:
    with OpenAIStub(lambda req, n: _good_answer(req), require_key="another-key") as stub:
        planner = _planner(stub, priors)
        with pytest.raises(ChatError) as e:
            planner.plan(WorkUnit(0, (2,), 1, 2))
        assert e.value.status == 401 and KEY not in str(e.value)


def test_openai_bad_request_ends_only_that_unit(priors: Priors, key_env) -> None:
    """HTTP 400 (e.g. the context is too long) is that unit's failure, counted as ``bad_request``, not retried; the
    next unit is planned as usual. 401/403/404 still raise (no request can get past them)."""
    unit = WorkUnit(0, (2, 3), 11, 2)
    with OpenAIStub(lambda req, n: _good_answer(req)) as stub:
        planner = _planner(stub, priors)
        stub.script(Reply(status=400, body='{"error": "maximum context length is 4096 tokens"}'))
        t0 = time.monotonic()
        res = planner.plan(unit)
        assert res.scene is None and dict(res.rejections) == {"bad_request": 1} and len(stub.requests) == 1
        assert planner.plan(unit).scene is not None
        for status in (401, 403, 404):
            stub.script(Reply(status=status, body='{"error": "no"}'))
            with pytest.raises(ChatError) as e:
                planner.plan(unit)
            assert e.value.status == status and e.value.fatal
        # an answer over the client's size cap is that unit's too_long
        planner.client.max_response_bytes = 50_000
        stub.script(Reply(content="x" * 100_000))
        assert dict(planner.plan(unit).rejections) == {"too_long": 1}
    assert time.monotonic() - t0 < 5.0


def test_openai_startup_check(priors: Priors, key_env) -> None:
    with OpenAIStub(lambda req, n: _good_answer(req) if "Objects:" in OpenAIStub.text_of(req) else '{"ok": true}',
                    require_key=KEY) as stub:
        planner = _planner(stub, priors)
        planner.load()
        planner.load()  # once
        assert len(stub.requests) == 1
        req = stub.requests[0][2]
        assert req["max_tokens"] == 8 and req["model"] == "qwen-test" and "connection check" in OpenAIStub.text_of(req)
        assert planner.plan(WorkUnit(0, (2, 3), 11, 2)).scene is not None
        cases = [(401, "ACP_TEST_KEY"), (403, "ACP_TEST_KEY"), (404, "model 'qwen-test'"), (400, "extra_params")]
        for status, hint in cases:
            stub.requests.clear()
            stub.script(Reply(status=status, body='{"error": "refused"}'))
            with pytest.raises(ChatError, match="start-up check") as e:
                _planner(stub, priors).load()
            assert e.value.status == status and hint in str(e.value) and KEY not in str(e.value)
            assert len(stub.requests) == 1  # not retried
        assert not _planner(stub, priors, startup_check=False).load()  # off: no request
        assert "startup_check" not in planner.settings() and "call_timeout" not in planner.settings()
    with OpenAIStub() as stub:
        url = stub.url
    dead = _planner(SimpleNamespace(url=url), priors, max_retries=1)
    with pytest.raises(ChatError, match="start-up check.*server up"):
        dead.load()


def test_openai_dead_endpoint_costs_a_unit_a_bounded_time(priors: Priors, key_env) -> None:
    """Refused connections cost the backoff waits; a server that accepts and never answers costs at most
    ``call_timeout``, however many retries ``max_retries`` allows."""
    unit = WorkUnit(0, (2, 3), 11, 2)
    with OpenAIStub() as stub:
        url = stub.url
    t0 = time.monotonic()
    res = _planner(SimpleNamespace(url=url), priors, max_retries=3, backoff=0.05).plan(unit)
    assert dict(res.rejections) == {"request_failed": 1} and time.monotonic() - t0 < 2.0
    with OpenAIStub(lambda req, n: Reply(content="never", delay=30.0)) as stub:
        planner = _planner(stub, priors, timeout=0.5, max_retries=10, backoff=0.0, call_timeout=1.2)
        t0 = time.monotonic()
        res = planner.plan(unit)
        elapsed = time.monotonic() - t0
        assert dict(res.rejections) == {"request_failed": 1} and 1.1 < elapsed < 2.5, elapsed
        assert len(stub.requests) == 3  # 0.5 + 0.5 + the 0.2 left


def test_openai_plan_many_bounded_concurrency(priors: Priors, key_env) -> None:
    slow = PeakConcurrency(_good_answer, 0.15)

    cats = priors.categories
    units = make_units(cats, cats.select("rare"), priors, 2, seed=0, max_objects=3)[:9]
    with OpenAIStub(slow) as stub:
        planner = _planner(stub, priors, concurrency=3)
        t0 = time.monotonic()
        results = planner.plan_many(units)
        elapsed = time.monotonic() - t0
    assert all(r.scene is not None for r in results)
    assert [r.scene.ids for r in results] == [list(requested_objects(cats, u.combo)) for u in units]
    assert 2 <= slow.peak <= 3
    assert elapsed < 9 * 2 * 0.15  # overlapped, not sequential


def test_openai_missing_key_env(priors: Priors, monkeypatch) -> None:
    monkeypatch.delenv("ACP_NO_SUCH_KEY", raising=False)
    with pytest.raises(BackendOptionError, match="ACP_NO_SUCH_KEY"):
        OpenAIPlanner(StageContext(priors.categories, priors), base_url="http://127.0.0.1:9/v1", model="m",
                      api_key_env="ACP_NO_SUCH_KEY")
