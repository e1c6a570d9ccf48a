"""The `inferlab` command: its subcommands (generate, chat, serve, bench, simulate, ...) and their parser.

The options they share are `cli_args.py`'s; generate and chat, which talk to a terminal, are `chat.py`'s;
simulate and calibrate are the simulator's (`sim/commands.py`).
"""
from __future__ import annotations

import argparse
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
    add_listen_args,
    add_origins_arg,
    add_record_arg,
    add_sampling_args,
    check_listen,
    engine_config,
    positive_int,
    recording,
    with_option_names,
)
from inferlab.distributed import EngineDeadError
from inferlab.distributed.worker import is_worker_node, run_node
from inferlab.logger import setup_logging
from inferlab.outputs import RequestFailed
from inferlab.server.reasoning import PARSERS as REASONING
from inferlab.server.tool_parsers import PARSERS
from inferlab.sim.commands import add_sim_commands
from inferlab.text import terminal_text


def cmd_serve(a: argparse.Namespace) -> None:
    from inferlab.server.serve import serve
    check_listen(a.host, a.port)
    if a.enable_auto_tool_choice and a.tool_call_parser is None:  # (vLLM's rule)
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (how the model writes its calls)")
    serve(engine_config(a), a.host, a.port, a.served_model_name, a.record, a.api_key, a.allowed_origins,
          a.enable_prompt_tokens_details, not a.disable_uvicorn_access_log,
          a.tool_call_parser if a.enable_auto_tool_choice else None, a.reasoning_parser)


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
    given = {"--input-len": a.input_len, "--output-len": a.output_len, "--hf-mode": a.hf_mode,
             "--hf-batch": a.hf_batch}
    for flag in ("--input-len", "--output-len") if not a.latency else ():  # (they were silently ignored)
        if given[flag] is not None:
            raise ValueError(f"{flag} is for --latency: a workload gives each request's lengths")
    for flag in ("--hf-mode", "--hf-batch") if a.compare != "hf" else ():
        if given[flag] is not None:
            raise ValueError(f"{flag} is for --compare hf")
    defaults = {"input_len": 128, "output_len": 128, "hf_mode": "static", "hf_batch": 16}
    for name, value in defaults.items():
        setattr(a, name, value if getattr(a, name) is None else getattr(a, name))
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
    result["scheduling_policy"] = llm.engine.config.scheduling_policy  # runs compared by policy say which
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
    g.add_argument("prompt", type=terminal_text, nargs="?",  # text options only: a path must stay as the OS gave it
                   help="the prompt; - (or none, with stdin a file or a pipe) reads it from stdin")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--system", type=terminal_text, default=None, help="system message")
    add_sampling_args(g)
    add_record_arg(g)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    c.add_argument("--system", type=terminal_text, default=None, help="system message")
    # greedy, with llama.cpp's and Ollama's repeat penalty: a small model sampled at 0.7 drifts
    # off even "What is the capital of France?", and plain greedy loops in longer answers
    add_sampling_args(c, repetition_penalty=1.1)
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)
    add_sim_commands(sub)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_listen_args(s, 8000)
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: from the file name)")
    s.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"),
                   help="clients of /v1 and the dashboard's lab must send 'Authorization: Bearer KEY' "
                        "(default: $INFERLAB_API_KEY; none: open)")
    add_origins_arg(s)
    s.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage says how many prompt tokens the prefix cache held (vLLM's flag; off: a client "
                        "could learn from it how much of another's prompt it guessed)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": the model decides whether to call tools (vLLM\'s flag; needs '
                        "--tool-call-parser). tool_choice required and named functions need neither")
    s.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how the model writes tool calls: hermes (Qwen 2.5 and 3), qwen3_coder, llama3_json "
                        "(Llama 3.1-3.3), pythonic and llama4_pythonic (Llama 3.2, 4), mistral (see the README)")
    s.add_argument("--reasoning-parser", choices=REASONING, default=None,
                   help="how a thinking model writes its reasoning, given apart from the answer (chat's "
                        "reasoning_content, Ollama's thinking): qwen3 (Qwen3, QwQ), deepseek_r1 (DeepSeek-R1)")
    s.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no log line per HTTP request (vLLM's flag; by default each says client, path and status)")
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
                   help="seconds a backend may stay silent before its request fails (default 300)")
    r.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks (default 2)")
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
    b.add_argument("--hf-mode", choices=["static", "sequential"], default=None,
                   help="for --compare hf (default static)")
    b.add_argument("--hf-batch", type=positive_int, default=None, help="requests per static batch for --compare hf "
                   "(default 16)")
    b.add_argument("--latency", action="store_true",
                   help="one request alone: time to first token and per output token (like llama-bench)")
    b.add_argument("--input-len", type=int, default=None, help="for --latency: prompt tokens (default 128)")
    b.add_argument("--output-len", type=int, default=None, help="for --latency: tokens generated (default 128)")
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
        if not any(known == name or (name.startswith("--") and known.startswith(name))  # --verb: --verbose
                   for known in parser._option_string_actions):
            parser.error(f"unrecognized arguments: {token} (options of a command go after it)")


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # a terminal or pipe that cannot show a character gets its escape,
        sys.stdout.reconfigure(errors="backslashreplace")  # not an error that drops the answer
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
