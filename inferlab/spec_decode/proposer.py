"""The proposer interface: what the engine asks of any way of guessing the next tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inferlab.request import Request


@dataclass
class Draft:
    """Proposed next tokens for one request, and the distributions they were drawn from: `probs`
    [len(tokens), vocab] for a draft model sampling a random request, None for a point mass (the
    proposer picked each token for sure: n-gram lookup, or greedy drafting)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Proposer:
    """Base-class contract: `propose` is called once a step, before scheduling, with the decoding
    requests allowed to speculate and how many tokens each may propose (k_i >= 1). It returns one
    Draft (1..k_i tokens) or None per request, and must not change the requests, except that it may
    give one room for its verify step (blocks for 1 + k_i more tokens, from the block manager). `release` is
    called when a request finishes or is aborted, to drop whatever the proposer keeps for it."""

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft | None]:
        raise NotImplementedError

    def release(self, req: Request) -> None:
        pass

    def forget_others(self, live: set[str]) -> None:
        """Drop state kept for requests not in `live` (ids of the running requests)."""

    def check_integrity(self) -> None:
        """Raise AssertionError if the proposer's own state (a draft pool) is broken."""

    def snapshot(self) -> dict:
        return {}

    def describe(self) -> str:
        """What proposes, for the start-up log."""
        return type(self).__name__
