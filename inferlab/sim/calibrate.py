"""`inferlab calibrate`: time real engine steps over a spread of batch shapes and fit a CostModel."""
from __future__ import annotations

import random
import time

from inferlab.engine import LLMEngine
from inferlab.sampling_params import SamplingParams
from inferlab.sim.cost_model import CostModel, StepFeatures

# (requests, prompt tokens, output tokens): prefill-heavy, decode-heavy and mixed batches
SHAPES = [(1, 32, 16), (2, 480, 8), (4, 256, 24), (8, 128, 32), (16, 64, 32), (32, 48, 24), (12, 320, 16),
          (24, 160, 40)]


def calibrate(engine: LLMEngine, scale: float = 1.0, seed: int = 0) -> tuple[CostModel, int]:
    """Run the shapes (their sizes multiplied by `scale`) and fit; returns (model, steps timed)."""
    samples: list[tuple[StepFeatures, float]] = []
    execute = engine.runner.execute
    features: list[StepFeatures] = []

    def observed(scheduled):
        features.append(StepFeatures.of(scheduled))
        return execute(scheduled)

    rng = random.Random(seed)
    engine.runner.execute = observed
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
        engine.runner.execute = execute
    warm = samples[2:]  # the first steps pay one-off allocation costs
    return CostModel.fit(warm), len(warm)
