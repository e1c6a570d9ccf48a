"""Sampler: turn a batch's logits into next tokens, one row per request, each with its own params.

Order per row: logit bias, allowed tokens and bad words -> penalties -> min_tokens EOS ban -> a
structured output's grammar mask ->
(greedy argmax | temperature, min-p, top-k, top-p, then a draw from the request's own generator); the
grammar then takes in the token. A per-request generator is what makes a seeded request produce the
same text whatever else shares its batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from inferlab import kernels
from inferlab.distributions import distributions, draw
from inferlab.request import Request
from inferlab.structured.guide import mask_rows


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_logprobs: dict[int, float] | None = None
    rank: int | None = None  # of the sampled token among the step's: 1 + how many were more likely
    embedding: list[float] | None = None  # a pooling request's vector, pooled from the same row

    @classmethod
    def with_logprobs(cls, token_id: int, logprobs: torch.Tensor, n: int) -> SampleResult:
        """`token_id` with its logprob and rank in `logprobs` (a row over the vocabulary) and the row's
        `n` most likely tokens: what a request asking for logprobs gets, sampled or verified."""
        lp = float(logprobs[token_id])
        top = {}
        if n:
            vals, ids = logprobs.topk(n)
            top = dict(zip(ids.tolist(), vals.tolist()))
        return cls(token_id, lp, top, int((logprobs > lp).sum()) + 1)


def request_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own random stream. Every bit of the seed is mixed in: PyTorch's CPU generator
    keeps only the low 32 bits of the number it is seeded with, so seeds 1 and 2**32 + 1 would
    otherwise give the same text."""
    mixed = int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little")
    return torch.Generator(device).manual_seed(mixed)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index of the maximum, like torch). On CPU, torch's is slow for a
    [64, 49152] batch of logits (15x numpy's), which made greedy sampling a visible cost: bf16 rows
    go to the native kernel (0.2 ms), fp32 rows to numpy."""
    if x.dtype == torch.bfloat16 and x.is_contiguous() and x.dim() == 2:
        k = kernels.for_tensor(x)
        if k is not None:
            out = torch.empty(x.shape[0], dtype=torch.int64)
            k.argmax(out, x, x.shape[0], x.shape[1], kernels.DTYPE_CODES[x.dtype])
            return out
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.numpy().argmax(-1))
    return x.argmax(-1)


class TokenCounts:
    """A request's distinct tokens so far (prompt and output) and how often each came in its output,
    in tensors that grow with it: a step reads only the tokens appended since the last (rebuilding
    them from the whole history every step took 0.4 ms a row at 200 tokens and 1.4 at 8,000)."""

    def __init__(self) -> None:
        self.read = 0  # tokens of the request taken in so far
        self.slot: dict[int, int] = {}  # token -> its place in ids / counts
        self.ids = torch.empty(64, dtype=torch.long)
        self.counts = torch.zeros(64)  # times in the output (0: in the prompt only)
        self.largest = -1  # the largest token id

    def update(self, req: Request) -> int:
        """Take in the tokens appended since the last call; returns how many distinct tokens there are."""
        new, first_output, before = req.token_ids[self.read:], req.num_prompt_tokens - self.read, len(self.slot)
        self.read = len(req.token_ids)
        fresh, bumps = [], {}
        for j, t in enumerate(new):
            at = self.slot.get(t)
            if at is None:
                at = self.slot[t] = len(self.slot)
                fresh.append(t)
            if j >= first_output:
                bumps[at] = bumps.get(at, 0) + 1
        while len(self.slot) > len(self.ids):  # twice the room
            self.ids = torch.cat([self.ids, torch.empty_like(self.ids)])
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        if fresh:
            self.ids[before:len(self.slot)] = torch.tensor(fresh)
            self.largest = max(self.largest, max(fresh))
        if bumps:
            self.counts[list(bumps)] += torch.tensor(list(bumps.values()), dtype=self.counts.dtype)
        return len(self.slot)


def apply_penalties(logits: torch.Tensor, req: Request) -> None:
    """In place on one row. Repetition penalty (HF/CTRL style) covers prompt and output;
    presence and frequency penalties (OpenAI style) cover the output only. With `penalty_last_n`
    (llama.cpp's), all three read the last N tokens, prompt's and output's alike."""
    p = req.params
    if p.penalty_last_n > 0:  # a few dozen tokens: counted afresh each step
        window = torch.tensor(req.token_ids[-p.penalty_last_n:], dtype=torch.long)
        ids, counts = torch.unique(window, return_counts=True)
        ids, counts = ids.to(logits.device), counts.to(device=logits.device, dtype=logits.dtype)
        largest = int(ids[-1])
    else:
        if req.penalty_counts is None:
            req.penalty_counts = TokenCounts()
        seen = req.penalty_counts
        n = seen.update(req)
        ids, counts = seen.ids[:n].to(logits.device), seen.counts[:n].to(device=logits.device, dtype=logits.dtype)
        largest = seen.largest
    if largest >= logits.shape[-1]:  # a token past the logits (an added one): nothing to penalise
        inside = ids < logits.shape[-1]
        ids, counts = ids[inside], counts[inside]
    vals = logits[ids]
    if p.repetition_penalty != 1.0:
        vals = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        vals -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    logits[ids] = vals


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> None:
    """In place on one row: OpenAI's logit_bias, added to the logits before anything else chooses."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)


def restrict(logits: torch.Tensor, req: Request) -> None:
    """In place on one row: what vLLM's allowed_token_ids and bad_words rule out (a bad word's last
    token, where its tokens before it end the output)."""
    if req.params.allowed_token_ids is not None:
        if req.banned is None:
            req.banned = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            req.banned[req.params.allowed_token_ids] = False
        logits.masked_fill_(req.banned, float("-inf"))
    for word in req.bad_words:
        before = len(word) - 1
        if before <= req.num_output_tokens and req.token_ids[len(req.token_ids) - before:] == word[:-1]:
            logits[word[-1]] = float("-inf")


class NoTokenLeft(ValueError):
    """A request's own rules (allowed tokens, bad words, min_tokens, a grammar) together rule out
    every token: its fault, not the engine's, so it fails alone with this."""

    def __init__(self) -> None:
        super().__init__("no token is left to draw: the request's allowed_token_ids, bad_words, logit_bias, "
                         "min_tokens and structured output together rule out every token")


def restricted(req: Request) -> bool:
    return req.params.allowed_token_ids is not None or bool(req.bad_words)


def sample(logits: torch.Tensor, reqs: list[Request], eos_ids: set[int]) -> list[SampleResult]:
    """logits: [len(reqs), vocab], in the model's dtype. One SampleResult per request, in order."""
    if all(r.params.greedy and r.params.logprobs is None and not r.params.has_penalties and not r.params.logit_bias
           and r.num_output_tokens >= r.params.min_tokens and r.guide is None and not restricted(r)
           for r in reqs):  # plain greedy: argmax
        return [SampleResult(t) for t in argmax_rows(logits).tolist()]
    logits = logits.float()
    want_logprobs = [r.params.logprobs is not None for r in reqs]
    raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
    for i, r in enumerate(reqs):
        if r.params.logit_bias:
            apply_logit_bias(logits[i], r.params.logit_bias)
        if restricted(r):
            restrict(logits[i], r)
        if r.params.has_penalties:
            apply_penalties(logits[i], r)
        if r.num_output_tokens < r.params.min_tokens:
            banned = [t for t in ({*eos_ids, *(r.params.stop_token_ids or [])}) if t < logits.shape[-1]]
            logits[i, banned] = float("-inf")
    guided = [(i, r.guide) for i, r in enumerate(reqs) if r.guide is not None]
    if guided:  # last: what the grammars cannot take next is never drawn
        mask_rows(logits, guided)
    ruled = [i for i, r in enumerate(reqs) if restricted(r) or r.guide is not None]
    if ruled and not bool(logits[ruled].isfinite().any(-1).all()):
        raise NoTokenLeft()  # (before any grammar takes a token: the step is retried without that request)
    tokens = argmax_rows(logits)
    sampled_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if sampled_rows:
        rows = logits if len(sampled_rows) == len(reqs) else logits[torch.tensor(sampled_rows, device=logits.device)]
        dists = distributions(rows, [reqs[i].params for i in sampled_rows])
        for (probs, ids), i in zip(dists, sampled_rows):
            t = draw(probs, reqs[i].generator)
            tokens[i] = t if ids is None else ids[t]
    token_list = tokens.tolist()
    results = []
    for i, r in enumerate(reqs):
        if r.guide is not None:
            r.guide.accept(token_list[i])
        if raw_logprobs is not None and want_logprobs[i]:
            results.append(SampleResult.with_logprobs(token_list[i], raw_logprobs[i], r.params.logprobs))
        else:
            results.append(SampleResult(token_list[i]))
    return results
