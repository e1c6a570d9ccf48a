"""The OpenAI-compatible server end to end: the official client, greedy parity with the offline
API, concurrency and batching, disconnects, failures that stay with their request, bad input,
and a clean shutdown on SIGTERM / SIGINT.

An in-process server (uvicorn in a thread) shares the session's model weights, so it starts in
well under a second; only the shutdown tests start `inferlab serve` as a real process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from inferlab import LLM, SamplingParams
from inferlab.async_engine import AsyncEngine
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.server.serve import build_server_app

MODEL = "SmolLM2-135M-Instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNING, WAITING, KV = "inferlab:num_requests_running", "inferlab:num_requests_waiting", "inferlab:kv_cache_usage_perc"
MAX_TOKENS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
QUESTIONS = ["What is the capital of France?", "List three prime numbers.", "hi"]


def finished_count(m: dict[str, float], reason: str) -> float:
    return m[f'inferlab:request_success_total{{finished_reason="{reason}"}}']


def parse_metrics(text: str) -> dict[str, float]:
    """Each series' name and labels -> its value, the model_name label that every series of an engine
    carries left out (a router's own series have none)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="[^"]*"}', "}", name).replace("{}", "")] = float(value)
    return out


class ErrorLog(logging.Handler):
    """Collects what uvicorn logs at ERROR (e.g. "Exception in ASGI application")."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Server:
    url: str
    engine: AsyncEngine
    errors: ErrorLog

    def metrics(self) -> dict[str, float]:
        r = httpx.get(f"{self.url}/metrics", timeout=10)
        assert r.status_code == 200
        return parse_metrics(r.text)

    def wait_for(self, check: Callable[[dict], bool], what: str, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics (the engine refreshes them after each step) until `check` holds."""
        deadline = time.monotonic() + timeout
        while not check(m := self.metrics()):
            assert time.monotonic() < deadline, f"{what} after {timeout}s: running {m[RUNNING]}, " \
                                                f"waiting {m[WAITING]}, kv {m[KV]}"
            time.sleep(0.05)
        return m

    def wait_idle(self, check: Callable[[dict], bool] = lambda m: True) -> dict[str, float]:
        """Until nothing runs, waits or holds a KV block (and `check` holds)."""
        return self.wait_for(lambda m: m[RUNNING] == 0 and m[WAITING] == 0 and m[KV] == 0.0 and check(m),
                             "server not idle")

    def check_engine(self) -> None:
        """The engine's own invariants, checked on its thread between steps; every block free."""
        def check() -> tuple[int, int]:
            self.engine.engine.check_integrity()
            bm = self.engine.engine.block_manager
            return bm.num_free_blocks, bm.num_blocks
        free, total = asyncio.run(self.engine.run(check))
        assert free == total


@contextmanager
def running_server(smol, api_key: str | None = None, draft=None, allowed_origins: list[str] | None = None,
                   prompt_tokens_details: bool = True, tool_parser: str | None = None,
                   reasoning_parser: str | None = None, **config) -> Iterator[Server]:
    config.setdefault("num_kv_blocks", 512)
    engine = AsyncEngine(LLMEngine(EngineConfig(**config), loaded=smol, draft_loaded=draft))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no free-port race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_server_app(engine, MODEL, api_key, allowed_origins,
                                                            prompt_tokens_details, tool_parser=tool_parser,
                                                            reasoning_parser=reasoning_parser),
                                           host="127.0.0.1",
                                           port=port, log_level="warning"))
    errors = ErrorLog()
    logging.getLogger("uvicorn.error").addHandler(errors)  # after Config, which sets logging up
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        yield Server(url, engine, errors)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.shutdown()


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(smol):
    """Greedy reference outputs from the offline API: prompt -> RequestOutput."""
    llm = LLM(loaded=smol, num_kv_blocks=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    chats = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params, use_tqdm=False)
    return {"llm": llm, **dict(zip(PROMPTS, outs)), **dict(zip(QUESTIONS, chats))}


def text_and_reason(out) -> tuple[str, str]:
    return out.outputs[0].text, out.outputs[0].finish_reason


def sse_data(lines: Iterator[str]) -> list[dict | str]:
    return [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]" for x in lines if x.startswith("data: ")]


# -- 1. the official client ---------------------------------------------------------------------
def test_models_list_shows_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_offline(client, offline, prompt):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    ref = offline[prompt]
    assert (r.choices[0].text, r.choices[0].finish_reason) == text_and_reason(ref)
    u = r.usage
    assert u.prompt_tokens == len(ref.prompt_token_ids) and u.completion_tokens == len(ref.outputs[0].token_ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_equals_offline(client, offline, question):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    ref = offline[question]
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == text_and_reason(ref)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_streamed_completion_equals_offline_and_ends_with_usage(client, offline):
    prompt = PROMPTS[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    ref = offline[prompt]
    body, last = chunks[:-1], chunks[-1]
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == ref.outputs[0].text
    assert body[-1].choices[0].finish_reason == ref.outputs[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_streamed_chat_equals_offline_and_ends_with_usage(client, offline):
    question = QUESTIONS[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    ref = offline[question]
    # the role comes with the first token, not in a chunk of its own sent before any work is done
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    body, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.outputs[0].text
    assert body[-1].choices[0].finish_reason == ref.outputs[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(client, offline):
    """vLLM's stream option: each chunk carries its choice's prompt and completion tokens so far."""
    prompt = PROMPTS[0]
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    ref = offline[prompt]
    body, last = chunks[:-1], chunks[-1]
    counts = [c.usage.completion_tokens for c in body]
    assert counts == sorted(counts) and counts[-1] == len(ref.outputs[0].token_ids) == last.usage.completion_tokens
    assert all(c.usage.prompt_tokens == len(ref.prompt_token_ids) for c in body)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in body)
    assert "".join(c.choices[0].text for c in body) == ref.outputs[0].text


def test_every_metric_series_names_the_model_as_vllms_do():
    """vLLM labels each series with model_name, so a dashboard filters by it; only one counter did.
    A name's quote and backslash are escaped as Prometheus reads them."""
    from inferlab.metrics import EngineMetrics
    snap = {"num_running": 1, "num_waiting": 0, "num_preemptions": 0, "num_prompt_tokens": 5,
            "num_prompt_tokens_seen": 5, "num_generation_tokens": 2,
            "kv": {"usage": 0.5, "prefix_queries": 5, "prefix_hits": 0}}
    text = EngineMetrics().render(snap, 'my "model"\\x')
    series = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(series) > 30 and all('model_name="my \\"model\\"\\\\x"}' in line for line in series)


def test_prompt_tokens_total_counts_whole_prompts_as_vllm_does(server, client):
    """prompt_tokens_total: every prompt whole, cached tokens included (vLLM's counter, which dashboards
    built for it read); prompt_tokens_computed_total: only what was computed."""
    prompt = "Counting prompt tokens: " + " ".join(f"t{i}" for i in range(40))
    before = server.wait_idle()
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = server.wait_idle()
    n, cached = first.usage.prompt_tokens, second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16
    assert after["inferlab:prompt_tokens_total"] - before["inferlab:prompt_tokens_total"] == 2 * n
    assert after["inferlab:prompt_tokens_computed_total"] - before["inferlab:prompt_tokens_computed_total"] == \
        2 * n - cached


@pytest.mark.parametrize("body, headers, message", [
    ("", {"Content-Type": "application/json"}, "the request body is empty"),
    ('{"prompt": "hi"}', {"Content-Type": "text/plain"}, "must be a JSON object .*Content-Type: application/json"),
    ('["hi"]', {"Content-Type": "application/json"}, "must be a JSON object"),
])
def test_a_body_that_is_no_object_is_named_as_such(server, body, headers, message):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert r.status_code == 400 and re.search(message, r.json()["error"]["message"])


def test_a_pool_smaller_than_the_context_is_the_context_clients_see(smol):
    """/v1/models reports what a request can hold (the pool: 24 blocks of 16 tokens), and a request past it
    is refused by it, not cut short by "length" (vLLM refuses to start with such a pool)."""
    with running_server(smol, num_kv_blocks=24) as small:
        model = httpx.get(f"{small.url}/v1/models", timeout=30).json()["data"][0]
        assert model["max_model_len"] == 24 * 16
        body = {"prompt": [5] * 300, "max_tokens": 200}
        r = httpx.post(f"{small.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "maximum context length is 384 tokens" in r.json()["error"]["message"]
        body["max_tokens"] = 84
        assert httpx.post(f"{small.url}/v1/completions", json=body, timeout=120).status_code == 200


def test_a_reservation_refused_for_the_load_is_a_503_that_clients_retry(smol):
    """kv_allocation="reserve" refuses a request whose reservation does not fit beside the others':
    the load's fault, not the request's, so a 503 (the OpenAI SDK retries it), where a 400 is never retried."""
    with running_server(smol, num_kv_blocks=64, kv_allocation="reserve") as small:
        body = {"prompt": [5] * 10, "max_tokens": 1000, "stream": True, "ignore_eos": True}  # 63 of 64 blocks
        with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=120) as most:
            lines = most.iter_lines()  # kept: a dropped iterator closes the stream, which aborts the request
            next(lines)
            r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 20}, timeout=60)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "out_of_kv_memory" and "--kv-allocation paged" in error["message"]
        assert httpx.post(f"{small.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                          timeout=120).status_code == 200
        # what its own choices reserve together is more than the pool: no retry helps, a 400
        r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 400, "n": 3}, timeout=60)
        assert r.status_code == 400, r.text
        assert "3 choices reserve 78 blocks together, more than the pool's 64" in r.json()["error"]["message"]
        small.wait_idle()
        small.check_engine()


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                            stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_second_identical_prompt_hits_the_prefix_cache(client):
    prompt = "A unique prompt for the cache test: " + " ".join(f"w{i}" for i in range(30))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # at least one full block
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text


def test_cached_prompt_tokens_are_reported_only_when_enabled(smol):
    """(vLLM's --enable-prompt-tokens-details, off by default.) A client that guesses another's prompt
    read from them, block by block, how much it got right: a secret in a system prompt leaked so."""
    with running_server(smol, prompt_tokens_details=False, num_kv_blocks=64) as plain:
        prompt = "The admin PIN is 4711. " + " ".join(f"w{i}" for i in range(30))
        for stream in (False, True):
            r = httpx.post(f"{plain.url}{CMPL}", timeout=60, json={
                "prompt": prompt, "max_tokens": 2, "stream": stream, "stream_options": {"include_usage": True}
                if stream else None})
            usage = json.loads(r.text.split("data: ")[-2]) if stream else r.json()
            assert usage["usage"]["prompt_tokens"] > 16 and "prompt_tokens_details" not in usage["usage"], usage


def test_cache_salt_shares_cached_blocks_only_within_a_salt(client):
    prompt = "A prompt for the cache salt test: " + " ".join(f"s{i}" for i in range(30))

    def cached(salt: str | None) -> int:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                      extra_body={"cache_salt": salt} if salt else None)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0 and cached(None) == 0  # another tenant's blocks are not served
    assert cached("tenant-a") >= 16


def test_n_with_seed_gives_n_reproducible_choices(client):
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # counted once, not per choice
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, n=2, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n == 6 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and token_lp <= 0
        assert top[token] == pytest.approx(max(top.values()))  # greedy: the sampled token is the best


def test_echo_puts_the_prompt_before_the_answer_with_its_logprobs_streamed_or_not(client, server, offline):
    """lm-evaluation-harness's loglikelihood (echo, logprobs, a prompt of context and continuation):
    the prompt's tokens come first, the first one's logprob null, the others' as the offline API's
    prompt_logprobs; text and offsets run on from the prompt's into the answer's."""
    prompt = PROMPTS[0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    text, lp = echoed.choices[0].text, echoed.choices[0].logprobs
    ids = offline["llm"].get_tokenizer().encode(prompt)
    want = offline["llm"].generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1,
                                                                             prompt_logprobs=1), use_tqdm=False)[0]
    assert text == prompt + plain.choices[0].text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[:len(ids)] == [None, *(float(e[t]) for e, t in zip(want.prompt_logprobs[1:], ids[1:]))]
    assert lp.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert echoed.usage.prompt_tokens == len(ids) and echoed.usage.completion_tokens == 4
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1,
                                       stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == text
    assert [x for c in chunks for x in c.logprobs.token_logprobs] == lp.token_logprobs
    assert [x for c in chunks for x in c.logprobs.text_offset] == lp.text_offset
    bare = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=2, temperature=0, echo=True)
    assert all(c.text.startswith(prompt) and len(c.text) > len(prompt) for c in bare.choices)  # token ids decoded
    scored = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2},
                        timeout=60).json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    for entry, e, t in zip(scored[1:], want.prompt_logprobs[1:], ids[1:]):
        assert entry[str(t)]["logprob"] == float(e[t]) and entry[str(t)]["rank"] == e[t].rank
        assert {v["rank"] for v in entry.values()} >= {1, 2}  # the top 2, and the token wherever it ranks
    # prompt_logprobs' top-N over logprobs' where both are given, as vLLM: the token alone at 0
    both = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "echo": True,
                                                             "logprobs": 2, "prompt_logprobs": 0}, timeout=60).json()
    assert all(len(entry) == 1 for entry in both["choices"][0]["prompt_logprobs"][1:])


def test_chat_prompt_logprobs_score_the_templated_prompt_beside_the_choices(server, offline):
    """vLLM's chat prompt_logprobs: the prompt the template made, scored once at the response's top level."""
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    want = offline["llm"].generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1,
                                                                             prompt_logprobs=2), use_tqdm=False)[0]
    body = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "n": 2,
                                                                  "prompt_logprobs": 2}, timeout=60).json()
    scored = body["prompt_logprobs"]
    assert len(body["choices"]) == 2 and scored[0] is None and len(scored) == len(ids)
    for entry, e, t in zip(scored[1:], want.prompt_logprobs[1:], ids[1:]):
        assert entry[str(t)]["logprob"] == float(e[t]) and entry[str(t)]["rank"] == e[t].rank
        assert {v["rank"] for v in entry.values()} >= {1, 2}
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                       timeout=60).json()
    assert "prompt_logprobs" not in plain


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, server):
    """OpenAI's legacy scoring call (and vLLM's): echo, max_tokens 0. The prompt's text and logprobs,
    as an echo with answers gives them, and nothing generated: no text, logprobs or count of the
    token the engine's step samples. Streamed alike; without echo, 0 stays refused."""
    prompt = PROMPTS[0]
    answered = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, n=2)
    k = alone.usage.prompt_tokens
    assert alone.usage.completion_tokens == 0 and alone.usage.total_tokens == k
    want = answered.choices[0].logprobs
    for c in alone.choices:
        assert c.text == prompt and c.finish_reason == "length"
        lp = c.logprobs
        assert (lp.tokens, lp.token_logprobs, lp.text_offset) == (want.tokens[:k], want.token_logprobs[:k],
                                                                  want.text_offset[:k])
        assert lp.top_logprobs == want.top_logprobs[:k]
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    parts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in parts) == prompt and parts[-1].finish_reason == "length"
    assert [x for p in parts for x in p.logprobs.token_logprobs] == want.token_logprobs[:k]
    assert chunks[-1].usage.completion_tokens == 0
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
    assert plain.choices[0].text == prompt and plain.choices[0].logprobs is None
    for body, words in [({"max_tokens": 0}, "max_tokens must be"),
                        ({"max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens (1) must not exceed")]:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, **body}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_echo_of_a_request_that_failed_before_its_prompt_was_scored(smol):
    """Its prompt's tokens with null logprobs, not a TypeError."""
    from inferlab.outputs import CompletionOutput, RequestOutput
    from inferlab.server.openai_format import Echo
    tok = smol[1]
    ids = tok.encode("The capital of France is")
    out = RequestOutput("r", "The capital of France is", ids, [CompletionOutput(0, "", [])], True, error="boom")
    text, lps = Echo(tok, 1)(out, "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, True)
    assert text == "The capital of France is" and lps["token_logprobs"] == [None] * len(ids)
    assert "".join(lps["tokens"]) == text and len(lps["text_offset"]) == len(ids)


def test_completion_top_logprobs_keep_the_likelier_of_tokens_that_decode_alike(client):
    """Pieces of characters all decode to U+FFFD alone: the sampled (greedy, so best) token's entry
    must be its own logprob, not a less likely piece's that came later."""
    r = client.completions.create(model=MODEL, prompt="Emoji: \U0001f600\U0001f603\U0001f604", max_tokens=4,
                                  temperature=0, logprobs=5, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(token_lp) and top[token] == max(top.values())


def test_completion_text_offsets_stay_in_the_text(client):
    """A piece of a character decodes to U+FFFD alone; counted so, offsets ran past the text. Each
    piece starts where its character does, and streamed chunks give the same offsets."""
    kw = dict(model=MODEL, prompt="Emoji: \U0001f600\U0001f603\U0001f604", max_tokens=12, temperature=0,
              logprobs=1, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    text, lp = whole.text, whole.logprobs
    assert "\ufffd" in lp.tokens  # the case is exercised
    assert len(lp.text_offset) == 12 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] < len(text)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert "\ufffd" in token or text.startswith(token, offset)
    streamed = [o for c in client.completions.create(**kw, stream=True) for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.text_offset


def test_completion_top_logprobs_hold_the_sampled_token(client):
    """OpenAI's legacy completions return the sampled token's logprob beside the best N, so up to
    N + 1 entries (one for logprobs 0); a sampled token outside the best N was missing."""
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=1.5, seed=3, extra_body={"ignore_eos": True})
    for n in (0, 1):
        lp = client.completions.create(**kw, logprobs=n).choices[0].logprobs
        outside = 0
        for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert top[token] == token_lp and list(top)[0] == token and 1 <= len(top) <= n + 1
            outside += len(top) == n + 1
        assert n == 0 or outside  # some draws fell outside the best one: the case is exercised


def test_completion_text_offsets_count_bytes_that_begin_no_character(client, smol):
    """A byte that cannot begin a UTF-8 character is a U+FFFD of its own: each such token moves the
    offset by one (they all stayed at 0, the detokenizer holding the text back)."""
    tok = smol[1]
    stray = next(t for t in range(tok.vocab_size) if tok.token_bytes(t) == b"\x8c")
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1,
                                  logit_bias={str(stray): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "\ufffd" * 4 and r.choices[0].logprobs.text_offset == [0, 1, 2, 3]


def test_completion_text_offsets_agree_streamed_while_a_stop_string_is_held_back(client):
    """Text that may begin a stop string is held back from the stream; its tokens' offsets are
    still where their text lands, as in the whole answer."""
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    # tokens 4 and 5 begin the stop, so from token 4 on the text is held back; it never ends it
    stop = "".join(plain.logprobs.tokens[4:6]) + "\x01"
    assert plain.logprobs.tokens[4] and stop[:-1] in plain.text
    whole = client.completions.create(**kw, stop=[stop]).choices[0]
    assert whole.text == plain.text and whole.logprobs.text_offset == plain.logprobs.text_offset
    chunks = client.completions.create(**kw, stop=[stop], stream=True)
    streamed = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert streamed == plain.logprobs.text_offset


def test_chat_logprobs_shape(client, offline):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert bytes(item.bytes).decode() == item.token
    # a token that is part of a character: its bytes are its piece, not those of the "\ufffd" it decodes to
    piece = offline["llm"].get_tokenizer().encode(" \U0001f600")[0]
    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            temperature=0, logprobs=True, logit_bias={str(piece): 100})
    assert [bytes(x.bytes) for x in forced.choices[0].logprobs.content] == [b" \xf0\x9f\x98"] * 2
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True)
    tokens = [x.token for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert tokens == [x.token for x in content]


def test_stop_string_cuts_the_text(client, offline):
    prompt = PROMPTS[0]
    full = offline[prompt].outputs[0].text
    stop = full.split()[2]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].model_extra["stop_reason"] == stop  # vLLM's field: which stop matched
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks][-1] == stop


def test_tokenize_and_detokenize_as_vllm(server, client):
    """vLLM's /tokenize gives the ids a prompt or a conversation becomes (the chat's usage counts
    them), /detokenize the text back; /version answers."""
    tok = server.engine.engine.tokenizer
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=30).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.engine.max_request_tokens
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r["count"] == chat.usage.prompt_tokens
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert tok.encode(back["prompt"], add_special_tokens=False) == r["tokens"]  # special tokens kept: a round trip
    assert httpx.get(f"{server.url}/version", timeout=30).json()["version"]
    # the chat's own options shape the prompt /tokenize counts
    opened = messages + [{"role": "assistant", "content": "The capital is"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    r = httpx.post(f"{server.url}/tokenize", json={"messages": opened, **options, "return_token_strs": True},
                   timeout=30).json()
    chat = client.chat.completions.create(model=MODEL, messages=opened, max_tokens=1, extra_body=options)
    assert r["count"] == chat.usage.prompt_tokens and len(r["token_strs"]) == r["count"]


def test_a_replayed_agent_conversation_reaches_the_template_with_its_tool_calls(smol):
    """An assistant's tool calls (their JSON arguments as an object, as vLLM gives them), a tool answer's
    call id and a name reach templates that render them, such as Qwen's; they used to be dropped."""
    from inferlab.server.protocol import ChatCompletionRequest
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    req = ChatCompletionRequest(model=MODEL, messages=[
        {"role": "user", "content": "Weather?", "name": "ana"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}])
    template = ("{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}:"
                "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments | tojson }}>"
                "{% endfor %}{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ m.content }};{% endfor %}")
    assert smol[1].apply_chat_template(req.template_messages(), chat_template=template) == \
        'user(ana):Weather?;assistant:<call weather {"city": "Paris"}>;tool:[c1]sunny;'
    # a template that takes the arguments for a string (DeepSeek-V3's concatenates them): a 400, not a 500
    with pytest.raises(ValueError, match="chat template failed on these messages: TypeError"):
        smol[1].apply_chat_template(req.template_messages(),
                                    chat_template="{{ 'x' + messages[1].tool_calls[0].function.arguments }}")
    with pytest.raises(ValueError, match="chat template failed on these messages: OverflowError"):  # the sandbox's
        smol[1].apply_chat_template(req.template_messages(), chat_template="{% for i in range(10**9) %}x{% endfor %}")


def test_a_model_without_a_chat_template_says_where_raw_prompts_go():
    from inferlab.model.chat_template import render
    with pytest.raises(ValueError, match=r"^this model has no chat template; send raw prompts instead "
                                         r"\(LLM.generate, /v1/completions\)$"):
        render(None, [{"role": "user", "content": "hi"}], True, None, None, None)


def test_tiny_temperature_acts_as_greedy(client, offline):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1e-300)
    assert r.choices[0].text == offline[PROMPTS[0]].outputs[0].text


def test_priority_is_accepted_in_extra_body(client, offline):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"priority": -3})
    assert r.choices[0].text == offline[PROMPTS[1]].outputs[0].text


def test_token_id_prompts(client, offline):
    tok = offline["llm"].get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=MAX_TOKENS, temperature=0)
    assert one.choices[0].text == offline[PROMPTS[0]].outputs[0].text
    two = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in two.choices] == [offline[p].outputs[0].text for p in PROMPTS[:2]]
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    texts = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in texts.choices] == [c.text for c in two.choices]


# -- 2. many concurrent clients share the running batch ---------------------------------------
def test_64_concurrent_streaming_clients_are_batched(server, offline):
    async def one(c: httpx.AsyncClient, prompt: str) -> tuple[str, str | None]:
        text, reason = "", None
        body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
        return text, reason

    async def main() -> tuple[list, list[float]]:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            done, running = asyncio.Event(), []

            async def poll() -> None:
                for _ in range(2000):  # bounded: ~100 s at most
                    if done.is_set():
                        return
                    running.append(parse_metrics((await c.get("/metrics")).text)[RUNNING])
                    await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(one(c, PROMPTS[i % len(PROMPTS)]) for i in range(64))), 120)
            finally:
                done.set()
                await poller
        return results, running

    steps_before = server.metrics()["inferlab:iteration_tokens_total_count"]
    results, running = asyncio.run(main())
    for i, got in enumerate(results):
        assert got == text_and_reason(offline[PROMPTS[i % len(PROMPTS)]]), i
    assert max(running) > 1, running
    m = server.wait_idle()
    # 64 x 16 tokens took far fewer steps than one request at a time would (1024 + prefills)
    assert m["inferlab:iteration_tokens_total_count"] - steps_before < 64 * MAX_TOKENS / 2
    server.check_engine()


# -- 3. a client that goes away has its request aborted ---------------------------------------
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
LONG = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def next_events(lines: Iterator[str], count: int) -> list[str]:
    """The next `count` data lines of a stream. Hold on to `lines`: an httpx line iterator that
    is dropped half-read closes its connection."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line)
            if len(events) == count:
                break
    return events


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = server.wait_idle()
    logged = len(server.errors.records)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert len(next_events(lines, 3)) == 3
            m = server.metrics()
            assert m[RUNNING] == 1 and m[KV] > 0
    server.wait_idle(check=lambda m: finished_count(m, "abort") == finished_count(before, "abort") + 1)
    server.check_engine()
    assert server.errors.records[logged:] == []


@pytest.mark.parametrize("path, body, n", [
    (CMPL, LONG, 1),
    (CHAT, {**LONG, "prompt": None, "messages": [{"role": "user", "content": "Count forever."}], "n": 2}, 2)],
    ids=["completion", "chat-n2"])
def test_non_streaming_client_timeout_aborts_and_frees_blocks(server, path, body, n):
    before = server.wait_idle()
    logged = len(server.errors.records)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{path}", json=body, timeout=httpx.Timeout(30, read=1.5))
    # the handler checks is_disconnected every 0.5 s
    server.wait_idle(check=lambda m: finished_count(m, "abort") == finished_count(before, "abort") + n)
    server.check_engine()
    assert server.errors.records[logged:] == []  # a client going away is not a server error


def test_a_client_gone_while_its_many_prompts_are_admitted_has_them_aborted(server):
    """A body of many prompts is admitted in one pass, so that a client that leaves is seen (and
    its prompts aborted) within the half second, not after thousands of them have run for nobody."""
    before = server.wait_idle()
    n = 2000
    body = {"model": MODEL, "prompt": [[100 + i, *range(200, 249)] for i in range(n)], "max_tokens": 1,
            "temperature": 0}  # each its own prompt: no prefix cache hit makes one cheap
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{CMPL}", json=body, timeout=httpx.Timeout(30, read=1.0))
    m = server.wait_idle(check=lambda m: finished_count(m, "abort") > finished_count(before, "abort"))
    done = finished_count(m, "length") - finished_count(before, "length")
    assert done < n / 2, (done, finished_count(m, "abort") - finished_count(before, "abort"))
    server.check_engine()


def test_disconnect_of_one_choice_group_aborts_all_n(server):
    before = server.wait_idle()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True, "n": 3, "temperature": 1}) as r:
            lines = r.iter_lines()
            assert len(next_events(lines, 6)) == 6
            assert server.metrics()[RUNNING] == 3
    server.wait_idle(check=lambda m: finished_count(m, "abort") == finished_count(before, "abort") + 3)


def test_disconnect_while_waiting_aborts_only_that_request(smol):
    with running_server(smol, num_kv_blocks=256, max_num_seqs=1) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", CMPL, json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()
            assert next_events(lines, 1)
            with c.stream("POST", CMPL, json={**LONG, "stream": True}) as waiting:
                assert waiting.status_code == 200
                server.wait_for(lambda m: (m[RUNNING], m[WAITING]) == (1, 1), "the second request is not waiting")
            m = server.wait_for(lambda m: m[WAITING] == 0, "the waiting request was not aborted")
            assert m[RUNNING] == 1 and finished_count(m, "abort") == 1
            assert len(next_events(lines, 3)) == 3  # the running one still streams
        server.wait_idle(check=lambda m: finished_count(m, "abort") == 2)
        server.check_engine()


# -- 5. bad input is a 4xx with an OpenAI-style error --------------------------------------------
USER = [{"role": "user", "content": "hi"}]
BAD = [
    (CMPL, "{not json", 400, "not valid JSON"),
    (CHAT, '{"messages": [', 400, "not valid JSON"),
    (CMPL, [1, 2], 400, "the request body must be a JSON object"),
    (CMPL, {"max_tokens": 4}, 400, "prompt: Field required"),
    (CMPL, {"prompt": "hi", "max_tokens": "a"}, 400, "max_tokens"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    (CMPL, {"prompt": "hi", "stop": 5}, 400, "stop"),
    (CMPL, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (CMPL, {"prompt": "hi", "temperature": -1}, 400, "temperature must be in [0, 100]"),
    (CHAT, {"messages": USER, "top_p": 2}, 400, "top_p must be in (0, 1]"),
    (CMPL, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens must be an integer >= 1"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens must be an integer >= 1"),
    (CMPL, {"prompt": "hi", "max_tokens": 10**9}, 400, "maximum context length"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**9}, 400, "maximum context length"),
    (CMPL, {"prompt": "hi", "n": 0}, 400, "n must be between 1 and"),
    (CHAT, {"messages": USER, "n": 1000}, 400, "n must be between 1 and"),
    (CMPL, {"prompt": "hi", "logprobs": 50}, 400, "logprobs must be in [0, 20]"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 1000}, 400, "top_logprobs must be in [0, 20]"),
    (CMPL, {"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty must be in [-2, 2]"),
    (CMPL, {"prompt": "hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
    (CMPL, {"prompt": "hi", "stop": ""}, 400, "stop must be a non-empty string"),
    (CMPL, {"prompt": "hi", "stop": ["a", 1]}, 400, "stop.1: Input should be a valid string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, 400,
     "messages.0.content.0.type: Field required"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages.0.content.0.text: Input should be a valid string"),
    (CMPL, {"prompt": "hi", "cache_salt": "\ud800"}, 400, "cache_salt must be valid Unicode text"),
    (CHAT, {"messages": USER, "cache_salt": "\udc80x"}, 400, "cache_salt must be valid Unicode text"),
    (CMPL, {"prompt": [100] * 8192, "echo": True, "max_tokens": 0}, 400, "leave no room for the one token an echo"),
    (CMPL, {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "does not exist"),
    (CMPL, {"prompt": ""}, 400, "the prompt is empty"),
    (CMPL, {"prompt": []}, 400, "prompt must not be empty"),
    (CMPL, {"prompt": ["a", 5]}, 400, "prompt: must be a string, a list of strings, a list of token ids, or a list"),
    (CMPL, {"prompt": None}, 400, "prompt: must be a string, a list of strings"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content: a user message needs its content"),
    (CHAT, {"messages": [{"role": "system", "content": None}, *USER]}, 400, "a system message needs its content"),
    (CHAT, {"messages": [{"role": "user", "content": []}]}, 400, "messages.0.content: an empty array; a user message"),
    (CMPL, {"prompt": [[]]}, 400, "the prompt is empty"),
    (CMPL, {"prompt": [10**6]}, 400, "outside the vocabulary"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CMPL, {"prompt": [100] * 9000}, 400, "maximum context length"),
    (CMPL, {"prompt": "hi " * 9000, "max_tokens": 1}, 400, "9001 prompt tokens"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    (CMPL, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be in (0, 10]"),
    (CMPL, {"prompt": "hi", "top_k": 2**63}, 400, "top_k: Input should be less than or equal to"),
    (CMPL, {"prompt": "hi", "seed": 2**64}, 400, "seed: Input should be less than or equal to"),
    (CMPL, {"prompt": "\ud800"}, 400, "not valid Unicode"),
    (CHAT, {"messages": [{"role": "user", "content": "\udfff"}]}, 400, "not valid Unicode"),
    (CMPL, {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs must be in [0, 20], got 21"),
    (CHAT, {"messages": USER, "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs is not available with "
                                                                           "stream: true on chat"),
    (CHAT, {"messages": USER, "prompt_logprobs": 21}, 400, "prompt_logprobs must be in [0, 20], got 21"),
    (CMPL, {"prompt": "hi", "suffix": "the end"}, 400, "this model has no fill-in-the-middle tokens"),
    (CMPL, {"prompt": [1, 2], "suffix": "the end"}, 400, "suffix fills the middle after a text prompt"),
    (CMPL, {"prompt": "hi", "best_of": 3}, 400, "best_of is not supported"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400,
     "response_format type must be text, json_object or json_schema, got 'xml'"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     400, "response_format: the JSON schema cannot be compiled"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
     "response_format and guided_regex both constrain the output: send one"),
    (CMPL, {"prompt": "hi", "structured_outputs": {"regex": "("}}, 400, "structured_outputs: the regex cannot be "
                                                                          "compiled"),
    (CMPL, {"prompt": "hi", "structured_outputs": {"choices": ["a"]}}, 400, "structured_outputs: unknown field "
                                                                            "'choices'"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     'tool_choice "auto" needs the server started with --enable-auto-tool-choice and --tool-call-parser'),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice required needs tools"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "names 'g', which is not among"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"}, 400,
     "tool_choice must be none, auto, required or a named function, got 'any'"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
            "response_format": {"type": "json_object"}}, 400, "tool_choice required and a structured output both"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions are OpenAI's old name: send tools"),
    (CMPL, {"prompt": "hi", "logit_bias": {"\u0661\u0662": 5}}, 400, "logit_bias keys must be token ids"),
    (CMPL, '{"\\ud800": 1, "prompt": "hi"}', 400, "a key of the body: a lone surrogate"),
    (CMPL, {"prompt": [[1, 2]] * 33, "n": 64}, 400, "ask for 2112 choices, more than the 2048 one request may"),
    (CHAT, {"messages": USER, "guided_choice": []}, 400, "guided_choice: choice must be a list of non-empty strings"),
    (CMPL, {"prompt": "hi", "logit_bias": {"the": 1}}, 400, "logit_bias keys must be token ids"),
    (CMPL, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias values must be numbers in [-100, 100]"),
    (CMPL, {"prompt": "hi", "logit_bias": {"999999": 5}}, 400, "logit_bias has a token id outside the vocabulary"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     400, "messages.0.content.0: image_url content parts are not supported"),
    (CMPL, {"prompt": "hi", "stop": ["s"] * 17}, 400, "stop takes at most 16 strings of at most 256 characters"),
    (CMPL, {"prompt": "hi", "stop": "s" * 257}, 400, "stop takes at most 16 strings"),
    (CMPL, {"prompt": "hi", "stop_token_ids": list(range(1025))}, 400, "stop_token_ids takes at most 1024"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [999999]}, 400, "stop_token_ids has a token id outside the vocabulary"),
    ("/tokenize", {"model": MODEL}, 400, "send either prompt or messages"),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ("/detokenize", {"tokens": [5, 999999]}, 400, "token id 999999 is outside the vocabulary"),
    ("/detokenize", {"tokens": "hi"}, 400, "tokens"),
    ("/tokenize", {"prompt": "hi", "chat_template": "{{ messages }}"}, 400, "chat_template: Extra inputs"),
    ("/tokenize", {"messages": USER, "continue_final_message": True}, 400, "needs add_generation_prompt false"),
    ("/v1/nothing", {"prompt": "hi"}, 404, "Not Found"),
    (CHAT, {"messages": USER, "echo": True}, 400, "echo is not supported on chat"),
    (CHAT, {"messages": USER, "chat_template": "{{ messages }}"}, 400, "chat_template is not supported"),
    (CMPL, {"prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens must be -1"),
    (CMPL, {"prompt": "hi", "allowed_token_ids": [10**6]}, 400, "allowed_token_ids has a token id outside"),
    (CMPL, {"prompt": "hi", "allowed_token_ids": [100], "guided_choice": ["yes"]}, 400, "no token is left to draw"),
    (CMPL, {"prompt": "hi", "grammar": "root ::= undefined"}, 400, "grammar: the grammar cannot be compiled"),
    (CMPL, {"prompt": "hi", "repeat_penalty": 1.3}, 400, "send repetition_penalty"),
    (CMPL, {"prompt": "hi", "n_predict": 8}, 400, "send max_tokens"),
    (CHAT, {"messages": USER, "continue_final_message": True}, 400, "needs add_generation_prompt false"),
    (CHAT, {"messages": USER, "continue_final_message": True, "add_generation_prompt": False}, 400,
     "needs a last message from the assistant"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"messages": []}}, 400, "may not set messages"),
    # vLLM's fields that change the answer: refused, not answered as if absent
    (CMPL, {"prompt": "hi", "max_completion_tokens": 2}, 400,
     "max_completion_tokens (2) differs from max_tokens (16): the completions API reads max_tokens"),
    (CMPL, {"prompt": "hi", "return_tokens_as_token_ids": True}, 400, "return_tokens_as_token_ids is not supported"),
    (CMPL, {"prompt": "hi", "add_special_tokens": False}, 400, "add_special_tokens False is not supported"),
    (CHAT, {"messages": USER, "add_special_tokens": True}, 400, "add_special_tokens True is not supported"),
    (CMPL, {"prompt": "hi", "logits_processors": ["x"]}, 400, "logits_processors are not supported"),
    (CMPL, {"prompt": "hi", "length_penalty": 0.5}, 400, "length_penalty is beam search's"),
    (CHAT, {"messages": USER, "documents": [{"text": "d"}]}, 400, "documents are not supported"),
    (CHAT, {"messages": USER * 10_001}, 400, "messages: List should have at most 10000 items"),  # before parsing them
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_4xx(server, path, body, status, message):
    content = body if isinstance(body, str) else json.dumps(body)  # ASCII escapes carry the lone surrogates
    r = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}


def test_do_nothing_values_of_unsupported_fields_are_accepted(client, offline):
    """What clients send by default (best_of 1, a text response_format, tools with tool_choice
    'none', text content parts) asks for plain generation: answered, not refused."""
    question = QUESTIONS[0]
    r = client.chat.completions.create(
        model=MODEL, max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "text"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], tool_choice="none",
        messages=[{"role": "user", "content": [{"type": "text", "text": question}]}],
        extra_body={"add_special_tokens": False})  # vLLM's chat default
    assert r.choices[0].message.content == offline[question].outputs[0].text
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, best_of=1,
                                  suffix=None, extra_body={"skip_special_tokens": True, "repeat_penalty": 1.0,
                                                           "add_special_tokens": True, "length_penalty": 1.0,
                                                           "max_completion_tokens": MAX_TOKENS})  # guidellm's
    assert r.choices[0].text == offline[PROMPTS[0]].outputs[0].text


def test_vllms_token_restrictions_reach_the_engine(client, offline):
    """allowed_token_ids, bad_words, skip_special_tokens and truncate_prompt_tokens (vLLM's, in
    extra_body) do what SamplingParams does with them (test_sampling.py)."""
    question = QUESTIONS[0]
    plain = offline[question].outputs[0]
    ask = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, messages=[{"role": "user", "content": question}])
    kept = client.chat.completions.create(**ask, extra_body={"skip_special_tokens": False, "ignore_eos": True})
    assert kept.choices[0].message.content.startswith(plain.text + "<|im_end|>")  # past its end token
    only = client.chat.completions.create(**ask, extra_body={"allowed_token_ids": plain.token_ids[:2]})
    assert only.usage.completion_tokens == MAX_TOKENS  # (no end token among them)
    word = plain.text.split()[1]
    banned = client.chat.completions.create(**ask, extra_body={"bad_words": [word]})
    assert word not in banned.choices[0].message.content
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, extra_body={
        "truncate_prompt_tokens": 2})
    assert cut.usage.prompt_tokens == 2


def test_return_token_ids_gives_the_prompts_and_the_answers_ids(server, offline):
    """vLLM's return_token_ids: a completion choice holds both; chat holds the prompt's at the top
    level; streams give each chunk's new ids, the prompt's with a choice's first."""
    question, prompt = QUESTIONS[0], PROMPTS[0]
    want = offline[prompt]
    c = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                         "return_token_ids": True}, timeout=60).json()["choices"][0]
    assert (c["prompt_token_ids"], c["token_ids"]) == (want.prompt_token_ids, want.outputs[0].token_ids)
    events = sse_data(httpx.post(f"{server.url}/v1/completions", json={
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, "stream": True},
        timeout=60).text.splitlines())[:-1]
    assert events[0]["choices"][0]["prompt_token_ids"] == want.prompt_token_ids
    assert not any("prompt_token_ids" in e["choices"][0] for e in events[1:])
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == want.outputs[0].token_ids
    chat = offline[question]
    ask = {"messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, "temperature": 0,
           "return_token_ids": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=ask, timeout=60).json()
    assert (r["prompt_token_ids"], r["choices"][0]["token_ids"]) == (chat.prompt_token_ids,
                                                                     chat.outputs[0].token_ids)
    events = sse_data(httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "stream": True},
                                 timeout=60).text.splitlines())[:-1]
    assert events[0]["prompt_token_ids"] == chat.prompt_token_ids and "prompt_token_ids" not in events[1]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == chat.outputs[0].token_ids
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60).json()
    assert "token_ids" not in plain["choices"][0]


def test_null_is_the_default_of_a_nullable_field(client, offline):
    """OpenAI's spec lets any optional field be null, and clients that send every argument do
    (the openai package sends null for an argument given as None)."""
    question = QUESTIONS[0]
    r = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, n=None, stream=None,
                                       logprobs=None, messages=[{"role": "user", "content": question}])
    assert r.choices[0].message.content == offline[question].outputs[0].text
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=None,
                                  echo=None, stream=None, extra_body={"ignore_eos": None, "min_tokens": None})
    assert r.choices[0].text == offline[PROMPTS[0]].outputs[0].text


def test_continue_final_message_continues_the_assistant(client, offline):
    """vLLM's prefill-the-reply: the last assistant message is left open and continued, as offline."""
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour I pick is"}]
    ref = offline["llm"].chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False,
                              add_generation_prompt=False, continue_final_message=True)[0].outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert r.choices[0].message.content == ref.text and ref.text.strip()  # closed, the turn would end at once
    closed = offline["llm"].chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False,
                                 add_generation_prompt=False)[0]
    assert r.usage.prompt_tokens < len(closed.prompt_token_ids)  # the end-of-turn tokens are cut


def test_chat_template_kwargs_reach_the_template(server, monkeypatch):
    tok = server.engine.engine.tokenizer
    monkeypatch.setattr(tok, "chat_template", "{{ greeting }} {{ messages[0].content }}")
    r = httpx.post(f"{server.url}{CHAT}", timeout=60, json={
        "messages": USER, "max_tokens": 1, "chat_template_kwargs": {"greeting": "Bonjour"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("Bonjour hi", add_special_tokens=False))


def test_logit_bias_bans_and_forces_tokens(client, offline):
    tok = offline["llm"].get_tokenizer()
    greedy = offline[PROMPTS[0]].outputs[0].token_ids
    banned = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                       logit_bias={str(greedy[0]): -100})
    assert banned.choices[0].text != tok.decode(greedy[:1])
    forced_id = tok.encode(" banana")[-1]
    forced = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == tok.decode([forced_id] * 3)


def test_openapi_declares_the_errors_the_server_answers(server):
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert '"422"' not in json.dumps(doc) and "HTTPValidationError" not in doc["components"]["schemas"]
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "500", "503"} <= set(responses), path
        assert responses["400"]["content"] == error
    assert {"400", "401", "413"} <= set(doc["paths"]["/scope/lab"]["post"]["responses"])
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"]["$ref"].endswith("ErrorDetail")


def test_wrong_method_is_405_json(server):
    r = httpx.get(f"{server.url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_bad_input_through_the_official_client(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=USER)


def test_bad_input_leaks_nothing_and_logs_no_server_error(server):
    server.wait_idle()
    server.check_engine()
    assert [r.getMessage() for r in server.errors.records] == []


# -- 5b. one large request must not freeze every client -----------------------------------------
def test_oversized_body_is_refused_with_413(server):
    big = json.dumps({"prompt": "x" * (9 << 20)})
    r = httpx.post(f"{server.url}{CMPL}", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)].encode()
    r = httpx.post(f"{server.url}{CMPL}", content=chunked(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_text_that_cannot_fit_is_refused_before_tokenizing(server, monkeypatch, path):
    tok = server.engine.engine.tokenizer
    encoded: list[int] = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a: encoded.append(len(text)) or real(text, *a))
    text = "hello world " * 60_000  # 720,000 characters: more than 8,192 tokens could spell
    body = {"prompt": text} if path == CMPL else {"messages": [{"role": "user", "content": text}]}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400 and "more than this model's maximum context length" in r.json()["error"]["message"]
    assert encoded == []


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    """While one prompt is being tokenized, the server still answers others."""
    tok = server.engine.engine.tokenizer
    entered, release = threading.Event(), threading.Event()
    real = tok.encode

    def slow_encode(text, *args):
        if text.startswith("Slow"):
            entered.set()
            release.wait(30)
        return real(text, *args)

    monkeypatch.setattr(tok, "encode", slow_encode)
    result: dict = {}
    post = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{server.url}{CMPL}", json={"prompt": "Slow to tokenize", "max_tokens": 2}, timeout=60)))
    post.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 200
    finally:
        release.set()
        post.join(60)
    assert result["r"].status_code == 200


def test_an_engine_built_by_a_function_is_built_on_the_thread_that_steps_it(smol):
    """OpenMP keeps a worker pool per thread that starts parallel work, and with more pooled threads
    than cores libgomp's workers sleep between kernels: an engine loaded on one thread and stepped on
    another ran a token 3-5x slower. So AsyncEngine builds the engine on its own thread when given a
    function, and raises that function's error to its caller."""
    built_on = []

    def build() -> LLMEngine:
        built_on.append(threading.current_thread())
        return LLMEngine(EngineConfig(num_kv_blocks=64), loaded=smol)

    engine = AsyncEngine(build)
    try:
        assert built_on[0] is not threading.main_thread()
        assert asyncio.run(engine.run(threading.current_thread)) is built_on[0]  # steps run there too

        async def answer() -> list[int]:
            stream = await engine.add("r", "The capital of France is", SamplingParams(max_tokens=4, temperature=0))
            return [t async for out in stream for t in out.outputs[0].new_token_ids]
        assert len(asyncio.run(answer())) == 4
    finally:
        engine.shutdown()

    def broken() -> LLMEngine:
        raise ValueError("no model at /nowhere")
    with pytest.raises(ValueError, match="no model at /nowhere"):
        AsyncEngine(broken)


def test_serve_builds_its_engine_on_the_engine_thread(monkeypatch):
    """`inferlab serve` hands AsyncEngine a builder, so the model's kernels run on one thread only."""
    from inferlab.server import serve as serve_module
    built_on = []

    def engine(config):
        built_on.append(threading.current_thread())
        raise RuntimeError("stop here")
    monkeypatch.setattr(serve_module, "LLMEngine", engine)
    with pytest.raises(RuntimeError, match="stop here"):
        serve_module.serve(EngineConfig())
    assert built_on[0].name == "inferlab-engine"


def test_api_key_guards_the_api_and_the_lab(smol):
    with running_server(smol, api_key="s3cret", num_kv_blocks=64) as server:
        url = server.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert httpx.post(f"{url}/scope/lab", json={"count": 1}, timeout=10).status_code == 401
        assert httpx.post(f"{url}{CMPL}", json={"prompt": "hi"}, timeout=10).status_code == 401
        assert httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, timeout=10).status_code == 401
        assert httpx.post(f"{url}/detokenize", json={"tokens": [1]}, timeout=10).status_code == 401
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes and metrics stay open
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        server.wait_idle()
        server.check_engine()


def test_an_empty_api_key_is_no_key():
    """(As vLLM reads it.) Guarded by "", no header got a 401 while an empty "Bearer" got in."""
    from inferlab.server.guard import Guard
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": []})
    app.add_middleware(Guard, api_key="")
    with TestClient(app) as open_app:
        assert open_app.get("/v1/models").status_code == 200
        assert open_app.get("/v1/models", headers={"Authorization": "Bearer"}).status_code == 200


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}{CHAT}", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_browsers_may_call_from_this_machine_by_default(server):
    """A web UI served from this machine on another port (Ollama's default); a page elsewhere may not."""
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://[::1]"):
        r = preflight(server.url, origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
        got = httpx.get(f"{server.url}/v1/models", headers={"Origin": origin}, timeout=10)
        assert got.headers["access-control-allow-origin"] == origin
    for origin in ("https://elsewhere.example", "http://localhost.example.com"):
        assert preflight(server.url, origin).status_code == 400
        assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models", headers={"Origin": origin},
                                                              timeout=10).headers


def test_allowed_origins_pass_before_the_api_key(smol):
    """A preflight carries no key, so it is answered first; a 401 still has the header a page needs
    to read it."""
    with running_server(smol, api_key="s3cret", allowed_origins=["https://ui.example"], num_kv_blocks=64) as server:
        ui = "https://ui.example"
        r = preflight(server.url, ui)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ui
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        refused = httpx.post(f"{server.url}{CHAT}", json={"messages": USER}, headers={"Origin": ui}, timeout=10)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ui
        ok = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "max_tokens": 2}, timeout=60,
                        headers={"Origin": ui, "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ui
        assert preflight(server.url, "https://other.example").status_code == 400
    with running_server(smol, allowed_origins=["*"], num_kv_blocks=64) as server:
        assert preflight(server.url, "https://anywhere.example").headers["access-control-allow-origin"] == "*"


def test_allowed_origins_option():
    from inferlab.cli_args import origins_arg
    assert origins_arg("http://a:1, https://b/") == ["http://a:1", "https://b"]
    assert origins_arg('["*"]') == ["*"]  # vLLM's form
    with pytest.raises(Exception, match="JSON list"):
        origins_arg("[1, 2]")


# -- 6. a request that breaks the engine fails alone -------------------------------------------
def test_a_step_failing_outside_the_model_fails_its_requests_once(server, offline, monkeypatch, caplog):
    """A fault in scheduling (a policy of one's own, say) is not one request's: the requests the
    step held fail with a 500, once. The step used to be retried at once, forever: thousands of
    tracebacks a second, and the client never answered."""
    scheduler = server.engine.engine.scheduler
    real, calls = scheduler.schedule, []

    def schedule():
        calls.append(1)
        if len(calls) == 3:  # the request has run a step: the fault comes mid-request
            raise RuntimeError("policy broke")
        return real()

    server.wait_idle()
    before = server.metrics()
    monkeypatch.setattr(scheduler, "schedule", schedule)
    with caplog.at_level(logging.ERROR, logger="inferlab"):
        r = httpx.post(f"{server.url}{CMPL}", json={**LONG, "max_tokens": 50}, timeout=60)
    assert r.status_code == 500 and "policy broke" in r.json()["error"]["message"]
    assert sum("engine step failed" in rec.getMessage() for rec in caplog.records) == 1
    server.wait_idle()
    after = server.metrics()  # a failure, not a client's abort
    assert finished_count(after, "error") == finished_count(before, "error") + 1
    assert finished_count(after, "abort") == finished_count(before, "abort")
    server.check_engine()
    prompt = PROMPTS[0]  # and the engine serves on
    again = httpx.post(f"{server.url}{CMPL}", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                   "temperature": 0}, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == offline[prompt].outputs[0].text


def test_a_poisoned_request_fails_alone(server, offline, monkeypatch):
    import inferlab.runner as runner_mod
    real_sample = runner_mod.sample
    batch_sizes: list[int] = []

    def sample(logits, reqs, eos):  # a fault that only a request with seed 666 triggers
        if any(r.params.seed == 666 for r in reqs):
            batch_sizes.append(len(reqs))
            raise RuntimeError("boom")
        return real_sample(logits, reqs, eos)

    monkeypatch.setattr(runner_mod, "sample", sample)
    before = server.wait_idle()

    async def post(c: httpx.AsyncClient, body: dict) -> tuple[int, dict | list]:
        if not body.get("stream"):
            r = await c.post(CMPL, json=body)
            return r.status_code, r.json()
        async with c.stream("POST", CMPL, json=body) as r:
            return r.status_code, sse_data([line async for line in r.aiter_lines()])

    good = [{"model": MODEL, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": i % 2 == 1}
            for i, p in enumerate(PROMPTS)]
    bad = [{"model": MODEL, "prompt": "Poison", "max_tokens": 8, "seed": 666, "stream": s} for s in (False, True)]

    async def carrier(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """A long request that runs until told to stop, so every other one shares a running batch
        with it however fast the engine is (a client going away aborts it)."""
        async with c.stream("POST", CMPL, json={**LONG, "stream": True}) as r:
            async for _ in r.aiter_lines():
                if stop.is_set():
                    return

    async def main() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            stop = asyncio.Event()
            running = asyncio.create_task(carrier(c, stop))
            while parse_metrics((await c.get("/metrics")).text)[RUNNING] < 1:
                await asyncio.sleep(0.02)
            try:
                return await asyncio.wait_for(asyncio.gather(*(post(c, b) for b in good + bad)), 60)
            finally:
                stop.set()
                await running

    results = asyncio.run(main())
    for body, (status, got) in zip(good, results):
        assert status == 200
        if body["stream"]:
            assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
            text = "".join(e["choices"][0]["text"] for e in got[:-1])
            reason = got[-2]["choices"][0]["finish_reason"]
        else:
            text, reason = got["choices"][0]["text"], got["choices"][0]["finish_reason"]
        assert (text, reason) == text_and_reason(offline[body["prompt"]])
    (status, plain), (stream_status, events) = results[len(good):]
    assert status == 500 and plain["error"]["type"] == "server_error" and "boom" in plain["error"]["message"]
    assert stream_status == 200  # headers were sent before the failure: it is reported in the stream
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and "boom" in errors[0]["error"]["message"]
    assert max(batch_sizes) > 1  # the poisoned requests did share a batch with good ones
    server.wait_idle(check=lambda m: finished_count(m, "error") == finished_count(before, "error") + 2
                     and finished_count(m, "abort") == finished_count(before, "abort") + 1)
    server.check_engine()


# -- 4. a signal stops `inferlab serve` cleanly --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(tmp_path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`inferlab serve --port 0` as a real process, until it has started (at the address its start-up
    line gives: the port the system picked); killed if left running."""
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inferlab.cli", "serve", "--port", "0",
                                 "--num-kv-blocks", "256", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "the server exited during startup"
            if url is None and (m := re.search(r"serving \S+ on (http://127\.0\.0\.1:(\d+)) ",
                                               (tmp_path / "serve.log").read_text())):
                url = m.group(1)
                assert m.group(2) != "0"
            try:
                if url is not None and httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 90 s"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_open_dashboard_does_not_hold_a_shutdown(tmp_path):
    """Its stream never ends by itself: uvicorn waited its whole graceful time out for it, then logged an
    error. It ends once a shutdown has nothing left to show."""
    from inferlab.server.serve import GRACEFUL_S
    with serve_process(tmp_path) as (proc, url):
        opened = threading.Event()

        def watch() -> None:
            try:
                with httpx.stream("GET", f"{url}/scope/events", timeout=30) as r:
                    for _ in r.iter_lines():
                        opened.set()
            except httpx.HTTPError:
                pass
        threading.Thread(target=watch, daemon=True).start()
        assert opened.wait(30), "the dashboard stream did not open"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=GRACEFUL_S + 10)
        assert time.monotonic() - t0 < GRACEFUL_S / 2, time.monotonic() - t0
    log = (tmp_path / "serve.log").read_text()
    assert "ERROR" not in log
    # a line per request, as vLLM's server writes them, but for the paths polled (/health here, twice or more)
    assert '"GET /scope/events HTTP/1.1" 200' in log and "/health" not in log


def test_a_third_signal_exits_without_waiting_whatever_the_signal():
    """(uvicorn forces an exit on a second SIGINT alone: a third SIGTERM waited the graceful time out.)"""
    from inferlab.server.serve import Server
    drains: list[float] = []
    engine = type("Engine", (), {"drain": lambda self, grace: drains.append(grace)})()
    server = Server(uvicorn.Config(FastAPI()), engine, lambda: None)
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGTERM):
        assert not server.force_exit
        server.handle_exit(sig, None)
    assert server.force_exit and drains[:2] == [5.0, 0]


def test_as_a_containers_pid_1_sigterm_still_exits_143(monkeypatch):
    """A container without an init runs the server as PID 1, whose signals' default actions the
    kernel ignores: the SIGTERM uvicorn raises again did nothing, and the server exited 0."""
    from inferlab.server.serve import Server
    engine = type("Engine", (), {"drain": lambda self, grace: None})()
    stopped: list[bool] = []
    server = Server(uvicorn.Config(FastAPI()), engine, lambda: stopped.append(True))
    monkeypatch.setattr(signal, "raise_signal", lambda sig: None)  # ignored, as for PID 1
    with pytest.raises(SystemExit) as e, server.capture_signals():
        server.handle_exit(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM and stopped == [True]


def _client(url: str, body: dict, outcome: dict, started: threading.Event) -> None:
    """One client of the shutdown test: a stream's events, or a plain answer's status and JSON."""
    try:
        if not body.get("stream"):
            started.set()
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            outcome.update(status=r.status_code, json=r.json())
            return
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 2:
                    started.set()
            outcome["events"] = sse_data(lines)
    except httpx.HTTPError as e:
        outcome["error"] = e


@pytest.mark.parametrize("sig, max_tokens, twice", [(signal.SIGTERM, 2000, False), (signal.SIGINT, 8, False),
                                                    (signal.SIGINT, 2000, True)],
                         ids=["SIGTERM-long-requests", "SIGINT-short-request", "SIGINT-twice-long-requests"])
def test_signal_shuts_the_server_down_cleanly(tmp_path, sig, max_tokens, twice):
    """Under load, a signal lets short requests finish and aborts long ones within the drain time:
    every stream still ends with a finish reason and [DONE], every plain request gets a JSON answer
    (a 503 if it was cut), and the process exits soon after. A second signal aborts them at once, the
    same way (uvicorn's own second signal cut the streams and answered 500)."""
    from inferlab.server.serve import DRAIN_S
    psutil = pytest.importorskip("psutil")
    with serve_process(tmp_path) as (proc, url):
        children = psutil.Process(proc.pid).children(recursive=True)
        body = {"prompt": "Count forever:", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        bodies = [{**body, "stream": True}] * 4 + [body] * 2 if max_tokens > 8 else [{**body, "stream": True}]
        outcomes: list[dict] = [{} for _ in bodies]
        starts = [threading.Event() for _ in bodies]
        clients = [threading.Thread(target=_client, args=(url, b, o, e), daemon=True)
                   for b, o, e in zip(bodies, outcomes, starts)]
        for c in clients:
            c.start()
        assert all(e.wait(60) for e in starts), "the in-flight requests did not start"
        if len(bodies) > 1:  # the plain requests are running too, not still on their way in
            deadline = time.monotonic() + 30
            while parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)[RUNNING] < len(bodies):
                assert time.monotonic() < deadline, "not every request is running"
                time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(sig)
        if twice:
            time.sleep(0.5)
            proc.send_signal(sig)
        proc.wait(timeout=DRAIN_S + 15)
        took = time.monotonic() - t0
        for c in clients:
            c.join(timeout=10)
            assert not c.is_alive(), "a client hangs"
    output = (tmp_path / "serve.log").read_text()
    # uvicorn restores the default handler and re-raises the signal once it has shut down:
    # SIGTERM then ends the process by that signal; SIGINT raises KeyboardInterrupt, which
    # `inferlab` turns into the shell's 128 + 2.
    expected = {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 130}[sig]
    assert proc.returncode in (0, expected), output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert f"{sig.name}: stopping; requests still running get {DRAIN_S:.0f} s to finish" in output, output
    assert took < (DRAIN_S if twice else DRAIN_S + 5), took
    assert ("again: aborting the running requests now" in output) == twice, output
    finish = "abort" if max_tokens > 8 else "length"  # a long request is cut, a short one finishes
    for b, outcome in zip(bodies, outcomes):
        if b.get("stream"):
            events = outcome.get("events")
            assert events and events[-1] == "[DONE]", outcome
            assert events[-2]["choices"][0]["finish_reason"] == finish, events[-2]
        else:
            assert outcome.get("status") == 503, outcome
            assert outcome["json"]["error"]["code"] == "server_shutting_down"
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
