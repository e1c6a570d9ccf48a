"""Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE: the Qwen2 / Qwen3 decoder with routed experts in place of
the dense MLP.

    y = sum_{i in top-k} p_i MLP_i(x)  +  sigmoid(w_s . x) MLP_shared(x)      p = softmax(x W_g^T)

Qwen2-MoE adds the gated shared expert and keeps p as softmax gives it; Qwen3-MoE has no shared
expert and renormalises the top-k p to sum to 1 (`norm_topk_prob`). A layer is dense where the
config says (`mlp_only_layers`, or every `decoder_sparse_step`-th layer is the sparse one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferlab.model.base import CausalLM, Decoder, MoEArgs, hf_shape, unsupported
from inferlab.model.gguf_args import gguf_shape
from inferlab.model.layers import MLP, Linear
from inferlab.model.layers.moe import Experts, Router, Routing
from inferlab.model.llama import DecoderLayer, LlamaForCausalLM


@dataclass
class QwenMoeArgs(MoEArgs):
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none


class SparseMoeBlock(nn.Module):
    def __init__(self, args: QwenMoeArgs) -> None:
        super().__init__()
        h = args.hidden_size
        self.gate = Router(h, args.num_experts, Routing(args.num_experts_per_tok, renormalize=args.norm_topk_prob))
        self.experts = Experts(args.num_experts, h, args.moe_intermediate_size)
        shared = args.shared_expert_intermediate_size
        self.shared_expert = MLP(h, shared) if shared else None
        self.shared_expert_gate = Linear(h, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, *self.gate(x))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class QwenMoeForCausalLM(CausalLM):
    packed_modules = LlamaForCausalLM.packed_modules

    def __init__(self, args: QwenMoeArgs) -> None:
        layers = [DecoderLayer(args, mlp=SparseMoeBlock(args) if i in args.moe_layers else None)
                  for i in range(args.num_layers)]
        super().__init__(args, Decoder(args, layers))

    @staticmethod
    def args_from_hf(arch: str, cfg: dict) -> QwenMoeArgs:
        if arch == "qwen3_moe" and cfg.get("attention_bias"):
            raise unsupported("attention_bias", True, "Qwen3-MoE without projection biases")
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 60 if arch == "qwen2_moe" else 128))
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
        if not isinstance(step, int) or step < 1:
            raise unsupported("decoder_sparse_step", step, "every step-th layer is sparse: an integer >= 1")
        moe_layers = tuple(i for i in range(cfg["num_hidden_layers"])
                           if num_experts > 0 and i not in dense and (i + 1) % step == 0)
        return QwenMoeArgs(
            arch=arch, **hf_shape(cfg), attention_bias=arch == "qwen2_moe" and cfg.get("qkv_bias", True),
            qk_norm=arch == "qwen3_moe", num_experts=num_experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 4 if arch == "qwen2_moe" else 8),
            moe_intermediate_size=cfg.get("moe_intermediate_size", 1408 if arch == "qwen2_moe" else 768),
            norm_topk_prob=cfg.get("norm_topk_prob", False), moe_layers=moe_layers,
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 5632) if arch == "qwen2_moe"
            else 0)

    @staticmethod
    def args_from_gguf(arch: str, fields: dict, tensor_names: set[str]) -> QwenMoeArgs:
        """llama.cpp's qwen2moe / qwen3moe; a layer with a router is a sparse one. llama.cpp always
        renormalises Qwen3-MoE's top-k and never Qwen2-MoE's."""
        shape = gguf_shape(arch, fields, tensor_names)
        return QwenMoeArgs(
            arch="qwen2_moe" if arch == "qwen2moe" else "qwen3_moe", **shape,
            attention_bias="blk.0.attn_q.bias" in tensor_names, qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            num_experts=fields[f"{arch}.expert_count"], num_experts_per_tok=fields[f"{arch}.expert_used_count"],
            moe_intermediate_size=fields[f"{arch}.expert_feed_forward_length"],
            norm_topk_prob=bool(fields.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")),
            moe_layers=tuple(i for i in range(shape["num_layers"]) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names),
            shared_expert_intermediate_size=fields.get(f"{arch}.expert_shared_feed_forward_length", 0)
            if any(".ffn_up_shexp." in name for name in tensor_names) else 0)
