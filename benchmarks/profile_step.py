"""Where a step's time goes: one decode step (64 sequences of ~300 tokens, or `--seqs`) and one prefill step
(4 prompts of 512 tokens), on the embedded model or `--model`, split by kind of work. The decode step is shown
as it runs (replayed from a tape in one native call, whose ops the replay times itself) and op by op
(through the Python model, as where no tape runs).

    .venv/bin/python benchmarks/profile_step.py [--model X.gguf] [--dtype bfloat16] [--quantization none] \\
        [--threads N] [--seqs 1]

The model's ops are wrapped here (only in this script) with wall-clock timers, summed by kind; the
native kernels run through ctypes, which PyTorch's profiler would not see, and the timers cost far
less than its events. Each step is measured several times and the fastest kept, as the machine's
other load only ever adds time.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict

import numpy as np

from inferlab import LLM, SamplingParams, kernels, runner
from inferlab.cli_args import positive_int
from inferlab.config import DTYPES
from inferlab.model import llama
from inferlab.model.layers import linear, mlp, norm  # the modules, not the functions of those names
from inferlab.model.layers.keep import QUANTIZATIONS
from inferlab.tape import DecodeTape

KINDS = {  # wrapped function -> kind of work; the wrapped functions never nest
    "linear": "linear layers (matmul)", "paged_attention": "attention (incl. KV write)",
    "rms_norm": "norm, RoPE, SiLU", "rope": "norm, RoPE, SiLU", "silu_and_mul": "norm, RoPE, SiLU",
    "sample": "sampling", "__call__": "the tape's replay itself (Python and C between its ops)",
}
spent: dict[str, float] = defaultdict(float)


def wrap(module, name: str) -> None:
    fn = getattr(module, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[KINDS[name]] += time.perf_counter() - t
    setattr(module, name, timed)


# The tape's op codes, to the same kinds: its replay is one native call, split by its own timers
TAPE_KINDS = {kernels.tape_ops()[op]: KINDS[fn] for op, fn in [
    ("linear", "linear"), ("rms_norm", "rms_norm"), ("rope", "rope"), ("silu_and_mul", "silu_and_mul"),
    ("write_kv", "paged_attention"), ("paged_attention", "paged_attention")]}
TAPE = KINDS["__call__"]


def timed_step(llm: LLM) -> tuple[float, dict[str, float]]:
    spent.clear()
    tape = llm.engine.runner.tape
    if tape is not None:
        tape.op_seconds = np.zeros(len(tape.ops))
    t = time.perf_counter()
    llm.engine.step()
    total = time.perf_counter() - t
    if tape is not None and TAPE in spent:  # the replay's ops by kind; what is left is the call's own cost
        for code, s in zip(tape.ops[:, 0], tape.op_seconds):
            spent[TAPE_KINDS.get(int(code), "the tape's embedding lookup")] += s
            spent[TAPE] -= s
    return total, dict(spent)


def report(title: str, tokens: int, total: float, per_kind: dict[str, float]) -> None:
    per_kind["everything else (Python, embedding, batch set-up)"] = total - sum(per_kind.values())
    print(f"\n{title}: {1e3 * total:.1f} ms ({tokens} tokens, {tokens / total:.0f} tok/s)")
    print("| work | ms | share |\n|---|---|---|")
    for kind, s in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {1e3 * s:.1f} | {100 * s / total:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the embedded model)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES)
    ap.add_argument("--quantization", default="auto", choices=QUANTIZATIONS, type=str.lower)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--seqs", type=positive_int, default=64,
                    help="sequences of the decode step (1: one request's step)")
    ap.add_argument("--int8-activations", action="store_true")
    ap.add_argument("--repeat", type=positive_int, default=5,
                    help="measure each step this many times, keep the fastest")
    a = ap.parse_args()
    # the KV pool taken at start, as `serve` and `bench` take it: on fresh pages a 4 x 512 prefill step's K/V
    # writes cost ~100 ms of page faults, which the profile counted as attention
    llm = LLM(model=a.model, dtype=a.dtype, quantization=a.quantization, num_threads=a.threads,
              long_prefill_token_threshold=2048,
              int8_activations=a.int8_activations, kv_cache_prefault=True)
    wrap(norm, "rms_norm")
    wrap(linear, "linear")
    for name in ("rope", "paged_attention"):
        wrap(llama, name)
    wrap(mlp, "silu_and_mul")
    wrap(runner, "sample")
    wrap(DecodeTape, "__call__")
    engine, rng = llm.engine, random.Random(0)
    top = min(10000, engine.model.args.vocab_size - 1)  # random prompt tokens, within any vocabulary

    def add(tag: str, n: int, length: int, out: int) -> None:
        length = min(length, engine.max_model_len - out)  # a model of a shorter context: shorter prompts
        for i in range(n):
            engine.add_request(f"{tag}{i}", {"prompt_token_ids": [rng.randint(0, top) for _ in range(length)]},
                               SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()
    add("w", 4, 512, 1)  # warm-up
    drain()
    prefills = []
    for r in range(a.repeat):
        add(f"p{r}-", 4, 512, 1)  # fresh prompts: nothing cached
        prefills.append(timed_step(llm))
        drain()
    report("Prefill step, 4 x 512 new tokens", 2048, *min(prefills, key=lambda x: x[0]))
    if a.seqs > engine.config.max_num_seqs:
        raise ValueError(f"--seqs {a.seqs} is more than the engine runs at once (max_num_seqs "
                         f"{engine.config.max_num_seqs})")
    # enough tokens that the first still decode when the last start: the prompts' prefill steps, and then some
    add("d", a.seqs, 300, 20 + 2 * a.repeat + -(-a.seqs * 300 // 2048))
    while engine.last_step_tokens != a.seqs:
        if not engine.has_unfinished_requests():
            raise ValueError(f"no step ran all {a.seqs} sequences' decodes at once (the KV pool too small?)")
        engine.step()
    tape, ways = engine.runner.tape, ["as it runs" if engine.runner.tape else "op by op (no tape here)"]
    if tape is not None:
        ways.append("op by op")
    for way in ways:
        engine.runner.tape = tape if way == "as it runs" else None
        report(f"Decode step, {a.seqs} sequences of ~300 tokens, {way}", a.seqs,
               *min((timed_step(llm) for _ in range(a.repeat)), key=lambda x: x[0]))
    engine.runner.tape = tape


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a model that does not load: one line
        sys.exit(f"error: {e}")
