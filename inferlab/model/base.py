"""What every architecture presents to the loader, the runner and the tape: its shape (`ModelArgs`)
and a causal LM over a paged cache (`CausalLM`). An architecture family is one file that builds its
decoder layers out of `layers`; the loader's table maps a checkpoint's `architectures` to its class.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from inferlab.distributed.layers import ParallelLMHead, VocabParallelEmbedding
from inferlab.model.layers import AttentionMetadata, Embedding, Linear, RMSNorm, RotaryEmbedding

log = logging.getLogger("inferlab")


class ModelLoadError(ValueError):
    """A checkpoint the loader cannot turn into a model: one line naming the problem."""


@dataclass
class ModelArgs:
    arch: str  # "llama", "qwen2", "qwen3", or a family's own ("qwen2_moe", "deepseek_v3", ...)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # the width RoPE rotates (DeepSeek's MLA: qk_rope_head_dim, as its HF config says)
    intermediate_size: int
    vocab_size: int
    max_position: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases: Qwen2, and Llama / Qwen3 configs that ask for them
    o_proj_bias: bool = False  # Llama's and Qwen3's attention_bias biases the output projection too
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down
    qk_norm: bool = False  # Qwen3

    def __post_init__(self) -> None:
        """A shape no model can have is refused here, with its field, before any layer is built."""
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                     "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise unsupported(name, value, "a positive integer")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise unsupported("rope_theta", self.rope_theta, "a positive number")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 <= self.rms_norm_eps < 1):  # NaN: every logit NaN
            raise unsupported("rms_norm_eps", self.rms_norm_eps, "a number in [0, 1)")
        if self.num_heads % self.num_kv_heads:
            raise unsupported("num_kv_heads", self.num_kv_heads, f"it must divide num_heads={self.num_heads}")

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's share of the KV pool: (tensors, blocks, block_size, heads, head_dim). Here a K
        and a V tensor of the KV heads; MLA keeps one latent "head" (`deepseek.DeepseekArgs`)."""
        return 2, num_blocks, block_size, self.num_kv_heads, self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Pool bytes one token takes in one layer."""
        return math.prod(self.kv_cache_shape(1, 1)) * torch.empty(0, dtype=dtype).element_size()


@dataclass
class MoEArgs(ModelArgs):
    """A decoder whose MLP is, in the layers `moe_layers` lists, routed experts: `num_experts` MLPs of
    `moe_intermediate_size`, `num_experts_per_tok` of them per token (renormalised to sum to 1 if
    `norm_topk_prob`); the other layers keep a dense MLP of `intermediate_size`."""

    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.num_experts_per_tok
        if self.moe_layers and not (isinstance(k, int) and 1 <= k <= self.num_experts):
            raise unsupported("num_experts_per_tok", self.num_experts_per_tok,
                              f"each token takes 1 to num_experts={self.num_experts} experts")


def unsupported(field: str, value, supported: str) -> ModelLoadError:
    return ModelLoadError(f"unsupported config: {field}={value!r} ({supported})")


# ModelArgs' fields that config.json names otherwise: its errors name the key the user can find
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "max_position": "max_position_embeddings"}


def in_hf_names(e: ModelLoadError) -> ModelLoadError:
    return ModelLoadError(re.sub(rf"\b({'|'.join(HF_NAMES)})\b", lambda m: HF_NAMES[m[1]], str(e)))


def hf_shape(cfg: dict) -> dict:
    """The ModelArgs fields every HF config.json gives, in our names; refuses what no family runs."""
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise unsupported("quantization_config", method, "quantized safetensors are not read; use a GGUF file")
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", cfg["hidden_act"], "only silu")
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    max_position = cfg.get("max_position_embeddings", 2048)
    window = sliding_window(cfg)
    if window is not None and window < max_position:
        # Within the window full attention is the same computation; past it, it would not be.
        log.warning("this model attends through a sliding window of %d tokens on some layers, which InferLab "
                    "does not implement: its context is limited to %d tokens (of %d)", window, window, max_position)
        max_position = window
    return dict(hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                max_position=max_position,
                rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0), rope_scaling=rope_scaling(cfg),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_word_embeddings=cfg.get("tie_word_embeddings", False))


def sliding_window(cfg: dict) -> int | None:
    """The window of a config whose layers, or some of them, attend only to their last `sliding_window`
    tokens (Mistral; Qwen2 and Qwen3 with `use_sliding_window`, from layer `max_window_layers` on;
    newer configs list `layer_types`); None where every layer attends to the whole context."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    if "layer_types" in cfg:
        return window if "sliding_attention" in (cfg["layer_types"] or ()) else None
    if "use_sliding_window" in cfg:
        if not cfg["use_sliding_window"] or cfg.get("max_window_layers", 0) >= cfg["num_hidden_layers"]:
            return None
    return window


def rope_scaling(cfg: dict) -> dict | None:
    """`rope_scaling` (older configs) or `rope_parameters`, None for plain RoPE. YaRN's pre-training
    length defaults to the context length, as transformers does."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    missing = [key for key in ROPE_KEYS.get(kind, ()) if scaling.get(key) is None]
    if missing:  # (a KeyError deep in the rotary layer named no config key)
        raise unsupported("rope_scaling", scaling, f"{kind} scaling needs {', '.join(ROPE_KEYS[kind])}; "
                                                   f"it lacks {', '.join(missing)}")
    return scaling


ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings")}


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.*`)."""

    def __init__(self, args: ModelArgs, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only LM over a paged KV cache. The contract:

    - `args` (ModelArgs): the shape; `args.kv_cache_shape` sizes the pool the runner allocates, and
      each layer gets that layer's tensors (`kv_caches[i]`, a tuple) in every forward call;
    - `model.layers[i](x, residual, cos, sin, kv_cache, meta)` returns (output, residual): the
      residual add happens inside the next norm, fused;
    - `hidden_states` is the whole forward from token ids and the step's RoPE table, the one
      definition that both the op-by-op path and a decode tape (`inferlab.tape`) run;
    - `packed_modules` maps a checkpoint projection to (our merged layer, shard), `gguf_names`
      overrides the loader's GGUF-to-HF tensor names, and `skip_checkpoint_tensor` names the
      checkpoint tensors the model has no use for;
    - `args_from_hf(arch, config)` and `args_from_gguf(arch, fields, tensor_names)` read the shape from
      a config.json or a GGUF file's fields, refusing what the class does not implement;
    - `process_weights_after_loading` converts the loaded weights to what they are kept as.

    The embedding and LM head are split by vocabulary across tensor-parallel ranks
    (`inferlab.distributed.layers`; with one rank they are the plain layers).
    """

    packed_modules: dict[str, tuple[str, int]] = {}
    gguf_names: dict[str, str] = {}

    def __init__(self, args: ModelArgs, decoder: Decoder) -> None:
        super().__init__()
        self.args = args
        self.model = decoder
        self.lm_head = ParallelLMHead(args.hidden_size, args.vocab_size)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.classifier: nn.Module | None = None  # a classification checkpoint's head (layers/classifier.py)
        self.pooling_type = "LAST"  # how its embeddings pool its states, as its checkpoint says (pooling.py)
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

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return "rotary_emb" in name or (self.args.tie_word_embeddings and name.startswith("lm_head"))

    def process_weights_after_loading(self, quantization: str, isa: str | None, int8_activations: bool = False) -> None:
        """Keep each loaded weight in the type `quantization` asks for (see `layers.keep.target_type`;
        `isa`: the native kernels', None without them); `int8_activations`: the linear layers quantize
        their inputs where their weight type allows."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading(quantization, self.dtype, isa, vocab=module is self.lm_head,
                                                     int8=int8_activations)
            elif isinstance(module, Embedding):
                tied = self.args.tie_word_embeddings
                module.process_weights_after_loading(quantization, self.dtype, isa, int8=int8_activations and tied,
                                                     tied=tied)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple],
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of tokens from many sequences (of the rows
        `keep` only, if given)."""
        cos, sin = self.rotary_emb(positions)
        return self.hidden_states(input_ids, cos, sin, kv_caches, meta, keep)

    def hidden_states(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[tuple],
                      meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The forward pass from token ids and the step's RoPE table: what a tape records. With
        `keep` (row indices), the last layer drops the other rows after its attention, as llama.cpp
        does: a prompt's earlier tokens need every layer's K and V but nothing after the last
        attention (for SmolLM2, ~2.5% of a prefill's matrix products)."""
        x, residual = self.model.embed_tokens(input_ids), None
        last = len(self.model.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, keep if i == last else None)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 (see `ParallelLMHead`). Under tensor parallelism, on rank 0 only (None on
        the others)."""
        return self.lm_head(hidden)
