"""The per-step message from the driver to the other ranks: a `StepBatch` (token ids, each
sequence's token count, first position and prompt length, which rows sample, block tables:
positions and slots follow from these) as two broadcasts of host int64 tensors, a fixed header
of sizes then the arrays. That is all a step sends besides the model's own collectives: one
round trip, not one per layer. An empty header (no sequences) tells the workers to stop.
"""
from __future__ import annotations

import numpy as np
import torch

from inferlab.distributed.group import TensorParallelGroup
from inferlab.runner import StepBatch

HEADER = 3  # sequences, tokens, block-table width


def send(group: TensorParallelGroup, batch: StepBatch | None) -> None:
    """Rank 0: broadcast one step (None: stop)."""
    if batch is None:
        group.broadcast(torch.zeros(HEADER, dtype=torch.int64))
        return
    (s, w), t = batch.tables.shape, len(batch.ids)
    group.broadcast(torch.tensor([s, t, w], dtype=torch.int64))
    plen = batch.prompt_lens if batch.prompt_lens is not None else np.zeros_like(batch.starts)
    none = np.zeros((s, 2), dtype=np.int64)  # every rank keeps the rows scored and mean-pooled
    spans = [x if x is not None else none for x in (batch.score, batch.mean)]
    payload = np.concatenate([batch.counts, batch.starts, batch.sample, plen, spans[0].ravel(), spans[1].ravel(),
                              batch.ids, batch.tables.ravel()])
    group.broadcast(torch.from_numpy(payload.astype(np.int64)))


def receive(group: TensorParallelGroup) -> StepBatch | None:
    """Another rank: wait (as long as the driver idles) for the next step; None when told to stop."""
    s, t, w = group.broadcast(torch.empty(HEADER, dtype=torch.int64), idle=True).tolist()
    if s == 0:
        return None
    payload = group.broadcast(torch.empty(8 * s + t + s * w, dtype=torch.int64)).numpy()
    counts, starts, sample, plen, spans, mean, ids, tables = np.split(payload, np.cumsum([s, s, s, s, 2 * s, 2 * s, t]))
    spans, mean = spans.reshape(s, 2).copy(), mean.reshape(s, 2).copy()
    return StepBatch(counts.copy(), starts.copy(), sample.astype(bool), ids.copy(),
                     tables.reshape(s, w).astype(np.int32), prompt_lens=plen.copy(),
                     score=spans if (spans[:, 1] > spans[:, 0]).any() else None,
                     mean=mean if (mean[:, 1] > mean[:, 0]).any() else None)
