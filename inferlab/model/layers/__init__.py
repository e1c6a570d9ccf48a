"""The model's building blocks, shared by every architecture: linear layers and embeddings with a
pluggable weight format (`quant.py`; the type each weight is kept in: `keep.py`), RMSNorm, RoPE,
SiLU-and-mul, the gated MLP and paged attention; mixture-of-experts (`moe.py`) and multi-head latent
attention (`mla.py`) build on them. Each op has a PyTorch reference (any device: the definition) and
calls the native CPU kernels through one dispatcher (`inferlab.kernels`), which picks the
implementation by op, weight type and ISA."""
from inferlab.model.layers.activation import silu_and_mul
from inferlab.model.layers.attention import AttentionMetadata, NativeRows, PrefillSeq, paged_attention
from inferlab.model.layers.linear import Embedding, Linear
from inferlab.model.layers.mlp import MLP
from inferlab.model.layers.norm import RMSNorm, rms_norm
from inferlab.model.layers.rotary import RotaryEmbedding, rope

__all__ = ["AttentionMetadata", "Embedding", "Linear", "MLP", "NativeRows", "PrefillSeq", "RMSNorm", "RotaryEmbedding",
           "paged_attention", "rms_norm", "rope", "silu_and_mul"]
