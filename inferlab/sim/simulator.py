"""The simulator: the engine's own Scheduler, policies and BlockManager, driven by a runner that
advances a virtual clock by the cost model instead of running the model. Every output token is a
dummy, so requests run to their max_tokens (like the benchmarks' ignore_eos)."""
from __future__ import annotations

import gc
import json
import random
from dataclasses import dataclass

from inferlab.block_manager import BlockManager
from inferlab.config import EngineConfig
from inferlab.policy import make_queue
from inferlab.request import Request, RequestStatus
from inferlab.sampling_params import SamplingParams
from inferlab.scheduler import Scheduler
from inferlab.sim.cost_model import CostModel

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
    # A shared prefix is the same tokens for the same id; the rest is unique to the request (ids
    # need not be in any vocabulary: only the prefix cache's hashes read them).
    head = list(range(-(t.prefix_id + 1) << 32, (-(t.prefix_id + 1) << 32) + min(t.prefix_len, t.prompt_len))) \
        if t.prefix_id is not None else []
    start = (i + 1) << 32
    return head + list(range(start, start + t.prompt_len - len(head)))


def simulate(config: EngineConfig, num_blocks: int, trace: list[TraceRequest], cost: CostModel) -> dict:
    # Nothing here makes reference cycles, and the cycle collector's passes over a backlog of
    # tens of thousands of waiting requests would cost a fifth of the run.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(config, num_blocks, trace, cost)
    finally:
        if enabled:
            gc.enable()


def _simulate(config: EngineConfig, num_blocks: int, trace: list[TraceRequest], cost: CostModel) -> dict:
    clock = VirtualClock()
    bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    sched = Scheduler(config, bm, make_queue(config.scheduling_policy, config.sjf_aging_rate), clock)
    limit = min(config.max_model_len or 1 << 30, num_blocks * config.block_size)
    done: list[tuple[float, float, float, float, int]] = []  # arrival, scheduled, first token, finish, tokens
    rejected, peak_usage, steps, next_i = 0, 0.0, 0, 0
    output_tokens = 0
    base, per_prefill, per_decode, per_context = cost.base, cost.per_prefill_token, cost.per_decode_seq, \
        cost.per_context_token
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
        # One pass does what StepFeatures.of, the runner and the stop check would do separately.
        prefill = decodes = context = 0
        sampled: dict[str, int] = {}
        finishing = []
        for req, n in out.scheduled:
            end = req.num_computed_tokens + n
            context += end
            num_prompt = len(req.prompt_token_ids)
            if n == 1 and end > num_prompt:
                decodes += 1
            else:
                prefill += n
            if end == len(req.token_ids):  # the chunk reaches the last token: one is sampled
                sampled[req.request_id] = 0
                if end + 1 - num_prompt >= req.max_tokens:
                    finishing.append(req)
        clock.now += base + per_prefill * prefill + per_decode * decodes + per_context * context
        steps += 1
        usage = bm.usage
        if usage > peak_usage:
            peak_usage = usage
        sched.update_from_output(out, sampled)
        now = clock.now
        for req in finishing:
            output_tokens += req.num_output_tokens
            sched.finish_request(req, RequestStatus.FINISHED_LENGTH)
            done.append((req.arrival_time, req.first_scheduled_time, req.first_token_time, now, req.max_tokens))
    return summarize(done, rejected, clock.now, steps, sched.num_preemptions, peak_usage, output_tokens)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(done: list[tuple[float, float, float, float, int]], rejected: int, makespan: float, steps: int,
              preemptions: int, peak_usage: float, output_tokens: int) -> dict:
    """`done` holds (arrival, first scheduled, first token, finish, output tokens) per request."""
    ttft = [first - arrival for arrival, _, first, _, _ in done]
    queue = [scheduled - arrival for arrival, scheduled, _, _, _ in done]
    e2e = [finish - arrival for arrival, _, _, finish, _ in done]
    tpot = [(finish - first) / (n - 1) for _, _, first, finish, n in done if n > 1]
    result = {"completed": len(done), "rejected": rejected, "makespan_s": round(makespan, 3), "steps": steps,
              "output_tok_s": round(output_tokens / makespan, 2) if makespan else 0.0,
              "preemptions": preemptions, "peak_kv_usage": round(peak_usage, 4),
              "longest_wait_s": round(max(queue, default=0.0), 3)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e), ("queue", queue)):
        for q in (50, 90, 99):
            result[f"{name}_s_p{q}"] = round(_pct(values, q / 100), 4)
    return result
