"""The OpenAI-compatible client against the local stub: retries, backoff, timeouts, concurrency, key redaction."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from openai_stub import OpenAIStub, PeakConcurrency, Reply

from acp_data.http_client import ChatClient, ChatError, image_to_data_url, user_message

KEY = "sk-test-0123456789abcdef"


def test_chat_round_trip_with_image_and_key(monkeypatch):
    monkeypatch.setenv("ACP_TEST_KEY", KEY)
    with OpenAIStub(lambda req, n: f"echo {OpenAIStub.text_of(req)}", require_key=KEY) as stub:
        client = ChatClient(stub.url, "tiny-model", api_key_env="ACP_TEST_KEY", backoff=0)
        img = np.zeros((4, 5, 3), dtype=np.uint8)
        out = client.chat([user_message("hello", images=[img])], max_tokens=7)
        assert out == "echo hello"
        path, headers, req = stub.requests[0]
        assert path == "/v1/chat/completions"
        assert req["model"] == "tiny-model" and req["max_tokens"] == 7
        assert OpenAIStub.images_of(req) == [image_to_data_url(img)]
        assert headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(client) and KEY not in str(client.settings())


def test_missing_key_variable_is_an_error(monkeypatch):
    monkeypatch.delenv("ACP_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="ACP_NO_SUCH_KEY"):
        ChatClient("http://127.0.0.1:1/v1", "m", api_key_env="ACP_NO_SUCH_KEY")


def test_retries_transient_errors_and_redacts(monkeypatch, caplog):
    monkeypatch.setenv("ACP_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(lambda req, n: "fine") as stub:
        stub.script(Reply(status=503, body=f"overloaded, your key {KEY}"), Reply(body="not json"),
                    Reply(status=429, headers={"Retry-After": "0"}))
        client = ChatClient(stub.url, "m", api_key_env="ACP_TEST_KEY", backoff=0, max_retries=3)
        assert client.chat([user_message("x")]) == "fine"
        assert len(stub.requests) == 4
        stub.script(*[Reply(status=500, body=f"boom {KEY}")] * 3)
        client2 = ChatClient(stub.url, "m", api_key_env="ACP_TEST_KEY", backoff=0, max_retries=2)
        with pytest.raises(ChatError) as ei:
            client2.chat([user_message("x")])
        assert ei.value.attempts == 3 and "***" in str(ei.value) and KEY not in str(ei.value)
        stub.script(Reply(status=400, body="bad request"))
        with pytest.raises(ChatError) as ei:
            client2.chat([user_message("x")])
        assert ei.value.status == 400 and ei.value.attempts == 1  # not retried
    assert "retry" in caplog.text
    assert KEY not in caplog.text


def test_timeout_is_retried():
    with OpenAIStub(lambda req, n: "late but fine") as stub:
        stub.script(Reply(content="too late", delay=1.0))
        client = ChatClient(stub.url, "m", timeout=0.3, backoff=0, max_retries=1)
        t0 = time.perf_counter()
        assert client.chat([user_message("x")]) == "late but fine"
        assert time.perf_counter() - t0 < 1.0
        stub.script(Reply(delay=1.0), Reply(delay=1.0))
        with pytest.raises(ChatError, match="after 2 attempts"):
            client.chat([user_message("x")])


def test_concurrency_is_bounded():
    slow = PeakConcurrency(OpenAIStub.text_of, 0.05)
    with OpenAIStub(slow) as stub:
        client = ChatClient(stub.url, "m", concurrency=3, backoff=0)
        out = client.chat_many([[user_message(str(i))] for i in range(12)])
        assert out == [str(i) for i in range(12)]
        assert 1 < slow.peak <= 3
        stub.script(Reply(status=404, body="no"))
        one = ChatClient(stub.url, "m", concurrency=1, backoff=0).chat_many([[user_message("a")], [user_message("b")]])
        assert isinstance(one[0], ChatError) and one[1] == "b"


# ----- an overall deadline per request ------------------------------------------------------------------------------
@pytest.mark.parametrize("after", [0, 120], ids=["headers trickled", "body trickled"])
def test_trickling_server_is_cut_at_the_deadline(after):
    """One byte every 0.1 s never trips a per-read socket timeout; the request deadline (timeout) still ends it."""
    with OpenAIStub() as stub:
        stub.script(*[Reply(content="x" * 500, trickle=0.1, trickle_after=after)] * 2)
        client = ChatClient(stub.url, "m", timeout=0.6, backoff=0, max_retries=1)
        t0 = time.monotonic()
        with pytest.raises(ChatError, match="timed out") as ei:
            client.chat([user_message("x")])
        elapsed = time.monotonic() - t0
        assert ei.value.retryable and ei.value.attempts == 2 and len(stub.requests) == 2
        assert 1.1 < elapsed < 2.5, elapsed
        time.sleep(0.3)
        sent = stub.trickled
        time.sleep(0.3)
        assert stub.trickled <= sent + 1  # the server noticed the client was gone


def test_one_byte_every_two_seconds_costs_one_deadline():
    """The case from the field: headers, then one byte every 2 s. ``timeout`` bounds the whole request."""
    with OpenAIStub() as stub:
        stub.script(Reply(content="a long answer", trickle=2.0, trickle_after=100))
        client = ChatClient(stub.url, "m", timeout=3.0, backoff=0, max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(ChatError, match="timed out"):
            client.chat([user_message("x")])
        assert 2.9 < time.monotonic() - t0 < 4.5


def test_call_timeout_bounds_all_attempts():
    with OpenAIStub() as stub:
        stub.script(*[Reply(content="late", delay=3.0)] * 6)
        client = ChatClient(stub.url, "m", timeout=1.0, backoff=0.05, max_retries=5, call_timeout=1.5)
        t0 = time.monotonic()
        with pytest.raises(ChatError, match="call_timeout") as ei:
            client.chat([user_message("x")])
        assert time.monotonic() - t0 < 2.2 and ei.value.attempts == 2 and ei.value.retryable
    with pytest.raises(ValueError, match="call_timeout"):
        ChatClient("http://127.0.0.1:1/v1", "m", call_timeout=0)


def test_finish_reason_large_and_oversized_answers():
    big = "[" * (2 << 20)
    with OpenAIStub() as stub:
        stub.script(Reply(content="cut", finish_reason="length"), Reply(content=big, finish_reason="length"),
                    Reply(content=big))
        client = ChatClient(stub.url, "m", backoff=0, max_retries=2, timeout=10)
        done = client.complete([user_message("x")])
        assert (done.text, done.finish_reason) == ("cut", "length")
        t0 = time.monotonic()
        done = client.complete([user_message("x")])
        assert done.text == big and done.finish_reason == "length" and time.monotonic() - t0 < 5
        small = ChatClient(stub.url, "m", backoff=0, max_retries=2, max_response_bytes=1 << 20)
        with pytest.raises(ChatError, match="max_response_bytes") as ei:
            small.complete([user_message("x")])
        assert not ei.value.retryable and not ei.value.fatal and len(stub.requests) == 3  # not retried


def test_connection_refused_is_quick():
    with OpenAIStub() as stub:
        url = stub.url
    client = ChatClient(url, "m", timeout=5, backoff=0.01, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(ChatError, match="after 3 attempts") as ei:
        client.chat([user_message("x")])
    assert ei.value.retryable and time.monotonic() - t0 < 1.0
