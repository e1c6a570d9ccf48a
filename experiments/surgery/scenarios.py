"""The surgery room's traces: the same requests and knobs for vLLM and for InferLab.

Plain Python with no import from either engine, so both capture scripts (each in its own
environment) read the same definition. Prompts are token ids (no tokenizer in the loop), all
requests arrive at once in list order, decoding is greedy with ignore_eos, so every request
generates exactly `max_tokens` and the schedule depends on the knobs alone, not on the model.
"""
from __future__ import annotations

import random

# Knobs both engines are given. `num_blocks` is the usable pool: vLLM keeps one more block aside
# (its null block), so it is started with num_gpu_blocks_override = num_blocks + 1. Blocks hold
# 32 tokens: vLLM's CPU attention takes multiples of 32 only (its default there is 128).
# The long-prefill cap is off in both (vLLM's default is off; InferLab's is a quarter of the budget).
SCENARIOS: dict[str, dict] = {
    # prefix caching and chunked prefill: a budget of 128 tokens spreads admissions over steps, so
    # later requests find the shared system prompt of the earlier ones already cached
    "cache": {"num_blocks": 64, "block_size": 32, "max_num_batched_tokens": 128, "max_num_seqs": 8,
              "max_model_len": 512, "shared_prefix": 64, "prompt_lens": [90, 70, 100, 58, 75, 66],
              "shared": [True, True, True, False, True, False], "max_tokens": 12},
    # a pool too small for the batch: preemption and recomputation
    "pressure": {"num_blocks": 8, "block_size": 32, "max_num_batched_tokens": 256, "max_num_seqs": 8,
                 "max_model_len": 256, "shared_prefix": 0, "prompt_lens": [40, 52, 36, 60, 44],
                 "shared": [False] * 5, "max_tokens": 32},
}
# The out-of-memory moment: a pool of 4 blocks (128 tokens) under a context of 2,048, and a prompt
# longer than the pool. vLLM refuses to start; InferLab starts and refuses the request.
OOM = {"num_blocks": 4, "block_size": 32, "max_model_len": 2048, "prompt_len": 200}


def requests(name: str, seed: int = 0) -> list[dict]:
    """[{"prompt_token_ids": [...], "max_tokens": n}] for a scenario, in arrival order."""
    s = SCENARIOS[name]
    rng = random.Random(seed)
    prefix = [rng.randint(100, 10000) for _ in range(s["shared_prefix"])]
    out = []
    for n, shared in zip(s["prompt_lens"], s["shared"], strict=True):
        head = prefix if shared else []
        out.append({"prompt_token_ids": head + [rng.randint(100, 10000) for _ in range(n - len(head))],
                    "max_tokens": s["max_tokens"]})
    return out


def oom_prompt(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(100, 10000) for _ in range(OOM["prompt_len"])]
