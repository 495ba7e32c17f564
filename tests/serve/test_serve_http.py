"""Bad input never crashes the server: every failure is a 4xx/5xx OpenAI-shaped JSON error, the API key
is enforced, overload is refused fast, disconnected clients free their cache blocks, and /metrics and
/health report it all. Raw httpx here, so malformed bodies can be sent."""

from __future__ import annotations

import json
import threading

import pytest

from frugalm.serve import EngineConfig, LLMEngine, ServerConfig
from serve_helpers import live_server, make_tokenizer, metric_value, random_model, single_thread, wait_for

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 480  # tokens a disconnected request would generate if it were not aborted


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("http")
    tok = make_tokenizer(path)
    model = random_model(6, vocab_size=tok.vocab_size, max_position_embeddings=512)
    engine = LLMEngine(model, EngineConfig(block_size=8, max_num_seqs=8), tokenizer=tok)
    config = ServerConfig(api_key=KEY, max_pending=3, max_body_bytes=64 << 10)
    with single_thread(), live_server(engine, config, model_name="tiny") as srv:
        yield srv, engine


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0].url, timeout=30) as c:
        yield c


def error_of(r: "httpx.Response", status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def metrics(http) -> str:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_health_and_metrics_need_no_key(http):
    assert http.get("/health").json() == {"status": "ok"}
    text = metrics(http)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count"):
        assert f"frugalm:{name} " in text


def test_api_key_is_enforced(http, served):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert error_of(http.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    error_of(http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(http.get("/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
    assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[0].url + "/v1", api_key="bad", max_retries=0).models.list()


@pytest.mark.parametrize("content,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (json.dumps({"model": "tiny", "prompt": "hi", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "hi", "n": 1000}).encode(), "n"),
    (json.dumps({"model": "tiny", "prompt": "hi", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"model": "tiny", "prompt": "hi", "logprobs": 99}).encode(), "logprobs"),
    (json.dumps({"model": "tiny", "prompt": "hi", "wat": 1}).encode(), "wat"),
    (json.dumps({"model": "tiny", "prompt": "hi", "echo": True}).encode(), None),
    (json.dumps({"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}}).encode(), None),
    (json.dumps({"model": "tiny", "prompt": [5, 100000]}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": []}).encode(), None),
    (json.dumps({"model": "tiny", "prompt": 42}).encode(), "prompt"),
    (json.dumps({"prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": "tiny", "prompt": "hi", "stop": ""}).encode(), None),
])
def test_bad_completion_requests_are_400(http, content, param):
    err = error_of(http.post("/v1/completions", content=content, headers={**AUTH, "content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 4},
])
def test_bad_chat_requests_are_400(http, body):
    error_of(http.post("/v1/chat/completions", json=body, headers=AUTH), 400)


def test_other_refusals(http, served):
    engine = served[1]
    err = error_of(http.post("/v1/chat/completions", headers=AUTH,
                             json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    too_long = [5] * engine.max_model_len
    err = error_of(http.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": too_long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error_of(http.post("/v1/completions", headers=AUTH,
                             json={"model": "tiny", "prompt": [5, 6], "max_tokens": engine.max_model_len}), 400)
    assert err["code"] == "context_length_exceeded"
    error_of(http.post("/v1/completions", headers=AUTH, content=b"x" * (65 << 10)), 413)
    error_of(http.get("/v1/nothing-here", headers=AUTH), 404)
    error_of(http.get("/v1/chat/completions", headers=AUTH), 405)
    assert http.get("/health").status_code == 200  # still alive after all of that


def test_overload_is_refused_and_disconnects_free_blocks(http, served):
    """max_pending=3: three long streams fill it, a fourth request gets 503; dropping the streams aborts
    their sequences (not run to completion) and gives every cache block back."""
    engine = served[1]
    base = metrics(http)
    gen0 = metric_value(base, "generation_tokens_total")
    done0 = metric_value(base, "request_success_total", 'finished_reason="length"')
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    clients = [httpx.Client(base_url=served[0].url, timeout=30) for _ in range(3)]
    streams = []
    try:
        for c in clients:
            cm = c.stream("POST", "/v1/completions", json=body, headers=AUTH)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the stream is flowing
            streams.append((cm, resp, lines))  # dropping `lines` would close the connection early
        err = error_of(http.post("/v1/completions", headers=AUTH, json={**body, "stream": False, "max_tokens": 2}), 503)
        assert err["code"] == "server_overloaded"
        assert engine.block_manager.usage > 0
    finally:
        for cm, resp, _ in streams:
            resp.close()
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    assert wait_for(lambda: engine.num_running == 0 and engine.block_manager.usage == 0.0, timeout=30)
    after = metrics(http)
    assert metric_value(after, "num_requests_pending") == 0
    assert metric_value(after, "generation_tokens_total") - gen0 < 3 * LONG  # aborted, not finished
    assert metric_value(after, "request_success_total", 'finished_reason="length"') == done0
    assert metric_value(after, "request_rejected_total", 'reason="overloaded"') >= 1
    # Capacity is back.
    r = http.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_non_streamed_request_is_aborted_when_the_client_leaves(served):
    srv, engine = served
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}
    with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(30, read=0.4)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body, headers=AUTH)
    assert wait_for(lambda: engine.num_running == 0 and engine.block_manager.usage == 0.0, timeout=30)


def test_engine_failure_is_a_500_and_the_server_survives(http, served, monkeypatch):
    engine = served[1]
    original = engine.step
    failed = threading.Event()

    def broken():
        if not failed.is_set():
            failed.set()
            raise RuntimeError("simulated kernel failure")
        return original()

    monkeypatch.setattr(engine, "step", broken)
    err = error_of(http.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "Hi", "max_tokens": 3}), 500)
    assert err["type"] == "server_error"
    assert engine.block_manager.usage == 0.0
    r = http.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200
    assert http.get("/health").status_code == 200


def test_streamed_completion_shape(http):
    # max_pending is 3 here: 2 prompts x n=2 = 4 sequences is refused as a whole.
    too_many = {"model": "tiny", "prompt": ["Hello", "Two"], "n": 2, "max_tokens": 2}
    assert error_of(http.post("/v1/completions", json=too_many, headers=AUTH), 503)["code"] == "server_overloaded"
    r = http.post("/v1/completions", json={**too_many, "n": 1, "temperature": 0}, headers=AUTH)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    body = {"model": "tiny", "prompt": ["Hello"], "max_tokens": 4, "n": 2, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    finish = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
              if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finish == {0: "length", 1: "length"}  # n=2 choices interleaved in one stream
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
