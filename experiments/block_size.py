"""Experiment 6: block size sweep — KV waste, prefix-cache hit rate and speed.

Small blocks waste less (only the last block of a request is partly empty) and share more of a
prefix (only whole blocks are cached), but mean longer block tables and more, smaller gathers.
Waste comes from the real BlockManager on the `cpu` workload's lengths (as in experiment 1); hit
rate from the simulator on a trace whose 300-token system prompt is not a multiple of the block
size; speed from the real engine on the `small` workload (all at once).
"""
from __future__ import annotations

from common import engine, figure, parse_args, replay, stats, table, write
from kv_waste import paged

from inferlab.bench import make_workload
from inferlab.config import EngineConfig
from inferlab.sim.cost_model import DEFAULT
from inferlab.sim.simulator import TraceRequest, make_trace, run, summarize

POOL_TOKENS = 16384


def main() -> None:
    a = parse_args(__doc__)
    sizes = [4, 16, 64] if a.smoke else [1, 4, 8, 16, 32, 64, 128]
    timed = {16, 64} if a.smoke else {4, 16, 64, 128}
    lengths = [(len(r["prompt_token_ids"]), r["max_tokens"]) for r in make_workload("cpu")["requests"]]
    sim_trace = make_trace(200 if a.smoke else 3000, 1.0, (320, 400), (8, 32), seed=7, shared_prefix=(4, 300))
    work = make_workload("small")["requests"][:4 if a.smoke else 16]
    trace = [TraceRequest(0.0, len(r["prompt_token_ids"]), r["max_tokens"] // (8 if a.smoke else 1)) for r in work]
    rows = []
    for bs in sizes:
        used, reserved, _ = paged(lengths, bs)
        config = EngineConfig(block_size=bs, max_num_seqs=64)
        hit = summarize(run(config, POOL_TOKENS // bs, sim_trace, DEFAULT))["prefix_hit_rate"]
        speed = ""
        if bs in timed:
            eng = engine(num_kv_blocks=POOL_TOKENS // bs, block_size=bs)
            records, makespan = replay(eng, trace, [r["prompt_token_ids"] for r in work])
            speed = stats(records, makespan)["output_tok_s"]
        rows.append([bs, f"{100 * (1 - used / reserved):.1f}%", f"{100 * hit:.1f}%", speed])
    fig, axes = figure(3, 3.6)
    ax_w, ax_h, ax_s = axes[0]
    ax_w.plot(sizes, [float(r[1][:-1]) for r in rows], "o-")
    ax_w.set_ylabel("KV waste (%)")
    ax_h.plot(sizes, [float(r[2][:-1]) for r in rows], "o-", color="tab:green")
    ax_h.set_ylabel("prefix hit rate (%)")
    timed_rows = [r for r in rows if r[3] != ""]
    ax_s.plot([r[0] for r in timed_rows], [r[3] for r in timed_rows], "o-", color="tab:red")
    ax_s.set_ylabel("engine output tok/s")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens)")
    best = max(timed_rows, key=lambda r: r[3])
    text = (f"Waste grows from {rows[0][1]} at block size {rows[0][0]} to {rows[-1][1]} at {rows[-1][0]}, and the "
            f"prefix hit rate falls from {rows[0][2]} to {rows[-1][2]} (a 300-token prompt shares only its whole "
            f"blocks). The engine was fastest at block size {best[0]} ({best[3]:.0f} output tok/s) of "
            f"{sorted(timed)}; the default, 16, sits where waste and hit rate are still within a few percent "
            "of the smallest blocks.")
    write(a.out, "block_size", "Block size: waste, prefix hit rate and speed",
          [f"Pool: {POOL_TOKENS:,} token slots at every block size. Hit rate: {len(sim_trace):,} simulated "
           "requests, 4 system prompts of 300 tokens, prompts 320-400. Speed: the `small` workload "
           f"({len(trace)} requests at once) on the embedded model.",
           table(["block size", "KV waste", "prefix hit rate", "engine output tok/s"], rows), text], fig)


if __name__ == "__main__":
    main()
