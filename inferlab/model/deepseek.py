"""DeepSeek-V2 / V2-Lite / V3: multi-head latent attention (`layers.mla`) and DeepSeekMoE.

    h   = x + MLA(norm(x))
    out = h + FFN(norm(h)),   FFN = dense MLP in the first `first_k_dense_replace` layers, else
          sum_{i in top-k} g_i Expert_i(h') + sum_j Shared_j(h')       (the shared experts: one wide MLP)

V2 routes by softmax over the experts (V2-Lite: plain top-k; V2: top-k within the best `topk_group` of
`n_group` groups, a group scored by its best expert), g as the softmax gives it, times
`routed_scaling_factor`. V3 scores by sigmoid, chooses with `e_score_correction_bias` added (a group
scored by its best two), weights with the unbiased scores renormalised, times the factor.

The KV pool holds MLA's latent: one (kv_lora_rank + qk_rope_head_dim)-wide row per token and layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferlab.distributed.group import current_group
from inferlab.model.base import CausalLM, Decoder, ModelLoadError, MoEArgs, hf_shape, unsupported
from inferlab.model.gguf_args import gguf_shape
from inferlab.model.layers import MLP
from inferlab.model.layers.mla import MLAAttention
from inferlab.model.layers.moe import Experts, Router, Routing
from inferlab.model.layers.rotary import yarn_mscale
from inferlab.model.llama import DecoderLayer

TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}


@dataclass
class DeepseekArgs(MoEArgs):
    """head_dim is qk_rope_head_dim (the width RoPE rotates), num_kv_heads 1 (the latent)."""

    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_interleave: bool = True
    n_shared_experts: int = 0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return 1, num_blocks, block_size, 1, self.kv_lora_rank + self.head_dim

    def routing(self) -> Routing:
        grouped = self.topk_method != "greedy"
        return Routing(self.num_experts_per_tok, scoring=self.scoring_func, renormalize=self.norm_topk_prob,
                       num_groups=self.n_group if grouped else 1, topk_groups=self.topk_group,
                       group_score="max" if self.topk_method == "group_limited_greedy" else "top2",
                       scaling=self.routed_scaling_factor, correction_bias=self.topk_method == "noaux_tc")

    def softmax_scale(self) -> float:
        """1/sqrt(q head width), times YaRN's mscale(mscale_all_dim) squared where set."""
        scale = (self.qk_nope_head_dim + self.head_dim) ** -0.5
        scaling = self.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        return scale

    def check(self) -> DeepseekArgs:
        if self.topk_method != "greedy":
            e, g = self.num_experts, self.n_group
            if g < 1 or e % g or not 1 <= self.topk_group <= g:
                raise unsupported("n_group", g, f"must divide n_routed_experts={e}, with 1 <= topk_group <= n_group")
            if self.num_experts_per_tok > self.topk_group * (e // g) or (self.topk_method == "noaux_tc" and e // g < 2):
                raise unsupported("topk_group", self.topk_group, "too few experts in the chosen groups")
        return self


class DeepseekMoE(nn.Module):
    def __init__(self, args: DeepseekArgs) -> None:
        super().__init__()
        h, inter = args.hidden_size, args.moe_intermediate_size
        self.gate = Router(h, args.num_experts, args.routing())
        self.experts = Experts(args.num_experts, h, inter)
        self.shared_experts = MLP(h, inter * args.n_shared_experts) if args.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, *self.gate(x))
        return y if self.shared_experts is None else y + self.shared_experts(x)


class DeepseekForCausalLM(CausalLM):
    # q's down-projection (or q itself, without a q LoRA) and the KV latent's share one matmul
    packed_modules = {"q_a_proj": ("qkv_a_proj", 0), "q_proj": ("qkv_a_proj", 0),
                      "kv_a_proj_with_mqa": ("qkv_a_proj", 1), "gate_proj": ("gate_up_proj", 0),
                      "up_proj": ("gate_up_proj", 1)}
    gguf_names = {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                  "ffn_down_shexp": "mlp.shared_experts.down_proj"}

    def __init__(self, args: DeepseekArgs) -> None:
        if current_group().size > 1:
            raise ValueError("tensor parallelism does not split MLA's latent KV cache (one head per token): "
                             "run DeepSeek models with tensor_parallel_size 1")

        def attention() -> MLAAttention:
            return MLAAttention(args.hidden_size, args.num_heads, args.q_lora_rank, args.kv_lora_rank,
                                args.qk_nope_head_dim, args.head_dim, args.v_head_dim, args.rms_norm_eps,
                                args.softmax_scale(), args.rope_interleave)

        layers = [DecoderLayer(args, self_attn=attention(), mlp=DeepseekMoE(args) if i in args.moe_layers else None)
                  for i in range(args.num_layers)]
        super().__init__(args, Decoder(args, layers))

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """V3 checkpoints append the multi-token-prediction module as layer num_layers: not run here.
        (V2 has none: a layer past num_layers there is a config that does not match its weights.)"""
        parts = name.split(".")
        extra = self.args.arch == "deepseek_v3" and parts[:2] == ["model", "layers"] and \
            int(parts[2]) >= self.args.num_layers
        return extra or super().skip_checkpoint_tensor(name)

    @staticmethod
    def args_from_hf(arch: str, cfg: dict) -> DeepseekArgs:
        v3 = arch == "deepseek_v3"
        for field in ("attention_bias", "mlp_bias"):
            if cfg.get(field):
                raise unsupported(field, True, "DeepSeek without projection biases")
        if cfg.get("moe_layer_freq", 1) != 1:
            raise unsupported("moe_layer_freq", cfg["moe_layer_freq"], "every layer after the dense ones is MoE: 1")
        scoring = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        if scoring != ("sigmoid" if v3 else "softmax"):
            raise unsupported("scoring_func", scoring, f"{arch} routes by {'sigmoid' if v3 else 'softmax'}")
        method = cfg.get("topk_method") or TOPK_METHODS[arch][0]
        if method not in TOPK_METHODS[arch]:
            raise unsupported("topk_method", method, f"{arch}: {' or '.join(TOPK_METHODS[arch])}")
        if not v3 and cfg.get("norm_topk_prob"):
            raise unsupported("norm_topk_prob", True, "DeepSeek-V2 weights its experts by the softmax as it is")
        if cfg.get("num_experts_per_tok") is None and not v3:
            raise ModelLoadError("config.json has no num_experts_per_tok")
        experts = cfg.get("n_routed_experts", 256 if v3 else 64) or 0
        first_dense = cfg.get("first_k_dense_replace", 3 if v3 else 0) or 0
        shape = hf_shape(cfg)
        rope_dim = cfg.get("qk_rope_head_dim", 64)
        shape.update(num_kv_heads=1, head_dim=rope_dim)
        return DeepseekArgs(
            arch=arch, **shape, num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok") or 8,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 2048 if v3 else 1407),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            moe_layers=tuple(range(first_dense, shape["num_layers"])) if experts else (),
            q_lora_rank=cfg.get("q_lora_rank", 1536), kv_lora_rank=cfg.get("kv_lora_rank", 512),
            qk_nope_head_dim=cfg.get("qk_nope_head_dim", 128), v_head_dim=cfg.get("v_head_dim", 128),
            rope_interleave=cfg.get("rope_interleave", True) if v3 else True,
            n_shared_experts=cfg.get("n_shared_experts", 1 if v3 else 2) or 0, scoring_func=scoring, topk_method=method,
            n_group=cfg.get("n_group", 8 if v3 else 1) or 1, topk_group=cfg.get("topk_group", 4 if v3 else 1) or 1,
            routed_scaling_factor=cfg.get("routed_scaling_factor", 2.5 if v3 else 1.0)).check()

    @staticmethod
    def args_from_gguf(arch: str, fields: dict, tensor_names: set[str]) -> DeepseekArgs:
        """llama.cpp's deepseek2 (V2, V2-Lite, V3): gating function 2 is V3's sigmoid. Newer files
        store the MLA head widths as key/value_length_mla, older ones as key/value_length."""
        key = f"{arch}."
        shape = gguf_shape(arch, fields, tensor_names)
        rope_dim = fields[key + "rope.dimension_count"]
        if key + "attention.key_length_mla" in fields:
            qk_head, v_dim = fields[key + "attention.key_length_mla"], fields[key + "attention.value_length_mla"]
        else:
            qk_head, v_dim = shape["head_dim"], fields[key + "attention.value_length"]
        # files converted from a config without scoring_func lack the key: V3's correction bias tells
        v3_bias = any(name.endswith("exp_probs_b.bias") for name in tensor_names)
        sigmoid = fields.get(key + "expert_gating_func", 2 if v3_bias else 1) == 2
        groups = fields.get(key + "expert_group_count", 0) or 1
        shape.update(num_kv_heads=1, head_dim=rope_dim,
                     num_layers=shape["num_layers"] - fields.get(key + "nextn_predict_layers", 0))
        return DeepseekArgs(
            arch="deepseek_v3" if sigmoid else "deepseek_v2", **shape, num_experts=fields[key + "expert_count"],
            num_experts_per_tok=fields[key + "expert_used_count"],
            moe_intermediate_size=fields[key + "expert_feed_forward_length"],
            norm_topk_prob=bool(fields.get(key + "expert_weights_norm", False)),
            moe_layers=tuple(i for i in range(shape["num_layers"]) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names),
            q_lora_rank=fields.get(key + "attention.q_lora_rank"), kv_lora_rank=fields[key + "attention.kv_lora_rank"],
            qk_nope_head_dim=qk_head - rope_dim, v_head_dim=v_dim,
            n_shared_experts=fields.get(key + "expert_shared_count", 0),
            scoring_func="sigmoid" if sigmoid else "softmax",
            topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if groups > 1 else "greedy",
            n_group=groups, topk_group=fields.get(key + "expert_group_used_count", 0) or 1,
            routed_scaling_factor=fields.get(key + "expert_weights_scale", 1.0)).check()
