"""Speed of the attention kernels: a 64-sequence decode step's attention over a paged KV pool
laid out as the engine lays it (blocks scattered over a pool with transparent huge pages), the
embedded model's heads (9 query, 3 KV, head_dim 64), against the time merely to read those blocks.

    .venv/bin/python benchmarks/attention_speed.py [--isa avx2] [--threads 2] [--seqs 64]
        [--context 300] [--dtype float32] [--layers 8] [--in-cache] [--contiguous] [--prefill]

Prints ms per layer, the KV bytes read per second, and the same for 30 layers. `--in-cache` draws
every sequence's blocks from 40 blocks, so the pool stays in cache: the arithmetic alone.
`--contiguous` gives each sequence consecutive blocks, as a fresh engine's pool does (what
`profile_step.py` measures); by default they lie anywhere in the pool. `--layers 30` cycles through
as many pools as the model has, so that nothing of one step is left in a large L3 for the next (at
8, a 64-sequence step is ~120 MB). `--prefill`: each sequence is instead a whole prompt of
`--context` tokens through the prefill kernel (causal; e.g. `--seqs 4 --context 512`, the profile's
prefill step), with its GFLOP/s.
"""
from __future__ import annotations

import argparse
import time

import torch

from inferlab import kernels
from inferlab.cli_args import positive_int
from inferlab.kv_pool import allocate_zeroed
from inferlab.model.layers.attention import prefill_kernel_runs

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", default=None, help="default: the best this CPU runs")
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--seqs", type=positive_int, default=64)
    ap.add_argument("--context", type=positive_int, default=300)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=positive_int, default=8,
                    help="pools cycled through, so each layer's come from memory")
    ap.add_argument("--in-cache", action="store_true")
    ap.add_argument("--repeat", type=positive_int, default=5)
    ap.add_argument("--prefill", action="store_true", help="whole prompts through the prefill kernel")
    ap.add_argument("--contiguous", action="store_true",
                    help="each sequence's blocks one after another, as a fresh pool hands them out (default: "
                         "anywhere in the pool, as after requests come and go)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        k = kernels.for_isa(a.isa) if a.isa else kernels.native()
    except ValueError as e:  # an ISA this CPU cannot run, or no such ISA
        ap.error(f"--isa: {e}")
    dtype = getattr(torch, a.dtype)
    if a.prefill and not prefill_kernel_runs(k, dtype, HEADS, KV_HEADS, HEAD_DIM, BLOCK):
        ap.error(f"--prefill: {k.isa} has no prefill kernel for {a.dtype} (the engine runs PyTorch's attention there)")
    blocks_per_seq = -(-a.context // BLOCK)
    pool_blocks = 40 if a.in_cache else 5825  # 5825: the engine's default pool for this model

    def pool() -> torch.Tensor:
        t = allocate_zeroed((pool_blocks, BLOCK, KV_HEADS, HEAD_DIM), dtype, torch.device("cpu"))
        return t.normal_()
    caches = [(pool(), pool()) for _ in range(a.layers)]
    g = torch.Generator().manual_seed(0)
    tables = torch.randint(0, pool_blocks, (a.seqs, blocks_per_seq), generator=g, dtype=torch.int32)
    if a.contiguous:
        tables = torch.arange(a.seqs * blocks_per_seq, dtype=torch.int32).view(a.seqs, blocks_per_seq) % pool_blocks
    q = torch.randn(a.seqs * (a.context if a.prefill else 1), HEADS, HEAD_DIM, generator=g).to(dtype)
    out = torch.empty_like(q)
    rows = torch.arange(a.seqs, dtype=torch.int64) * (a.context if a.prefill else 1)
    seqs = torch.arange(a.seqs, dtype=torch.int32)
    lens = torch.full((a.seqs,), a.context, dtype=torch.int32)
    shape = (HEADS, KV_HEADS, HEAD_DIM, BLOCK, HEAD_DIM ** -0.5, kernels.DTYPE_CODES[dtype])

    def step() -> None:
        for kc, vc in caches:
            if a.prefill:
                k.prefill_attention(q, q.stride(0), kc, vc, out, rows, lens, lens, seqs, a.seqs, tables,
                                    tables.shape[1], *shape)
            else:
                k.paged_attention(q, q.stride(0), kc, vc, out, rows, seqs, lens, a.seqs, tables, tables.shape[1],
                                  *shape)
    step()
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    per_layer = min(times) / a.layers
    kv_bytes = 2 * a.seqs * a.context * KV_HEADS * HEAD_DIM * q.element_size()
    where = "in cache" if a.in_cache else "from memory"
    if a.prefill:  # causal: query t scores and weighs t + 1 keys, 2 x 2 x head_dim flops each
        flops = a.seqs * HEADS * a.context * (a.context + 1) / 2 * 4 * HEAD_DIM
        print(f"ISA {k.isa}, {torch.get_num_threads()} threads, prefill of {a.seqs} x {a.context} tokens, "
              f"{a.dtype}: {1e3 * per_layer:.2f} ms a layer, {flops / per_layer / 1e9:.0f} GFLOP/s, "
              f"{30e3 * per_layer:.0f} ms for 30 layers")
        return
    print(f"ISA {k.isa}, {torch.get_num_threads()} threads, {a.seqs} sequences x {a.context} keys, {a.dtype}, "
          f"{where}: {1e3 * per_layer:.2f} ms a layer, {kv_bytes / per_layer / 1e9:.1f} GB/s of K and V, "
          f"{30e3 * per_layer:.0f} ms for 30 layers")


if __name__ == "__main__":
    main()
