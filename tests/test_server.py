"""The OpenAI-compatible server (`python -m mixtral_ext serve`), live on 127.0.0.1 with a small
random-weight model, driven by the official openai client (httpx for the raw cases): answers equal
to the engine's, streamed and not; the wire format; every error status; the key, origins and body
limit; 16 concurrent clients; 50 clients that leave mid-stream. Every loop is bounded."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace

import pytest

import mixtral_ext
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("mistral_common")

KEY = "test-key-123"
CONFIG = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96)
CONTEXT = 512


def launch(*args: str) -> tuple[subprocess.Popen, str]:
    """`python -m mixtral_ext serve --port 0 ARGS`, its output in a file; returns it and its URL."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "mixtral_ext", "serve", "--port", "0", *args],
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log.name
    found = wait_for(process, 30, "say its address",
                     lambda: re.search(r"at (http://127\.0\.0\.1:[0-9]+)/v1", open(log.name).read()))
    return process, found.group(1)


def wait_for(process: subprocess.Popen, seconds: float, what: str, check):
    """check()'s first true answer, polled while the server runs; else the server is killed and reaped."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        answer = check()
        if answer:
            return answer
        time.sleep(0.05)
    output = open(process.log).read()
    process.kill()
    process.wait(timeout=20)
    os.unlink(process.log)
    raise AssertionError(f"the server did not {what} within {seconds:.0f} s: {output}")


def healthy(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url + "/health", timeout=5).status_code == 200
    return False


def start_server(model_dir: str | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """A server of model_dir (None: the demo model), once /health answers 200."""
    model = ["--model", model_dir] if model_dir else []
    process, url = launch(*model, "--served-model-name", "tiny", "--max-context", str(CONTEXT), "--num-threads", "1",
                          *extra)
    wait_for(process, 60, "become healthy", lambda: healthy(url))
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM stops it cleanly: uvicorn shuts down, then ends by the signal it caught."""
    process.terminate()
    try:
        assert process.wait(timeout=20) in (0, -15)
        output = open(process.log).read()
        assert "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=20)
        os.unlink(process.log)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("served"), CONFIG, seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    process, url = start_server(model_dir, "--api-key", KEY, "--allowed-origins", "http://allowed.example",
                                "--max-queue", "100")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def engine(model_dir):
    with mixtral_ext.Engine.from_pretrained(model_dir, max_context=CONTEXT, num_threads=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=60, max_retries=0)


def raw(server: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None, method: str = "POST"):
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    if isinstance(body, (dict, list)):
        body, all_headers["Content-Type"] = json.dumps(body), "application/json"
    return httpx.request(method, server + path, content=body, headers=all_headers, timeout=60)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]


def test_models_health_tokenize_and_detokenize(server, engine):
    assert httpx.get(server + "/health", timeout=5).status_code == 200  # no key needed
    models = raw(server, "/v1/models", method="GET").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == CONTEXT
    tokens = raw(server, "/tokenize", {"prompt": "Hello there"}).json()
    assert tokens["tokens"] == engine.tokenizer.encode("Hello there") and tokens["count"] == len(tokens["tokens"])
    assert raw(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "Hello there"
    chat_tokens = raw(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert chat_tokens == engine.chat_prompt(MESSAGES)


def test_chat_answers_equal_the_engine_streamed_or_not(client, engine):
    expected = engine.chat(MESSAGES, max_tokens=24, temperature=0)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.message.content
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # The repeated conversation reuses its prefix's KV cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_seeds_stops_and_logprobs(client, engine):
    settings = dict(max_tokens=20, temperature=0.9, top_p=0.9, seed=11)
    expected = engine.chat(MESSAGES, **settings)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, **settings)
    assert reply.choices[0].message.content == expected.message.content
    text = expected.message.content
    stop = text[len(text) // 2:][:3]
    stopped = client.chat.completions.create(model="tiny", messages=MESSAGES, stop=[stop], **settings)
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content
    with_logprobs = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=3)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the top token
    extras = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                            extra_body=dict(top_k=5, min_p=0.05, repetition_penalty=1.1, seed=2,
                                                            ignore_eos=True))
    assert extras.usage.completion_tokens == 8


def test_tools_and_tool_messages_are_accepted(client, engine):
    """Random weights write no tool calls; the request and an OpenAI-style tool history go through."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Nice\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "name": "get_weather", "content": "22 C"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=6, temperature=0)
    expected = engine.chat(history, tools=tools, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.message.content
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.choices[0].message.tool_calls is None


def test_completions_take_text_or_token_ids(client, engine):
    expected = engine.generate("Once upon a time", max_tokens=16, temperature=0)
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == 16
    ids = engine.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0, logprobs=2)
    assert by_ids.choices[0].text == expected.text
    assert len(by_ids.choices[0].logprobs.token_logprobs) == 16
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    ("/v1/completions", {"prompt": [10**7]}, 400, None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "\ud800 lone surrogate"}, 400, None),
    ("/v1/completions", {"prompt": "x", "temperature": 10**400}, 400, None),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": 5}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, None),
    ("/v1/chat/completions", {"messages": ["not a message"]}, 400, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": "get_weather"}, 400, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, 400, None),
    ("/v1/chat/completions", b'{"messages": [' * 100000, 400, None),
    ("/v1/chat/completions", b'{"max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    ("/v1/nothing", {}, 404, None),
])
def test_errors_are_openai_bodies(server, path, body, status, param):
    response = raw(server, path, body, headers=None if isinstance(body, dict) else {"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_loopback_server_answers_loopback_names_only(server):
    """A page on evil.example whose name resolves to 127.0.0.1 (DNS rebinding) sends Host: evil.example."""
    rebound = raw(server, "/v1/models", method="GET", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 403
    assert raw(server, "/v1/models", method="GET", headers={"Host": "localhost"}).status_code == 200


def test_key_origins_and_body_size(server):
    assert raw(server, "/v1/models", method="GET", key=None).status_code == 401
    assert raw(server, "/v1/models", method="GET", key="wrong").json()["error"]["code"] == "invalid_api_key"
    foreign = raw(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2},
                  headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    allowed = raw(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2},
                  headers={"Origin": "http://allowed.example"})
    assert allowed.status_code == 200
    plain = raw(server, "/v1/chat/completions", json.dumps({"messages": MESSAGES}), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 400  # a page's "simple" cross-site POST cannot send JSON
    huge = raw(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert huge.status_code == 413


def test_sixteen_concurrent_clients_get_their_serial_answers(client):
    prompts = [f"Story number {i}:" for i in range(16)]
    serial = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
              for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        parallel = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                                     temperature=0).choices[0].text, prompts))
    assert parallel == serial


def test_clients_that_leave_a_plain_or_queued_request_free_the_stream(server):
    """Not streamed, or still waiting for the stream: the generation stops (or never starts)."""
    body = json.dumps({"prompt": "Endless", "max_tokens": 400, "ignore_eos": True})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def give_up(seconds: float) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(server + "/v1/completions", content=body, headers=headers, timeout=seconds)

    tokens_before = metric(server, "mixtral_ext_generation_tokens_total")
    leavers = [threading.Thread(target=give_up, args=(0.3,)) for _ in range(8)]
    for thread in leavers:
        thread.start()
    for thread in leavers:
        thread.join()
    deadline = time.monotonic() + 10
    while metric(server, "mixtral_ext_requests_running") + metric(server, "mixtral_ext_requests_waiting") > 0:
        assert time.monotonic() < deadline, "a generation went on after its client left"
        time.sleep(0.02)
    # Eight clients that stayed would have had 3,200 tokens; these left after 0.3 s.
    assert metric(server, "mixtral_ext_generation_tokens_total") - tokens_before < 800
    assert metric(server, "mixtral_ext_kv_cache_usage_ratio") == 0


def metric(server: str, name: str) -> float:
    for line in raw(server, "/metrics", method="GET").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_clients_that_leave_midway_free_their_pages(server, client):
    def leave_midway(i: int) -> int:
        with httpx.stream("POST", server + "/v1/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                          content=json.dumps({"prompt": f"Tale {i}", "max_tokens": 400, "stream": True,
                                              "ignore_eos": True})) as response:
            assert response.status_code == 200
            for n, _ in enumerate(response.iter_lines()):
                if n >= 3:
                    return n  # closes the connection mid-stream
        return -1

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        assert all(n == 3 for n in pool.map(leave_midway, range(50)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (metric(server, "mixtral_ext_requests_running") > 0
                                           or metric(server, "mixtral_ext_requests_waiting") > 0):
        time.sleep(0.1)
    assert metric(server, "mixtral_ext_requests_running") == 0
    assert metric(server, "mixtral_ext_kv_cache_usage_ratio") == 0  # abandoned sequences keep no pages
    start = time.monotonic()
    client.completions.create(model="tiny", prompt="Still there?", max_tokens=4)
    assert time.monotonic() - start < 10
    assert metric(server, "mixtral_ext_generation_tokens_total") > 0
    assert "mixtral_ext_time_to_first_token_seconds_bucket" in raw(server, "/metrics", method="GET").text


def test_a_full_queue_is_answered_429():
    # The demo model: its 1,500 tokens take seconds (the tiny one's, a fraction of one).
    process, url = start_server(None, "--max-queue", "1", "--max-context", "4096")
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        headers = {"Content-Type": "application/json"}
        long = json.dumps({"prompt": "Long", "max_tokens": 1500, "ignore_eos": True, "stream": True})
        short = json.dumps({"prompt": "Short", "max_tokens": 2})
        with httpx.stream("POST", url + "/v1/completions", content=long, headers=headers, timeout=60) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # it runs; the next request waits, the ones after it are refused
            posts = [pool.submit(httpx.post, url + "/v1/completions", content=short, headers=headers, timeout=60)
                     for _ in range(4)]
            refused = []
            for done in concurrent.futures.as_completed(posts, timeout=30):
                if done.result().status_code == 429:
                    refused.append(done.result())
                if len(refused) == 3:
                    break
            assert len(refused) == 3, [p.result().status_code for p in posts if p.done()]
        # The long stream's client has left: the waiting request runs.
        assert sorted(p.result(timeout=60).status_code for p in posts) == [200, 429, 429, 429]
        assert refused[0].headers["Retry-After"] and refused[0].json()["error"]["type"] == "rate_limit_error"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_server(process)


def test_health_is_503_while_loading_and_the_demo_serves_without_a_model():
    process, url = launch()  # the demo model: its checkpoint is written while /health says 503
    seen = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.add(httpx.get(url + "/health", timeout=1).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        assert 200 in seen
        reply = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert reply.usage.completion_tokens <= 3
        assert 503 in seen and 200 in seen
        assert raw(url, "/v1/models", method="GET").json()["data"][0]["id"] == "demo"
    finally:
        stop_server(process)


class ToolCallingEngine:
    """The real engine, but its chat streams call a tool (random weights never write [TOOL_CALLS])."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def achat_stream(self, messages, tools=None, **sampling):
        from mixtral_ext.chat import ToolCall
        from mixtral_ext.generation import Delta, Usage

        async def deltas():
            yield Delta("", 5)
            yield Delta("", 6, finish_reason="tool_calls", usage=Usage(30, 2, 0),
                        tool_calls=[ToolCall("a1B2c3D4e", "get_weather", {"city": "Nice"})])
        return deltas()


def test_tool_calls_in_openai_wire_format(engine):
    from fastapi.testclient import TestClient

    from mixtral_ext.server import ServerSettings, create_app

    app = create_app(ServerSettings(model_name="tiny"), lambda: ToolCallingEngine(engine))
    with TestClient(app) as http:
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert call.id == "a1B2c3D4e" and call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Nice"}
        assert reply.usage.prompt_tokens == 30 and reply.usage.completion_tokens == 2
        chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(streamed) == 1 and streamed[0][0].index == 0 and streamed[0][0].id == "a1B2c3D4e"
        assert json.loads(streamed[0][0].function.arguments) == {"city": "Nice"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
