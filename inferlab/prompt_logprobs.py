"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's log-probability given the tokens
before it, and the top-N there, what evaluation harnesses score answers with. The row of position q
predicts token q + 1, so a step scores the prompt positions its chunk computes, up to the second to
last (the last one's row predicts the first generated token). A request being scored takes no
prefix-cache hits (`Request.scoring_prompt`), so every such row is computed once it is admitted; a
position computed again (after a preemption, or a failed batch retried) is not scored again.
"""
from __future__ import annotations

import numpy as np
import torch

from inferlab.request import Request
from inferlab.sampler import SampleResult

ROWS_AT_ONCE = 256  # log_softmax over the vocabulary this many rows at a time: bounds its memory


def score_spans(scheduled: list[tuple[Request, int]]) -> np.ndarray | None:
    """[S, 2] int64: the positions [lo, hi) whose rows each sequence scores this step (lo = hi where
    none); None where no sequence scores any."""
    scoring = [i for i, (req, _) in enumerate(scheduled) if req.scoring_prompt]
    if not scoring:  # nearly every step: nothing built
        return None
    spans = np.zeros((len(scheduled), 2), dtype=np.int64)
    for i in scoring:
        req, n = scheduled[i]
        lo = max(req.num_computed_tokens, len(req.prompt_logprobs))
        spans[i] = lo, max(lo, min(req.num_computed_tokens + n, req.num_prompt_tokens - 1))
    return spans if (spans[:, 1] > spans[:, 0]).any() else None


def score_rows(spans: np.ndarray, starts: np.ndarray, row_starts: np.ndarray) -> list[int]:
    """The step's rows of those positions, sequence after sequence (the order `score` reads them in)."""
    return [r for i, (lo, hi) in enumerate(spans) for r in range(row_starts[i] + lo - starts[i],
                                                                  row_starts[i] + hi - starts[i])]


def score(scheduled: list[tuple[Request, int]], spans: np.ndarray, logits: torch.Tensor) -> None:
    """Append each scored position's result to its request's `prompt_logprobs`: the next prompt
    token's logprob and rank, and the row's top params.prompt_logprobs."""
    targets = [(req, q) for (req, _), (lo, hi) in zip(scheduled, spans) for q in range(lo, hi)]
    for start in range(0, len(targets), ROWS_AT_ONCE):
        logprobs = logits[start:start + ROWS_AT_ONCE].float().log_softmax(-1)
        for row, (req, q) in zip(logprobs, targets[start:start + ROWS_AT_ONCE]):
            if len(req.prompt_logprobs) == q:  # in order, once
                req.prompt_logprobs.append(SampleResult.with_logprobs(req.prompt_token_ids[q + 1], row,
                                                                      req.params.prompt_logprobs))
