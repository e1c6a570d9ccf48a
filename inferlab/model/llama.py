"""The Llama-family decoder (Llama, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm) over a paged KV cache.

Parameter names follow HF checkpoints, except that q/k/v and gate/up are merged into one matmul
each; a merged layer's `weight_loader` takes each checkpoint shard into place. The forward pass is
written once, here, out of `layers`: the op-by-op path runs it as it is, and a tape recorded from it
(`inferlab.tape`) replays the same kernel calls for decode steps. The projections, the embedding and
the LM head are tensor-parallel layers (`inferlab.distributed.layers`): built inside a group of
several ranks, each rank's copy of this model holds its share of the heads and features, and with
one rank they are the plain layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferlab.distributed.group import current_group
from inferlab.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from inferlab.model.layers import (
    AttentionMetadata,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    paged_attention,
    rope,
    silu_and_mul,
)


@dataclass
class ModelArgs:
    arch: str  # "llama", "qwen2" or "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        tp = current_group()  # under tensor parallelism this rank computes its share of the heads
        self.num_heads, self.num_kv_heads = tp.split(args.num_heads, "attention heads"), \
            tp.split(args.num_kv_heads, "KV heads")
        self.head_dim = args.head_dim
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, [q, kv, kv], bias=args.attention_bias)
        self.o_proj = RowParallelLinear(q, args.hidden_size)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = args.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple,
                meta: AttentionMetadata) -> torch.Tensor:
        t, heads, kv_heads, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(t, heads + 2 * kv_heads, d)
        v = qkv[:, heads + kv_heads:]
        if self.q_norm is None:  # q and k are adjacent heads: one RoPE call for both
            qk = rope(qkv[:, :heads + kv_heads], cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q, k = self.q_norm(qkv[:, :heads])[0], self.k_norm(qkv[:, heads:heads + kv_heads])[0]
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.view(t, heads * d))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        current_group().split(args.intermediate_size, "intermediate size")
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, [args.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """Takes and returns (this layer's input, the residual stream before it); the residual
        add happens inside the next norm, fused."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv_cache, meta), residual)
        return self.mlp(h), residual


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (merged layer, shard index)
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = ParallelLMHead(args.hidden_size, args.vocab_size)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.tie_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype."""
        return self.model.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight, self.lm_head.wtype = self.model.embed_tokens.weight, self.model.embed_tokens.wtype

    def process_weights_after_loading(self, quantization: str, isa: str | None, int8_activations: bool = False) -> None:
        """Keep each loaded weight in the type `quantization` asks for (see `layers.linear.target_type`;
        `isa`: the native kernels', None without them); `int8_activations`: the linear layers quantize
        their inputs where their weight type allows."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading(quantization, self.dtype, isa, vocab=module is self.lm_head,
                                                     int8=int8_activations)
            elif isinstance(module, Embedding):
                module.process_weights_after_loading(quantization, self.dtype, isa)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of tokens from many sequences."""
        cos, sin = self.rotary_emb(positions)
        return self.hidden_states(input_ids, cos, sin, kv_caches, meta)

    def hidden_states(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[tuple],
                      meta: AttentionMetadata) -> torch.Tensor:
        """The forward pass from token ids and the step's RoPE table: what a tape records."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: greedy sampling takes its argmax as it is, the rest widens.
        Under tensor parallelism, on rank 0 only (None on the others)."""
        return self.lm_head(hidden)
