"""The simulator's commands, `inferlab simulate` and `inferlab calibrate`: their options and what they print."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace

from inferlab.cli_args import add_engine_args, add_kv_mode_args, budget_arg, engine_config, kv_mode_config, output_file
from inferlab.config import EngineConfig


def add_sim_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("simulate", help="replay a trace on the real scheduler with a virtual clock")
    m.add_argument("--num-requests", type=int, default=None, help="of a generated trace (default 1000)")
    m.add_argument("--rate", type=float, default=None, help="requests/s, Poisson (inf: all at once; default 10)")
    m.add_argument("--policy", default="fcfs", help="fcfs, priority, sjf, or module:Class / file.py:Class")
    m.add_argument("--sjf-aging-rate", type=float, default=20.0, help="sjf: tokens of work forgiven per second waited")
    m.add_argument("--replicas", type=int, default=1, help="engines behind a router")
    m.add_argument("--router", default="round_robin", choices=["round_robin", "least_loaded", "prefix", "prefix_aware"])
    m.add_argument("--trace", default=None, help="JSONL: arrival, prompt_len, output_len[, priority, prefix_id, ...]")
    m.add_argument("--cost-model", default=None, help="file written by `inferlab calibrate` (default: built in)")
    m.add_argument("--prompt-len", type=_range, default=None, help="LO:HI tokens (default 64:512)")
    m.add_argument("--output-len", type=_range, default=None, help="LO:HI tokens (default 16:256)")
    m.add_argument("--max-tokens", type=int, default=None,
                   help="the cap of every request that gives none, what policies see (default: its output "
                        "length, known exactly)")
    m.add_argument("--burst", type=int, default=None, help="requests arriving together (default 1)")
    m.add_argument("--shared-prefix", type=_count_len, default=None, help="COUNT:LEN shared system prompts")
    m.add_argument("--priorities", type=int, default=None, help="priority levels drawn uniformly (default 1)")
    m.add_argument("--seed", type=int, default=None, help="of a generated trace (default 0)")
    m.add_argument("--num-kv-blocks", type=int, default=4096)
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--max-model-len", type=int, default=8192)
    m.add_argument("--max-num-seqs", type=int, default=256)
    m.add_argument("--max-num-batched-tokens", type=budget_arg, default=2048, help="an integer or auto")
    m.add_argument("--step-time-target", type=float, default=0.25, help="seconds, for --max-num-batched-tokens auto")
    m.add_argument("--no-prefix-caching", action="store_true")
    add_kv_mode_args(m)
    m.set_defaults(func=cmd_simulate)
    k = sub.add_parser("calibrate", help="fit the simulator's cost model to timed steps of the real model")
    k.add_argument("--out", default="cost_model.json")
    k.add_argument("--scale", type=float, default=1.0, help="multiply the calibration batch sizes")
    add_engine_args(k)
    k.set_defaults(func=cmd_calibrate)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None


def _count_len(text: str) -> tuple[int, int]:
    count, sep, length = text.partition(":")  # both: "4" read as 4:4 (N or LO:HI's rule) was no one's meaning
    with contextlib.suppress(ValueError):
        if sep:
            return int(count), int(length)
    raise argparse.ArgumentTypeError(f"expected COUNT:LEN, got {text!r}")


# a generated trace's options, and their defaults
GENERATED = {"num_requests": 1000, "rate": 10.0, "prompt_len": (64, 512), "output_len": (16, 256), "burst": 1,
             "shared_prefix": None, "priorities": 1, "seed": 0}
MAX_SIM_BLOCKS = 1 << 24  # ~16 M blocks (a few GB of block objects): 268 M tokens of 16
MAX_SPAN_S = 1e9  # a float64 clock past ~1e12 s no longer resolves a millisecond; this leaves it room


def check_trace_options(a: argparse.Namespace) -> None:
    """One line naming the option, where make_trace would divide by zero, draw from an empty range,
    or generate arrivals at negative times or requests with nothing to compute."""
    if not a.rate > 0:  # nan too
        raise ValueError(f"--rate must be positive (inf: all at once), got {a.rate}")
    for name in ("num_requests", "burst", "priorities"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.num_requests / a.rate > MAX_SPAN_S:  # (latencies printed as 0.0: lost beside the arrival times)
        raise ValueError(f"--rate {a.rate} spreads {a.num_requests} requests over ~{a.num_requests / a.rate:.3g} s, "
                         f"past the {MAX_SPAN_S:.0e} s within which the simulator's clock resolves a millisecond")
    for name in ("prompt_len", "output_len"):
        lo, hi = getattr(a, name)
        if not 1 <= lo <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be N or LO:HI with 1 <= LO <= HI, got {lo}:{hi}")
    if a.shared_prefix and min(a.shared_prefix) < 1:
        raise ValueError(f"--shared-prefix must be COUNT:LEN, both at least 1, got {a.shared_prefix[0]}:"
                         f"{a.shared_prefix[1]}")


def cmd_simulate(a: argparse.Namespace) -> None:
    from inferlab.sim.cost_model import DEFAULT, CostModel
    from inferlab.sim.simulator import load_trace, make_trace, simulate
    if a.max_tokens is not None and a.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {a.max_tokens}")
    given = [name for name in GENERATED if getattr(a, name) is not None]
    if a.trace is not None and given:  # (they were silently ignored)
        raise ValueError(f"--{given[0].replace('_', '-')} is for a generated trace: --trace gives each request")
    for name, value in GENERATED.items():
        setattr(a, name, value if getattr(a, name) is None else getattr(a, name))
    if a.trace is None:
        check_trace_options(a)
    trace = load_trace(a.trace) if a.trace is not None else make_trace(
        a.num_requests, a.rate, a.prompt_len, a.output_len, a.seed, a.burst, a.shared_prefix, a.priorities)
    if a.max_tokens is not None:  # the cap of every request whose trace line gives none
        trace = [replace(t, max_tokens=t.max_tokens or a.max_tokens) for t in trace]
    config = EngineConfig(block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, max_model_len=a.max_model_len,
                          max_num_seqs=a.max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, step_time_target=a.step_time_target,
                          scheduling_policy=a.policy, enable_prefix_caching=not a.no_prefix_caching,
                          sjf_aging_rate=a.sjf_aging_rate, **kv_mode_config(a))
    if a.replicas >= 1 and a.num_kv_blocks * a.replicas > MAX_SIM_BLOCKS:  # each block is a Python object
        raise ValueError(f"--num-kv-blocks {a.num_kv_blocks} x --replicas {a.replicas} is more than the "
                         f"{MAX_SIM_BLOCKS:,} KV blocks the simulator holds in memory")
    cost = CostModel.load(a.cost_model) if a.cost_model else DEFAULT
    result = {"policy": a.policy, "requests": len(trace), "replicas": a.replicas, "router": a.router,
              **simulate(config, a.num_kv_blocks, trace, cost, a.replicas, a.router)}
    for key, value in result.items():
        print(f"{key:>16}  {'-' if value is None else value}")  # None: no request completed to measure it
    print(json.dumps(result))


POOR_FIT = 0.25  # calibrate's median relative error past which it warns


def cmd_calibrate(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    from inferlab.sim.calibrate import calibrate
    # at 0 or below every shape is one 2-token request: a fit of collinear features, saved as if sound
    if not 0 < a.scale < float("inf"):
        raise ValueError(f"--scale must be a positive number, got {a.scale}")
    if os.path.isdir(a.out):  # found after the minutes of timing, it was a traceback
        raise ValueError(f"--out {a.out} is a folder; give the file to write, e.g. "
                         f"{os.path.join(a.out, 'cost_model.json')}")
    output_file(a.out, "--out")  # (a missing folder too: found only after the timing)
    model, steps, error = calibrate(LLMEngine(engine_config(a)), a.scale)
    try:
        model.save(a.out)
    except OSError as e:
        raise ValueError(f"--out {a.out}: cannot write it ({e.strerror or e})") from None
    print(f"fitted on {steps} timed steps (median error {error:.0%}), saved to {a.out}", file=sys.stderr)
    if not error <= POOR_FIT:
        print(f"warning: the fit explains the steps poorly (median error {error:.0%}, over {POOR_FIT:.0%}); "
              "was another job running? calibrate again on a quiet machine", file=sys.stderr)
    print(json.dumps(vars(model)))
