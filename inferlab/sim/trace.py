"""Traces for the simulator: generated (Poisson or bursty arrivals, uniform lengths) or read from JSONL."""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, replace


@dataclass
class TraceRequest:
    arrival: float  # seconds from the start
    prompt_len: int
    output_len: int
    priority: int = 0
    prefix_id: int | None = None  # requests with the same id share a prefix of `prefix_len` tokens
    prefix_len: int = 0
    # the cap the client sent, which is what a policy sees (sjf's work left); the answer still ends
    # after output_len tokens (its EOS). None: the cap is output_len, the answer's length known exactly
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        # a trace file is typed by hand: a string or a float where a count belongs, or an empty
        # prompt, would fail deep in the simulator or be replayed as a request no engine accepts
        for name in ("prompt_len", "output_len", "priority", "prefix_len"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.prefix_id is not None and not (is_int(self.prefix_id) and self.prefix_id >= 0):
            # (a negative id's tokens were another request's own: cache hits that no prompt shares)
            raise ValueError(f"prefix_id must be an integer >= 0 or null, got {self.prefix_id!r}")
        number = isinstance(self.arrival, (int, float)) and not isinstance(self.arrival, bool)
        if not (number and 0 <= self.arrival <= sys.float_info.max):  # not NaN, inf, or an integer no float holds
            raise ValueError(f"arrival must be a number of seconds >= 0, got {self.arrival!r}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"prompt_len and output_len must be at least 1, got {self.prompt_len} and "
                             f"{self.output_len}")
        if self.max_tokens is not None and not (is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or null, got {self.max_tokens!r}")
        if not 0 <= self.prefix_len <= self.prompt_len:
            raise ValueError(f"prefix_len must be between 0 and prompt_len ({self.prompt_len}), got {self.prefix_len}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


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
        prefix_id = rng.randrange(shared_prefix[0]) if shared_prefix else None
        n_prompt = rng.randint(*prompt_len)
        # a shared prefix longer than the prompt is the whole prompt
        prefix_len = min(shared_prefix[1], n_prompt) if shared_prefix else 0
        trace.append(TraceRequest(t, n_prompt, rng.randint(*output_len), rng.randrange(priorities), prefix_id,
                                  prefix_len))
    return trace


def load_trace(path: str) -> list[TraceRequest]:
    """JSONL: one object a line with arrival, prompt_len, output_len, and optionally priority,
    prefix_id, prefix_len, max_tokens; ValueError naming the file and line of anything else. Arrivals are made
    relative to the first one."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read trace {path}: {e}") from None
    trace = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if not isinstance(fields, dict):
                raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
            if fields.get("type") in ("header", "frame"):
                raise ValueError(f"{path} is a dashboard recording (--record), not a trace of requests: "
                                 f"`inferlab scope --replay {path}` plays it")
            missing = [k for k in ("arrival", "prompt_len", "output_len") if k not in fields]
            unknown = sorted(set(fields) - set(TraceRequest.__dataclass_fields__))
            if missing or unknown:  # said by name, not as TraceRequest.__init__()'s TypeError
                raise ValueError("; ".join([f"missing {', '.join(missing)}"] * bool(missing) +
                                           [f"unknown field {', '.join(unknown)}"] * bool(unknown)) +
                                 " (a request has arrival, prompt_len, output_len, and optionally priority, "
                                 "prefix_id, prefix_len, max_tokens)")
            trace.append(TraceRequest(**fields))
        except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"cannot read trace {path}: line {i}: {e}") from None
    if not trace:
        raise ValueError(f"trace {path} holds no requests")
    # the run starts at the first arrival: a trace of wall-clock times (1.7e9 s) would count the idle
    # seconds before it in the makespan and divide the throughput by them
    start = min(r.arrival for r in trace)
    return sorted((replace(r, arrival=r.arrival - start) for r in trace), key=lambda r: r.arrival)


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
