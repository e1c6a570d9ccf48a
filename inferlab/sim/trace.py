"""Traces for the simulator: generated (Poisson or bursty arrivals, uniform lengths) or read from JSONL."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class TraceRequest:
    arrival: float  # seconds from the start
    prompt_len: int
    output_len: int
    priority: int = 0
    prefix_id: int | None = None  # requests with the same id share a prefix of `prefix_len` tokens
    prefix_len: int = 0


def make_trace(num_requests: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
               seed: int = 0, burst: int = 1, shared_prefix: tuple[int, int] | None = None,
               priorities: int = 1) -> list[TraceRequest]:
    """Poisson arrivals at `rate` req/s (all at t=0 if rate is inf), in bursts of `burst`
    requests; lengths uniform in the given ranges; optionally a shared prefix (count, length)."""
    rng = random.Random(seed)
    trace, t = [], 0.0
    for i in range(num_requests):
        if i % burst == 0 and rate != float("inf"):
            t += rng.expovariate(rate / burst)
        prefix = (rng.randrange(shared_prefix[0]), shared_prefix[1]) if shared_prefix else (None, 0)
        trace.append(TraceRequest(t, rng.randint(*prompt_len), rng.randint(*output_len),
                                  rng.randrange(priorities), *prefix))
    return trace


def load_trace(path: str) -> list[TraceRequest]:
    """JSONL: one object a line with arrival, prompt_len, output_len, and optionally priority,
    prefix_id, prefix_len."""
    try:
        with open(path) as f:
            trace = [TraceRequest(**json.loads(line)) for line in f if line.strip()]
    except (OSError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read trace {path}: {e}") from None
    return sorted(trace, key=lambda r: r.arrival)


def save_trace(trace: list[TraceRequest], path: str) -> None:
    with open(path, "w") as f:
        for t in trace:
            f.write(json.dumps(vars(t)) + "\n")


def prompt_tokens(i: int, t: TraceRequest) -> list[int]:
    """Token ids for trace request `i`: a shared prefix is the same ids for the same prefix id,
    the rest unique to the request (ids need not be in a vocabulary: only the prefix cache's
    hashes read them)."""
    head: list[int] = []
    if t.prefix_id is not None:
        base = -(t.prefix_id + 1) << 32
        head = list(range(base, base + min(t.prefix_len, t.prompt_len)))
    start = (i + 1) << 32
    return head + list(range(start, start + t.prompt_len - len(head)))
