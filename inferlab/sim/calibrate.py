"""`inferlab calibrate`: time real engine steps over a spread of batch shapes and fit a CostModel;
time K/V copies to a host pool and back for the cost of preemption by swap."""
from __future__ import annotations

import dataclasses
import random
import time

import numpy as np

from inferlab.engine import LLMEngine
from inferlab.kv_pool import kv_bytes_per_block
from inferlab.kv_swap import HostKVPool
from inferlab.sampling_params import SamplingParams
from inferlab.sim.cost_model import CostModel, StepFeatures

# (requests, prompt tokens, output tokens): prefill-heavy, decode-heavy and mixed batches
SHAPES = [(1, 32, 16), (2, 480, 8), (4, 256, 24), (8, 128, 32), (16, 64, 32), (32, 48, 24), (12, 320, 16),
          (24, 160, 40)]


def calibrate(engine: LLMEngine, scale: float = 1.0, seed: int = 0) -> tuple[CostModel, int, float]:
    """Run the shapes (their sizes multiplied by `scale`) and fit; returns (model, steps timed, the
    fit's median relative error over them)."""
    samples: list[tuple[StepFeatures, float]] = []
    features: list[StepFeatures] = []
    rng = random.Random(seed)
    engine.runner.on_execute = lambda scheduled: features.append(StepFeatures.of(scheduled))
    try:
        for i, (n, prompt_len, out_len) in enumerate(SHAPES):
            for j in range(max(1, round(n * scale))):
                ids = [rng.randint(100, 10000) for _ in range(max(2, round(prompt_len * scale)))]
                engine.add_request(f"calibrate-{i}-{j}", {"prompt_token_ids": ids},
                                   SamplingParams(temperature=0, max_tokens=max(1, round(out_len * scale)),
                                                  ignore_eos=True))
            while engine.has_unfinished_requests():
                # the whole step is timed (scheduling, sampling, detokenizing too), as a replay pays it all
                seen, start = len(features), time.perf_counter()
                engine.step()
                if len(features) > seen:
                    samples.append((features[-1], time.perf_counter() - start))
            engine.block_manager.reset_prefix_cache()
    finally:
        engine.runner.on_execute = None
    warm = samples[2:]  # the first steps pay one-off allocation costs
    # at a tiny scale, one-token answers: no decode step to learn from
    if np.linalg.matrix_rank(CostModel.design(warm)) < 4:
        raise ValueError(f"the steps timed at scale {scale} are too alike to fit a cost model (it needs prefills, "
                         "and decodes of several batch sizes and contexts): raise --scale")
    fit = CostModel.fit(warm)
    return dataclasses.replace(fit, **swap_cost(engine)), len(warm), fit.median_error(warm)


def swap_cost(engine: LLMEngine, num_blocks: int = 64, rounds: int = 3) -> dict:
    """Seconds per byte of K/V copied out to a host pool and back (best of `rounds`), and the
    model's K/V bytes per token. Copies the pool's first blocks onto themselves: call it idle."""
    ids = list(range(min(num_blocks, engine.block_manager.num_blocks)))
    host, pairs = HostKVPool(engine.runner, len(ids)), list(zip(ids, ids))
    host.copy(pairs, [])  # allocates the host pool
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        host.copy(pairs, [])
        host.copy([], pairs)
        best = min(best, time.perf_counter() - start)
    per_token = kv_bytes_per_block(engine.model.args, 1, engine.dtype)
    return {"per_swap_byte": best / (2 * len(ids) * engine.config.block_size * per_token),
            "kv_bytes_per_token": per_token}
