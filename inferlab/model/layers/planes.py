"""A GGUF block type's rows taken apart into what every regrouped layout reorders, and put back: per
group of 16 weight rows, the rows' scale fields side by side, and per 32 inputs each row's low bits
(nibbles, or Q2_K's and Q3_K's 2 bits) and the planes of its higher bits (Q5's fifth, Q3_K's third,
Q6_K's fifth and sixth). `regroup.py` (the AVX512-BF16 kernel's layout) and `tiles.py` (the AMX tiles')
each lay these out their own way; the GGUF formats themselves are read and written only here.
"""
from __future__ import annotations

import torch

from inferlab.model.layers.quant import (
    GROUP_ROWS,
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    WeightType,
)

# A block's scale fields as (first byte, end, field width), in the order the layouts put them first
FIELDS = {Q4_0: [(0, 2, 2)], IQ4_NL: [(0, 2, 2)], Q4_1: [(0, 4, 2)], Q5_0: [(0, 2, 2)], Q5_1: [(0, 4, 2)],
          Q8_0: [(0, 2, 2)], Q4_K: [(0, 4, 2), (4, 16, 1)], Q5_K: [(0, 4, 2), (4, 16, 1)],
          Q6_K: [(208, 210, 2), (192, 208, 1)], Q3_K: [(108, 110, 2), (96, 108, 1)],
          Q2_K: [(80, 84, 2), (0, 16, 1)], IQ4_XS: [(0, 4, 2), (4, 8, 1)]}
# (bits of the low field, planes of higher bits) a value: Q8_0 is not split so
VALUES = {Q4_0: (4, 0), IQ4_NL: (4, 0), Q4_1: (4, 0), Q5_0: (4, 1), Q5_1: (4, 1), Q4_K: (4, 0), Q5_K: (4, 1),
          Q6_K: (4, 2), Q3_K: (2, 1), Q2_K: (2, 0), IQ4_XS: (4, 0)}


def side_by_side(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Fields of `width` bytes [g, 16 rows, blocks, n * width] -> [g, blocks, 16 n * width]: field k of
    row i at 16 k + i (the 16 rows' same field side by side, as one vector load takes them)."""
    g, _, nb, nbytes = fields.shape
    return fields.reshape(g, GROUP_ROWS, nb, nbytes // width, width).permute(0, 2, 3, 1, 4).reshape(g, nb, -1)


def by_row(groups: torch.Tensor, width: int) -> torch.Tensor:
    """`side_by_side`'s inverse: [g, blocks, bytes] -> [g, 16 rows, blocks, bytes / 16]."""
    g, nb, nbytes = groups.shape
    fields = groups.reshape(g, nb, nbytes // (GROUP_ROWS * width), GROUP_ROWS, width).permute(0, 3, 1, 2, 4)
    return fields.reshape(g, GROUP_ROWS, nb, -1)


def words(b: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words of bytes [..., 4 k] -> [..., k] (int64)."""
    b = b.reshape(*b.shape[:-1], -1, 4).to(torch.int64)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def word_bytes(word: torch.Tensor) -> torch.Tensor:
    """`words`' inverse: [..., k] -> bytes [..., 4 k]."""
    return torch.stack([(word >> 8 * k) & 255 for k in range(4)], dim=-1).to(torch.uint8).flatten(-2)


def _q6_values(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [..., 210] -> their 6-bit values [..., 256]: weight 128 n + 32 g + l has the low
    (g < 2) or high nibble of ql[64 n + 32 (g % 2) + l] and bits 2 g, 2 g + 1 of qh[32 n + l]."""
    ql = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 2, 32).to(torch.int64)
    qh = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32).to(torch.int64)
    low = torch.cat([ql & 15, ql >> 4], dim=-2)  # [..., n, g, l]
    return (low | ((qh >> 2 * torch.arange(4).view(4, 1)) & 3) << 4).flatten(-3)


def _q6_bytes(q: torch.Tensor) -> torch.Tensor:
    """`_q6_values`' inverse: [..., 256] values -> ql [..., 128] and qh [..., 64] side by side."""
    q = q.reshape(*q.shape[:-1], 2, 4, 32)
    ql = (q[..., :2, :] & 15) | (q[..., 2:, :] & 15) << 4
    qh = ((q >> 4) << 2 * torch.arange(4).view(4, 1)).sum(-2)
    return torch.cat([ql.flatten(-3), qh.flatten(-2)], dim=-1).to(torch.uint8)


def _bit_pairs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K value bytes [g, 16 rows, blocks, 64] -> their 2-bit values [g, 16 rows, 8 blocks, 32]:
    sub-block j is bit pair j % 4 of bytes 32 (j / 4) .."""
    g, _, nb, _ = qs.shape
    qs = qs.reshape(g, GROUP_ROWS, nb, 2, 1, 32).to(torch.int64)
    return ((qs >> 2 * torch.arange(4).view(4, 1)) & 3).reshape(g, GROUP_ROWS, nb * 8, 32)


def _bit_pair_bytes(q: torch.Tensor) -> torch.Tensor:
    """`_bit_pairs`' inverse."""
    g, _, n, _ = q.shape
    q = q.reshape(g, GROUP_ROWS, n // 8, 2, 4, 32) << 2 * torch.arange(4).view(4, 1)
    return q.sum(4).to(torch.uint8).flatten(-2)


def _sub_block_bits(b: torch.Tensor) -> torch.Tensor:
    """32 bytes a block [g, 16 rows, blocks, 32] whose bit j of byte l is sub-block j's weight l's (Q5_K's
    fifth bits, Q3_K's third) -> [g, 16 rows, 8 blocks, 32]."""
    g, _, nb, _ = b.shape
    return ((b.unsqueeze(3).to(torch.int64) >> torch.arange(8).view(8, 1)) & 1).reshape(g, GROUP_ROWS, nb * 8, 32)


def _sub_block_bytes(bits: torch.Tensor) -> torch.Tensor:
    """`_sub_block_bits`' inverse."""
    g, _, n, _ = bits.shape
    return (bits.reshape(g, GROUP_ROWS, n // 8, 8, 32) << torch.arange(8).view(8, 1)).sum(3).to(torch.uint8)


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 16] -> their 32 nibbles [..., 32]: the low ones, then the high ones."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def block_groups(data: torch.Tensor, wtype: WeightType) -> tuple[int, int, int, torch.Tensor]:
    """Rows [N, row bytes] of `wtype` blocks as (N, groups, blocks a row, [groups, 16, blocks, bytes])."""
    n = data.shape[0]
    if n % GROUP_ROWS:
        raise ValueError(f"{n} rows do not split into groups of {GROUP_ROWS}")
    g, nb = n // GROUP_ROWS, data.shape[1] // wtype.nbytes
    return n, g, nb, data.reshape(g, GROUP_ROWS, nb, wtype.nbytes)


def field_bytes(wtype: WeightType) -> int:
    """The bytes a group's block starts with: its 16 rows' scale fields."""
    return GROUP_ROWS * sum(end - start for start, end, _ in FIELDS[wtype])


def fields(blocks: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """A type's scale fields of blocks [g, 16 rows, blocks, bytes], the rows' side by side [g, blocks, bytes]."""
    return torch.cat([side_by_side(blocks[..., a:b], w) for a, b, w in FIELDS[wtype]], dim=2)


def split(blocks: torch.Tensor, wtype: WeightType) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Blocks [g, 16 rows, blocks, bytes] of any type but Q8_0 -> (their scale fields [g, blocks, bytes],
    the values' low bits [g, 16 rows, 32-input sub-blocks, 32] of VALUES[wtype][0] bits, and each plane
    of higher bits, one bit a value, in the same shape)."""
    g, _, nb, _ = blocks.shape
    if wtype == Q6_K:
        q = _q6_values(blocks).reshape(g, GROUP_ROWS, nb * 8, 32)
        low, highs = q & 15, [(q >> 4) & 1, q >> 5]
    elif wtype in (Q2_K, Q3_K):  # Q3_K: hmask, 2-bit qs; Q2_K: scales, 2-bit qs
        low = _bit_pairs(blocks[..., 32:96] if wtype == Q3_K else blocks[..., 16:80])
        highs = [_sub_block_bits(blocks[..., :32])] if wtype == Q3_K else []
    elif wtype == IQ4_XS:  # sub-block j: the nibbles of bytes 8 + 16 j ..
        low, highs = _nibble_pairs(blocks[..., 8:].reshape(g, GROUP_ROWS, nb * 8, 16)), []
    elif wtype in (Q4_K, Q5_K):  # sub-block j: the low (j even) or high nibbles of bytes 32 (j / 2) ..
        qs = blocks[..., -128:].reshape(g, GROUP_ROWS, nb, 4, 1, 32)
        low = torch.cat([qs & 15, qs >> 4], dim=4).reshape(g, GROUP_ROWS, nb * 8, 32)
        highs = [_sub_block_bits(blocks[..., 16:48])] if wtype == Q5_K else []  # bit j of qh[l]: sub-block j's
    else:  # 32 inputs: 16 bytes of nibbles last; Q5: 4 bytes before them, bit l weight l's fifth bit
        low = _nibble_pairs(blocks[..., -16:])
        highs = [(words(blocks[..., -20:-16]) >> torch.arange(32)) & 1] if wtype in (Q5_0, Q5_1) else []
    return fields(blocks, wtype), low, highs


def join(groups: torch.Tensor, low: torch.Tensor, highs: list[torch.Tensor], wtype: WeightType) -> torch.Tensor:
    """`split`'s inverse: the scale fields [g, blocks, bytes] (a layout's, starting with them), the low
    bits and the higher bits' planes -> the GGUF blocks [g, 16 rows, blocks, bytes]."""
    g, nb = groups.shape[:2]
    out, at = torch.empty(g, GROUP_ROWS, nb, wtype.nbytes, dtype=torch.uint8), 0
    for a, b, w in FIELDS[wtype]:
        out[..., a:b] = by_row(groups[:, :, at:at + GROUP_ROWS * (b - a)], w)
        at += GROUP_ROWS * (b - a)
    if wtype == Q6_K:
        out[..., :192] = _q6_bytes((low | highs[0] << 4 | highs[1] << 5).reshape(g, GROUP_ROWS, nb, 256))
    elif wtype in (Q2_K, Q3_K):
        out[..., slice(32, 96) if wtype == Q3_K else slice(16, 80)] = _bit_pair_bytes(low)
        if wtype == Q3_K:
            out[..., :32] = _sub_block_bytes(highs[0])
    elif wtype == IQ4_XS:
        out[..., 8:] = (low[..., :16] | low[..., 16:] << 4).reshape(g, GROUP_ROWS, nb, 128)
    elif wtype in (Q4_K, Q5_K):
        q = low.reshape(g, GROUP_ROWS, nb, 4, 2, 32)
        out[..., -128:] = (q[..., 0, :] | q[..., 1, :] << 4).reshape(g, GROUP_ROWS, nb, 128)
        if wtype == Q5_K:
            out[..., 16:48] = _sub_block_bytes(highs[0])
    else:
        out[..., -16:] = low[..., :16] | low[..., 16:] << 4
        if highs:
            out[..., -20:-16] = word_bytes((highs[0] << torch.arange(32)).sum(-1, keepdim=True))
    return out
