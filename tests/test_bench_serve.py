"""`inferlab bench serve` against an in-process server on 127.0.0.1: bounded, streaming, measured."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn

from inferlab.async_engine import AsyncEngine
from inferlab.bench_serve import arrival_times, percentile
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.server.app import build_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = [8, 5, 8, 6, 8, 7]  # one per request of the workload file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(smol):
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=256), loaded=smol))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "SmolLM2-135M-Instruct"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


@pytest.fixture(scope="module")
def workload_file(tmp_path_factory) -> str:
    rng = random.Random(1)
    reqs = [{"prompt_token_ids": [rng.randint(100, 10000) for _ in range(30)], "max_tokens": m} for m in MAX_TOKENS]
    path = tmp_path_factory.mktemp("bench") / "workload.json"
    path.write_text(json.dumps({"name": "tiny", "requests": reqs}))
    return str(path)


def bench_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferlab.cli", "bench", "serve", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def check(r: subprocess.CompletedProcess, n: int, output_tokens: int) -> dict:
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert "Serving Benchmark Result" in r.stdout and "P99 TTFT (ms):" in r.stdout
    assert (s["completed"], s["failed"]) == (n, 0), r.stdout
    assert s["output_tokens"] == output_tokens  # ignore_eos: every request runs to its max_tokens
    assert s["prompt_tokens"] == 30 * n
    assert s["req_s"] > 0 and s["output_tok_s"] > 0 and s["total_tok_s"] > s["output_tok_s"]
    for m in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < s[f"{m}_ms_p50"] <= s[f"{m}_ms_p90"] <= s[f"{m}_ms_p99"], m
        assert s[f"{m}_ms_mean"] > 0
    assert s["ttft_ms_p50"] <= s["e2e_ms_p50"]
    return s


def test_all_at_once_cycles_the_workload(base_url, workload_file):
    r = bench_serve("--base-url", base_url, "--workload", workload_file, "--num-requests", "8",
                    "--max-concurrency", "4")
    s = check(r, 8, sum(MAX_TOKENS) + MAX_TOKENS[0] + MAX_TOKENS[1])  # 8 requests: the 6, then the first 2
    assert s["model"] == "SmolLM2-135M-Instruct" and s["request_rate"] == "inf"


def test_sampling_settings_reach_the_server(base_url, workload_file):
    """--temperature / --top-p / --top-k go with every request (a bad one is refused: all failed, which
    is status 1)."""
    s = check(bench_serve("--base-url", base_url, "--workload", workload_file, "--num-requests", "6",
                          "--temperature", "1.0", "--top-p", "0.9", "--top-k", "20"), 6, sum(MAX_TOKENS))
    assert (s["temperature"], s["top_p"], s["top_k"]) == (1.0, 0.9, 20)
    r = bench_serve("--base-url", base_url, "--workload", workload_file, "--num-requests", "2", "--top-p", "1.5")
    assert json.loads(r.stdout.strip().splitlines()[-1])["failed"] == 2 and "top_p" in r.stdout, r.stdout
    assert r.returncode == 1 and "\nerror: no request completed (HTTP 400" in r.stderr, r.stderr  # no figure


def test_the_edit_workload_goes_to_chat_as_offline(base_url):
    """`edit` (offline `bench --workload edit`) sends its passages as chat messages, stopping at EOS (it
    crashed for want of a tokenizer); the server applies the template, so its prompts are the offline ones."""
    from inferlab.bench_serve import build_requests
    from inferlab.bench_text import edit_messages
    reqs = build_requests("edit", 20, None)
    assert [p for p, _ in reqs] == ["/v1/chat/completions"] * 20
    assert [b["messages"][0]["content"] for _, b in reqs] == (edit_messages() * 2)[:20]
    assert all(b["max_tokens"] == 160 and "ignore_eos" not in b for _, b in reqs)
    r = bench_serve("--base-url", base_url, "--workload", "edit", "--num-requests", "2", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert (s["completed"], s["failed"]) == (2, 0) and 0 < s["output_tokens"] <= 8


def test_finite_rate_spreads_the_arrivals(base_url, workload_file):
    n, rate = 6, 10.0
    r = bench_serve("--base-url", base_url, "--workload", workload_file, "--num-requests", str(n),
                    "--request-rate", str(rate))
    s = check(r, n, sum(MAX_TOKENS))
    last_send = arrival_times(n, rate, 0)[-1]  # the default seed
    assert last_send > 0.5 * (n - 1) / rate  # this seed draws a typical spread, not a degenerate one
    assert s["duration_s"] >= last_send  # the last request left no earlier than its arrival time


def test_no_server_is_one_clear_line():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = bench_serve("--base-url", f"http://127.0.0.1:{port}", "--workload", "chat", "--num-requests", "2")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the server at"), r.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1", "ftp://h"])
def test_a_bad_base_url_is_one_line(url):
    r = bench_serve("--base-url", url, "--workload", "chat", "--num-requests", "2")  # :99999 was a traceback
    assert r.returncode == 2 and r.stderr == f"error: --base-url is http:// or https://, a host and an optional " \
        f"port from 1 to 65535, e.g. http://127.0.0.1:8000; got {url!r}\n", r.stderr


def test_an_unknown_workload_names_every_one_it_takes():
    r = bench_serve("--base-url", "http://127.0.0.1:1", "--workload", "nosuch", "--num-requests", "2")
    assert r.returncode == 2 and r.stderr == "error: unknown workload 'nosuch': use small, cpu, nano, chat, edit or " \
        "a JSON file\n", r.stderr  # chat was left out


def test_arrivals_are_a_seeded_poisson_process():
    times = arrival_times(4001, 10.0, 0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.01  # mean gap 1/rate
    assert arrival_times(5, 10.0, 0) == times[:5] and arrival_times(5, 10.0, 1) != times[:5]
    assert arrival_times(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and percentile([7.0], 99) == 7.0
