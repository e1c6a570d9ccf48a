"""The Llama-family decoder (Llama, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm; any of them with the
biases its config asks for) over a paged KV cache.

Parameter names follow HF checkpoints, except that q/k/v and gate/up are merged into one matmul
each; a merged layer's `weight_loader` takes each checkpoint shard into place. The forward pass is
written once, here, out of `layers`: the op-by-op path runs it as it is, and a tape recorded from it
(`inferlab.tape`) replays the same kernel calls for decode steps. The projections are tensor-parallel
layers (`inferlab.distributed.layers`): built inside a group of several ranks, each rank's copy of
this model holds its share of the heads and features, and with one rank they are the plain layers.
"""
from __future__ import annotations

import torch
from torch import nn

from inferlab.distributed.group import current_group
from inferlab.distributed.layers import ColumnParallelLinear, RowParallelLinear
from inferlab.model.base import CausalLM, Decoder, ModelArgs, hf_shape
from inferlab.model.gguf_args import gguf_shape
from inferlab.model.layers import MLP, AttentionMetadata, RMSNorm, paged_attention, rope


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        tp = current_group()  # under tensor parallelism this rank computes its share of the heads
        self.num_heads, self.num_kv_heads = tp.split(args.num_heads, "attention heads"), \
            tp.split(args.num_kv_heads, "KV heads")
        self.head_dim = args.head_dim
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, [q, kv, kv], bias=args.attention_bias)
        self.o_proj = RowParallelLinear(q, args.hidden_size, bias=args.o_proj_bias)
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


class DecoderLayer(nn.Module):
    """Pre-norm attention then MLP, each added to the residual stream. Other families pass their own
    attention (MLA) or MLP (experts)."""

    def __init__(self, args: ModelArgs, self_attn: nn.Module | None = None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = self_attn if self_attn is not None else Attention(args)
        if mlp is None:
            current_group().split(args.intermediate_size, "intermediate size")  # the error names the model's size
            mlp = MLP(args.hidden_size, args.intermediate_size, ColumnParallelLinear, RowParallelLinear,
                      bias=args.mlp_bias)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta, keep: torch.Tensor | None = None):
        """Takes and returns (this layer's input, the residual stream before it); the residual
        add happens inside the next norm, fused. `keep`: the rows to go on with after attention (the
        last layer's, where only the rows that get logits matter; every row's K and V are written)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        if keep is not None:
            h, residual = h[keep], residual[keep]
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    # checkpoint projection name -> (merged layer, shard index)
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args, Decoder(args, [DecoderLayer(args) for _ in range(args.num_layers)]))

    @staticmethod
    def args_from_hf(arch: str, cfg: dict) -> ModelArgs:
        biased = bool(cfg.get("attention_bias", False))  # Qwen2's q/k/v biases are its own, unconfigured
        return ModelArgs(arch=arch, **hf_shape(cfg), attention_bias=arch == "qwen2" or biased,
                         o_proj_bias=arch != "qwen2" and biased, mlp_bias=bool(cfg.get("mlp_bias", False)),
                         qk_norm=arch == "qwen3")

    @staticmethod
    def args_from_gguf(arch: str, fields: dict, tensor_names: set[str]) -> ModelArgs:
        return ModelArgs(arch=arch, **gguf_shape(arch, fields, tensor_names),
                         attention_bias="blk.0.attn_q.bias" in tensor_names,
                         o_proj_bias="blk.0.attn_output.bias" in tensor_names,
                         mlp_bias="blk.0.ffn_down.bias" in tensor_names,
                         qk_norm="blk.0.attn_q_norm.weight" in tensor_names)
