"""Paged attention: this step's K/V written into the block pool, every query row's attention read
back through its sequence's block table.

K/V live in a pool of blocks, `[num_blocks, block_size, num_kv_heads, head_dim]` per layer. New
tokens are written at `slot_mapping` (block_id * block_size + offset). Two ways to read the pool:
- the PyTorch reference (any device): decodes (one query token) gathered and batched into one SDPA
  call; each prefill chunk over a cached prefix gets its own call, causal against all before it;
- the native CPU kernels, where the runner planned for them (`meta.native`): one call of the row
  kernel for every generated token's row (decodes, drafts), K/V read in place through the block
  table, and, on CPUs with a matrix-product kernel for it, one call for every prompt chunk, cached
  prefix or not, so that a prompt row's bits do not depend on what was cached or how it was chunked.
Elsewhere a prefill chunk with nothing cached before it needs no cache read: SDPA on this step's K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferlab import kernels


@dataclass
class PrefillSeq:
    start: int  # first row of this sequence's tokens in the flat batch
    num_tokens: int  # query tokens this step
    context_len: int  # tokens with KV after this step (cached + new)
    block_table: torch.Tensor  # blocks covering context_len


@dataclass
class NativeRows:
    """The native kernels' plan: `rows` for the row kernel (generated tokens' rows where a prefill
    kernel runs; else also short chunks over a cached prefix), `chunks` for the prefill kernel."""

    rows: torch.Tensor  # [R] int64 rows in the flat batch
    seqs: torch.Tensor  # [R] int32 row of `block_tables` for each
    lens: torch.Tensor  # [R] int32 keys each row sees (its position + 1)
    block_tables: torch.Tensor  # [S, W] int32
    # Prefill chunks for the matrix-product kernel, where it runs (else they are in meta.prefills, for
    # SDPA): (first row int64, query count, keys seen, row of block_tables), each [C], int32 but the first.
    chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class AttentionMetadata:
    """Everything attention needs about the flat batch; built by the runner once per step and
    passed down the model explicitly (no global forward context)."""

    slot_mapping: torch.Tensor  # [num_tokens]
    prefills: list[PrefillSeq]
    decode_rows: torch.Tensor | None = None  # [D] rows of the single-token (decode) queries
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [D]
    native: NativeRows | None = None  # set when the native kernels run this step


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, native: kernels.Kernels | None) -> None:
    """Store this step's K/V ([T, kv_heads, d], rows may be strided views) at their slots."""
    kvh, d = k.shape[-2:]
    if native is not None and k.stride()[1:] == v.stride()[1:] == (d, 1):
        native.write_kv(k_cache, v_cache, k, k.stride(0), v, v.stride(0), slot_mapping, k.shape[0], kvh * d,
                        k.element_size())
        return
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, kv_heads, max_blocks * block_size, head_dim]."""
    b, nb = block_tables.shape
    _, bs, kvh, d = cache.shape
    return cache[block_tables].view(b, nb * bs, kvh, d).transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] for this step's tokens. Returns [T, heads, d]."""
    native = meta.native
    lib = kernels.for_tensor(q) if native is not None else None
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping, lib)
    out = q.new_empty(q.shape)  # contiguous, even where q is a strided view into the qkv output
    heads, d = q.shape[1:]
    kvh = k.shape[1]
    _, block_size, _, _ = k_cache.shape
    dtype = kernels.DTYPE_CODES.get(q.dtype)
    for seq in meta.prefills:
        rows = slice(seq.start, seq.start + seq.num_tokens)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if seq.context_len == seq.num_tokens:  # nothing cached before: use this step's K/V
            ks, vs = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            table = seq.block_table.unsqueeze(0)
            ks = gather_kv(k_cache, table)[:, :, :seq.context_len]
            vs = gather_kv(v_cache, table)[:, :, :seq.context_len]
            # query i sits at position context_len - n + i and sees keys up to there
            pos_q = torch.arange(seq.context_len - seq.num_tokens, seq.context_len, device=q.device)
            mask = pos_q[:, None] >= torch.arange(seq.context_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(0).transpose(0, 1)
    if lib is not None:
        tables = native.block_tables
        if native.chunks is not None:
            lib.prefill_attention(q, q.stride(0), k_cache, v_cache, out, *native.chunks, native.chunks[0].numel(),
                                  tables, tables.shape[1], heads, kvh, d, block_size, scale, dtype)
        if native.rows.numel():
            lib.paged_attention(q, q.stride(0), k_cache, v_cache, out, native.rows, native.seqs, native.lens,
                                native.rows.numel(), tables, tables.shape[1], heads, kvh, d, block_size, scale, dtype)
    elif meta.decode_rows is not None:
        rows = meta.decode_rows
        n = rows.numel()
        # Fold each KV head's query group into the query-length axis: GQA without repeating K/V.
        qd = q[rows].view(n, kvh, heads // kvh, d)
        ks = gather_kv(k_cache, meta.decode_block_tables)
        vs = gather_kv(v_cache, meta.decode_block_tables)
        mask = torch.arange(ks.shape[2], device=q.device)[None, :] < meta.decode_context_lens[:, None]
        o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=mask[:, None, None, :], scale=scale)
        out[rows] = o.reshape(n, heads, d)
    return out


def prefill_kernel_runs(lib: kernels.Kernels, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                        block_size: int) -> bool:
    """Whether this CPU has a matrix-product kernel for prefill chunks of this shape: the kernel
    itself answers, given no chunks."""
    return lib.functions["prefill_attention"](None, 0, None, None, None, None, None, None, None, 0, None, 0, num_heads,
                                              num_kv_heads, head_dim, block_size, 1.0, kernels.DTYPE_CODES[dtype],
                                              1) == 0
