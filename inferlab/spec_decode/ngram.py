"""Prompt lookup (n-gram) proposals: no extra weights, only the request's own tokens.

vLLM's `ngram_proposer` rule: find the longest suffix of the context, between `prompt_lookup_max`
and `prompt_lookup_min` tokens, that also occurs earlier in the context; propose the (up to) k
tokens that followed its most recent earlier occurrence. Text that copies from its input (edits,
summaries, code changes, retrieval answers) repeats long runs of the prompt, which is where this
pays off; on text that does not, it usually finds nothing and the step is a plain decode.
"""
from __future__ import annotations

import numpy as np

from inferlab.request import Request
from inferlab.spec_decode.proposer import Draft, Proposer


def propose_ngram(tokens: list[int] | np.ndarray, k: int, lo: int, hi: int) -> list[int]:
    """The tokens that followed the latest earlier match of the longest suffix of `tokens` of
    `lo`..`hi` tokens, at most `k` of them; [] when no suffix of `lo` tokens occurs earlier."""
    seq = np.asarray(tokens, dtype=np.int64)
    n = len(seq)
    if n < lo + 1:
        return []
    # Candidate match ends: earlier positions holding the last token, latest first. Each one's match
    # length is then counted backwards, at most `hi` tokens.
    ends = np.flatnonzero(seq[:-1] == seq[-1])[::-1]
    best_len, best_end = 0, -1
    for end in ends.tolist():
        length = 1
        while length < hi and length <= end and seq[end - length] == seq[n - 1 - length]:
            length += 1
        if length > best_len:  # strictly longer: among equal lengths the latest match wins
            best_len, best_end = length, end
            if length == hi:
                break
    if best_len < lo:
        return []
    return seq[best_end + 1:best_end + 1 + k].tolist()


class NgramProposer(Proposer):
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft | None]:
        drafts: list[Draft | None] = []
        for req, k in zip(reqs, ks):
            tokens = propose_ngram(req.token_ids, k, self.lo, self.hi)
            drafts.append(Draft(tokens) if tokens else None)
        return drafts

    def describe(self) -> str:
        return f"prompt lookup of {self.hi} down to {self.lo} tokens"
