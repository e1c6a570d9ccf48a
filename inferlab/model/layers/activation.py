"""SiLU-and-multiply, the gated MLP's activation: one pass where the reference makes three."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inferlab import kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate, then up) -> silu(gate) * up, [T, I]."""
    k = kernels.for_tensor(gate_up)
    if k is None or not gate_up.is_contiguous() or gate_up.dim() != 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    dim = gate_up.shape[-1] // 2
    out = gate_up.new_empty(gate_up.shape[0], dim)
    k.silu_and_mul(out, gate_up, gate_up.shape[0], dim, kernels.DTYPE_CODES[gate_up.dtype])
    return out
