"""The `inferlab` command: generate, chat and bench on the embedded model or a local one."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from inferlab import bench_serve
from inferlab.config import KV_ALLOCATIONS, PREEMPTION_MODES, PREFIX_CACHES, EngineConfig
from inferlab.distributed import EngineDeadError
from inferlab.distributed.worker import is_worker_node, run_node
from inferlab.logger import setup_logging
from inferlab.model.layers.linear import QUANTIZATIONS


def budget_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and KV cache (auto: bfloat16 where the CPU has bf16 instructions, else float32)")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="weights: auto keeps a GGUF's quantized blocks (and a checkpoint's float type) as stored; "
                        "none converts them to --dtype; q8_0/q4_0/q4_1 quantize at load")
    g.add_argument("--int8-activations", action="store_true",
                   help="quantize linear layers' inputs to int8 for q8_0/q4_*/q5_* weights, as llama.cpp does: "
                        "faster, slightly less exact (may change greedy answers)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=budget_arg, default=2048,
                   help="tokens a step may compute, or auto: as many as keep a step near --step-time-target "
                        "(default: 2048; auto for serve)")
    g.add_argument("--step-time-target", type=float, default=0.25, help="seconds, for --max-num-batched-tokens auto")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--scheduling-policy", default="fcfs",
                   help="fcfs, priority, sjf, or a policy of your own: module:Class or file.py:Class")
    add_kv_mode_args(g)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "native", "torch"],
                   help="native: the C kernel reading the paged cache in place (CPU); torch: the reference")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: the cores other processes leave free, rechecked "
                        "every 2 s)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step op by op through the Python model (no one-call decode step)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4}\' or \'{"method": "draft_model", "model": PATH, '
                        '"num_speculative_tokens": 4}\'')
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer and the KV pool across N processes (ranks): one per GPU, or sharing "
                        "the cores; with --nnodes, across hosts")
    g.add_argument("--nnodes", type=int, default=1,
                   help="hosts the ranks span: run the same command on each, with its --node-rank")
    g.add_argument("--node-rank", type=int, default=0,
                   help="this host: 0 runs the engine, the others run their ranks for it until it stops")
    g.add_argument("--master-addr", default=None,
                   help="address of node 0, where the ranks meet (default: MASTER_ADDR, else 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None,
                   help="port there (default: MASTER_PORT, else a free port on one host)")
    g.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help='a KV connector, as vLLM\'s: {"kv_connector": "RedisConnector" or "SharedStorageConnector", '
                        '"kv_role": "kv_producer"|"kv_consumer"|"kv_both", "kv_connector_extra_config": '
                        '{"url": "redis://127.0.0.1:6379"} or {"shared_storage_path": DIR}}')
    p.set_defaults(runs_engine=True)


def add_kv_mode_args(g) -> None:
    """The learning path's switches (docs/learn), for the engine and the simulator alike."""
    g.add_argument("--prefix-cache", default="hash", choices=PREFIX_CACHES, help="the prefix cache: a hash chain "
                   "(vLLM) or a radix tree (SGLang)")
    g.add_argument("--kv-allocation", default="paged", choices=KV_ALLOCATIONS,
                   help="reserve: each request's whole length up front, refused when the pool is full (pre-vLLM)")
    g.add_argument("--preemption-mode", default="recompute", choices=PREEMPTION_MODES,
                   help="swap: a preempted request's KV goes to a host pool and back")
    g.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for --preemption-mode swap")


def kv_mode_config(a: argparse.Namespace) -> dict:
    return {"prefix_cache": a.prefix_cache, "kv_allocation": a.kv_allocation, "preemption_mode": a.preemption_mode,
            "swap_space": a.swap_space}


def add_sampling_args(p: argparse.ArgumentParser, repetition_penalty: float = 1.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=repetition_penalty)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=a.model, dtype=a.dtype, quantization=a.quantization,
                        int8_activations=a.int8_activations, device=a.device,
                        block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, kv_cache_memory=a.kv_cache_memory,
                        max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, step_time_target=a.step_time_target,
                        enable_prefix_caching=not a.no_prefix_caching, scheduling_policy=a.scheduling_policy,
                        attention_backend=a.attention_backend, num_threads=a.threads, enforce_eager=a.enforce_eager,
                        tensor_parallel_size=a.tensor_parallel_size, nnodes=a.nnodes, node_rank=a.node_rank,
                        master_addr=a.master_addr, master_port=a.master_port,
                        kv_transfer_config=a.kv_transfer_config, speculative_config=a.speculative_config,
                        **kv_mode_config(a))


def add_record_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record", default=None, metavar="FILE",
                   help="write the engine's per-step snapshots to FILE (JSONL) for `inferlab scope --replay`")


def recording(engine, path: str | None):
    """A Recorder on `engine` if `path` is given, else a no-op context: recording off costs nothing."""
    if path is None:
        return contextlib.nullcontext()
    from inferlab.scope.recorder import Recorder
    return Recorder(engine, path)


def sampling_params(a: argparse.Namespace):
    from inferlab.sampling_params import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def stream(engine, request_id: str, prompt, params) -> str:
    """Run one request to the end, printing text as it is released; returns the whole text."""
    engine.add_request(request_id, prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].new_text
            text += delta
            print(delta, end="", flush=True)
    print()
    return text


def cmd_generate(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    engine = LLMEngine(engine_config(a))
    tok = engine.tokenizer
    if a.raw or not tok.chat_template:
        prompt = a.prompt
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                   [{"role": "user", "content": a.prompt}]
        text = tok.apply_chat_template(messages)
        prompt = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
    with recording(engine, a.record):
        stream(engine, "generate-0", prompt, sampling_params(a))


def chat_prompt(tok, messages: list[dict], first: int, limit: int, answer: int) -> tuple[dict | None, int]:
    """The prompt for a conversation and how many of its oldest messages it leaves out: exchanges
    after the first `first` messages (a system message) are dropped, oldest first, until the prompt
    leaves `answer` tokens of the `limit`, or only the newest message is left. None if even that
    leaves no room to answer."""
    dropped = 0
    while True:
        kept = messages[:first] + messages[first + dropped:]
        text = tok.apply_chat_template(kept)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) + answer <= limit or len(kept) == first + 1:
            break
        dropped += 2  # a question and its answer
    return ({"prompt": text, "prompt_token_ids": ids} if len(ids) < limit else None), dropped


def cmd_chat(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    engine = LLMEngine(engine_config(a))
    tok = engine.tokenizer
    if not tok.chat_template:
        raise ValueError("this model has no chat template; use `inferlab generate --raw`")
    first = 1 if a.system else 0
    history = [{"role": "system", "content": a.system}] if a.system else []
    print("Chat with the model. /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    turn, limit = 0, engine.max_request_tokens
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:first]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt, dropped = chat_prompt(tok, history, first, limit, a.max_tokens)
        if prompt is None:
            history.pop()
            print(f"error: this message does not fit the context of {limit} tokens; say it in fewer words "
                  "(the conversation is kept)", file=sys.stderr)
            continue
        if dropped:
            del history[first:first + dropped]
            print(f"(the conversation outgrew the context of {limit} tokens: the oldest {dropped // 2} "
                  f"exchange{'s' if dropped > 2 else ''} forgotten; /reset starts over)", file=sys.stderr)
        try:
            reply = stream(engine, f"chat-{turn}", prompt, sampling_params(a))
        except KeyboardInterrupt:  # stop this answer, keep the session
            engine.abort_request(f"chat-{turn}")
            print()
            reply = ""
        turn += 1
        history.append({"role": "assistant", "content": reply})


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None


def cmd_simulate(a: argparse.Namespace) -> None:
    from inferlab.sim.cost_model import DEFAULT, CostModel
    from inferlab.sim.simulator import load_trace, make_trace, simulate
    trace = load_trace(a.trace) if a.trace else make_trace(
        a.num_requests, a.rate, a.prompt_len, a.output_len, a.seed, a.burst, a.shared_prefix, a.priorities)
    config = EngineConfig(block_size=a.block_size, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, step_time_target=a.step_time_target,
                          scheduling_policy=a.policy, enable_prefix_caching=not a.no_prefix_caching,
                          sjf_aging_rate=a.sjf_aging_rate, **kv_mode_config(a))
    cost = CostModel.load(a.cost_model) if a.cost_model else DEFAULT
    result = {"policy": a.policy, "requests": len(trace), "replicas": a.replicas, "router": a.router,
              **simulate(config, a.num_kv_blocks, trace, cost, a.replicas, a.router)}
    for key, value in result.items():
        print(f"{key:>16}  {value}")
    print(json.dumps(result))


def cmd_calibrate(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    from inferlab.sim.calibrate import calibrate
    model, steps = calibrate(LLMEngine(engine_config(a)), a.scale)
    model.save(a.out)
    print(f"fitted on {steps} timed steps, saved to {a.out}", file=sys.stderr)
    print(json.dumps(vars(model)))


def cmd_serve(a: argparse.Namespace) -> None:
    from inferlab.server.serve import serve
    serve(engine_config(a), a.host, a.port, a.served_model_name, a.record, a.api_key)


def cmd_router(a: argparse.Namespace) -> None:
    from inferlab.router.app import serve_router
    serve_router(a.backend, a.prefill, a.decode, a.policy, a.host, a.port, a.timeout, a.health_interval)


def cmd_scope(a: argparse.Namespace) -> None:
    from inferlab.scope.replay import serve_replay
    serve_replay(a.replay, a.host, a.port)


def tensor_parallel_stats(llm) -> dict:
    """Rank 0's time in collectives over the run (warm-up included), for a tensor-parallel engine."""
    return {"tensor_parallel": llm.engine.runner.comm_stats()} if llm.engine.config.tensor_parallel_size > 1 else {}


def cmd_bench(a: argparse.Namespace) -> None:
    from inferlab.bench import load_workload, run_bench
    from inferlab.llm import LLM
    llm = LLM(**vars(engine_config(a)))
    if a.latency:
        from inferlab.bench import run_latency
        print(json.dumps({**run_latency(llm, a.input_len, a.output_len), **tensor_parallel_stats(llm)}))
        return
    workload = load_workload(a.workload, llm.get_tokenizer())
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
    parser = argparse.ArgumentParser(prog="inferlab", description="A small, readable LLM inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    m.add_argument("--shared-prefix", type=_range, default=None, help="COUNT:LEN shared system prompts")
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
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: from the file name)")
    s.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"),
                   help="clients of /v1 and the dashboard's lab must send 'Authorization: Bearer KEY' "
                        "(default: $INFERLAB_API_KEY; none: open)")
    add_record_arg(s)
    add_engine_args(s)
    # a server keeps its streams flowing while prompts arrive: steps sized to a time, not 2,048 tokens
    s.set_defaults(func=cmd_serve, max_num_batched_tokens="auto")
    r = sub.add_parser("router", help="OpenAI-compatible proxy in front of several `inferlab serve` instances")
    r.add_argument("--backend", action="append", default=[], metavar="URL", help="an instance (repeatable)")
    r.add_argument("--policy", default="round_robin", choices=["round_robin", "least_loaded", "prefix"],
                   help="which backend a request goes to (the simulator's routers)")
    r.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="P/D mode: an instance that computes prompts (kv_producer; repeatable)")
    r.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="P/D mode: an instance that loads them and generates (kv_consumer; repeatable)")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8080)
    r.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a backend may stay silent before its request fails")
    r.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    r.set_defaults(func=cmd_router)
    o = sub.add_parser("scope", help="the dashboard on a recorded trace (live: `inferlab serve`, then /scope)")
    o.add_argument("--replay", required=True, action="append", metavar="FILE",
                   help="a trace written with --record; repeat it to see several side by side")
    o.add_argument("--host", default="127.0.0.1")
    o.add_argument("--port", type=int, default=8001)
    o.set_defaults(func=cmd_scope)
    b = sub.add_parser("bench", help="offline throughput on a reference workload, or `bench serve` to load a "
                       "running server; last line is JSON",
                       description="Offline throughput of the engine on a reference workload; `inferlab bench serve "
                                   "--help` for the load generator against a running server.")
    b.add_argument("--workload", default="cpu", help="small, cpu, nano (random token ids), edit (real text: edit a "
                   "passage given in the prompt) or a JSON file")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--compare", choices=["hf"], default=None,
                   help="also run the workload through HF transformers generate, same dtype, and print the ratio")
    b.add_argument("--hf-mode", choices=["static", "sequential"], default="static")
    b.add_argument("--hf-batch", type=int, default=16, help="requests per static batch for --compare hf")
    b.add_argument("--latency", action="store_true",
                   help="one request alone: time to first token and per output token (like llama-bench)")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    add_record_arg(b)
    add_engine_args(b)
    b.set_defaults(func=cmd_bench)
    modes = b.add_subparsers(dest="mode", title="modes (default: the offline benchmark)", metavar="[serve]")
    bs = modes.add_parser("serve", help="latency and throughput of a running server under a bounded load")
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.verbose:
        setup_logging().setLevel(logging.DEBUG)
    try:
        if getattr(a, "runs_engine", False) and is_worker_node(config := engine_config(a)):
            return run_node(config)  # this host's tensor-parallel ranks, for the engine on node 0
        a.func(a)
    except (ValueError, FileNotFoundError) as e:  # our one-line errors (bad options, model, prompt)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineDeadError as e:  # a tensor-parallel rank failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
