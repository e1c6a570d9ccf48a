"""Experiment 10: beyond one instance — P/D disaggregation, router policies and a shared KV pool,
with real `inferlab serve` processes, a real router and a real Redis on loopback.

The load: conversations that open with one of two shared system prompts and go on for a few
turns, each turn sent when the previous answer is in (multi-turn chat, streamed). Measured:
- TTFT and inter-token latency percentiles for one instance against P/D (a prefill instance, a
  decode instance, the router in P/D mode, Redis between them);
- throughput and TTFT of two instances behind each router policy, with the simulator's prediction
  for the same trace (each request's measured send time, prompt and output lengths, its system
  prompt as the shared prefix);
- the prefix-hit rate (cached prompt tokens / prompt tokens, from each answer's usage) with
  per-instance caches against a Redis pool shared by both.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager

import httpx
from common import engine, figure, parse_args, pct, table, write

from inferlab.config import EngineConfig
from inferlab.sim.calibrate import calibrate
from inferlab.sim.simulator import run as simulate
from inferlab.sim.trace import TraceRequest

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count river stones under pale "
         "autumn light and distant bells ring softly across quiet hills").split()
SERVE = ["--dtype", "float32", "--num-kv-blocks", "1024", "--max-model-len", "2048", "--max-num-batched-tokens",
         "256", "--threads", "1", "--enable-prompt-tokens-details"]  # usage's cached tokens show where KV came from


def options(p) -> None:
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.5, help="conversations started per second")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(args: list[str], health: str | None, log: str):
    """A child process (its output in `log`), ready when `health` answers 200; killed at the end."""
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while health is not None:
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[:4]} did not start; see {log}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.kill()
        proc.wait()


class Fleet:
    """Starts instances, routers and Redis for one configuration; everything stops with the stack."""

    def __init__(self, stack: ExitStack, tmp: str) -> None:
        self.stack, self.tmp, self.n = stack, tmp, 0

    def _start(self, args: list[str], health_path: str = "/health") -> str:
        port, self.n = free_port(), self.n + 1
        url = f"http://127.0.0.1:{port}"
        self.stack.enter_context(process([*args, "--port", str(port)], url + health_path, f"{self.tmp}/p{self.n}.log"))
        return url

    def serve(self, kv: dict | None = None) -> str:
        extra = ["--kv-transfer-config", json.dumps(kv)] if kv else []
        return self._start([sys.executable, "-m", "inferlab.cli", "serve", *SERVE, *extra])

    def router(self, *args: str) -> str:
        return self._start([sys.executable, "-m", "inferlab.cli", "router", *args])

    def redis(self) -> str:
        port = free_port()
        self.stack.enter_context(process(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"], None, f"{self.tmp}/redis.log"))
        time.sleep(0.3)
        return f"redis://127.0.0.1:{port}"


def workload(a, seed: int = 0) -> tuple[list[str], list[list[str]], list[float]]:
    """Two system prompts, each conversation's user turns, and conversation start times."""
    rng = random.Random(seed)
    systems = [f"You are assistant number {k}. " + " ".join(rng.choice(WORDS) for _ in range(150)) for k in range(2)]
    turns = [[f"Question {c}.{t}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
              for t in range(a.turns)] for c in range(a.conversations)]
    starts, t = [], 0.0
    for _ in range(a.conversations):
        starts.append(t)
        t += rng.expovariate(a.rate)
    return systems, turns, starts


async def chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, t0: float) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, times, text, usage = time.monotonic(), [], "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices", []):
                if c["delta"].get("content"):
                    times.append(time.monotonic())
                    text += c["delta"]["content"]
    return {"arrival": sent - t0, "ttft": times[0] - sent, "itl": [b - a for a, b in zip(times, times[1:])],
            "end": times[-1] - t0, "prompt": usage["prompt_tokens"], "output": usage["completion_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"], "text": text}


def drive(url: str, a, systems, turns, starts) -> list[dict]:
    """Every conversation, each turn after the previous answer; one record per request."""
    async def conversation(client, c: int, t0: float) -> list[dict]:
        await asyncio.sleep(max(0.0, starts[c] - (time.monotonic() - t0)))
        messages, done = [{"role": "system", "content": systems[c % 2]}], []
        for user in turns[c]:
            messages.append({"role": "user", "content": user})
            rec = await chat(client, url, messages, a.max_tokens, t0)
            rec["system"] = c % 2
            messages.append({"role": "assistant", "content": rec["text"]})
            done.append(rec)
        return done

    async def main() -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            t0 = time.monotonic()
            runs = await asyncio.gather(*(conversation(client, c, t0) for c in range(len(turns))))
        return sorted((r for conv in runs for r in conv), key=lambda r: r["arrival"])

    return asyncio.run(main())


def summary(recs: list[dict]) -> dict:
    itl = [x for r in recs for x in r["itl"]]
    makespan = max(r["end"] for r in recs) - min(r["arrival"] for r in recs)
    return {"ttft_p50": pct([r["ttft"] for r in recs], 50), "ttft_p90": pct([r["ttft"] for r in recs], 90),
            "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90), "itl_p99": pct(itl, 99),
            "tok_s": sum(r["output"] for r in recs) / makespan,
            "hit": sum(r["cached"] for r in recs) / sum(r["prompt"] for r in recs)}


def predict(recs: list[dict], system_tokens: int, cost, replicas: int, policy: str) -> dict:
    """The simulator on the same trace: the measured send times and lengths, the system prompt shared."""
    trace = [TraceRequest(r["arrival"], r["prompt"], r["output"], 0, r["system"], system_tokens) for r in recs]
    config = EngineConfig(max_num_batched_tokens=256, max_model_len=2048)
    fleet = simulate(config, 1024, trace, cost, replicas, policy)
    done = fleet.records
    makespan = max(fin for *_, fin, _ in done) - min(arr for _, arr, *_ in done)
    queries = sum(rep.block_manager.prefix_queries for rep in fleet.replicas)
    return {"ttft_p50": pct([first - arr for _, arr, _, first, _, _ in done], 50),
            "tok_s": sum(n for *_, n in done) / makespan,
            "hit": sum(rep.block_manager.prefix_hits for rep in fleet.replicas) / queries}


def main() -> None:
    a = parse_args(__doc__, options)
    if shutil.which("redis-server") is None:
        sys.exit("this experiment needs redis-server (apt-get install redis-server)")
    systems, turns, starts = workload(a)
    eng = engine(num_kv_blocks=1024, max_num_batched_tokens=256, max_model_len=2048, num_threads=1)
    cost, steps, _ = calibrate(eng)
    system_tokens = len(eng.tokenizer.encode(systems[0]))
    del eng
    results: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def measure(name: str, build) -> None:
            with ExitStack() as stack:
                url = build(Fleet(stack, tmp))
                records[name] = drive(url, a, systems, turns, starts)
                results[name] = summary(records[name])
            print(name, {k: round(v, 3) for k, v in results[name].items()}, file=sys.stderr)

        measure("1 instance", lambda f: f.serve())

        def pd(f: Fleet) -> str:
            kv = {"kv_connector": "RedisConnector", "kv_connector_extra_config": {"url": f.redis()}}
            p, d = f.serve({**kv, "kv_role": "kv_producer"}), f.serve({**kv, "kv_role": "kv_consumer"})
            return f.router("--prefill", p, "--decode", d)
        measure("P/D (1 prefill + 1 decode)", pd)
        for policy in ("round_robin", "least_loaded", "prefix"):
            measure(f"2 instances, {policy}", lambda f, p=policy: f.router(
                "--policy", p, "--backend", f.serve(), "--backend", f.serve()))

        def shared(f: Fleet) -> str:
            kv = {"kv_connector": "RedisConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"url": f.redis()}}
            return f.router("--policy", "round_robin", "--backend", f.serve(kv), "--backend", f.serve(kv))
        measure("2 instances, round_robin, shared Redis pool", shared)

    sim_rows, sims = [], {}
    for name, replicas, policy in (("1 instance", 1, "round_robin"), ("2 instances, round_robin", 2, "round_robin"),
                                   ("2 instances, least_loaded", 2, "least_loaded"),
                                   ("2 instances, prefix", 2, "prefix")):
        sims[name] = sim = predict(records[name], system_tokens, cost, replicas, policy)
        real = results[name]
        sim_rows.append([name, f"{real['tok_s']:.1f}", f"{sim['tok_s']:.1f}",
                         f"{sim['tok_s'] / real['tok_s'] - 1:+.0%}",
                         f"{real['ttft_p50']:.3f}", f"{sim['ttft_p50']:.3f}",
                         f"{sim['ttft_p50'] / real['ttft_p50'] - 1:+.0%}", f"{real['hit']:.0%}", f"{sim['hit']:.0%}"])
    rows = [[name, f"{r['ttft_p50']:.3f}", f"{r['ttft_p90']:.3f}", f"{r['itl_p50'] * 1e3:.0f}",
             f"{r['itl_p90'] * 1e3:.0f}", f"{r['itl_p99'] * 1e3:.0f}", f"{r['tok_s']:.1f}", f"{r['hit']:.0%}"]
            for name, r in results.items()]
    n = len(records["1 instance"])
    setup = (f"{a.conversations} conversations x {a.turns} turns ({n} requests), two shared system prompts of "
             f"{system_tokens} tokens, {a.max_tokens} output tokens a turn (greedy, ignore_eos), conversations "
             f"started at {a.rate}/s (Poisson), each turn sent when the previous answer is in. Every instance: the "
             f"embedded SmolLM2-135M in float32, one thread, 1,024 KV blocks, steps of up to 256 tokens. All "
             f"processes (instances, router, Redis, client) on this machine, over loopback.")
    sim_note = (f"The simulator replays each run's own trace (measured send times, prompt and output lengths), with "
                f"a cost model calibrated in this run on {steps} timed steps. It knows only the system prompt as a "
                f"shared prefix, not each conversation's earlier turns, so it under-predicts the hit rate of "
                f"multi-turn chat; and it does not model the processes sharing cores, nor HTTP and streaming.")
    fig, axes = figure(2, 5.5)
    ax1, ax2 = axes[0]
    names = list(results)
    rows_at = range(len(names))
    ax1.barh([y - 0.2 for y in rows_at], [results[k]["ttft_p50"] for k in names], 0.4, label="TTFT p50")
    ax1.barh([y + 0.2 for y in rows_at], [results[k]["itl_p99"] for k in names], 0.4, label="ITL p99")
    ax1.set_yticks(list(rows_at), names)
    ax1.set_xlabel("seconds")
    ax1.legend()
    ax1.invert_yaxis()
    ax2.barh(names, [results[k]["hit"] * 100 for k in names])
    ax2.set_xlabel("prefix-hit rate, % of prompt tokens")
    ax2.invert_yaxis()
    ax2.set_yticks([])
    write(a.out, "disaggregation", "Experiment 10: P/D disaggregation, router policies, a shared KV pool", [
        setup,
        table(["configuration", "TTFT p50 s", "TTFT p90 s", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "output tok/s",
               "prefix hits"], rows),
        "Measured against the simulator's prediction for the same trace:",
        table(["configuration", "tok/s", "sim tok/s", "off by", "TTFT p50 s", "sim TTFT p50 s", "off by",
               "hits", "sim hits"], sim_rows),
        sim_note], fig)


if __name__ == "__main__":
    main()
