"""Rotary position embeddings: the frequencies (with Llama 3's, linear and YaRN scaling, or a GGUF's
per-frequency divisors), each step's cos/sin table shared by every layer, and the rotation itself
(HF's rotate-half convention)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from inferlab import kernels


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":  # Llama 3.1+: stretch low frequencies, keep high ones, blend between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor,
                               torch.where(wavelen < old_len / hi, inv_freq, blended))
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "freq_factors":  # a GGUF's rope_freqs.weight: one divisor per frequency (Llama 3.1+'s)
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    elif kind == "yarn":
        inv_freq = yarn_inv_freq(head_dim, theta, scaling)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn more than beta_fast times over the pre-training
    length keep their value, those turning fewer than beta_slow times are divided by `factor`, and a
    linear ramp over the dimensions between blends the two."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_turning(turns: float) -> float:  # the dimension whose frequency turns `turns` times over old_len
        return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: interpolated
    wavelength = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return 1.0 / (factor * wavelength) * (1 - keep) + 1.0 / wavelength * keep


def rope_attention_factor(scaling: dict | None) -> float:
    """YaRN scales cos and sin (so both q and k, so the logits by its square): by `attention_factor`,
    or 0.1 ln(factor) + 1, or DeepSeek's ratio of that at `mscale` and `mscale_all_dim`."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling).float(), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (inv_freq, cos, sin)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin: [T, head_dim / 2] each, rows of a table of every position up to the largest
        seen so far, so a position's values never depend on the rows beside it."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        if self._table is None or self._table[0] is not self.inv_freq or top > self._table[1].shape[0]:
            held = self._table[1].shape[0] if self._table is not None else 0
            self._table = self.inv_freq, *self._cos_sin(max(top, 1024, 2 * held))
        return self._table[1][positions], self._table[2][positions]

    def _cos_sin(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. n - 1: each frequency an fp32 product as HF's, its cos and sin by numpy in fp64,
        rounded to fp32. (torch's fp32 cos, MKL's, gave some processes other last bits in the rows a
        second thread computed, so a long prompt's logits changed from one run to the next.)"""
        freqs = (torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]).cpu()
        freqs = freqs.numpy().astype(np.float64)
        return tuple(torch.from_numpy(f(freqs) * self.attention_factor).float().to(self.inv_freq.device)
                     for f in (np.cos, np.sin))


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d/2] fp32 (rotated in x's dtype)."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x: [T, heads, d], which may be a view into the fused qkv output (rows
    strided, heads dense). The native path rotates in place and returns x itself."""
    k = kernels.for_tensor(x)
    t, heads, d = x.shape
    if k is None or x.stride()[1:] != (d, 1) or not (cos.is_contiguous() and sin.is_contiguous()) \
            or d > kernels.C["IL_MAX_HEAD_DIM"]:
        return rope_ref(x, cos, sin)
    k.rope(x, x.stride(0), cos, sin, t, heads, d, kernels.DTYPE_CODES[x.dtype])
    return x
