"""Experiment 8: preemption by swap or by recompute — which wins, and when.

Claim tested: "swapping a preempted request's KV to host memory is cheaper than recomputing it"
(vLLM v0 swapped; v1 only recomputes). A swap costs bytes: the request's K/V copied out and back,
`kv_bytes_per_token` each way at the copy's bandwidth. A recompute costs FLOPs: its tokens
through the model again, at the cost of a prefill token, minus whatever the prefix cache still
holds of it. The ratio r = swap seconds / recompute seconds per token decides, and the prefix
cache can make recompute nearly free. Measured here: both costs on this machine, the real engine
under a tight pool in both modes (prefix cache on and off), and the simulator across r.
"""
from __future__ import annotations

import dataclasses
import math
import time

from common import engine, figure, parse_args, replay, stats, table, write

from inferlab.bench import make_workload
from inferlab.config import EngineConfig
from inferlab.sampling_params import SamplingParams
from inferlab.sim.calibrate import swap_cost
from inferlab.sim.cost_model import DEFAULT
from inferlab.sim.simulator import TraceRequest, make_trace, run, summarize

RATIOS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
SIM_BLOCKS = 128  # 2,048 slots for prompts of 64-512 and outputs of 16-256: preemption all along


def crossover(ratios: list[float], gains: list[float]) -> float | None:
    """The r where swap's gain (recompute / swap) crosses 1, interpolated in log r; None if it never does."""
    for (r0, g0), (r1, g1) in zip(zip(ratios, gains), zip(ratios[1:], gains[1:])):
        if g0 >= 1 > g1:
            return 10 ** (math.log10(r0) + (g0 - 1) / (g0 - g1) * (math.log10(r1) - math.log10(r0)))
    return None


def prefill_seconds_per_token(eng, tokens: int) -> float:
    """One fresh prefill of `tokens` tokens, best of 3, per token (nothing cached)."""
    best = float("inf")
    for k in range(3):
        eng.add_request(f"prefill-{k}", {"prompt_token_ids": [100 + (7 * i + k) % 5000 for i in range(tokens)]},
                        SamplingParams(max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        eng.step()
        best = min(best, time.perf_counter() - start)
    return best / tokens


def timed_copies(eng) -> list[float]:
    """Wrap the engine's host pool so the seconds spent copying blocks are counted."""
    spent, copy = [0.0], eng.host_pool.copy

    def timed(swap_out, swap_in):
        start = time.perf_counter()
        copy(swap_out, swap_in)
        spent[0] += time.perf_counter() - start
    eng.host_pool.copy = timed
    return spent


def fmt(r: float | None) -> str:
    return "never, in the range tried" if r is None else f"{r:.2g}"


def main() -> None:
    a = parse_args(__doc__)
    rows = []
    # 1. the two costs per token on this machine, with the embedded model
    eng = engine(num_kv_blocks=512, enable_prefix_caching=False)
    swap = swap_cost(eng)
    swap_token = 2 * swap["per_swap_byte"] * swap["kv_bytes_per_token"]
    prefill_token = prefill_seconds_per_token(eng, 64 if a.smoke else 256)
    measured_r = swap_token / prefill_token
    # 2. the real engine, a pool of a few requests' worth, every request at once
    work = make_workload("small")["requests"][:4 if a.smoke else 8]
    trace = [TraceRequest(0.0, len(r["prompt_token_ids"]), 24 if a.smoke else 48) for r in work]
    prompts = [r["prompt_token_ids"] for r in work]
    blocks = 28
    for caching in (True, False):
        for mode in ("recompute", "swap"):
            eng = engine(num_kv_blocks=blocks, preemption_mode=mode, enable_prefix_caching=caching)
            copying = timed_copies(eng)
            records, makespan = replay(eng, trace, prompts)
            s, snap = stats(records, makespan), eng.snapshot()
            rows.append(["engine", f"{blocks * 16}", "on" if caching else "off", mode, "-",
                         eng.scheduler.num_preemptions, eng.num_prompt_tokens, snap.get("swapped_out", 0),
                         round(copying[0], 3), round(makespan, 2), s["output_tok_s"]])
    # 3. the simulator: the same pressure at scale, across the cost ratio r
    sim_trace = make_trace(100 if a.smoke else 2000, 0.6, (64, 512), (16, 256), seed=8)
    ratios = [RATIOS[0], 1.0, RATIOS[-1]] if a.smoke else RATIOS
    sim = {}
    for caching in (True, False):
        for r in ratios:
            cost = dataclasses.replace(DEFAULT, per_swap_byte=r * DEFAULT.per_prefill_token
                                       / (2 * DEFAULT.kv_bytes_per_token))
            for mode in ("recompute", "swap"):
                config = EngineConfig(max_model_len=2048, preemption_mode=mode, enable_prefix_caching=caching)
                res = summarize(run(config, SIM_BLOCKS, sim_trace, cost))
                sim[(caching, r, mode)] = res
                rows.append(["simulator", SIM_BLOCKS * 16, "on" if caching else "off", mode, r, res["preemptions"],
                             res["prefill_tokens"], res["swapped_blocks"], "-", res["makespan_s"],
                             res["output_tok_s"]])
    fig, axes = figure(2, 5.0)
    gains = {}
    for ax, metric, label in ((axes[0][0], "makespan_s", "makespan"), (axes[0][1], "e2e_s_p50", "end-to-end p50")):
        for caching, style in ((True, "o-"), (False, "s--")):
            gain = [sim[(caching, r, "recompute")][metric] / sim[(caching, r, "swap")][metric] for r in ratios]
            gains[(metric, caching)] = gain
            ax.plot(ratios, gain, style, label=f"prefix cache {'on' if caching else 'off'}")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.axvline(measured_r, color="tab:green", linestyle=":", label=f"this CPU (r = {measured_r:.2g})")
        ax.set_xscale("log")
        ax.set_xlabel("r = swap seconds / recompute seconds, per token")
        ax.set_ylabel(f"{label}: recompute / swap")
        ax.set_title("above 1: swap wins", fontsize=9)
        ax.legend(fontsize=7)
    even = {c: crossover(ratios, gains[("makespan_s", c)]) for c in (True, False)}
    best = {c: gains[("makespan_s", c)][0] for c in (True, False)}
    eng_rows = {(row[2], row[3]): row for row in rows if row[0] == "engine"}
    text = (f"On this machine a token's K/V is {swap['kv_bytes_per_token']:,} bytes (float32); copying it out "
            f"and back takes {1e6 * swap_token:.0f} µs ({1e-9 / swap['per_swap_byte']:.2f} GB/s), a prefill token "
            f"{1e6 * prefill_token:.0f} µs: r = {measured_r:.2g}, so per token swapping is the cheaper way back. "
            f"On the engine with the prefix cache off, recompute computed {eng_rows[('off', 'recompute')][6]:,} "
            f"prompt tokens against swap's {eng_rows[('off', 'swap')][6]:,}; with it on, "
            f"{eng_rows[('on', 'recompute')][6]:,} against {eng_rows[('on', 'swap')][6]:,}, since a preempted "
            f"request finds most of its own blocks still cached. In the simulator, with swaps almost free "
            f"(r = {RATIOS[0]}) swap shortens the makespan by {100 * (best[False] - 1):.0f}% with the prefix cache "
            f"off and by {100 * (best[True] - 1):.0f}% with it on; it stops winning at r = {fmt(even[False])} "
            f"(cache off) and r = {fmt(even[True])} (cache on).")
    write(a.out, "preemption", "Preemption: swap or recompute",
          [f"Engine: {len(trace)} requests of the `small` workload at once ({trace[0].output_len} output tokens "
           f"each), a pool of {blocks} blocks. Simulator: {len(sim_trace):,} requests, Poisson 0.6 req/s, prompts "
           f"64-512, outputs 16-256, {SIM_BLOCKS} blocks, the built-in cost model with swap cost set from r.",
           table(["where", "pool (slots)", "prefix cache", "preemption", "r", "preemptions",
                  "prompt tokens computed", "blocks swapped out", "copy time (s)", "makespan (s)",
                  "output tok/s"], rows), text], fig)


if __name__ == "__main__":
    main()
