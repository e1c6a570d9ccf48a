"""Each request's sampling distribution from its row of logits: temperature, then min-p, top-k and
top-p (vLLM V1's order: top-p reads what min-p and top-k kept, renormalized), and one draw from it
with the request's own generator.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from inferlab.sampling_params import SamplingParams

PREFIX = 256  # a row's largest values looked at first for its cut-off (all of them sorted only past them)


def thresholds(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Each row's lowest kept logit under min-p, then top-k, then top-p ([rows, 1]; -inf: all kept),
    and the rows' PREFIX largest logits and their ids where top-k or top-p needed them (else None).
    The cut-offs come from those largest values in order, or, for a row whose cut-off lies further
    (a top_k past them, a flat distribution under top-p), from all its values, sorted by numpy
    (torch's sort took 1.5 ms a row of 49,152, numpy's 0.15)."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    # min-p's cut-off (min_p times the top probability: the same before and after any renormalizing)
    floor = torch.full_like(logits[:, :1], float("-inf"))
    if bool((min_p > 0).any()):
        min_logit = logits.max(-1, keepdim=True).values + torch.log(min_p.clamp(min=1e-30))[:, None]
        floor = torch.where(min_p[:, None] > 0, min_logit, floor)
    threshold, largest = floor, None
    if bool(((top_k > 0) | (top_p < 1)).any()):
        largest = values, ids = logits.topk(min(vocab, PREFIX), dim=-1)

        def gathered(kth: torch.Tensor) -> torch.Tensor:
            """The largest values' probabilities: over themselves where top-k keeps none past them,
            else gathered from the whole row's softmax."""
            probs = values.masked_fill(values < kth, float("-inf")).softmax(-1)
            rows = torch.nonzero(values[:, -1] >= kth[:, 0]).flatten()
            if rows.numel():  # (copied and masked only where it changes anything: rows of 49,152)
                whole = logits if rows.numel() == len(logits) else logits[rows]
                if bool(kth[rows].isfinite().any()):
                    whole = whole.masked_fill(whole < kth[rows], float("-inf"))
                probs[rows] = whole.softmax(-1).gather(-1, ids[rows])
            return probs
        threshold, done = cutoffs(values, gathered, k, top_p, vocab, floor)
        if not bool(done.all()):  # a cut-off past the prefix: those rows sorted whole
            rest = torch.nonzero(~done).flatten()
            ascending = np.sort(logits[rest].cpu().numpy(), axis=-1)
            whole = torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1])).to(logits.device)
            threshold[rest] = cutoffs(whole, lambda kth: whole.masked_fill(whole < kth, float("-inf")).softmax(-1),
                                      k[rest], top_p[rest], vocab, floor[rest])[0]
    return threshold, largest


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask out (to -inf) what top-k / top-p / min-p exclude, row-wise. top_k 0 = off."""
    return logits.masked_fill(logits < thresholds(logits, top_k, top_p, min_p)[0], float("-inf"))


def cutoffs(values: torch.Tensor, probs_of: Callable[[torch.Tensor], torch.Tensor], k: torch.Tensor,
            top_p: torch.Tensor, vocab: int, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's lowest kept logit under min-p's `floor`, top-k (`k`: vocab = off), then top-p, from
    `values`, its largest logits in descending order (all of them, or the first few), and whether
    those were enough to tell (both cut-offs inside them). `probs_of(kth)`: the probabilities of
    `values` over the row's logits from `kth` on."""
    width = values.shape[-1]
    kth = values.gather(-1, (k.clamp(max=width) - 1)[:, None])
    kth = torch.maximum(torch.where((k == vocab)[:, None], torch.full_like(kth, float("-inf")), kth), floor)
    # top-p acts on what min-p and top-k kept, renormalized (vLLM V1's order), not on the full softmax
    probs = probs_of(kth)
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept);
    # p = 1 keeps all, even where float rounding lets the cumulative mass hit 1 early
    mass_before = probs.cumsum(-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True
    n_keep = keep.sum(-1, keepdim=True)
    pth = torch.where((top_p >= 1.0)[:, None], torch.full_like(kth, float("-inf")), values.gather(-1, n_keep - 1))
    # enough: top-k's k-th value was in view (ties of it past the view are kept by the mask all the
    # same), and top-p's crossing too
    done = (width == vocab) | (((n_keep.squeeze(-1) < width) | (top_p >= 1.0)) & ((k == vocab) | (k <= width)))
    return torch.maximum(kth, pth), done


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each row's sampling distribution (float32 logits, one row per params, none greedy): divided
    by the temperature, then min-p, top-k and top-p, softmaxed; as (probabilities, their token ids):
    over the row's PREFIX largest logits where every kept token is among them (masking whole rows
    of 49,152 logits cost more than the rest of the sampling), else over the vocabulary (ids None)."""
    dev, vocab = logits.device, logits.shape[-1]
    sub = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    # a top_k past the vocabulary means "all": clamp before it overflows int64
    top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if not bool((top_k > 0).any() or (top_p < 1).any() or (min_p > 0).any()):
        return [(row, None) for row in sub.softmax(-1)]
    threshold, largest = thresholds(sub, top_k, top_p, min_p)
    out: list = [None] * len(params)
    inside = torch.zeros(len(params), dtype=torch.bool, device=dev)
    if largest is not None:  # the kept tokens all in view (no tie of the cut-off past it), in a row
        values, ids = largest  # whose own top-k or top-p asked for the view: a row's way is its own
        inside = ((values[:, -1] < threshold[:, 0]) | (values.shape[-1] == vocab)) & ((top_k > 0) | (top_p < 1))
        rows = torch.nonzero(inside).flatten()
        kept = values[rows].masked_fill(values[rows] < threshold[rows], float("-inf")).softmax(-1)
        for j, i in enumerate(rows.tolist()):
            out[i] = (kept[j], ids[i])
    rows = torch.nonzero(~inside).flatten()
    if rows.numel():
        dense = sub[rows].masked_fill(sub[rows] < threshold[rows], float("-inf")).softmax(-1)
        for j, i in enumerate(rows.tolist()):
            out[i] = (dense[j], None)
    return out


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`distributions` as rows over the vocabulary, [rows, vocab] (what verification compares)."""
    out = torch.zeros_like(logits)
    for row, (p, ids) in zip(out, distributions(logits, params)):
        if ids is None:
            row.copy_(p)
        else:
            row.scatter_(0, ids, p)
    return out


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `probs` [vocab] (non-negative weights, not necessarily normalised), using only
    this request's generator: the cumulative distribution, summed in float64, inverted at one
    uniform number. (An exponential race, argmax(p / E), takes a random number for every entry of
    the vocabulary: 0.8 ms a row of 49,152 on CPU against 0.05 here.)"""
    cdf = probs.double().cumsum(-1)
    point = torch.rand(1, dtype=torch.float64, generator=generator, device=probs.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, point, right=True))  # the first token whose interval ends past it
    if i == len(cdf):  # u * total rounded up to the total: the last token with any weight
        i = int(torch.nonzero(probs).max())
    return i
