"""A scheduling policy of one's own, loaded with `--scheduling-policy examples/srpt.py:ShortestPredictedOutput`:
shortest remaining *predicted* output first.

SJF orders by `max_tokens`, which is only a cap: a server does not know how long an answer will
be. This policy guesses it instead, from the prompt length, and orders by the guess minus what is
already generated. A policy is a waiting-queue key plus a victim rule: the smallest key is
admitted next and, when KV blocks run out, the running request with the largest key is preempted.
"""
from __future__ import annotations

from inferlab.policy import RequestQueue
from inferlab.request import Request


class ShortestPredictedOutput(RequestQueue):
    def predict(self, req: Request) -> int:
        # A deliberately simple guess (answers scale with questions), never past the cap.
        return min(req.max_tokens, 32 + req.num_prompt_tokens // 2)

    def key(self, req: Request) -> tuple:
        # Fixed while the request waits (nothing is generated then), as RequestQueue requires.
        return (max(0, self.predict(req) - req.num_output_tokens), req.arrival_time, req.seq)
