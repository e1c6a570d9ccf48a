"""Request: one sequence's state as the scheduler, block manager and runner see it, and as a
dashboard shows it (`request_view`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from inferlab.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its KV dropped (recompute)
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # admitted, its blocks loading from a KV connector
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine failed on this request alone

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    """`token_ids` holds prompt then output; `num_computed_tokens` is how many have KV in the
    cache. The scheduler's only job is to make `num_computed_tokens` catch up with
    `len(token_ids)` (vLLM v1's rule), which covers prefill, chunked prefill and decode alike."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seq: int = 0  # admission order, stamped by the scheduler: breaks arrival-time ties
    max_tokens: int = 1  # the engine resolves params.max_tokens=None against the context
    priority: int = 0
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # keys of the full blocks cached so far
    cache_salt: str | None = None  # part of its first block's key: only requests with the same salt share blocks
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    stop_reason: int | str | None = None
    generator: Any = None  # this request's own torch.Generator for sampling
    penalty_counts: Any = None  # its tokens as the sampler's penalties read them (sampler.TokenCounts)
    # Speculative decoding: tokens proposed after the last one, verified by the next step (vLLM v1's
    # name), and the distributions they were drawn from (None: each picked for sure)
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: Any = None
    # params.prompt_logprobs: prompt token i + 1's SampleResult at [i], appended as its position is
    # computed (None: not asked)
    prompt_logprobs: list | None = None
    # an embedding request (pooling.PoolingParams): it ends at its last prompt token, whose hidden
    # state it returns instead of a generated token; None for a generation
    pooling: Any = None
    # mean pooling: the sum of its prompt rows' final states added so far, and of how many positions
    # (None: it pools its last row, or is a generation)
    pooled: Any = None
    pooled_upto: int = 0
    # structured outputs (inferlab/structured/): the grammar that masks its logits; None: free text
    guide: Any = None
    # params.allowed_token_ids as a mask of the tokens it may not draw (built by the sampler once), and
    # params.bad_words as token ids (inputs.bad_word_ids)
    banned: Any = None
    bad_words: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = []

    @property
    def scoring_prompt(self) -> bool:
        """Whether prompt positions are still to be scored (their rows computed, not read from a cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def computes_prompt(self) -> bool:
        """Whether every prompt row must be computed here, none read from a cache or loaded: scored
        (prompt_logprobs) or mean-pooled positions remain."""
        return self.scoring_prompt or (self.pooled is not None and self.pooled_upto < self.num_prompt_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def remaining_work(self) -> int:
        """Tokens still to compute or generate: the job length shortest-job-first orders by."""
        return (self.num_tokens - self.num_computed_tokens) + max(0, self.max_tokens - self.num_output_tokens)


def block_runs(table: list[int]) -> list[list[int]]:
    """[[first_block, count], ...]: block tables are mostly runs of consecutive blocks."""
    runs: list[list[int]] = []
    for b in table:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return runs


def request_view(req: Request) -> dict:
    """One live request as a dashboard shows it: queue, progress, priority and its blocks."""
    return {"id": req.request_id, "state": req.status.value, "priority": req.priority,
            "computed": req.num_computed_tokens, "prompt": req.num_prompt_tokens,
            "output": req.num_output_tokens, "max_tokens": req.max_tokens,
            "preemptions": req.num_preemptions, "blocks": block_runs(req.block_table)}
