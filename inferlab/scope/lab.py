"""The lab panel's burst: N requests of a given prompt and output length and priority, optionally
opening with one shared system prompt, made of token ids so their lengths are exact."""
from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

MAX_BURST = 256
SHARED_FRACTION = 0.75  # of the prompt that the shared system prompt takes, when on


class Burst(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as the API: "2" or true is no count

    count: int = Field(8, ge=1, le=MAX_BURST)
    prompt_len: int = Field(128, ge=1)
    output_len: int = Field(64, ge=1)
    priority: int = Field(0, ge=-1000, le=1000)
    shared_prefix: bool = True
    seed: int | None = None


def filler_ids(rng: random.Random, n: int, vocab_size: int, avoid: set[int]) -> list[int]:
    """`n` ordinary token ids: the low ids are special tokens in the usual vocabularies."""
    lo = min(256, vocab_size // 2)
    ids: list[int] = []
    while len(ids) < n:
        t = rng.randrange(lo, vocab_size)
        if t not in avoid:
            ids.append(t)
    return ids


def burst_prompts(burst: Burst, vocab_size: int, avoid: set[int]) -> list[list[int]]:
    """One prompt per request; with `shared_prefix`, all begin with the same system prompt (the
    same in every burst, so later bursts hit the prefix cache too) and differ after it."""
    shared = 0
    if burst.shared_prefix:
        shared = int(burst.prompt_len * SHARED_FRACTION)
    system = filler_ids(random.Random(0), shared, vocab_size, avoid)
    rng = random.Random(burst.seed)
    return [system + filler_ids(rng, burst.prompt_len - shared, vocab_size, avoid) for _ in range(burst.count)]
