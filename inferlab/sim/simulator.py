"""The simulator: replays a trace on one or more Replicas (the engine's own Scheduler, policies
and BlockManager on virtual clocks) behind a router, in arrival and step order, and sums it up."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

from inferlab.config import EngineConfig
from inferlab.sim.cost_model import CostModel
from inferlab.sim.replica import Record, Replica
from inferlab.sim.router import make_router, prefix_of
from inferlab.sim.trace import TraceRequest, load_trace, make_trace

__all__ = ["Fleet", "TraceRequest", "load_trace", "make_trace", "run", "simulate", "summarize"]


@dataclass
class Fleet:
    """What a replay leaves: the replicas (their schedulers and pools) and the refused requests."""
    replicas: list[Replica]
    rejected: int = 0
    records: list[Record] = field(default_factory=list)  # every finished request, in finish order


def run(config: EngineConfig, num_blocks: int, trace: list[TraceRequest], cost: CostModel,
        replicas: int = 1, router: str = "round_robin") -> Fleet:
    """Replay `trace` (sorted by arrival). Events are taken in time order: an arrival is routed
    before any step that starts at or after it; otherwise the replica whose next step starts
    first runs that step. A prompt that fills the context or a replica's pool is rejected, and so
    is one the replica refuses (kv_allocation="reserve": out of KV memory); an output past what is
    left is cut to fit, as the engine's max_tokens is, and the request completes."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    route = make_router(router)
    fleet = Fleet([Replica(config, num_blocks, cost) for _ in range(replicas)])
    limit = min(config.max_model_len or 1 << 30, num_blocks * config.block_size)
    # Nothing here makes reference cycles, and the cycle collector's passes over a backlog of
    # tens of thousands of waiting requests would cost a fifth of a long replay.
    enabled = gc.isenabled()
    gc.disable()
    try:
        i = 0
        only = fleet.replicas[0] if replicas == 1 else None
        while True:
            if only is not None:  # one replica: no search for the next one
                nxt = only if only.busy else None
            else:
                nxt = min((r for r in fleet.replicas if r.busy), key=lambda r: r.clock.now, default=None)
            if i < len(trace) and (nxt is None or trace[i].arrival <= nxt.clock.now):
                t = trace[i]
                if t.prompt_len >= limit or not fleet.replicas[route.choose(prefix_of(t), fleet.replicas)].add(
                        i, t, min(t.max_tokens or t.output_len, limit - t.prompt_len)):
                    fleet.rejected += 1
                i += 1
            elif nxt is not None:
                nxt.step()
            else:
                break
    finally:
        if enabled:
            gc.enable()
    fleet.records = sorted((r for rep in fleet.replicas for r in rep.done), key=lambda r: r[4])
    return fleet


def simulate(config: EngineConfig, num_blocks: int, trace: list[TraceRequest], cost: CostModel,
             replicas: int = 1, router: str = "round_robin") -> dict:
    return summarize(run(config, num_blocks, trace, cost, replicas, router))


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile, rounded; None when no request gave a value (not 0.0, which reads as instant)."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def summarize(fleet: Fleet) -> dict:
    reps, done = fleet.replicas, fleet.records
    makespan = max(r.clock.now for r in reps)
    output_tokens = sum(r.output_tokens for r in reps)
    queries = sum(r.block_manager.prefix_queries for r in reps)
    ttft = [first - arrival for _, arrival, _, first, _, _ in done]
    queue = [scheduled - arrival for _, arrival, scheduled, _, _, _ in done]
    e2e = [finish - arrival for _, arrival, _, _, finish, _ in done]
    tpot = [(finish - first) / (n - 1) for _, _, _, first, finish, n in done if n > 1]
    result = {"completed": len(done), "rejected": fleet.rejected, "makespan_s": round(makespan, 3),
              "steps": sum(r.steps for r in reps),
              "output_tok_s": round(output_tokens / makespan, 2) if makespan else 0.0,
              "preemptions": sum(r.scheduler.num_preemptions for r in reps),
              "peak_kv_usage": round(max(r.peak_usage for r in reps), 4),
              "prefill_tokens": sum(r.prefill_tokens for r in reps),
              "swapped_blocks": sum(r.swapped_blocks for r in reps),
              "prefix_hit_rate": round(sum(r.block_manager.prefix_hits for r in reps) / queries, 4) if queries else 0.0,
              "longest_wait_s": _pct(queue, 1.0)}  # rounded as the percentiles: p99 <= it
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e), ("queue", queue)):
        for q in (50, 90, 99):
            result[f"{name}_s_p{q}"] = _pct(values, q / 100)
    return result
