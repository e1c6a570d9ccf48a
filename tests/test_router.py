"""The router on real servers: policies spread requests and /metrics counts them, a backend down at
start is skipped and joins when it comes up, P/D through the router gives a single instance's
output (streamed and not) with the decode instance computing only each prompt's last token, and a
decode instance killed mid-stream ends the client's stream with an error, not a hang."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI, Request
from kv_store import free_port, redis_server
from loopback import bound_socket, serving
from test_server import parse_metrics

from inferlab.async_engine import AsyncEngine
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.router.app import build_router_app
from inferlab.router.backends import Backend
from inferlab.router.policy import make_policy
from inferlab.server.serve import build_server_app

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village, there lived",
           "List three prime numbers:", "The quick brown fox jumps over the lazy dog, and then"]


@contextmanager
def instance(tiny, sock: socket.socket | None = None, **config) -> Iterator[tuple[str, AsyncEngine]]:
    config.setdefault("num_kv_blocks", 256)
    engine = AsyncEngine(LLMEngine(EngineConfig(**config), loaded=tiny))
    try:
        with serving(build_server_app(engine, "tiny", prompt_tokens_details=True), sock or bound_socket()) as url:
            yield url, engine
    finally:
        engine.shutdown()
        engine.engine.shutdown()


@contextmanager
def router(backends: list[str], policy: str = "round_robin", prefill: list[str] = (), **kw) -> Iterator[str]:
    app = build_router_app([Backend(u, "decode" if prefill else "serve") for u in backends], policy,
                           [Backend(u, "prefill") for u in prefill], **kw)
    with serving(app, bound_socket()) as url:
        yield url


def complete(url: str, prompt: str, stream: bool = False, max_tokens: int = 12, timeout: float = 60) -> dict:
    """One greedy completion: the JSON answer, or for a stream {"text", "error", "chunks"}."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
        return {"status": r.status_code, **r.json()}
    text, error, chunks = "", None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            else:
                text += event["choices"][0]["text"]
                chunks += 1
    return {"text": text, "error": error, "chunks": chunks}


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def check_empty(engine: AsyncEngine) -> LLMEngine:
    def check() -> LLMEngine:
        engine.engine.check_integrity()
        assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks
        return engine.engine
    return asyncio.run(engine.run(check))


def test_policies_spread_requests_and_metrics_count_them(tiny):
    with instance(tiny) as (a, _), instance(tiny) as (b, _):
        direct = [complete(a, p)["choices"][0]["text"] for p in PROMPTS[:4]]
        with router([a, b], "round_robin") as r:
            assert [complete(r, p)["choices"][0]["text"] for p in PROMPTS[:4]] == direct
            m = metrics(r)
            assert m[f'inferlab_router_backend_requests_total{{backend="{a}",role="serve"}}'] == 2
            assert m[f'inferlab_router_backend_requests_total{{backend="{b}",role="serve"}}'] == 2
            assert m[f'inferlab_router_backend_in_flight{{backend="{a}",role="serve"}}'] == 0
            assert m["inferlab_router_requests_total"] == 4
            text = httpx.get(f"{r}/metrics", timeout=10).text
            typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
            assert {name.split("{")[0] for name in m} <= typed  # every series is declared
            assert "# TYPE inferlab_router_failed_total counter" in text
        with router([a, b], "prefix") as r:  # one prefix, one home
            for p in PROMPTS[:3]:
                assert complete(r, "You are a helpful assistant. " * 12 + p)["status"] == 200
            counts = [metrics(r)[f'inferlab_router_backend_requests_total{{backend="{u}",role="serve"}}']
                      for u in (a, b)]
            assert sorted(counts) == [0, 3]


def test_backend_down_at_start_is_skipped_then_rejoins(tiny):
    sock = bound_socket()  # reserved, not listening yet: connections are refused
    down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with instance(tiny) as (a, _), router([down, a], "round_robin", health_interval=0.3) as r:
        t = time.monotonic()
        assert all(complete(r, p)["status"] == 200 for p in PROMPTS)
        assert complete(r, PROMPTS[0], stream=True)["error"] is None
        assert time.monotonic() - t < 30
        m = metrics(r)
        assert m[f'inferlab_router_backend_up{{backend="{down}",role="serve"}}'] == 0
        assert m[f'inferlab_router_backend_requests_total{{backend="{a}",role="serve"}}'] == len(PROMPTS) + 1
        with instance(tiny, sock) as (back, _):
            deadline = time.monotonic() + 10
            while metrics(r)[f'inferlab_router_backend_up{{backend="{back}",role="serve"}}'] == 0:
                assert time.monotonic() < deadline, "the backend did not rejoin"
                time.sleep(0.1)
            for p in PROMPTS[:4]:
                assert complete(r, p)["status"] == 200
            assert metrics(r)[f'inferlab_router_backend_requests_total{{backend="{back}",role="serve"}}'] >= 1


def test_pd_through_the_router_equals_a_single_instance(tiny):
    with redis_server() as (url, _):
        kv = {"kv_connector": "RedisConnector", "kv_connector_extra_config": {"url": url}}
        with instance(tiny) as (single, _), \
                instance(tiny, kv_transfer_config={**kv, "kv_role": "kv_producer"}) as (p, pe), \
                instance(tiny, kv_transfer_config={**kv, "kv_role": "kv_consumer"}) as (d, de), \
                router([d], prefill=[p]) as r:
            for stream in (False, True):
                want = [complete(single, q, stream) for q in PROMPTS]
                got = [complete(r, q, stream) for q in PROMPTS]
                if stream:
                    assert [g["text"] for g in got] == [w["text"] for w in want]
                    assert all(g["error"] is None and g["chunks"] > 1 for g in got)
                else:
                    assert [g["choices"][0]["text"] for g in got] == [w["choices"][0]["text"] for w in want]
                    assert [g["usage"]["prompt_tokens_details"]["cached_tokens"] for g in got] == \
                           [g["usage"]["prompt_tokens"] - 1 for g in got]
            decode = check_empty(de)
            assert decode.num_prompt_tokens == 2 * len(PROMPTS)  # only each prompt's last token
            decode_before = decode.num_prompt_tokens
            prefilled = check_empty(pe).num_prompt_tokens
            assert prefilled > 0
            body = {"input": ["a new text to embed", "and a second one"]}  # straight to decode: no prefill first
            want = httpx.post(f"{single}/v1/embeddings", json=body, timeout=60).json()
            got = httpx.post(f"{r}/v1/embeddings", json=body, timeout=60).json()
            assert "data" in want and "data" in got, (want, got)
            want, got = want["data"], got["data"]
            assert len(got) == 2 and all(max(abs(x - y) for x, y in zip(g["embedding"], w["embedding"])) < 1e-5
                                         for g, w in zip(got, want))
            assert check_empty(pe).num_prompt_tokens == prefilled and check_empty(de).num_prompt_tokens > decode_before
            body = {"query": "a query", "documents": ["one document", "another"]}  # vLLM's rerank, likewise
            want = httpx.post(f"{single}/rerank", json=body, timeout=60).json()
            got = httpx.post(f"{r}/v1/rerank", json=body, timeout=60).json()
            assert [g["index"] for g in got["results"]] == [w["index"] for w in want["results"]], (want, got)
            assert check_empty(pe).num_prompt_tokens == prefilled


def test_decode_killed_mid_stream_is_an_error_not_a_hang(tiny):
    """P/D mode, the decode instance a real `inferlab serve` process (the embedded model) killed
    while it streams (the prefill instance has no store here: it only computes the prompt)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inferlab.cli", "serve", "--port", str(port), "--dtype",
                             "float32", "--num-kv-blocks", "128", "--max-model-len", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "inferlab serve did not start"
            time.sleep(0.2)
        with instance(tiny) as (prefill, _), router([url], prefill=[prefill], health_interval=0.5) as r:
            body = {"prompt": "Count from one to a thousand: one, two,", "max_tokens": 400, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            t, chunks, error = time.monotonic(), 0, None
            with httpx.stream("POST", f"{r}/v1/completions", json=body, timeout=30) as resp:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        continue
                    chunks += 1
                    if chunks == 3:
                        proc.send_signal(signal.SIGKILL)
            assert chunks >= 3 and error is not None and "failed mid-stream" in error
            assert time.monotonic() - t < 30
            # the dead backend is out of rotation: the next request fails at once, clearly
            answer = httpx.post(f"{r}/v1/completions", json={**body, "stream": False}, timeout=30)
            assert answer.status_code == 503 and "no backend" in answer.json()["error"]["message"]
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def fakes(count: int, delay: float = 0.0) -> Iterator[list[str]]:
    """Stand-in backends (no model): each answers a completion with its own URL after `delay` s."""
    def fake() -> FastAPI:
        app = FastAPI()
        app.get("/health")(lambda: {"status": "ok"})

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def answer(raw: Request) -> dict:
            await asyncio.sleep(delay)
            return {"choices": [{"text": str(raw.base_url)}]}
        return app

    with serving(fake()) as a, serving(fake()) as b, serving(fake()) as c, serving(fake()) as d:
        yield [a, b, c, d][:count]


def sent(url: str, backends: list[str], role: str) -> list[float]:
    m = metrics(url)
    return [m[f'inferlab_router_backend_requests_total{{backend="{u}",role="{role}"}}'] for u in backends]


def test_pd_pools_take_turns_each_on_their_own():
    """One policy shared by both pools moved its turn twice a request: with two of each, every
    prefill went to one instance and every decode to one."""
    with fakes(4) as (p1, p2, d1, d2), router([d1, d2], "round_robin", prefill=[p1, p2]) as r:
        for i in range(6):
            assert complete(r, f"request {i}")["status"] == 200
        assert sent(r, [p1, p2], "prefill") == [3, 3] and sent(r, [d1, d2], "decode") == [3, 3]


def test_prefix_policy_spills_a_busy_home_with_two_backends():
    """Against the mean load of all targets, two could never trip the bound: eight requests in
    flight with one system prompt all piled on one backend."""
    with fakes(2, delay=1.0) as (a, b), router([a, b], "prefix") as r:
        async def burst() -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                body = {"prompt": "You are a helpful assistant. " * 12 + "Hi", "max_tokens": 4}
                await asyncio.gather(*(c.post(f"{r}/v1/completions", json=body) for _ in range(8)))
        asyncio.run(burst())
        assert min(sent(r, [a, b], "serve")) >= 2


def test_prefix_keys_of_every_prompt_shape():
    from inferlab.router.backends import prefix_keys
    ids = list(range(100, 200))
    assert prefix_keys({"prompt": ids}) != prefix_keys({"prompt": [100, *range(300, 399)]})  # not the first id
    assert prefix_keys({"prompt": ids})[0] == prefix_keys({"prompt": ids[:32] + [7] * 68})[0]  # 32 ids a block
    assert prefix_keys({"prompt": ["same text " * 20, "b"]}) == prefix_keys({"prompt": "same text " * 20})
    assert prefix_keys({"prompt": [ids, [1]]}) == prefix_keys({"prompt": ids})  # a batch: its first prompt
    for malformed in ({"messages": None, "prompt": "hi"}, {"messages": 5}, {"prompt": [1.5]}, {"prompt": None}, {}):
        prefix_keys(malformed)  # no error: the backend answers a bad request itself
    assert prefix_keys({"messages": None, "prompt": "x" * 200}) == prefix_keys({"prompt": "x" * 200})
    assert prefix_keys({"input": ["x" * 200, "y"]}) == prefix_keys({"prompt": "x" * 200})  # an embedding's
    # a rerank's documents all follow its query, and a score's second texts its first
    assert prefix_keys({"query": "x" * 200, "documents": ["y"]}) == prefix_keys({"prompt": "x" * 200})
    assert prefix_keys({"text_1": ["x" * 200], "text_2": ["y"]}) == prefix_keys({"prompt": "x" * 200})


def test_router_passes_bad_bodies_to_the_backend_and_serves_model_lookups(tiny):
    with instance(tiny) as (a, _), router([a]) as r:
        for body in ({"messages": None}, {"messages": 5}):
            got = httpx.post(f"{r}/v1/chat/completions", json=body, timeout=30)
            want = httpx.post(f"{a}/v1/chat/completions", json=body, timeout=30)
            assert got.status_code == want.status_code == 400 and got.json() == want.json()
        # what the backend judges by its own rules, as it would sent directly (these were the router's 500s)
        for path, text in (("/v1/completions", '{"prompt": "hi", "temperature": NaN}'),
                           ("/v1/completions", '{"prompt": "\\ud800"}'),
                           ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}'),
                           ("/v1/completions", '{"prompt": [1, 2], "max_tokens": 1, "user": "\\ud800"}')):
            got, want = (httpx.post(f"{u}{path}", content=text, headers={"content-type": "application/json"},
                                    timeout=30) for u in (r, a))
            assert got.status_code == want.status_code and got.status_code in (200, 400), (text, got.text)
            assert got.status_code == 200 or got.json() == want.json()
        nested = httpx.post(f"{r}/v1/completions", content=b'{"prompt":' + b"[" * 100_000, timeout=30)
        assert nested.status_code == 400 and "not valid JSON" in nested.json()["error"]["message"]
        ok = httpx.post(f"{r}/v1/completions", json={"prompt": "hi", "messages": None, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
        for stream in (False, True):  # the Responses API, its typed events passed through as they come
            body = {"input": "hi", "max_output_tokens": 2, "temperature": 0, "stream": stream}
            got, want = (httpx.post(f"{u}/v1/responses", json=body, timeout=30) for u in (r, a))
            assert got.status_code == want.status_code == 200
            if stream:
                kinds = [line for line in got.text.splitlines() if line.startswith("event: ")]
                assert kinds == [line for line in want.text.splitlines() if line.startswith("event: ")]
            else:
                (mine,), (theirs,) = got.json()["output"], want.json()["output"]
                assert mine["content"] == theirs["content"]
        model = httpx.get(f"{r}/v1/models/tiny", timeout=30)
        assert model.status_code == 200 and model.json()["id"] == "tiny"
        assert httpx.get(f"{r}/v1/models/other", timeout=30).status_code == 404
        for missing in (httpx.get(f"{r}/v1/nothing"), httpx.get(f"{r}/v1/completions")):
            assert missing.status_code in (404, 405) and "message" in missing.json()["error"]
            assert missing.json()["error"]["param"] is None and missing.json()["error"]["code"] is None  # the servers'
        huge = httpx.post(f"{r}/v1/completions", content=b"x" * (9 << 20), timeout=30)  # refused before it is read
        assert huge.status_code == 413 and huge.json()["error"]["message"] == "the request body is larger than 8 MiB"


def test_a_client_leaving_a_plain_request_aborts_it_on_the_backend(tiny):
    with instance(tiny, max_model_len=4096) as (a, engine), router([a]) as r:
        body = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{r}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        aborted = 'inferlab:request_success_total{finished_reason="abort"}'
        deadline = time.monotonic() + 10
        while metrics(a).get(aborted, 0) < 1:  # not "length": it was stopped, not run to its end
            assert time.monotonic() < deadline, "the backend went on generating for a client that left"
            time.sleep(0.1)
        assert metrics(r)[f'inferlab_router_backend_in_flight{{backend="{a}",role="serve"}}'] == 0
        check_empty(engine)


def test_the_router_logs_the_signal_that_stops_it():
    """(It said nothing, and waited on open requests as long as --timeout.)"""
    proc = subprocess.Popen([sys.executable, "-m", "inferlab.cli", "router", "--port", "0", "--backend",
                             "http://127.0.0.1:1"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "routing on" not in line:
            line = proc.stderr.readline()
            assert line, "the router exited before it listened"
        url = line.split("routing on ")[1].split()[0]
        for _ in range(100):  # serving: its signal handlers are in place
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
        assert "SIGTERM: stopping; requests still open get 10 s to finish" in rest
        assert proc.returncode == -signal.SIGTERM
    finally:
        proc.kill()


@pytest.mark.parametrize("args, message", [
    ([], "give --backend URL"),
    (["--backend", "127.0.0.1:8001"], "a backend URL is http:// or https://, a host and an optional port"),
    (["--backend", "http://"], "from 1 to 65535, e.g. http://127.0.0.1:8000; got 'http://'"),
    # a port past 65535 or not a number, and a broken IPv6 host: a traceback at start-up (exit 3)
    (["--backend", "http://127.0.0.1:99999"], "got 'http://127.0.0.1:99999'"),
    (["--backend", "http://127.0.0.1:abc"], "got 'http://127.0.0.1:abc'"),
    (["--backend", "http://[::1"], "got 'http://[::1'"),
    (["--backend", "http://a:0"], "got 'http://a:0'"),
    # a path doubles the router's /v1 (every request a 404); one instance twice counted twice
    (["--backend", "http://127.0.0.1:8000/v1"], "without a path: the router adds /v1/... itself; got"),
    (["--backend", "http://a:8000/?x=1"], "without a path"),
    (["--backend", "http://a:8000", "--backend", "http://A:8000/"], "'http://A:8000/' names the same instance as"),
    (["--backend", "http://a", "--backend", "http://a:80"], "names the same instance"),
    (["--prefill", "http://a:1", "--decode", "http://a:1"], "--decode 'http://a:1' names the same instance"),
    (["--backend", "http://a", "--timeout", "0"], "above 0 seconds"),
    (["--backend", "http://a", "--health-interval", "-1"], "above 0 seconds"),
    (["--prefill", "http://127.0.0.1:1"], "give --backend URL (repeatable), or both"),
    (["--backend", "http://a", "--decode", "http://b"], "not both"),
])
def test_router_command_line_errors_are_one_line(args, message, capsys):
    from inferlab.cli import main
    assert main(["router", *args]) == 2
    assert message in capsys.readouterr().err


def test_simulator_and_router_share_one_policy_definition():
    from inferlab.sim.router import ROUTERS
    assert ROUTERS["prefix_aware"] is make_policy("prefix").__class__
    targets = [Backend("http://a"), Backend("http://b")]
    policy = make_policy("prefix")
    targets[0].in_flight = 1
    home = policy.choose(["k1", "k2"], targets)
    assert home == 1  # a new prefix: the least loaded
    assert policy.choose(["k1", "k2", "k3"], targets) == 1  # the longest known prefix keeps its home
    assert policy.choose(["k1", "k2"], targets[:1]) == 0  # its home gone from the targets: another


@contextmanager
def odd_backend(answer: str) -> Iterator[str]:
    """A backend that answers completions (and health checks once asked one) with a 503 as a draining
    server does ("draining"), or
    that stops once it has passed its first health check: nothing it is asked then ever answers
    ("stopped", as a SIGSTOPped process), or that fails its health checks once asked a completion
    but answers it 1.5 s later ("finishing", as a server draining what it has in flight)."""
    from fastapi.responses import JSONResponse
    app = FastAPI()
    checks, asked = [], []

    @app.get("/health")
    async def health():
        checks.append(1)
        if answer == "stopped" and len(checks) > 1:
            await asyncio.sleep(3600)
        if answer in ("draining", "finishing") and asked:  # as a draining server's: else the next check
            return JSONResponse({"status": "shutting down"}, status_code=503)  # put it back in rotation
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(raw: Request):
        asked.append(1)
        if answer == "stopped":
            await asyncio.sleep(3600)
        if answer == "finishing":
            await asyncio.sleep(1.5)
            return {"choices": [{"text": "finished here"}]}
        return JSONResponse({"error": {"message": "the server is shutting down", "code": "server_shutting_down"}},
                            status_code=503)

    with serving(app) as url:
        yield url


@pytest.mark.parametrize("answer", ["draining", "stopped"])
def test_a_request_a_backend_does_not_take_goes_to_another(answer):
    """A draining backend's 503 (a rolling restart) and a backend stopped mid-request (its health
    checks fail while the request waits) cost the client nothing where another backend is up."""
    with odd_backend(answer) as odd, fakes(1) as (ok,), router([odd, ok], "round_robin", health_interval=0.3) as r:
        t = time.monotonic()
        for i in range(4):
            got = complete(r, f"request {i}")
            assert got["status"] == 200 and got["choices"][0]["text"] == f"{ok}/", got
        assert time.monotonic() - t < 15
        m = metrics(r)
        assert m[f'inferlab_router_backend_up{{backend="{odd}",role="serve"}}'] == 0
        assert m[f'inferlab_router_backend_requests_total{{backend="{odd}",role="serve"}}'] >= 1  # it was tried


def test_a_backend_draining_finishes_what_it_has_in_flight():
    """Its failed health checks take it out of rotation, but its plain requests in flight are its
    to answer (a rolling restart's SIGTERM: the router gave them 503s, or ran them again elsewhere)."""
    with odd_backend("finishing") as odd, fakes(1) as (ok,), router([odd, ok], "round_robin",
                                                                    health_interval=0.2) as r:
        got = complete(r, "in flight")
        assert got["status"] == 200 and got["choices"][0]["text"] == "finished here", got
        assert metrics(r)[f'inferlab_router_backend_up{{backend="{odd}",role="serve"}}'] == 0  # and out
        assert complete(r, "next")["choices"][0]["text"] == f"{ok}/"


def test_a_plain_request_longer_than_the_timeout_is_not_cut_off():
    """--timeout cuts a silent stream; a plain answer comes whole at its end, so a healthy backend
    working longer than the timeout is waited for (it was a 502 'ReadTimeout')."""
    with fakes(1, delay=1.5) as (slow,), router([slow], timeout=0.5) as r:
        got = complete(r, "a long essay")
        assert got["status"] == 200 and got["choices"][0]["text"] == f"{slow}/"
