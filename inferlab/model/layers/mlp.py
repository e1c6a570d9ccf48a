"""The gated MLP (SwiGLU): down(silu(gate(x)) * up(x)), gate and up in one matmul. Dense layers,
MoE experts and shared experts are all this block, at different widths. Tensor parallelism passes
its split layers as `column` (gate/up rows) and `row` (down columns)."""
from __future__ import annotations

import torch
from torch import nn

from inferlab.model.layers.activation import silu_and_mul
from inferlab.model.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, column: type[Linear] = Linear,
                 row: type[Linear] = Linear, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = column(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = row(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
