"""Blocks regrouped 16 weight rows at a time for the AVX512-BF16 kernel (`kernels/avx512/x16.c`, where
the layout is described): `repack` makes a regrouped type (quant.REGROUPED) from a GGUF type's rows at
load, the same bytes per row, and `unrepack` gives the rows back (the reference reads them so).
(`tiles.py` regroups blocks for the AMX tiles instead.)
"""
from __future__ import annotations

import torch

from inferlab.model.layers.planes import (
    VALUES,
    block_groups,
    by_row,
    field_bytes,
    fields,
    join,
    side_by_side,
    split,
    word_bytes,
    words,
)
from inferlab.model.layers.quant import BF16, BF16X16, GROUP_ROWS, Q8_0, REGROUPED, WeightType


def _pair_words(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`bits`-bit values q [g, 16 rows, blocks, 32 inputs] as the regrouped blocks' words [g, blocks,
    64 bits bytes]: with f = 16 / bits fields a word, field j of word 32 c + 2 i + e is row i's input
    2 (f c + j) + e (4 bits: 256 bytes of nibbles; Q3_K's 2: 128 bytes)."""
    g, _, nb, _ = q.shape
    f = 16 // bits
    q = q.to(torch.int32).reshape(g, GROUP_ROWS, nb, 16 // f, f, 2).permute(0, 2, 3, 4, 1, 5)
    q = q.reshape(g, nb, 16 // f, f, 32)
    word = sum(q[:, :, :, j] << bits * j for j in range(f))
    return torch.stack([word & 255, word >> 8], dim=-1).to(torch.uint8).reshape(g, nb, -1)


def _pair_values(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`_pair_words`' inverse: [g, blocks, bytes] -> `bits`-bit values [g, 16 rows, blocks, 32 inputs]."""
    g, nb, _ = values.shape
    f = 16 // bits
    wb = values.reshape(g, nb, 16 // f, 32, 2).to(torch.int32)
    word = wb[..., 0] | wb[..., 1] << 8  # [g, block, c, 2 i + e]
    q = torch.stack([(word >> bits * j) & ((1 << bits) - 1) for j in range(f)], dim=3)  # [g, block, c, j, 2 i + e]
    return q.reshape(g, nb, 16 // f, f, GROUP_ROWS, 2).permute(0, 4, 1, 2, 3, 5).reshape(g, GROUP_ROWS, nb, 32)


def _by_pair(t: torch.Tensor) -> torch.Tensor:
    """[g, 16 rows, blocks, 32 inputs] -> [g, blocks, pair row p, lane 2 i + e] (row i's input 2 p + e)."""
    g, _, nb, _ = t.shape
    return t.to(torch.int64).reshape(g, GROUP_ROWS, nb, 16, 2).permute(0, 2, 3, 1, 4).reshape(g, nb, 16, 32)


def _bits_above(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per pair row and lane, the bit the kernel finds above a field in its word: the next field's
    low bit (pair row p + 1), 0 past a word's last field. `values`: the fields, as `_by_pair` takes."""
    q, f = _by_pair(values), 16 // bits
    above = torch.zeros_like(q)
    for p in range(16):
        if p % f != f - 1:
            above[:, :, p] = q[:, :, p + 1] & 1
    return above


def _from_pair(t: torch.Tensor) -> torch.Tensor:
    """`_by_pair`'s inverse."""
    g, nb, _, _ = t.shape
    return t.reshape(g, nb, 16, GROUP_ROWS, 2).permute(0, 3, 1, 2, 4).reshape(g, GROUP_ROWS, nb, 32)


def _lane_masks(bits: torch.Tensor) -> torch.Tensor:
    """Bits [g, blocks, pair row p, lane] as 16 32-bit masks a block [g, blocks, 64 bytes] (bit l of mask p)."""
    return word_bytes((bits << torch.arange(32)).sum(-1))


def _mask_lanes(masks: torch.Tensor) -> torch.Tensor:
    """`_lane_masks`' inverse."""
    return (words(masks).unsqueeze(-1) >> torch.arange(32)) & 1


def _fifth_masks(values: torch.Tensor, high: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The bit above `bits`-bit fields (Q5's fifth, Q3_K's third) [g, 16 rows, blocks, 32 inputs] as
    the regrouped blocks' 16 32-bit masks: bit 2 i + e of mask p is row i's input 2 p + e's high bit
    XOR the bit above its field (x16_blocks.h says why). `values`: the fields."""
    return _lane_masks(_by_pair(high) ^ _bits_above(values, bits))


def _mask_bits(masks: torch.Tensor, values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`_fifth_masks`' inverse: the masks [g, blocks, 64] and the fields -> the high bits."""
    return _from_pair(_mask_lanes(masks) ^ _bits_above(values, bits))


def repack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL / IQ4_XS / Q4_K / Q5_K / Q6_K / Q3_K / Q2_K rows [N, row bytes] (N a
    multiple of 16) regrouped as REGROUPED[wtype] (bf16: BF16X16), the same bytes per row: per group of 16 rows and
    block, the rows' scale fields side by side (`planes.FIELDS`), then per 32 inputs the masks of the
    values' higher bits (the first as `_fifth_masks`, a second, Q6_K's sixth, as plain lane masks) and
    the low bits as pairs of inputs of the 16 rows (`_pair_words`; layout: kernels/avx512/x16_blocks.h);
    Q8_0's values as pairs of bytes; bf16 weights [N, K] as pairs of them, into [N, 2 K] bytes."""
    if wtype not in REGROUPED and wtype != BF16:
        raise ValueError(f"{wtype.name} rows do not regroup (only {', '.join(t.name for t in (*REGROUPED, BF16))})")
    if wtype == BF16:  # 4 bytes a row's input pair: pair row p holds the 16 rows' pair p side by side
        _, _, _, blocks = block_groups(data.contiguous().view(torch.uint8), BF16X16)
        return side_by_side(blocks, 4).reshape(data.shape[0], -1).contiguous()
    n, g, nb, blocks = block_groups(data, wtype)
    if wtype == Q8_0:  # byte 2 i + e of pair row p: row i's input 2 p + e
        return torch.cat([fields(blocks, wtype), side_by_side(blocks[..., 2:], 2)], dim=2).reshape(n, -1).contiguous()
    scales, low, highs = split(blocks, wtype)
    bits = VALUES[wtype][0]
    masks = [_fifth_masks(low, highs[0], bits), *(_lane_masks(_by_pair(h)) for h in highs[1:])] if highs else []
    subs = torch.cat([*masks, _pair_words(low, bits)], dim=2)
    return torch.cat([scales, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()


def unrepack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """The GGUF rows a regrouped tensor was made from (`repack`'s inverse)."""
    base = wtype.base
    if base == BF16:
        nbytes = BF16X16.nbytes
        rows = by_row(data.reshape(data.shape[0] // GROUP_ROWS, data.shape[1] // nbytes, GROUP_ROWS * nbytes), 4)
        return rows.reshape(data.shape[0], -1).contiguous().view(torch.bfloat16)
    n, nb = data.shape[0], data.shape[1] // base.nbytes
    g, head = n // GROUP_ROWS, field_bytes(base)
    groups = data.reshape(g, nb, GROUP_ROWS * base.nbytes)
    if base == Q8_0:
        rows = torch.cat([by_row(groups[:, :, :head], 2), by_row(groups[:, :, head:], 2)], dim=3)
        return rows.reshape(n, -1).contiguous()
    bits, high_planes = VALUES[base]
    subs = groups[:, :, head:].reshape(g, nb * base.block // 32, -1)
    low = _pair_values(subs[:, :, 64 * high_planes:], bits)
    highs = [_mask_bits(subs[:, :, :64], low, bits)] if high_planes else []
    highs += [_from_pair(_mask_lanes(subs[:, :, 64 * k:64 * k + 64])) for k in range(1, high_planes)]
    return join(groups, low, highs, base).reshape(n, -1).contiguous()
