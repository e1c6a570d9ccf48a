"""`inferlab bench serve`: load-test a running OpenAI-compatible server and report its latencies.

Sends a bounded number of streaming requests (token-id prompts of a reference workload to
/v1/completions, or chat or edit prompts to /v1/chat/completions) with Poisson arrivals at a given rate,
optionally capped in concurrency, and measures per request TTFT, inter-token latency (ITL), time
per output token (TPOT) and end-to-end latency. Prints a table, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from inferlab.outputs import RequestFailed
from inferlab.server.listen import http_url

CHAT_PROMPTS = [
    "What is the capital of France?", "hi", "Write a haiku about the sea.", "List three prime numbers.",
    "Translate 'good morning' to Spanish.", "What is 12 times 7?", "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clean Python code.",
    "Tell me a short story about a robot who learns to paint, in about five sentences.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarize the plot of Romeo and Juliet in one paragraph.", "How do I boil an egg so that the yolk stays soft?",
    "Name the planets of the solar system in order from the Sun.",
    "Write a polite email declining a meeting invitation.", "What is photosynthesis? Answer for a ten-year-old.",
    "Suggest a name for a coffee shop and explain why it fits.",
]
DEFAULT_CHAT_MAX_TOKENS = 128


@dataclass
class Result:
    """What one request measured; times in seconds from the moment it was sent."""
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--workload", default="cpu",
                   help="small, cpu, nano or a JSON file (token-id prompts to /v1/completions, ignore_eos), "
                        "or chat (16 chat prompts) or edit (18 passages to edit, as `bench --workload edit`) to "
                        "/v1/chat/completions; default: %(default)s")
    p.add_argument("--num-requests", type=int, default=64, help="requests to send; the workload is cycled or cut")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests/s of Poisson arrivals; inf sends all at once (default)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"output cap: chat default {DEFAULT_CHAT_MAX_TOKENS}; overrides the workload's per-request one")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature sent with every request (default: %(default)s, greedy; the "
                        "OpenAI API's own default, when a client sends none, is 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="top_p sent with every request (default: none sent)")
    p.add_argument("--top-k", type=int, default=None, help="top_k sent with every request (default: none sent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request (default: %(default)s)")


def build_requests(workload: str, n: int, max_tokens: int | None,
                   sampling: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of each of the n requests, cycling through the workload's requests; `sampling`:
    the sampling fields every body carries (default: greedy)."""
    if workload in ("chat", "edit"):  # real text: the server applies its model's chat template
        from inferlab.bench_text import EDIT_MAX_TOKENS, edit_messages
        chat = workload == "chat"
        texts, cap = (CHAT_PROMPTS, DEFAULT_CHAT_MAX_TOKENS) if chat else (edit_messages(), EDIT_MAX_TOKENS)
        base = [("/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                          "max_tokens": max_tokens or cap}) for q in texts]
    else:
        from inferlab.bench import SHAPES, load_workload
        if workload not in SHAPES and not os.path.exists(workload):  # (load_workload's own list lacks chat)
            raise ValueError(f"unknown workload {workload!r}: use {', '.join(SHAPES)}, chat, edit or a JSON file")
        reqs = load_workload(workload)["requests"]
        if not reqs:
            raise ValueError(f"workload {workload!r} has no requests")
        base = [("/v1/completions", {"prompt": r["prompt_token_ids"], "max_tokens": max_tokens or r["max_tokens"],
                                     "ignore_eos": True}) for r in reqs]
    stream = {"temperature": 0.0, **(sampling or {}), "stream": True, "stream_options": {"include_usage": True}}
    return [(path, {**body, **stream}) for path, body in (base[i % len(base)] for i in range(n))]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send time of each request, in seconds from the start: a Poisson process (exponential gaps
    from a seeded RNG) whose first request goes at 0; all at 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return list(itertools.accumulate((rng.expovariate(rate) for _ in range(n - 1)), initial=0.0))


async def read_stream(client: Any, path: str, body: dict, res: Result, start: float) -> None:
    """Consume one SSE stream, filling `res`; content chunks time TTFT and ITL."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            res.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        last = None
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                return
            if chunk.get("usage"):
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                res.output_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.error = "the stream ended without [DONE]"


async def send(client: Any, path: str, body: dict, timeout: float) -> Result:
    res = Result()
    start = time.perf_counter()
    try:
        await asyncio.wait_for(read_stream(client, path, body, res, start), timeout)
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout:g} s"
    except Exception as e:  # noqa: BLE001 - one request's failure is counted, never fatal
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - start
    if not res.error and not res.output_tokens:  # no usage chunk: count the content chunks
        res.output_tokens = len(res.itl) + (res.ttft is not None)
    return res


async def served_model(client: Any, base_url: str, wanted: str | None) -> str:
    import httpx
    url = f"{base_url}/v1/models"
    try:
        r = await client.get("/v1/models", timeout=10.0)
        ids = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the server at {url} ({type(e).__name__}: {e or 'no detail'}); "
                         "is `inferlab serve` running?") from None
    except (ValueError, KeyError, TypeError):
        ids = []
    if not ids:
        raise ValueError(f"{url} did not list any model (HTTP {r.status_code}); is this an OpenAI-compatible server?")
    if wanted is not None and wanted not in ids:
        raise ValueError(f"model {wanted!r} is not served at {base_url}; it serves {', '.join(ids)}")
    return wanted or ids[0]


async def run(a: argparse.Namespace) -> tuple[list[Result], float, str]:
    try:
        import httpx
    except ImportError:
        raise ValueError("`inferlab bench serve` needs httpx: pip install httpx") from None
    sampling = {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k}
    requests = build_requests(a.workload, a.num_requests, a.max_tokens,
                              {k: v for k, v in sampling.items() if v is not None})
    times = arrival_times(a.num_requests, a.request_rate, a.seed)
    limits = httpx.Limits(max_connections=a.max_concurrency or a.num_requests, max_keepalive_connections=None)
    # trust_env=False: never route through a proxy from the environment, only ever reach base_url
    async with httpx.AsyncClient(base_url=a.base_url, timeout=httpx.Timeout(a.timeout), limits=limits,
                                 trust_env=False) as client:
        model = await served_model(client, a.base_url, a.model)
        rate = "inf" if math.isinf(a.request_rate) else f"{a.request_rate:g} req/s"
        print(f"bench serve: {a.num_requests} requests of {a.workload} to {a.base_url} ({model}) at {rate}"
              + (f", at most {a.max_concurrency} in flight" if a.max_concurrency else ""), file=sys.stderr)
        gate = asyncio.Semaphore(a.max_concurrency or a.num_requests)

        async def one(path: str, body: dict) -> Result:
            async with gate:
                return await send(client, path, {**body, "model": model}, a.timeout)

        tasks = []
        start = time.perf_counter()
        for at, (path, body) in zip(times, requests):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(path, body)))
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start, model


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(a: argparse.Namespace, results: list[Result], duration: float, model: str) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "workload": a.workload, "model": model, "num_requests": a.num_requests,
        "request_rate": "inf" if math.isinf(a.request_rate) else a.request_rate,
        "max_concurrency": a.max_concurrency, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
        "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": round(duration, 3), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "req_s": round(len(ok) / duration, 3), "output_tok_s": round(output_tokens / duration, 2),
        "total_tok_s": round((prompt_tokens + output_tokens) / duration, 2)}
    series = {
        "ttft": [r.ttft if r.ttft is not None else r.e2e for r in ok],
        "tpot": [(r.e2e - (r.ttft or 0.0)) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2e": [r.e2e for r in ok]}
    for name, xs in series.items():
        out[f"{name}_ms_mean"] = round(1000 * sum(xs) / len(xs), 2) if xs else None
        for q in (50, 90, 99):
            out[f"{name}_ms_p{q}"] = round(1000 * percentile(xs, q), 2) if xs else None
    return out


def print_table(s: dict[str, Any], first_error: str | None) -> None:
    def row(label: str, value: Any) -> None:
        print(f"{label:<40}{'-' if value is None else value}")

    print(f"{' Serving Benchmark Result ':=^50}")
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if first_error:
        row("First failure:", first_error[:200])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["prompt_tokens"])
    row("Total generated tokens:", s["output_tokens"])
    row("Request throughput (req/s):", s["req_s"])
    row("Output token throughput (tok/s):", s["output_tok_s"])
    row("Total token throughput (tok/s):", s["total_tok_s"])
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^50}")
        for stat in ("mean", "p50", "p90", "p99"):
            row(f"{stat.capitalize()} {name.upper()} (ms):", s[f"{name}_ms_{stat}"])
    print("=" * 50)


def main(a: argparse.Namespace) -> None:
    """Run the benchmark from parsed options; bad options or no server raise ValueError (one line)."""
    for name, value in (("num-requests", a.num_requests), ("max-concurrency", a.max_concurrency),
                        ("max-tokens", a.max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if not a.request_rate > 0 or not a.timeout > 0:
        raise ValueError("--request-rate and --timeout must be positive")
    http_url(a.base_url, "--base-url")
    a.base_url = a.base_url.rstrip("/").removesuffix("/v1")  # the server root; paths add /v1
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    results, duration, model = asyncio.run(run(a))
    summary = summarize(a, results, duration, model)
    first_error = next((r.error for r in results if r.error), None)
    print_table(summary, first_error)
    print(json.dumps(summary), flush=True)
    if not summary["completed"]:  # no figure at all: a failure, for scripts that check the status
        raise RequestFailed(f"no request completed ({first_error})")
