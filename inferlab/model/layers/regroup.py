"""Blocks regrouped 16 weight rows at a time for the AVX512-BF16 kernel (`kernels/avx512/x16.c`, where
the layout is described): `repack` makes a regrouped type (quant.REGROUPED) from a GGUF type's rows at
load, the same bytes per row, and `unrepack` gives the rows back (the reference reads them so).
(`tiles.py` regroups blocks for the AMX tiles instead.)
"""
from __future__ import annotations

import torch

from inferlab.model.layers.quant import GROUP_ROWS, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, WeightType


def _side_by_side(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Fields of `width` bytes [g, 16 rows, blocks, n * width] -> [g, blocks, 16 n * width]: field k of
    row i at 16 k + i (the 16 rows' same field side by side, as one vector load takes them)."""
    g, _, nb, nbytes = fields.shape
    return fields.reshape(g, GROUP_ROWS, nb, nbytes // width, width).permute(0, 2, 3, 1, 4).reshape(g, nb, -1)


def _by_row(groups: torch.Tensor, width: int) -> torch.Tensor:
    """`_side_by_side`'s inverse: [g, blocks, bytes] -> [g, 16 rows, blocks, bytes / 16]."""
    g, nb, nbytes = groups.shape
    fields = groups.reshape(g, nb, nbytes // (GROUP_ROWS * width), GROUP_ROWS, width).permute(0, 3, 1, 2, 4)
    return fields.reshape(g, GROUP_ROWS, nb, -1)


def _words(b: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words of bytes [..., 4 k] -> [..., k] (int64)."""
    b = b.reshape(*b.shape[:-1], -1, 4).to(torch.int64)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _word_bytes(word: torch.Tensor) -> torch.Tensor:
    """`_words`' inverse: [..., k] -> bytes [..., 4 k]."""
    return torch.stack([(word >> 8 * k) & 255 for k in range(4)], dim=-1).to(torch.uint8).flatten(-2)


def _value_bytes(wtype: WeightType) -> int:
    return 32 if wtype == Q8_0 else 16  # a block's int8 values, or its 32 nibbles


def _pair_words(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`bits`-bit values q [g, 16 rows, blocks, 32 inputs] as the regrouped blocks' words [g, blocks,
    64 bits bytes]: with f = 16 / bits fields a word, field j of word 32 c + 2 i + e is row i's input
    2 (f c + j) + e (4 bits: 256 bytes of nibbles; Q3_K's 2: 128 bytes)."""
    g, _, nb, _ = q.shape
    f = 16 // bits
    q = q.to(torch.int32).reshape(g, GROUP_ROWS, nb, 16 // f, f, 2).permute(0, 2, 3, 4, 1, 5)
    q = q.reshape(g, nb, 16 // f, f, 32)
    words = sum(q[:, :, :, j] << bits * j for j in range(f))
    return torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8).reshape(g, nb, -1)


def _pair_values(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`_pair_words`' inverse: [g, blocks, bytes] -> `bits`-bit values [g, 16 rows, blocks, 32 inputs]."""
    g, nb, _ = values.shape
    f = 16 // bits
    wb = values.reshape(g, nb, 16 // f, 32, 2).to(torch.int32)
    words = wb[..., 0] | wb[..., 1] << 8  # [g, block, c, 2 i + e]
    q = torch.stack([(words >> bits * j) & ((1 << bits) - 1) for j in range(f)], dim=3)  # [g, block, c, j, 2 i + e]
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
    return _word_bytes((bits << torch.arange(32)).sum(-1))


def _mask_lanes(masks: torch.Tensor) -> torch.Tensor:
    """`_lane_masks`' inverse."""
    return (_words(masks).unsqueeze(-1) >> torch.arange(32)) & 1


def _fifth_masks(values: torch.Tensor, high: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The bit above `bits`-bit fields (Q5's fifth, Q3_K's third) [g, 16 rows, blocks, 32 inputs] as
    the regrouped blocks' 16 32-bit masks: bit 2 i + e of mask p is row i's input 2 p + e's high bit
    XOR the bit above its field (x16_blocks.h says why). `values`: the fields."""
    return _lane_masks(_by_pair(high) ^ _bits_above(values, bits))


def _mask_bits(masks: torch.Tensor, values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`_fifth_masks`' inverse: the masks [g, blocks, 64] and the fields -> the high bits."""
    return _from_pair(_mask_lanes(masks) ^ _bits_above(values, bits))


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


def block_groups(data: torch.Tensor, wtype: WeightType) -> tuple[int, int, int, torch.Tensor]:
    """Rows [N, row bytes] of `wtype` blocks as (N, groups, blocks a row, [groups, 16, blocks, bytes])."""
    n = data.shape[0]
    if n % GROUP_ROWS:
        raise ValueError(f"{n} rows do not split into groups of {GROUP_ROWS}")
    g, nb = n // GROUP_ROWS, data.shape[1] // wtype.nbytes
    return n, g, nb, data.reshape(g, GROUP_ROWS, nb, wtype.nbytes)


def repack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL / IQ4_XS / Q4_K / Q5_K / Q6_K / Q3_K / Q2_K rows [N, row bytes] (N a
    multiple of 16) regrouped as
    REGROUPED[wtype], the same bytes per row: per group of 16 rows and block, the rows' scale fields
    side by side, then the values as pairs of inputs of the 16 rows (layout: kernels/avx512/x16_blocks.h).
    Q4_K: per group and 256-input block, the rows' d, dmin and 12 scale bytes side by side, then its
    8 sub-blocks' values so (Q5_K: each sub-block's fifth-bit masks, then its values, as Q5_1's).
    Q6_K: per group and 256-input block, the rows' d and 16 scales side by side, then its 8 sub-blocks'
    fifth-bit masks, sixth-bit masks and low nibbles. Q3_K: the rows' d and 12 scale bytes side by side,
    then its 8 sub-blocks' third-bit masks and 2-bit words; Q2_K: the rows' d, dmin and 16 scale bytes,
    then its 8 sub-blocks' 2-bit words. IQ4_XS: the rows' d, scales_h and 4 scales_l
    bytes side by side, then its 8 sub-blocks' values."""
    n, g, nb, blocks = block_groups(data, wtype)
    if wtype == Q6_K:
        d, sc = _side_by_side(blocks[..., 208:], 2), _side_by_side(blocks[..., 192:208], 1)
        q = _q6_values(blocks).reshape(g, GROUP_ROWS, nb * 8, 32)
        low = q & 15
        subs = torch.cat([_fifth_masks(low, (q >> 4) & 1), _lane_masks(_by_pair(q >> 5)), _pair_words(low)], dim=2)
        return torch.cat([d, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == Q3_K:  # sub-block j: bit pair j % 4 of qs[32 (j / 4) ..], bit j of hmask[..] the third bit
        d, sc = _side_by_side(blocks[..., 108:], 2), _side_by_side(blocks[..., 96:108], 1)
        low = _bit_pairs(blocks[..., 32:96])
        subs = torch.cat([_fifth_masks(low, _sub_block_bits(blocks[..., :32]), 2), _pair_words(low, 2)], dim=2)
        return torch.cat([d, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == Q2_K:  # sub-block j: bit pair j % 4 of qs[32 (j / 4) ..]
        dm, sc = _side_by_side(blocks[..., 80:], 2), _side_by_side(blocks[..., :16], 1)
        words = _pair_words(_bit_pairs(blocks[..., 16:80]), 2)
        return torch.cat([dm, sc, words.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == IQ4_XS:  # sub-block j: the low then the high nibbles of bytes 8 + 16 j ..
        fields, low = _side_by_side(blocks[..., :4], 2), _side_by_side(blocks[..., 4:8], 1)
        qs = blocks[..., 8:].reshape(g, GROUP_ROWS, nb * 8, 16)
        subs = _pair_words(torch.cat([qs & 15, qs >> 4], dim=3))
        return torch.cat([fields, low, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype in (Q4_K, Q5_K):  # sub-block j: the low (j even) or high nibbles of bytes 32 (j / 2) ..
        dm, sc = _side_by_side(blocks[..., :4], 2), _side_by_side(blocks[..., 4:16], 1)
        qs = blocks[..., -128:].reshape(g, GROUP_ROWS, nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=4).reshape(g, GROUP_ROWS, nb * 8, 32)
        subs = _pair_words(q)
        if wtype == Q5_K:  # bit j of qh[l]: sub-block j's weight l's fifth bit
            subs = torch.cat([_fifth_masks(q, _sub_block_bits(blocks[..., 16:48])), subs], dim=2)
        return torch.cat([dm, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    vb, five = _value_bytes(wtype), wtype in (Q5_0, Q5_1)
    scales, qs = blocks[..., :-vb - 4 * five], blocks[..., -vb:]
    fields = _side_by_side(scales, 2)
    if wtype == Q8_0:  # byte 2 i + e of pair row p: row i's input 2 p + e
        values = _side_by_side(qs, 2)
    else:
        q = torch.cat([qs & 15, qs >> 4], dim=3)
        values = _pair_words(q)
        if five:  # qh: bit l of its 4 bytes (little-endian) is weight l's fifth bit
            word = _words(blocks[..., -vb - 4:-vb])
            values = torch.cat([_fifth_masks(q, (word >> torch.arange(32)) & 1), values], dim=2)
    return torch.cat([fields, values], dim=2).reshape(n, -1).contiguous()


def unrepack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """The GGUF rows a regrouped tensor was made from (`repack`'s inverse)."""
    base = wtype.base
    n, nb = data.shape[0], data.shape[1] // base.nbytes
    g = n // GROUP_ROWS
    groups = data.reshape(g, nb, GROUP_ROWS * base.nbytes)
    if base == Q6_K:
        d, sc = _by_row(groups[:, :, :32], 2), _by_row(groups[:, :, 32:288], 1)
        subs = groups[:, :, 288:].reshape(g, nb * 8, 384)
        low = _pair_values(subs[:, :, 128:])
        q = low | _mask_bits(subs[:, :, :64], low) << 4 | _from_pair(_mask_lanes(subs[:, :, 64:128])) << 5
        values = _q6_bytes(q.reshape(g, GROUP_ROWS, nb, 256))
        return torch.cat([values, sc, d], dim=3).reshape(n, -1).contiguous()
    if base == Q3_K:
        d, sc = _by_row(groups[:, :, :32], 2), _by_row(groups[:, :, 32:224], 1)
        subs = groups[:, :, 224:].reshape(g, nb * 8, 192)
        low = _pair_values(subs[:, :, 64:], 2)  # [g, 16 rows, sub-block, 32]
        hmask = _sub_block_bytes(_mask_bits(subs[:, :, :64], low, 2))
        return torch.cat([hmask, _bit_pair_bytes(low), sc, d], dim=3).reshape(n, -1).contiguous()
    if base == Q2_K:
        dm, sc = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:320], 1)
        qs = _bit_pair_bytes(_pair_values(groups[:, :, 320:].reshape(g, nb * 8, 128), 2))
        return torch.cat([sc, qs, dm], dim=3).reshape(n, -1).contiguous()
    if base == IQ4_XS:
        fields, low = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:128], 1)
        q = _pair_values(groups[:, :, 128:].reshape(g, nb * 8, 256))
        qs = (q[..., :16] | q[..., 16:] << 4).to(torch.uint8).reshape(g, GROUP_ROWS, nb, 128)
        return torch.cat([fields, low, qs], dim=3).reshape(n, -1).contiguous()
    if base in (Q4_K, Q5_K):
        dm, sc = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:256], 1)
        five = base == Q5_K
        subs = groups[:, :, 256:].reshape(g, nb * 8, -1)
        values = _pair_values(subs[:, :, 64 * five:])  # [g, 16 rows, sub-block, 32]
        q = values.reshape(g, GROUP_ROWS, nb, 4, 2, 32)
        qs = (q[:, :, :, :, 0] | q[:, :, :, :, 1] << 4).to(torch.uint8).reshape(g, GROUP_ROWS, nb, 128)
        qh = qs[..., :0]
        if five:
            qh = _sub_block_bytes(_mask_bits(subs[:, :, :64], values))
        return torch.cat([dm, sc, qh, qs], dim=3).reshape(n, -1).contiguous()
    vb, five = _value_bytes(base), base in (Q5_0, Q5_1)
    nfields = (base.nbytes - vb - 4 * five) // 2
    fields = _by_row(groups[:, :, :GROUP_ROWS * 2 * nfields], 2)
    values = groups[:, :, GROUP_ROWS * 2 * nfields:]
    qh = fields[..., :0]
    if base == Q8_0:
        qs = _by_row(values, 2)
    else:
        q = _pair_values(values[:, :, 64 * five:])
        qs = (q[..., :16] | q[..., 16:] << 4).to(torch.uint8)
        if five:
            qh = _word_bytes((_mask_bits(values[:, :, :64], q) << torch.arange(32)).sum(-1, keepdim=True))
    rows = torch.cat([fields, qh, qs], dim=3)
    return rows.reshape(n, -1).contiguous()
