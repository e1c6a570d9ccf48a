"""The simulator: the engine's own Scheduler, policies and BlockManager, driven by a runner that
advances a virtual clock by the cost model instead of running the model. Every output token is a
dummy, so requests run to their max_tokens (like the benchmarks' ignore_eos)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from inferlab.block_manager import BlockManager
from inferlab.config import EngineConfig
from inferlab.policy import make_queue
from inferlab.request import Request, RequestStatus
from inferlab.sampling_params import SamplingParams
from inferlab.scheduler import Scheduler
from inferlab.sim.cost_model import CostModel, StepFeatures

_PARAMS = SamplingParams(max_tokens=None)


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


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tokens(i: int, t: TraceRequest) -> list[int]:
    # a shared prefix is the same tokens for the same id; the rest is unique to the request
    head = [(t.prefix_id * 7919 + k) % 30000 + 1 for k in range(min(t.prefix_len, t.prompt_len))] \
        if t.prefix_id is not None else []
    return head + [(i * 104729 + k * 31) % 30000 + 1 for k in range(t.prompt_len - len(head))]


def simulate(config: EngineConfig, num_blocks: int, trace: list[TraceRequest], cost: CostModel) -> dict:
    clock = VirtualClock()
    bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    sched = Scheduler(config, bm, make_queue(config.scheduling_policy, config.sjf_aging_rate), clock)
    limit = min(config.max_model_len or 1 << 30, num_blocks * config.block_size)
    done: list[Request] = []
    rejected, peak_usage, steps, next_i = 0, 0.0, 0, 0
    output_tokens = 0
    while next_i < len(trace) or sched.has_unfinished():
        if not sched.has_unfinished() and clock.now < trace[next_i].arrival:
            clock.now = trace[next_i].arrival  # idle: jump to the next arrival
        while next_i < len(trace) and trace[next_i].arrival <= clock.now:
            t = trace[next_i]
            if t.prompt_len >= limit:
                rejected += 1
            else:
                req = Request(f"sim-{next_i}", _tokens(next_i, t), _PARAMS, t.arrival,
                              max_tokens=min(t.output_len, limit - t.prompt_len), priority=t.priority)
                sched.add_request(req)
            next_i += 1
        out = sched.schedule()
        if not out.scheduled:
            raise RuntimeError("scheduler made no progress")  # cannot happen: a lone request always fits
        clock.now += cost.step_time(StepFeatures.of(out.scheduled))
        steps += 1
        peak_usage = max(peak_usage, bm.usage)
        sampled = {r.request_id: 0 for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
        sched.update_from_output(out, sampled)
        for req, _ in out.scheduled:
            if req.request_id in sampled and req.status is RequestStatus.RUNNING and \
                    req.num_output_tokens >= req.max_tokens:
                req.finish_time = clock.now
                output_tokens += req.num_output_tokens
                sched.finish_request(req, RequestStatus.FINISHED_LENGTH)
                req.token_ids = []  # keep memory flat over 100k requests
                done.append(req)
    return summarize(done, rejected, clock.now, steps, sched.num_preemptions, peak_usage, output_tokens)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(done: list[Request], rejected: int, makespan: float, steps: int, preemptions: int,
              peak_usage: float, output_tokens: int) -> dict:
    ttft = [r.first_token_time - r.arrival_time for r in done]
    queue = [r.first_scheduled_time - r.arrival_time for r in done]
    e2e = [r.finish_time - r.arrival_time for r in done]
    tpot = [(r.finish_time - r.first_token_time) / (r.max_tokens - 1) for r in done if r.max_tokens > 1]
    result = {"completed": len(done), "rejected": rejected, "makespan_s": round(makespan, 3), "steps": steps,
              "output_tok_s": round(output_tokens / makespan, 2) if makespan else 0.0,
              "preemptions": preemptions, "peak_kv_usage": round(peak_usage, 4),
              "longest_wait_s": round(max(queue, default=0.0), 3)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e), ("queue", queue)):
        for q in (50, 90, 99):
            result[f"{name}_s_p{q}"] = round(_pct(values, q / 100), 4)
    return result
