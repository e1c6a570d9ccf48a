"""Speed of random sampling (temperature, top-k, top-p, min-p) against greedy: the sampler alone on
a batch of rows of the embedded model's vocabulary, then whole generations of the `cpu` workload's
first requests at each setting.

    .venv/bin/python benchmarks/sampling_speed.py [--rows 64] [--tokens 64] [--threads 2]

Prints ms per `sample()` call for `--rows` rows of random logits (N(0, 4^2): flatter than a real
model's, so top-p reaches past the first few hundred tokens there) of requests 2,000 tokens long,
then output tok/s for `--rows` requests of `--tokens` tokens each, one setting after another after
a greedy warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch

from inferlab import LLM, SamplingParams
from inferlab.cli_args import positive_int
from inferlab.request import Request
from inferlab.sampler import request_generator, sample

SETTINGS = {"greedy": dict(temperature=0.0), "temperature 0.8": dict(temperature=0.8),
            "top_p 0.95": dict(temperature=0.8, top_p=0.95), "top_k 40": dict(temperature=0.7, top_k=40),
            "min_p 0.05": dict(temperature=1.0, min_p=0.05),
            "penalties": dict(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.3)}
WORKLOAD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "workload.py")


def sampler_ms(rows: int, settings: dict, repeat: int = 15) -> float:
    reqs, rng = [], random.Random(0)
    for i in range(rows):  # a 1,000-token prompt and as many tokens out (what the penalties read)
        reqs.append(Request(f"r{i}", [rng.randrange(49152) for _ in range(1000)], SamplingParams(**settings), 0.0))
        reqs[-1].token_ids.extend(rng.randrange(49152) for _ in range(1000))
        reqs[-1].generator = request_generator(i, torch.device("cpu"))
    logits = torch.randn(rows, 49152, generator=torch.Generator().manual_seed(0)) * 4
    sample(logits.clone(), reqs, set())
    t = time.perf_counter()
    for _ in range(repeat):  # a token more each step, as a generation goes
        for r in reqs:
            r.token_ids.append(rng.randrange(49152))
        sample(logits.clone(), reqs, set())
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=positive_int, default=64)
    p.add_argument("--tokens", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"| setting | sample(), {a.rows} rows, ms | generate, {a.rows} x {a.tokens} tokens, output tok/s |")
    print("|---|---|---|")
    requests = json.loads(subprocess.check_output([sys.executable, WORKLOAD, "cpu"]))["requests"][:a.rows]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    llm = LLM(num_threads=a.threads)
    llm.generate(prompts, SamplingParams(max_tokens=a.tokens, ignore_eos=True), use_tqdm=False)  # warm-up
    for name, settings in SETTINGS.items():
        params = [SamplingParams(max_tokens=a.tokens, ignore_eos=True, seed=i, **settings) for i in range(len(prompts))]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
        print(f"| {name} | {sampler_ms(a.rows, settings):.1f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
