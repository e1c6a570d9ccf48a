"""Multi-head latent attention (DeepSeek-V2, section 2.1) over a latent paged cache.

Per token, with h heads, a rank-r latent and a decoupled RoPE key of width d_r:

    q          = W_UQ norm(W_DQ x)   (or W_Q x without a q LoRA)     [h, d_nope + d_r]
    c, k_r     = norm(first r of W_DKV x), RoPE(last d_r of W_DKV x)  the cache holds (c, k_r) only
    k_i, v_i   = W_UK_i c, W_UV_i c        (kv_b_proj's rows, head by head)
    o_i        = softmax(q_i . [k_i, k_r] * scale) v_i,   y = W_O [o_1 .. o_h]

So the pool holds one "head" of r + d_r values per token and layer (576 at DeepSeek's sizes, where
Llama-style MHA would hold 2 * h * 128), in the same block pool as any other model.

Two ways to attend, equal in exact arithmetic:
- up-projected (prefill chunks, which see many keys per query row anyway): k_i, v_i from the latent of
  the whole context, then ordinary attention;
- absorbed (decode rows and short chunks): q_i . k_i = (W_UK_i^T q_nope_i) . c, so the query moves
  into latent space once and attention runs over the latent itself, all heads sharing one K (the
  latent) and one V (its first r values); W_UV_i applies to the attended latent afterwards. Nothing
  per head is ever expanded per cached token (vLLM's `mla/common.py` describes the same split).

DeepSeek's checkpoints rotate adjacent pairs of the RoPE dimensions; their rows are permuted at load
time into rotate-half order (a permutation of both q_r and k_r leaves every q . k unchanged), so the
shared RoPE kernel applies. Attention itself is PyTorch (SDPA), which a decode tape does not replay.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inferlab.model.layers.attention import AttentionMetadata
from inferlab.model.layers.linear import Linear
from inferlab.model.layers.norm import RMSNorm
from inferlab.model.layers.rotary import rope


def deinterleave(heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Row order taking each head's last `rope_dim` rows from adjacent pairs (x0, x1), (x2, x3)...
    to rotate-half order (x0, x2, ..., x1, x3, ...)."""
    idx = torch.arange(heads * head_dim).view(heads, head_dim)
    pe = idx[:, head_dim - rope_dim:]
    idx[:, head_dim - rope_dim:] = torch.cat([pe[:, 0::2], pe[:, 1::2]], dim=1)
    return idx.flatten()


def permuting_loader(loader: Callable, orders: dict[int | None, torch.Tensor]) -> Callable:
    """A weight loader that reorders the rows of the shards in `orders` before storing them."""
    def load(param, data, shard=None, wtype=None):
        order = orders.get(shard)
        loader(param, data if order is None else data[order], shard, wtype)
    return load


class MLAAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, eps: float, scale: float,
                 rope_interleaved: bool = True) -> None:
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.scale = num_heads, kv_lora_rank, scale
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head = qk_nope_head_dim + qk_rope_head_dim
        self.q_dim = q_lora_rank or num_heads * qk_head
        # x's two down-projections (q's LoRA or q itself, and the KV latent with k_r) as one matmul
        self.qkv_a_proj = Linear(hidden_size, [self.q_dim, kv_lora_rank + qk_rope_head_dim])
        self.q_a_layernorm = RMSNorm(q_lora_rank, eps) if q_lora_rank else None
        self.q_b_proj = Linear(q_lora_rank, num_heads * qk_head) if q_lora_rank else None
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps)
        # W_UK and W_UV, kept in the model's dtype: the absorbed form multiplies by them head by head
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size)
        if rope_interleaved:
            q_order = deinterleave(num_heads, qk_head, qk_rope_head_dim)
            kv_order = deinterleave(1, kv_lora_rank + qk_rope_head_dim, qk_rope_head_dim)
            a = self.qkv_a_proj.weight  # shard 0: q itself without a q LoRA; shard 1: the latent and k_r
            a.weight_loader = permuting_loader(a.weight_loader, {1: kv_order} if q_lora_rank else {0: q_order,
                                                                                                   1: kv_order})
            if q_lora_rank:
                b = self.q_b_proj.weight
                b.weight_loader = permuting_loader(b.weight_loader, {None: q_order})

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [h, d_nope, r] and W_UV [h, d_v, r]: views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple,
                meta: AttentionMetadata) -> torch.Tensor:
        t, r = x.shape[0], self.kv_lora_rank
        q_a, kv_a = self.qkv_a_proj(x).split([self.q_dim, r + self.rope_dim], dim=1)
        q = q_a if self.q_b_proj is None else self.q_b_proj(self.q_a_layernorm(q_a)[0])
        q = q.view(t, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope], rope(q[..., self.nope:], cos, sin)
        k_pe = rope(kv_a[:, r:].view(t, 1, self.rope_dim), cos, sin)[:, 0]
        latent = torch.cat([self.kv_a_layernorm(kv_a[:, :r])[0], k_pe], dim=1)  # [T, r + d_r]
        cache = kv_cache[0]
        cache.view(-1, latent.shape[1]).index_copy_(0, meta.slot_mapping, latent)
        out = x.new_empty(t, self.num_heads, self.v_dim)
        for start, n, ctx, table in prefill_chunks(meta):
            rows = slice(start, start + n)
            context = latent[rows] if ctx == n else cache[table.long()].view(-1, latent.shape[1])[:ctx]
            out[rows] = self.attend_up_projected(q_nope[rows], q_pe[rows], context)
        rows, tables, lens = latent_rows(meta)
        if rows is not None and rows.numel():
            out[rows] = self.attend_absorbed(q_nope[rows], q_pe[rows], cache, tables, lens)
        return self.o_proj(out.view(t, -1))

    def attend_up_projected(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """n query rows (the last n of the context) over the context's latents [ctx, r + d_r], causal."""
        n, ctx, h = q_nope.shape[0], context.shape[0], self.num_heads
        kv = self.kv_b_proj(context[:, :self.kv_lora_rank]).view(ctx, h, self.nope + self.v_dim)
        k = torch.cat([kv[..., :self.nope], context[:, None, self.kv_lora_rank:].expand(ctx, h, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        mask = None if n == ctx else \
            torch.arange(ctx - n, ctx, device=q.device)[:, None] >= torch.arange(ctx, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), kv[..., self.nope:].transpose(0, 1),
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o.transpose(0, 1)

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor) -> torch.Tensor:
        """Rows each reading their sequence's first lens[i] latents through tables[i]: [R, h, d_v]."""
        w_uk, w_uv = self.w_uk_uv()
        q = torch.cat([torch.einsum("rhn,hnc->rhc", q_nope, w_uk), q_pe], dim=-1)  # [R, h, r + d_r]
        num_rows, width = tables.shape
        keys = cache[tables.long()].view(num_rows, 1, width * cache.shape[1], -1)  # one latent "head" per row
        mask = torch.arange(keys.shape[2], device=q.device)[None, :] < lens[:, None]
        o = F.scaled_dot_product_attention(q[:, None], keys, keys[..., :self.kv_lora_rank],
                                           attn_mask=mask[:, None, None, :], scale=self.scale)
        return torch.einsum("rhc,hvc->rhv", o[:, 0], w_uv)


def prefill_chunks(meta: AttentionMetadata) -> list[tuple[int, int, int, torch.Tensor]]:
    """(first row, query rows, context length, block table) of each chunk the up-projected form runs:
    the runner's prefill chunks (a latent pool never gets the native prefill kernel's plan)."""
    return [(p.start, p.num_tokens, p.context_len, p.block_table) for p in meta.prefills]


def latent_rows(meta: AttentionMetadata) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(rows, block tables [R, W], keys seen [R]) of the rows the absorbed form runs: decodes, and short
    chunks over a cached prefix where the runner planned rows for the native kernels."""
    native = meta.native
    if native is not None:
        return native.rows, native.block_tables[native.seqs.long()], native.lens
    return meta.decode_rows, meta.decode_block_tables, meta.decode_context_lens
