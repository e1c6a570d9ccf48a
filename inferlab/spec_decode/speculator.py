"""Speculator: which decoding requests speculate each step and how far, the proposer (built by
method name, here and nowhere else), and the acceptance counters the snapshot, /metrics and the
dashboard read.

When not to speculate (a request that does not simply decodes one token, as without speculation):
| rule                                                | why                                              |
|-----------------------------------------------------|--------------------------------------------------|
| more than `disable_by_batch_size` requests decode   | a large batch already fills the cores with useful |
| (default 64 // (1 + k): 12 at k = 4; a draft model: | rows; its verify rows would leave the one-call   |
| 10 // (1 + k): 2 at k = 4)                          | decode step (64 rows) and cost more than they win;|
|                                                     | a draft model's own steps grow with the batch too |
| the request uses penalties or bad words, or waits   | they depend on the tokens before each position   |
| for min_tokens                                      |                                                  |
| its recent drafts were mostly rejected: acceptance  | a wasted verify costs k rows; it pauses          |
| (an exponential average) below MIN_ACCEPTANCE       | PAUSE_STEPS steps, then tries again              |
| it may emit only one more token                     | k shrinks to max_tokens - emitted - 1            |
"""
from __future__ import annotations

import logging
import os

from inferlab.request import Request, RequestStatus
from inferlab.spec_decode.config import SpeculativeConfig
from inferlab.spec_decode.draft import DraftModelProposer
from inferlab.spec_decode.ngram import NgramProposer
from inferlab.spec_decode.proposer import Proposer

log = logging.getLogger("inferlab")
MIN_ACCEPTANCE = 0.2  # of drafted tokens accepted, averaged over a request's recent drafts
AVERAGING = 0.3  # weight of the latest draft in that average
PAUSE_STEPS = 8


def ngram(config: SpeculativeConfig, engine, draft_loaded) -> Proposer:
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)


def same_checkpoint(config: SpeculativeConfig, engine, draft_loaded) -> bool:
    """Whether the draft is the target's own checkpoint (perhaps quantized otherwise): then it shares
    the target's K/V unless `share_kv` says otherwise."""
    if draft_loaded is not None:
        return draft_loaded[0] is engine.model
    paths = [None if m in (None, "embedded") else os.path.realpath(m) for m in (config.model, engine.config.model)]
    return paths[0] == paths[1]


def draft_model(config: SpeculativeConfig, engine, draft_loaded) -> Proposer:
    runner = engine.runner
    share = config.share_kv if config.share_kv is not None else same_checkpoint(config, engine, draft_loaded)
    return DraftModelProposer(config, engine.model.args.vocab_size, engine.dtype, engine.device,
                              engine.block_manager.num_blocks, engine.config.block_size,
                              native=runner.native is not None, fused=runner.tape is not None,
                              loaded=draft_loaded, target=(engine.block_manager, runner) if share else None,
                              tokenizer=engine.tokenizer)


PROPOSERS = {"ngram": ngram, "draft_model": draft_model}


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        self.k = config.num_speculative_tokens
        self.acceptance: dict[str, float] = {}  # request id -> recent acceptance
        self.paused: dict[str, int] = {}  # request id -> steps left before it drafts again
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.k
        self.last = {"drafts": 0, "draft_tokens": 0, "accepted": 0}  # the last step's figures
        log.info("speculative decoding: %s, k = %d, up to %d decodes at once", proposer.describe(), self.k,
                 config.disable_by_batch_size)

    @classmethod
    def build(cls, config: SpeculativeConfig, engine, draft_loaded=None) -> Speculator:
        return cls(config, PROPOSERS[config.method](config, engine, draft_loaded))

    def eligible(self, req: Request) -> bool:
        p = req.params
        return not p.has_penalties and not req.bad_words and req.num_output_tokens >= p.min_tokens and \
            req.max_tokens - req.num_output_tokens > 1 and not self._paused(req.request_id)

    def _paused(self, rid: str) -> bool:
        left = self.paused.get(rid)
        if left is None:
            return False
        if left <= 1:
            del self.paused[rid]
            self.acceptance[rid] = MIN_ACCEPTANCE  # one good draft lifts it back, one bad pauses it again
        else:
            self.paused[rid] = left - 1
        return True

    def propose(self, running: list[Request]) -> None:
        """Set each running request's drafts for the coming step (none for most)."""
        self.last = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
        self.proposer.forget_others({r.request_id for r in running})
        decodes = [r for r in running if r.status is RequestStatus.RUNNING
                   and r.num_computed_tokens == r.num_tokens - 1]
        for r in running:
            r.spec_token_ids, r.spec_probs = [], None
        if not decodes or len(decodes) > self.config.disable_by_batch_size:
            return
        reqs = [r for r in decodes if self.eligible(r)]
        ks = [min(self.k, r.max_tokens - r.num_output_tokens - 1) for r in reqs]
        for req, draft in zip(reqs, self.proposer.propose(reqs, ks) if reqs else []):
            if draft is not None:
                req.spec_token_ids, req.spec_probs = draft.tokens, draft.probs

    def observe(self, req: Request, num_emitted: int) -> None:
        """`req` verified its drafts (still in `spec_token_ids`) and emits `num_emitted` tokens."""
        drafted, accepted = len(req.spec_token_ids), num_emitted - 1
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for pos in range(accepted):
            self.accepted_per_pos[pos] += 1
        self.last["drafts"] += 1
        self.last["draft_tokens"] += drafted
        self.last["accepted"] += accepted
        rid = req.request_id
        rate = (1 - AVERAGING) * self.acceptance.get(rid, 1.0) + AVERAGING * accepted / drafted
        self.acceptance[rid] = rate
        if rate < MIN_ACCEPTANCE:
            self.paused[rid] = PAUSE_STEPS

    def release(self, req: Request) -> None:
        self.acceptance.pop(req.request_id, None)
        self.paused.pop(req.request_id, None)
        self.proposer.release(req)

    def check_integrity(self) -> None:
        self.proposer.check_integrity()

    def snapshot(self) -> dict:
        """Counters since start (vLLM's spec_decode_* names) and derived figures: acceptance rate
        (accepted / drafted) and mean accepted length (tokens emitted per verified draft)."""
        d, t, a = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return {"method": self.config.method, "k": self.k, "num_drafts": d, "num_draft_tokens": t,
                "num_accepted_tokens": a, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": a / t if t else None, "mean_accepted_length": 1 + a / d if d else None,
                "last_step": dict(self.last), **self.proposer.snapshot()}
