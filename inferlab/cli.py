"""The `inferlab` command: its subcommands (generate, chat, serve, bench, simulate, ...) and their parser.

The options they share are `cli_args.py`'s; generate and chat, which talk to a terminal, are `chat.py`'s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

import inferlab
from inferlab import bench_serve
from inferlab.chat import cmd_chat, cmd_generate
from inferlab.cli_args import (
    OneLineErrors,
    add_engine_args,
    add_kv_mode_args,
    add_listen_args,
    add_origins_arg,
    add_record_arg,
    add_sampling_args,
    budget_arg,
    check_listen,
    engine_config,
    kv_mode_config,
    positive_int,
    recording,
    with_option_names,
)
from inferlab.config import EngineConfig
from inferlab.distributed import EngineDeadError
from inferlab.distributed.worker import is_worker_node, run_node
from inferlab.logger import setup_logging
from inferlab.outputs import RequestFailed


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


def check_trace_options(a: argparse.Namespace) -> None:
    """One line naming the option, where make_trace would divide by zero, draw from an empty range,
    or generate arrivals at negative times or requests with nothing to compute."""
    if not a.rate > 0:  # nan too
        raise ValueError(f"--rate must be positive (inf: all at once), got {a.rate}")
    for name in ("num_requests", "burst", "priorities"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
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
    if not a.trace:
        check_trace_options(a)
    trace = load_trace(a.trace) if a.trace else make_trace(
        a.num_requests, a.rate, a.prompt_len, a.output_len, a.seed, a.burst, a.shared_prefix, a.priorities)
    config = EngineConfig(block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, max_model_len=a.max_model_len,
                          max_num_seqs=a.max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, step_time_target=a.step_time_target,
                          scheduling_policy=a.policy, enable_prefix_caching=not a.no_prefix_caching,
                          sjf_aging_rate=a.sjf_aging_rate, **kv_mode_config(a))
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
    model, steps, error = calibrate(LLMEngine(engine_config(a)), a.scale)
    model.save(a.out)
    print(f"fitted on {steps} timed steps (median error {error:.0%}), saved to {a.out}", file=sys.stderr)
    if not error <= POOR_FIT:
        print(f"warning: the fit explains the steps poorly (median error {error:.0%}, over {POOR_FIT:.0%}); "
              "was another job running? calibrate again on a quiet machine", file=sys.stderr)
    print(json.dumps(vars(model)))


def cmd_serve(a: argparse.Namespace) -> None:
    from inferlab.server.serve import serve
    check_listen(a.host, a.port)
    serve(engine_config(a), a.host, a.port, a.served_model_name, a.record, a.api_key, a.allowed_origins)


def cmd_router(a: argparse.Namespace) -> None:
    from inferlab.router.serve import serve_router
    check_listen(a.host, a.port)
    serve_router(a.backend, a.prefill, a.decode, a.policy, a.host, a.port, a.timeout, a.health_interval,
                 a.allowed_origins)


def cmd_scope(a: argparse.Namespace) -> None:
    from inferlab.scope.replay import serve_replay
    check_listen(a.host, a.port)
    serve_replay(a.replay, a.host, a.port)


def tensor_parallel_stats(llm) -> dict:
    """Rank 0's time in collectives over the run (warm-up included), for a tensor-parallel engine."""
    return {"tensor_parallel": llm.engine.runner.comm_stats()} if llm.engine.config.tensor_parallel_size > 1 else {}


def cmd_bench(a: argparse.Namespace) -> None:
    from inferlab.bench import load_workload, run_bench
    from inferlab.llm import LLM
    if a.latency:  # one request alone: a workload's options would be silently ignored
        for flag, value in (("--workload", a.workload), ("--compare", a.compare)):
            if value is not None:
                raise ValueError(f"{flag} is for a workload run, not --latency")
        if a.input_len < 1 or a.output_len < 2:
            raise ValueError("--latency needs --input-len >= 1 and --output-len >= 2 (the first token comes with "
                             "the prefill; the time per token is timed after it)")
    a.workload = a.workload or "cpu"
    # a bad workload file is refused before the model loads and the KV memory is taken
    # (only `edit` needs the model's tokenizer)
    workload = None if a.latency or a.workload == "edit" else load_workload(a.workload)
    llm = LLM(**vars(engine_config(a)))
    if a.latency:
        from inferlab.bench import run_latency
        with recording(llm.engine, a.record):
            result = run_latency(llm, a.input_len, a.output_len)
        print(json.dumps({**result, **tensor_parallel_stats(llm)}))
        return
    workload = workload or load_workload(a.workload, llm.get_tokenizer())
    with recording(llm.engine, a.record):
        result = run_bench(llm, workload, use_tqdm=not a.no_progress)
    result["dtype"] = str(llm.engine.dtype).removeprefix("torch.")
    result.update(tensor_parallel_stats(llm))
    if a.compare == "hf":
        from inferlab.bench import run_hf
        print(json.dumps(result))
        hf = run_hf(workload, result["dtype"], a.model, a.hf_mode, a.hf_batch)
        print(json.dumps(hf))
        result = {"inferlab": result, "hf": hf, "speedup": round(result["output_tok_s"] / hf["output_tok_s"], 2)}
        print(f"inferlab {result['inferlab']['output_tok_s']} tok/s, HF transformers ({hf['mode']}, batch "
              f"{hf['batch']}) {hf['output_tok_s']} tok/s: {result['speedup']}x", file=sys.stderr)
    print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="inferlab", description="A small, readable LLM inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"inferlab {inferlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (chat template applied for instruct models)")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--system", default=None, help="system message")
    add_sampling_args(g)
    add_record_arg(g)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    c.add_argument("--system", default=None, help="system message")
    # greedy, with llama.cpp's and Ollama's repeat penalty: a small model sampled at 0.7 drifts
    # off even "What is the capital of France?", and plain greedy loops in longer answers
    add_sampling_args(c, repetition_penalty=1.1)
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)
    m = sub.add_parser("simulate", help="replay a trace on the real scheduler with a virtual clock")
    m.add_argument("--num-requests", type=int, default=1000)
    m.add_argument("--rate", type=float, default=10.0, help="requests/s, Poisson (inf: all at once)")
    m.add_argument("--policy", default="fcfs", help="fcfs, priority, sjf, or module:Class / file.py:Class")
    m.add_argument("--sjf-aging-rate", type=float, default=20.0, help="sjf: tokens of work forgiven per second waited")
    m.add_argument("--replicas", type=int, default=1, help="engines behind a router")
    m.add_argument("--router", default="round_robin", choices=["round_robin", "least_loaded", "prefix", "prefix_aware"])
    m.add_argument("--trace", default=None, help="JSONL: arrival, prompt_len, output_len[, priority, prefix_id, ...]")
    m.add_argument("--cost-model", default=None, help="file written by `inferlab calibrate` (default: built in)")
    m.add_argument("--prompt-len", type=_range, default=(64, 512), help="LO:HI tokens")
    m.add_argument("--output-len", type=_range, default=(16, 256), help="LO:HI tokens")
    m.add_argument("--burst", type=int, default=1, help="requests arriving together")
    m.add_argument("--shared-prefix", type=_count_len, default=None, help="COUNT:LEN shared system prompts")
    m.add_argument("--priorities", type=int, default=1, help="priority levels drawn uniformly")
    m.add_argument("--seed", type=int, default=0)
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
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_listen_args(s, 8000)
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: from the file name)")
    s.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"),
                   help="clients of /v1 and the dashboard's lab must send 'Authorization: Bearer KEY' "
                        "(default: $INFERLAB_API_KEY; none: open)")
    add_origins_arg(s)
    add_record_arg(s)
    add_engine_args(s)
    s.add_argument("--seed", type=int, default=None, dest="engine_seed",
                   help="seed of the requests that send none, so that a run's sampled outputs repeat (vLLM's)")
    # a server keeps its streams flowing while prompts arrive: steps sized to a time, not 2,048 tokens
    # and a long-running server takes its KV memory at start, as vLLM does (--no-kv-cache-prefault: lazily)
    s.set_defaults(func=cmd_serve, max_num_batched_tokens="auto", kv_cache_prefault=True)
    r = sub.add_parser("router", help="OpenAI-compatible proxy in front of several `inferlab serve` instances")
    r.add_argument("--backend", action="append", default=[], metavar="URL", help="an instance (repeatable)")
    r.add_argument("--policy", default="round_robin", choices=["round_robin", "least_loaded", "prefix"],
                   help="which backend a request goes to (the simulator's routers)")
    r.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="P/D mode: an instance that computes prompts (kv_producer; repeatable)")
    r.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="P/D mode: an instance that loads them and generates (kv_consumer; repeatable)")
    add_listen_args(r, 8080)
    r.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a backend may stay silent before its request fails")
    r.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    add_origins_arg(r)
    r.set_defaults(func=cmd_router)
    o = sub.add_parser("scope", help="the dashboard on a recorded trace (live: `inferlab serve`, then /scope)")
    o.add_argument("--replay", required=True, action="append", metavar="FILE",
                   help="a trace written with --record; repeat it to see several side by side")
    add_listen_args(o, 8001)
    o.set_defaults(func=cmd_scope)
    b = sub.add_parser("bench", help="offline throughput on a reference workload, or `bench serve` to load a "
                       "running server; last line is JSON",
                       description="Offline throughput of the engine on a reference workload; `inferlab bench serve "
                                   "--help` for the load generator against a running server.")
    b.add_argument("--workload", default=None, help="small, cpu (default), nano (random token ids), edit (real text: "
                   "edit a passage given in the prompt) or a JSON file")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--compare", choices=["hf"], default=None,
                   help="also run the workload through HF transformers generate, same dtype, and print the ratio")
    b.add_argument("--hf-mode", choices=["static", "sequential"], default="static")
    b.add_argument("--hf-batch", type=positive_int, default=16, help="requests per static batch for --compare hf")
    b.add_argument("--latency", action="store_true",
                   help="one request alone: time to first token and per output token (like llama-bench)")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    add_record_arg(b)
    add_engine_args(b)
    # an engine as `serve` runs it: its KV memory taken at start, as vLLM and llama.cpp take theirs
    # (outside their benchmarks' clocks too)
    b.set_defaults(func=cmd_bench, kv_cache_prefault=True)
    modes = b.add_subparsers(dest="mode", title="modes (default: the offline benchmark)", metavar="[serve]")
    bs = modes.add_parser("serve", help="latency and throughput of a running server under a bounded load")
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.main)
    for command in [*sub.choices.values(), bs]:
        # -v after the command too; SUPPRESS: a command's default must not undo a -v given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        command.set_defaults(command_parser=command)  # the parser that names its own options in errors
    return parser


def _refuse_unknown_leading_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`inferlab --bogus generate`: argparse would hand the command an empty line and blame its prompt."""
    for token in argv:
        if not token.startswith("-"):
            return
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2]  # -vh is -v -h
        if name not in parser._option_string_actions:
            parser.error(f"unrecognized arguments: {token} (options of a command go after it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _refuse_unknown_leading_options(parser, sys.argv[1:] if argv is None else argv)
    a, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser, so that the help it points to has the options
        a.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if a.verbose:
        setup_logging().setLevel(logging.DEBUG)
    try:
        if getattr(a, "runs_engine", False) and is_worker_node(config := engine_config(a)):
            return run_node(config)  # this host's tensor-parallel ranks, for the engine on node 0
        a.func(a)
    except (ValueError, FileNotFoundError) as e:  # our one-line errors (bad options, model, prompt)
        print(f"error: {with_option_names(str(e), a.command_parser)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head -1`): quietly, as a tool killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush fails again
        return 141
    except (EngineDeadError, RequestFailed) as e:  # a tensor-parallel rank, or the engine on a request, failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
