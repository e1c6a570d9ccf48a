"""Blocks regrouped 16 weight rows at a time for the AMX tiles (`kernels/amx/linear.c`; the layout is
described in `kernels/regrouped.h`): `repack` makes a t16 type (quant.TILED) from a GGUF type's rows at
load, the same bytes per row, and `unrepack` gives the rows back. A tile row is 32 inputs of one weight
row under one scale, so the kernel decodes it with one table permute. (`planes.py` takes the GGUF
blocks apart; this module lays the parts out.)
"""
from __future__ import annotations

import torch

from inferlab.model.layers import planes, quant
from inferlab.model.layers.quant import GROUP_ROWS, Q8_0, WeightType


def _quad_words(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """4-bit values q [g, 16 rows, sub-blocks, 32 inputs] as the tiles' words [g, sub-blocks, 256 bytes]:
    little-endian 16-bit word j of quad c holds input j of rows 4c .. 4c + 3, row 4c + s at bits 4s.
    (2 bits: 128 bytes, word j of octet c holding input j of rows 8c .. 8c + 7, row 8c + s at bits 2s.)"""
    g, _, nb, _ = q.shape
    f = 16 // bits  # rows a word
    q = q.to(torch.int32).reshape(g, 16 // f, f, nb, 32)  # [g, word group, row in it, sub-block, input]
    words = sum(q[:, :, s] << bits * s for s in range(f)).permute(0, 2, 1, 3)  # [g, sub-block, group, input]
    return torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8).reshape(g, nb, -1)


def _quad_values(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`_quad_words`' inverse: [g, sub-blocks, 256 bytes] -> [g, 16 rows, sub-blocks, 32 inputs]."""
    g, nb, _ = values.shape
    f = 16 // bits
    wb = values.reshape(g, nb, 16 // f, 32, 2).to(torch.int32)
    words = wb[..., 0] | wb[..., 1] << 8
    q = torch.stack([(words >> bits * s) & ((1 << bits) - 1) for s in range(f)], dim=3)  # [g, sub, group, row, input]
    return q.permute(0, 2, 3, 1, 4).reshape(g, GROUP_ROWS, nb, 32)


def _row_words(bits: torch.Tensor) -> torch.Tensor:
    """One bit per input [g, 16 rows, sub-blocks, 32 inputs] as the rows' 32-bit words side by side
    [g, sub-blocks, 64 bytes]: row i's little-endian word at 4 i, input k at bit k."""
    return planes.side_by_side(planes.word_bytes((bits.to(torch.int64) << torch.arange(32)).sum(-1, keepdim=True)), 4)


def _word_bits(words: torch.Tensor) -> torch.Tensor:
    """`_row_words`' inverse."""
    return (planes.words(planes.by_row(words, 4)) >> torch.arange(32)) & 1


def repack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """A GGUF block type's rows [N, row bytes] (N a multiple of 16) regrouped as TILED[wtype], the same
    bytes per row: per group of 16 rows and block, the rows' scale fields side by side
    (`planes.FIELDS`), then per 32 inputs the rows' words of each higher bit (`_row_words`: Q5's fifth,
    Q3_K's third, Q6_K's fifth and sixth) and the low bits as `_quad_words`; Q8_0's 16 rows of 32 bytes
    one after another (layout: kernels/regrouped.h)."""
    if wtype not in quant.TILED:
        raise ValueError(f"only {', '.join(t.name for t in quant.TILED)} regroup for the tiles, not {wtype.name}")
    n, g, nb, blocks = planes.block_groups(data, wtype)
    if wtype == Q8_0:
        values = blocks[..., 2:].permute(0, 2, 1, 3).reshape(g, nb, -1)
        return torch.cat([planes.fields(blocks, wtype), values], dim=2).reshape(n, -1).contiguous()
    scales, low, highs = planes.split(blocks, wtype)
    subs = torch.cat([*(_row_words(h) for h in highs), _quad_words(low, planes.VALUES[wtype][0])], dim=2)
    return torch.cat([scales, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()


def unrepack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """The GGUF rows a t16 tensor was made from (`repack`'s inverse)."""
    base = wtype.base
    g, nb = data.shape[0] // GROUP_ROWS, data.shape[1] // base.nbytes
    groups, head = data.reshape(g, nb, GROUP_ROWS * base.nbytes), planes.field_bytes(base)
    if base == Q8_0:
        values = groups[:, :, head:].reshape(g, nb, GROUP_ROWS, 32).permute(0, 2, 1, 3)
        rows = torch.cat([planes.by_row(groups[:, :, :head], 2), values], dim=3)
        return rows.reshape(g * GROUP_ROWS, -1).contiguous()
    bits, high_planes = planes.VALUES[base]
    subs = groups[:, :, head:].reshape(g, nb * base.block // 32, -1)
    highs = [_word_bits(subs[:, :, 64 * k:64 * k + 64]) for k in range(high_planes)]
    low = _quad_values(subs[:, :, 64 * high_planes:], bits)
    return planes.join(groups, low, highs, base).reshape(g * GROUP_ROWS, -1).contiguous()
