"""The options the commands share (engine, sampling, recording) and the configs they make.

`add_engine_args` mirrors `EngineConfig` field for field, so every engine-running command (generate,
chat, serve, bench, calibrate) takes the same flags; the simulator takes the scheduling ones.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
from typing import NoReturn

from inferlab.config import (
    DTYPE_ALIASES,
    DTYPES,
    KV_ALLOCATIONS,
    PREEMPTION_MODES,
    PREFIX_CACHES,
    EngineConfig,
    parse_size,
)
from inferlab.model.layers.keep import QUANTIZATIONS
from inferlab.pooling import POOLING_TYPES
from inferlab.server.listen import bind
from inferlab.text import terminal_text


class OneLineErrors(argparse.ArgumentParser):
    """A bad option is one line on stderr, exit status 2 (argparse's own prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        # an optional mode ("bench [serve]") takes the value of an unknown option ("--num-prompts 4")
        # as the mode: argparse's "invalid choice" would hide the option that is wrong
        if m := re.fullmatch(r"argument \[(.+)\]: invalid choice: '(.*)' \(choose from .*\)", message):
            message = f"{m.group(2)!r} is not a mode of this command ({m.group(1)} is); " \
                      "if it is an option's value, that option is unknown"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def budget_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of rows, layers, repeats, threads)."""
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1: 1,4,64."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas, got {text!r}") from None


def bytes_arg(text: str) -> int:
    """A size: bytes (4294967296, 4e9) or with a unit (4GiB, 512MiB, 4GB)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in bytes (4e9, 4GiB, 512MiB), got {text!r}") from None


def add_listen_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_arg, default=port, help=f"TCP port (default {port}; 0: any free one)")


def port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {text!r}")
    return port


def check_listen(host: str, port: int) -> None:
    """Refuse, before a model loads for a minute, an address this process could not listen on.
    (A port taken in between still fails later, when the server binds it.)"""
    bind(host, port).close()


def origins_arg(text: str) -> list[str]:
    """`--allowed-origins`: comma-separated origins, `*` for any, or vLLM's JSON list."""
    if text.strip().startswith("["):
        try:
            origins = json.loads(text)
        except json.JSONDecodeError:
            origins = None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError(f"expected origins separated by commas or a JSON list, got {text!r}")
        return origins
    return [o.strip().rstrip("/") for o in text.split(",") if o.strip()]


def add_origins_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-origins", type=origins_arg, default=None, metavar="ORIGINS",
                   help="web pages that may call the API from a browser, besides this machine's own: "
                        "comma-separated origins (http://host:port), '*' for any, or a JSON list")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=[*DTYPES, *DTYPE_ALIASES],
                   help="activations and KV cache (auto: bfloat16 where the CPU has bf16 instructions, else float32)")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS, type=str.lower,
                   help="weights: auto keeps a GGUF's quantized blocks (and a checkpoint's float type) as stored "
                        "(bf16 models on CPUs with bf16 matrix units: what those multiply fastest); "
                        "none converts them to --dtype; q8_0/q4_0/q4_1 quantize at load")
    g.add_argument("--int8-activations", action="store_true",
                   help="quantize linear layers' inputs to int8 for block weights (every block type), as "
                        "llama.cpp does: faster, slightly less exact (may change greedy answers)")
    g.add_argument("--hf-overrides", default=None, metavar="JSON",
                   help="fields laid over an HF folder's config.json (vLLM's), e.g. to load Qwen3-Reranker as a "
                        "reranker (see the README)")
    g.add_argument("--pooling-type", type=str.upper, choices=POOLING_TYPES, default=None,
                   help="how embeddings pool the prompt: its last token's state or the mean of all (default: as "
                        "the checkpoint says, else LAST)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    g.add_argument("--kv-cache-memory", type=bytes_arg, default=None,
                   help="KV pool size in bytes: 4294967296, 4e9, 4GiB, 512MiB or 4GB")
    g.add_argument("--kv-cache-prefault", action=argparse.BooleanOptionalAction, default=False,
                   help="touch every page of the KV pool at start, as vLLM and llama.cpp do: the memory is held "
                        "from then on and no request pays a page's first use, for a longer start (default: off; "
                        "on for serve and bench)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=budget_arg, default=2048,
                   help="tokens a step may compute, or auto: as many as keep a step near --step-time-target "
                        "(default: 2048; auto for serve)")
    g.add_argument("--step-time-target", type=float, default=0.25, help="seconds, for --max-num-batched-tokens auto")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--scheduling-policy", default="fcfs",
                   help="fcfs, priority, sjf, or a policy of your own: module:Class or file.py:Class")
    g.add_argument("--sjf-aging-rate", type=float, default=20.0,
                   help="sjf (and a policy taking aging_rate): tokens of work forgiven per second waited")
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
    g.add_argument("--swap-space", type=float, default=4.0,
                   help="GiB of host memory for --preemption-mode swap (default 4)")


def kv_mode_config(a: argparse.Namespace) -> dict:
    return {"prefix_cache": a.prefix_cache, "kv_allocation": a.kv_allocation, "preemption_mode": a.preemption_mode,
            "swap_space": a.swap_space}


def add_sampling_args(p: argparse.ArgumentParser, repetition_penalty: float = 1.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256,
                   help="new tokens at most (default 256; the context bounds them too)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="default 1: off")
    g.add_argument("--top-k", type=int, default=0, help="default 0: off")
    g.add_argument("--min-p", type=float, default=0.0, help="default 0: off")
    whose = " (llama.cpp's and Ollama's)" if repetition_penalty != 1 else ""
    g.add_argument("--repetition-penalty", type=float, default=repetition_penalty,
                   help=f"default {repetition_penalty:g}{whose}; 1: off")
    g.add_argument("--seed", type=int, default=None, help="default: none, so sampled text differs from run to run")
    g.add_argument("--stop", action="append", type=terminal_text, default=None, help="stop string (repeatable)")
    g.add_argument("--format", default=None, metavar="json|SCHEMA",
                   help="the answer is a JSON object (json, Ollama's) or follows a JSON schema (its text, or a file)")
    g.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="the answer follows a grammar: GBNF (llama.cpp's) or Lark, its text or a file")


# EngineConfig and SamplingParams fields set by an option of another name (the others: --field-name)
FIELD_OPTIONS = {"num_threads": ("--threads",), "scheduling_policy": ("--scheduling-policy", "--policy")}
ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
# the first word, or a word_with_underscores after it; neither part of a path or a file's name
FIELD_WORD = re.compile(r"^[a-z][a-z0-9_]*\b(?![./])|(?<![\w./-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b(?![/-]|\.?\w)")


def with_option_names(message: str, parser: argparse.ArgumentParser) -> str:
    """An error that names the fields options set ("num_threads must be >= 1", "... lower
    kv_cache_memory / num_kv_blocks"), with those options' names instead, as the user typed them
    ("--threads must be >= 1"): the message's first word, and the engine's settings after it (not
    any word_with_underscores: a trace file's fields and a file's name are not options)."""
    known = {s for action in parser._actions for s in action.option_strings}

    def option(m: re.Match) -> str:
        field = m.group(0)
        if m.start() > 0 and field not in ENGINE_FIELDS:
            return field
        names = FIELD_OPTIONS.get(field, ("--" + field.replace("_", "-"),))
        return next((n for n in names if n in known), field)

    return FIELD_WORD.sub(option, message)


def output_file(path: str, flag: str, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse, before any model loads, a file that cannot be written or that is one of the run's own
    inputs (`bench --workload w.json --record w.json` replaced the workload with a trace)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not path:
        raise ValueError(f"{flag} {path!r} is not a file to write")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write it ({folder} is not a folder this process may write)")
    for given in inputs:
        if given and os.path.exists(path) and os.path.exists(given) and os.path.samefile(path, given):
            raise ValueError(f"{flag} {path} is the run's input file too: writing it would replace it")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    if getattr(a, "record", None) is not None:
        output_file(a.record, "--record", (getattr(a, "workload", None),))
    return EngineConfig(model=a.model, dtype=a.dtype, quantization=a.quantization,
                        int8_activations=a.int8_activations, hf_overrides=a.hf_overrides, device=a.device,
                        pooling_type=a.pooling_type,
                        block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, kv_cache_memory=a.kv_cache_memory,
                        kv_cache_prefault=a.kv_cache_prefault,
                        max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, step_time_target=a.step_time_target,
                        enable_prefix_caching=not a.no_prefix_caching, scheduling_policy=a.scheduling_policy,
                        sjf_aging_rate=a.sjf_aging_rate, attention_backend=a.attention_backend,
                        num_threads=a.threads, enforce_eager=a.enforce_eager,
                        tensor_parallel_size=a.tensor_parallel_size, nnodes=a.nnodes, node_rank=a.node_rank,
                        master_addr=a.master_addr, master_port=a.master_port,
                        kv_transfer_config=a.kv_transfer_config, speculative_config=a.speculative_config,
                        seed=getattr(a, "engine_seed", None), **kv_mode_config(a))


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
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop,
                          structured_outputs=structured_outputs(a.format, a.grammar))


def structured_outputs(fmt: str | None, grammar: str | None):
    """--format and --grammar as StructuredOutputsParams (None: free text); each a text or a file's."""
    from inferlab.structured import StructuredOutputsParams

    def text(value: str) -> str:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return f.read()
        return value
    if fmt is not None and grammar is not None:
        raise ValueError("--format and --grammar both constrain the answer: give one")
    try:
        if fmt is not None:
            return StructuredOutputsParams(json_object=True) if fmt == "json" else \
                StructuredOutputsParams(json=text(fmt))
        return None if grammar is None else StructuredOutputsParams(grammar=text(grammar))
    except (ValueError, OSError) as e:
        raise ValueError(f"{'--format' if fmt is not None else '--grammar'}: {e}") from None
