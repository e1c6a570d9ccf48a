"""Experiment 2: FCFS vs SJF vs SJF+aging vs priority — queue time, and starvation of a long job.

Claim tested: "SJF beats FCFS on waiting time but starves long jobs". A stream of short jobs
keeps the engine busy while a few long jobs arrive among them; the long jobs are given the
lowest priority, so `priority` treats them as SJF does. Measured on the real engine (small trace,
wall clock) and on the simulator at scale (same shape, many more requests).
"""
from __future__ import annotations

import sys

from common import engine, figure, parse_args, replay, stats, table, write

from inferlab.config import EngineConfig
from inferlab.policy import resolve_policy
from inferlab.sim.cost_model import DEFAULT
from inferlab.sim.simulator import TraceRequest, make_trace, run

AGING = 100.0  # tokens of work forgiven per second of waiting, for SJF+aging
POLICIES = [("FCFS", "fcfs", 0.0), ("SJF", "sjf", 0.0), ("SJF+aging", "sjf", AGING), ("priority", "priority", 0.0)]


def shorts_and_longs(num_short: int, rate: float, long_every: int, long_len: tuple[int, int],
                     seed: int) -> tuple[list[TraceRequest], set[int]]:
    """Poisson short jobs; every `long_every`-th request is a long one at priority 1 (lower)."""
    trace = make_trace(num_short, rate, (24, 64), (4, 16), seed=seed)
    longs = set(range(1, len(trace), long_every))
    for i in longs:
        trace[i].prompt_len, trace[i].output_len, trace[i].priority = long_len[0], long_len[1], 1
    return trace, longs


def short_job_rate(smoke: bool) -> float:
    """Short jobs a second the engine serves with 2 running at once, measured now: the engine
    trace's arrival rate is set from it, so the load is the same whatever else slows the machine."""
    trace = make_trace(4 if smoke else 12, float("inf"), (24, 64), (4, 16), seed=9)
    records, makespan = replay(engine(num_kv_blocks=512, max_num_seqs=2), trace)
    return len(records) / makespan


def row(where: str, label: str, records, makespan: float, longs: set[int]) -> list:
    s = stats(records, makespan)
    long_wait = max((r[2] - r[1] for r in records if r[0] in longs), default=0.0)
    short = [r[2] - r[1] for r in records if r[0] not in longs]
    return [where, label, s["requests"], sum(short) / len(short), s["queue_mean"], s["queue_p99"], long_wait]


def main() -> None:
    a = parse_args(__doc__, lambda p: p.add_argument(
        "--policy", action="append", default=[], metavar="SPEC",
        help="also compare a policy of your own, module:Class or file.py:Class (repeatable)"))
    for spec in a.policy:  # before minutes of replays, as every command that takes a policy checks it
        try:
            resolve_policy(spec)
        except ValueError as e:
            print(f"error: --policy: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    # labelled file:Class, not by the class alone: a class named FCFS must not take the built-in's row
    policies = POLICIES + [(spec.rpartition("/")[2], spec, 0.0) for spec in a.policy]
    rows = []
    # real engine: up to 2 running at once, short jobs at 70% of what it serves, for 60 s
    capacity = short_job_rate(a.smoke)
    rate, count, long_len = (3 * capacity, 12, (48, 24)) if a.smoke else \
        (0.7 * capacity, round(42 * capacity), (256, 64))  # 42 = 0.7 * 60 s
    real_trace, real_longs = shorts_and_longs(count, rate, 25, long_len, 1)
    for label, policy, aging in policies:
        eng = engine(num_kv_blocks=512, max_num_seqs=2, scheduling_policy=policy, sjf_aging_rate=aging)
        records, makespan = replay(eng, real_trace)
        rows.append(row("engine", label, records, makespan, real_longs))
    # simulator at scale: the same shape, most of the engine's capacity taken by short jobs
    n = 500 if a.smoke else 40000
    sim_trace, sim_longs = shorts_and_longs(n, 5.5, 200, (512, 512), 2)
    for label, policy, aging in policies:
        config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=1024, scheduling_policy=policy,
                              sjf_aging_rate=aging)
        fleet = run(config, 4096, sim_trace, DEFAULT)
        rows.append(row("simulator", label, fleet.records, max(r.clock.now for r in fleet.replicas), sim_longs))
    fig, axes = figure(2, 5.0)
    for ax, where in zip(axes[0], ["engine", "simulator"]):
        mine = [r for r in rows if r[0] == where]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r[3] for r in mine], 0.4, label="mean queue, short jobs")
        ax.bar([x + 0.2 for x in xs], [r[6] for r in mine], 0.4, label="longest wait of a long job")
        ax.set_xticks(list(xs), [r[1] for r in mine])
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"{where} ({mine[0][2]:,} requests)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    sim = {r[1]: r for r in rows if r[0] == "simulator"}
    eng = {r[1]: r for r in rows if r[0] == "engine"}
    text = (f"On the engine ({capacity:.2f} short jobs/s measured, offered {rate:.2f}/s), SJF gives the short jobs a "
            f"mean queue of {eng['SJF'][3]:.2f} s against {eng['FCFS'][3]:.2f} s for FCFS; a long job's longest wait "
            f"is {eng['SJF'][6]:.1f} s under SJF, {eng['SJF+aging'][6]:.1f} s with aging and {eng['FCFS'][6]:.1f} s "
            "under FCFS. "
            f"In the simulator, SJF cuts the short jobs' mean queue time from {sim['FCFS'][3]:.2f} s (FCFS) to "
            f"{sim['SJF'][3]:.2f} s, while a long job waits up to {sim['SJF'][6]:.0f} s instead of "
            f"{sim['FCFS'][6]:.1f} s; with aging ({AGING:.0f} tokens/s) the long job's worst wait is "
            f"{sim['SJF+aging'][6]:.1f} s and the short jobs' mean queue {sim['SJF+aging'][3]:.2f} s. Priority "
            f"(long jobs lower) behaves like SJF without aging: worst long wait {sim['priority'][6]:.0f} s.")
    write(a.out, "policies", "Scheduling policies: waiting time and starvation",
          ["Short jobs: prompt 24-64, output 4-16 tokens, Poisson. Long jobs (every 25th on the engine, 200th in "
           "the simulator): priority 1, prompt/output "
           f"{real_trace[1].prompt_len}/{real_trace[1].output_len} on the engine, 512/512 in the simulator. "
           "Engine: embedded model, max_num_seqs 2. Simulator: built-in cost model, max_num_seqs 8.",
           table(["where", "policy", "requests", "mean queue, short (s)", "mean queue, all (s)", "p99 queue (s)",
                  "longest wait, long job (s)"], rows), text], fig)


if __name__ == "__main__":
    main()
