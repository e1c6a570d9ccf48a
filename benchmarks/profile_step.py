"""Where a step's time goes: one decode step (64 sequences of ~300 tokens) and one prefill step
(4 prompts of 512 tokens), on the embedded model, split by kind of work.

    .venv/bin/python benchmarks/profile_step.py [--dtype bfloat16] [--threads N]

The native kernels are called through ctypes, which PyTorch's profiler does not see, so the
model's ops are wrapped in `record_function`s here (only in this script) and timed by kind.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile, record_function

from inferlab import LLM, SamplingParams, ops, runner
from inferlab.model import llama

KINDS = {  # record_function label -> kind of work; the wrapped functions never nest
    "linear": "linear layers (matmul)", "attention": "attention (incl. KV write)",
    "rms_norm": "norm, RoPE, SiLU", "rope": "norm, RoPE, SiLU", "silu_and_mul": "norm, RoPE, SiLU",
    "sample": "sampling",
}


def wrap(module, name: str, label: str) -> None:
    fn = getattr(module, name)

    def timed(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    setattr(module, name, timed)


def breakdown(llm: LLM, title: str) -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step"):
            llm.engine.step()
    per_kind: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in prof.key_averages():
        if e.key == "step":
            total = e.cpu_time_total / 1e3
        elif e.key in KINDS:
            per_kind[KINDS[e.key]] += e.cpu_time_total / 1e3
    per_kind["everything else (Python, embedding, batch set-up)"] = total - sum(per_kind.values())
    print(f"\n{title}: {total:.1f} ms ({llm.engine.last_step_tokens} tokens)")
    print("| work | ms | share |\n|---|---|---|")
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    llm = LLM(dtype=a.dtype, num_threads=a.threads, long_prefill_token_threshold=2048)
    for name in ("rms_norm", "rope", "silu_and_mul", "linear"):
        wrap(ops, name, name)
    wrap(llama, "paged_attention", "attention")
    wrap(runner, "sample", "sample")
    engine, rng = llm.engine, random.Random(0)

    def add(tag: str, n: int, length: int, out: int) -> None:
        for i in range(n):
            engine.add_request(f"{tag}{i}", {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(length)]},
                               SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))
    add("w", 4, 512, 1)  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    add("p", 4, 512, 1)
    breakdown(llm, "Prefill step, 4 x 512 new tokens")
    while engine.has_unfinished_requests():
        engine.step()
    add("d", 64, 300, 20)
    while engine.last_step_tokens != 64:
        engine.step()
    engine.step()
    breakdown(llm, "Decode step, 64 sequences of ~300 tokens")


if __name__ == "__main__":
    main()
