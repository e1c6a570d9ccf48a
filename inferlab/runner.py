"""ModelRunner: owns the KV pool tensor, turns a scheduled batch into model inputs, runs the
model and samples. It knows nothing of queues or policies."""
from __future__ import annotations

import math
import mmap

import torch

from inferlab.attention import AttentionMetadata, PrefillSeq
from inferlab.model.llama import LlamaForCausalLM, ModelArgs
from inferlab.request import Request
from inferlab.sampler import SampleResult, sample


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * elem


def allocate_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled pool. Masked-out slots still enter attention as 0 * value, so they must
    hold finite numbers. On CPU, anonymous mmap gives zero pages that the OS faults in only as
    blocks are first used, so a large pool costs nothing at start (torch.zeros would touch
    every page: seconds for a few GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = mmap.mmap(-1, max(1, numel * torch.empty(0, dtype=dtype).element_size()))
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, eos_ids: set[int]) -> None:
        args = model.args
        self.model = model
        self.block_size = block_size
        self.eos_ids = eos_ids
        self.device = model.lm_head.weight.device
        dtype = model.lm_head.weight.dtype
        shape = (2, args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim)
        self.kv_cache = allocate_zeroed(shape, dtype, self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(args.num_layers)]

    def prepare(self, scheduled: list[tuple[Request, int]]):
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSeq] = []
        d_rows: list[int] = []
        d_tables: list[list[int]] = []
        d_lens: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for req, n in scheduled:
            start, end, table = req.num_computed_tokens, req.num_computed_tokens + n, req.block_table
            row = len(ids)
            ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            used = table[:-(-end // bs)]
            if n == 1:
                d_rows.append(row)
                d_tables.append(used)
                d_lens.append(end)
            else:
                prefills.append(PrefillSeq(row, n, end, torch.tensor(used, device=self.device)))
            if end == req.num_tokens:  # the chunk reaches the last token: a new token is due
                sample_rows.append(row + n - 1)
                sample_reqs.append(req)
        dev = self.device
        decode = None
        if d_rows:
            width = max(len(t) for t in d_tables)
            decode = (torch.tensor(d_rows, device=dev),
                      torch.tensor([t + [0] * (width - len(t)) for t in d_tables], device=dev),
                      torch.tensor(d_lens, device=dev))
        meta = AttentionMetadata(torch.tensor(slots, device=dev), prefills, *(decode or (None, None, None)))
        return (torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta,
                sample_rows, sample_reqs)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> dict[str, SampleResult]:
        input_ids, positions, meta, sample_rows, sample_reqs = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sample_reqs:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        results = sample(logits, sample_reqs, self.eos_ids)
        return {r.request_id: res for r, res in zip(sample_reqs, results)}
