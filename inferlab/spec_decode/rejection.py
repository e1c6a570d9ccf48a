"""Verification of drafts by exact rejection sampling (Leviathan et al. 2023; vLLM's rejection sampler).

For a request with drafts d_1..d_k the target computed k + 1 rows of logits in one step: row j is
its distribution p_j for the token after d_1..d_{j-1}. Tokens are emitted left to right:
- random sampling: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), where q_j is the
  distribution d_j was drawn from (a point mass for n-gram or greedy drafts); on the first
  rejection emit a token drawn from norm(max(0, p_j - q_j)) and stop; when all k are accepted,
  emit a bonus token drawn from p_{k+1}. Each emitted token is then distributed exactly as p_j:
  speculation changes the speed, never the distribution. For a point mass this is the same as
  drawing t_j from p_j and keeping d_j while t_j = d_j (accepted with probability p_j(d_j); a
  rejection emits t_j, which is p_j without d_j), and that is how it is done: each emitted token
  is the draw one-at-a-time decoding makes from the same row with the same random number, so a
  seeded request's text does not depend on whether it was given drafts.
- greedy: the same rule with p_j a point mass on its argmax: accept while d_j is the argmax, then
  emit the argmax of the first row that disagrees (or of the last row): exactly the tokens
  one-at-a-time decoding picks.
Penalties read the tokens before each position, so requests using them never speculate
(`speculator.py`); logit bias, temperature, top-k/p and min-p apply to every row.
"""
from __future__ import annotations

import numpy as np
import torch

from inferlab.distributions import distributions, draw, probabilities
from inferlab.request import Request
from inferlab.sampler import SampleResult, apply_logit_bias, argmax_rows, restrict, sample


def accepted_tokens(logits: torch.Tensor, req: Request) -> list[int]:
    """The tokens `req` keeps from its drafts plus one (bonus or correction), given the target's
    float32 logits at its 1 + k verified rows (bias already applied)."""
    drafts, p = req.spec_token_ids, req.params
    if p.greedy:
        target = argmax_rows(logits).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        return drafts[:a] + [target[a]]
    q, gen = req.spec_probs, req.generator
    if q is None:  # point-mass drafts: each row drawn as sample() draws it, drafts kept while they match
        tokens = []
        for j, (row, ids) in enumerate(distributions(logits, [p] * logits.shape[0])):
            t = draw(row, gen)
            tokens.append(t if ids is None else int(ids[t]))
            if j == len(drafts) or tokens[-1] != drafts[j]:
                return tokens
    probs = probabilities(logits, [p] * logits.shape[0])
    tokens = []
    for j, d in enumerate(drafts):  # drafts drawn from a draft model's q
        pd, qd = float(probs[j, d]), float(q[j, d])
        if float(torch.rand((), generator=gen, device=probs.device)) * qd < pd:  # u < p/q, without dividing by 0
            tokens.append(d)
            continue
        residual = (probs[j] - q[j]).clamp(min=0.0)
        if not float(residual.sum()) > 0.0:  # p <= q everywhere can only be rounding: p == q
            residual = probs[j]
        tokens.append(draw(residual, gen))  # draw() needs no normalised distribution
        return tokens
    return tokens + [draw(probs[len(drafts)], gen)]


def verify(logits: torch.Tensor, req: Request) -> list[SampleResult]:
    """The results `req` emits this step from its 1 + k rows of logits, with logprobs if asked."""
    logits = logits.float()
    raw = logits.log_softmax(-1) if req.params.logprobs is not None else None
    for row in logits:  # (bad words, which depend on the tokens before, keep a request from speculating)
        if req.params.logit_bias:
            apply_logit_bias(row, req.params.logit_bias)
        if req.params.allowed_token_ids is not None:
            restrict(row, req)
    tokens = accepted_tokens(logits, req)
    if raw is None:
        return [SampleResult(t) for t in tokens]
    return [SampleResult.with_logprobs(t, raw[j], req.params.logprobs) for j, t in enumerate(tokens)]


def sample_rows(logits: torch.Tensor, reqs: list[Request], widths: np.ndarray,
                eos_ids: set[int]) -> list[list[SampleResult]]:
    """What each request emits: `widths[i]` consecutive rows of `logits` are request i's. A request
    with drafts (width > 1) is verified, the others are sampled together as without speculation."""
    firsts = np.concatenate(([0], np.cumsum(widths)[:-1]))
    out: list[list[SampleResult]] = [[] for _ in reqs]
    plain = np.flatnonzero(widths == 1)
    if plain.size:
        rows = torch.from_numpy(firsts[plain]).to(logits.device)
        for i, res in zip(plain.tolist(), sample(logits[rows], [reqs[i] for i in plain], eos_ids)):
            out[i] = [res]
    for i in np.flatnonzero(widths > 1).tolist():
        out[i] = verify(logits[firsts[i]:firsts[i] + widths[i]], reqs[i])
    return out
