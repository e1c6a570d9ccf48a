"""Fused decoder-layer ops: RMSNorm (with the residual add folded in), SiLU-and-mul, RoPE, and the
linear layer at the few rows of a decode step (native AMX or bf16 GEMV, streaming the weights once).

Each has a PyTorch reference (any device, the definition) and uses the native CPU kernel from
`inferlab.kernels` where it runs, since a chain of PyTorch elementwise ops passes over memory
several times and PyTorch's bf16 elementwise kernels are slow on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inferlab import kernels


def _native(x: torch.Tensor):
    if not x.is_cpu or x.dtype not in kernels.DTYPE_CODES:  # is_cpu: no device object built per call
        return None
    return kernels.native_library()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, x).
    The native path adds into `residual` in place, as the next layer only needs the sum."""
    lib = _native(x)
    dim = x.shape[-1]
    if lib is None or not x.is_contiguous() or weight.dtype != x.dtype or dim > 8192 or \
            (residual is not None and (not residual.is_contiguous() or residual.dtype != x.dtype)):
        return rms_norm_ref(x, weight, eps, residual)
    out = torch.empty_like(x)
    lib.rms_norm(out.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                 x.numel() // dim, dim, eps, kernels.DTYPE_CODES[x.dtype], torch.get_num_threads())
    return out, (x if residual is None else residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate, then up) -> silu(gate) * up, [T, I]."""
    lib = _native(gate_up)
    if lib is None or not gate_up.is_contiguous():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    dim = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], dim)
    lib.silu_and_mul(out.data_ptr(), gate_up.data_ptr(), out.numel() // dim, dim, kernels.DTYPE_CODES[gate_up.dtype],
                     torch.get_num_threads())
    return out


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d/2] fp32 (HF's rotate-half convention, in x's dtype)."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x: [T, heads, d], which may be a view into the fused qkv output (rows
    strided, heads dense). The native path rotates in place and returns x itself."""
    lib = _native(x)
    t, heads, d = x.shape
    if lib is None or x.stride()[1:] != (d, 1) or not (cos.is_contiguous() and sin.is_contiguous()):
        return rope_ref(x, cos, sin)
    lib.rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), t, heads, d, kernels.DTYPE_CODES[x.dtype],
             torch.get_num_threads())
    return x


# Rows up to which the native matmul (`kernels/linear.c`) beats PyTorch's; past it oneDNN's blocking wins.
NATIVE_LINEAR_MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). For the 1-64 rows of a decode step in bf16 on CPU, the native kernel
    (AMX tiles, or a bf16 GEMV at 1-4 rows without AMX) reads the weights near memory speed, where
    PyTorch's matmul reaches about half of it; PyTorch (oneDNN) otherwise, and for prefill."""
    lib = _native(x)
    if lib is None or x.dtype != torch.bfloat16 or weight.dtype != x.dtype or x.dim() != 2 or \
            not 1 <= x.shape[0] <= NATIVE_LINEAR_MAX_ROWS or not (x.is_contiguous() and weight.is_contiguous()):
        return F.linear(x, weight, bias)
    y = x.new_empty(x.shape[0], weight.shape[0])
    status = lib.linear_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], weight.shape[0],
                             torch.get_num_threads())
    if status == 2:
        raise MemoryError("linear_bf16: out of memory for the repacked input")
    if status:
        return F.linear(x, weight, bias)  # no fast path for this shape on this CPU
    return y if bias is None else y.add_(bias)
