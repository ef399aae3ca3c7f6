"""Prebuild with the ``openai`` planner against the loopback stub: the start-up check stops a run with a wrong key or
model once, before any unit; a 400 for one request ends only that unit; the summary counts every repair and
rejection by reason."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from openai_stub import OpenAIStub, Reply

from acp_data.prebuild import PrebuildError, run_prebuild

KEY = "sk-prebuild-test-5a4b3c2d1e"


def _config(url: str, **planner: Any) -> dict[str, Any]:
    return {
        "categories": "shapes:small", "concepts": "rare", "images_per_category": 1, "seed": 1, "max_objects": 2,
        "candidates": 1, "priors": None, "layout_score": False, "scorer": None, "device": "cpu",
        "planner": {"name": "openai", "base_url": url, "model": "served-model", "api_key_env": "ACP_PREBUILD_KEY",
                    "backoff": 0.0, "max_retries": 1, "timeout": 5.0, "retries": 1, "shots": 1, **planner},
        "generator": {"name": "shapes", "width": 64, "height": 64}, "segmenter": {"name": "shapes"},
    }


class _Answers:
    """ACP-shaped descriptions with an alias id and an extra object, layouts that overshoot the right edge a little,
    and a 400 for the first description request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.descriptions = 0

    def __call__(self, req: dict[str, Any], n: int) -> str | Reply:
        text = OpenAIStub.text_of(req)
        if "connection check" in text:
            return '{"ok": true}'
        ids = json.loads(re.findall(r"Objects: (\[.*?\])", req["messages"][-1]["content"])[-1])
        if "You lay out" in req["messages"][0]["content"]:
            return json.dumps({"Layout": [{"object": oid, "bbox": [0.9 - 0.3 * k, 0.3, 0.15, 0.2]}
                                          for k, oid in enumerate(ids)]})
        with self.lock:
            self.descriptions += 1
            if self.descriptions == 1:
                return Reply(status=400, body='{"error": "This model\'s maximum context length is 2048 tokens"}')
        alias = [f"thing-{oid.rsplit('-', 1)[1]}" for oid in ids]
        return json.dumps({
            "attributes": [{"name": oid, "attributes": "plain"} for oid in ids] + [{"name": "cloud-9",
                                                                                    "attributes": "white"}],
            "groups": [{"id": "group-1", "group": alias}],
            "layers of depth": {"Foreground": ["group-1"], "Midground": [], "Background": []},
            "relations": [{"caption": "the shapes", "relations": []}],
            "caption": "A picture of " + " and ".join(f"a shape({a})" for a in alias) + " under a cloud(cloud-9)."})


def test_prebuild_counts_repairs_and_a_bad_request(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACP_PREBUILD_KEY", KEY)
    answers = _Answers()
    with OpenAIStub(answers, require_key=KEY) as stub:
        t0 = time.monotonic()
        s = run_prebuild(_config(stub.url), tmp_path / "cache", max_units=6, progress=False)
        elapsed = time.monotonic() - t0
        checks = [r for _, _, r in stub.requests if "connection check" in OpenAIStub.text_of(r)]
        assert len(checks) == 1 and stub.requests[0][2] is checks[0]  # one tiny request, before any unit
    assert s["units"]["processed"] == 6 and s["units"]["stored"] == 5 and s["units"]["errors"] == 0
    assert s["rejections"]["plan"] == {"bad_request": 1, "no_scene": 1}
    assert list(s["empty_units"].values()) == ["planner_rejected"]
    assert s["repairs"] == {"acp_shape": 5, "rename_id": 5, "drop_extra_object": 5, "clip_box": 5}
    assert elapsed < 60
    again = run_prebuild(_config("http://127.0.0.1:9/v1", startup_check=False), tmp_path / "cache", max_units=6,
                         progress=False)
    assert again["units"]["skipped_done"] == 6  # the 400 unit is final: the request would fail the same way


@pytest.mark.parametrize("status,hint", [(401, "ACP_PREBUILD_KEY"), (403, "ACP_PREBUILD_KEY"),
                                         (404, "model 'served-model'")])
def test_prebuild_stops_at_startup_once(tmp_path: Path, monkeypatch, status: int, hint: str) -> None:
    monkeypatch.setenv("ACP_PREBUILD_KEY", KEY)
    with OpenAIStub(lambda req, n: Reply(status=status, body='{"error": "refused"}')) as stub:
        t0 = time.monotonic()
        with pytest.raises(PrebuildError, match="start-up check") as e:
            run_prebuild(_config(stub.url), tmp_path / "cache", max_units=6, progress=False)
        assert len(stub.requests) == 1 and time.monotonic() - t0 < 10
    assert f"HTTP {status}" in str(e.value) and hint in str(e.value) and KEY not in str(e.value)
    assert not list((tmp_path / "cache").glob("shards/*.tar"))
