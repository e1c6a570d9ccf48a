"""Blocks regrouped 16 weight rows at a time for the AMX tiles (`kernels/amx/linear.c`; the layout is
described in `kernels/regrouped.h`): `repack` makes a t16 type (quant.TILED) from a GGUF type's rows at
load, the same bytes per row, and `unrepack` gives the rows back. A tile row is 32 inputs of one weight
row under one scale, so the kernel decodes it with one table permute.
"""
from __future__ import annotations

import torch

from inferlab.model.layers import quant
from inferlab.model.layers.quant import GROUP_ROWS, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, WeightType
from inferlab.model.layers.regroup import (
    _bit_pair_bytes,
    _bit_pairs,
    _by_row,
    _q6_bytes,
    _q6_values,
    _side_by_side,
    _sub_block_bits,
    _sub_block_bytes,
    block_groups,
)


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
    word = (bits.to(torch.int64) << torch.arange(32)).sum(-1)  # [g, row, sub-block]
    b = torch.stack([(word >> 8 * e) & 255 for e in range(4)], dim=-1).to(torch.uint8)
    return b.permute(0, 2, 1, 3).reshape(b.shape[0], b.shape[2], -1)


def _word_bits(words: torch.Tensor) -> torch.Tensor:
    """`_row_words`' inverse."""
    g, nb, _ = words.shape
    b = words.reshape(g, nb, GROUP_ROWS, 4).to(torch.int64)
    word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return ((word.unsqueeze(-1) >> torch.arange(32)) & 1).permute(0, 2, 1, 3)


def repack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_NL / IQ4_XS rows [N, row bytes]
    (N a multiple of 16) regrouped as TILED[wtype], the same bytes per row: per group of 16 rows and
    block, the rows' scale fields side by side (as `repack`'s; Q5: then each row's 4 bytes of fifth
    bits; Q4_K and Q5_K: d, dmin, then the 12 scale bytes; Q2_K: d, dmin, then its 16 scale bytes; Q3_K:
    d, then its 12 scale bytes; Q6_K: d,
    then the 16 scales; IQ4_XS: d, scales_h, then the 4 scales_l bytes), then each 32 inputs' low
    nibbles as `_quad_words` (Q4_K, IQ4_XS: their 8 sub-blocks; Q5_K: 8 of the rows' fifth-bit words as
    `_row_words`, then those; Q6_K: 8 of the fifth-bit and sixth-bit words, then those; Q3_K: 8 of the
    third-bit words, then the low 2 bits as 2-bit `_quad_words`; Q2_K: 8 of those), or Q8_0's 16 rows of 32 bytes
    (layout: kernels/regrouped.h). IQ4_NL's blocks are Q4_0's."""
    if wtype not in quant.TILED:
        raise ValueError(f"only {', '.join(t.name for t in quant.TILED)} regroup for the tiles, not {wtype.name}")
    n, g, nb, blocks = block_groups(data, wtype)
    if wtype == Q8_0:
        values = blocks[..., 2:].permute(0, 2, 1, 3).reshape(g, nb, -1)
        return torch.cat([_side_by_side(blocks[..., :2], 2), values], dim=2).reshape(n, -1).contiguous()
    if wtype == Q6_K:  # 8 x 32 inputs: the rows' fifth-bit and sixth-bit words, then their low nibbles
        d, sc = _side_by_side(blocks[..., 208:], 2), _side_by_side(blocks[..., 192:208], 1)
        q = _q6_values(blocks).reshape(g, GROUP_ROWS, nb * 8, 32)
        subs = torch.cat([_row_words((q >> 4) & 1), _row_words(q >> 5), _quad_words(q & 15)], dim=2)
        return torch.cat([d, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == Q2_K:  # 8 x 32 inputs of 2-bit octet words
        dm, sc = _side_by_side(blocks[..., 80:], 2), _side_by_side(blocks[..., :16], 1)
        subs = _quad_words(_bit_pairs(blocks[..., 16:80]), 2)
        return torch.cat([dm, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == Q3_K:  # 8 x 32 inputs: the rows' third-bit words, then their low 2 bits as octet words
        d, sc = _side_by_side(blocks[..., 108:], 2), _side_by_side(blocks[..., 96:108], 1)
        third, low = _sub_block_bits(blocks[..., :32]), _bit_pairs(blocks[..., 32:96])
        subs = torch.cat([_row_words(third), _quad_words(low, 2)], dim=2)
        return torch.cat([d, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype == IQ4_XS:  # sub-block j: the low then the high nibbles of bytes 8 + 16 j ..
        fields, low = _side_by_side(blocks[..., :4], 2), _side_by_side(blocks[..., 4:8], 1)
        qs = blocks[..., 8:].reshape(g, GROUP_ROWS, nb * 8, 16)
        subs = _quad_words(torch.cat([qs & 15, qs >> 4], dim=3))
        return torch.cat([fields, low, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    if wtype in (Q4_K, Q5_K):  # sub-block j: the low (j even) or high nibbles of bytes 32 (j / 2) ..
        dm, sc = _side_by_side(blocks[..., :4], 2), _side_by_side(blocks[..., 4:16], 1)
        qs = blocks[..., -128:].reshape(g, GROUP_ROWS, nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=4).reshape(g, GROUP_ROWS, nb * 8, 32)
        subs = _quad_words(q)
        if wtype == Q5_K:  # bit j of qh[l]: sub-block j's weight l's fifth bit
            subs = torch.cat([_row_words(_sub_block_bits(blocks[..., 16:48])), subs], dim=2)
        return torch.cat([dm, sc, subs.reshape(g, nb, -1)], dim=2).reshape(n, -1).contiguous()
    qs = blocks[..., -16:]
    q = torch.cat([qs & 15, qs >> 4], dim=3)
    fields = [_side_by_side(blocks[..., :-16], 2)]
    if wtype in (Q5_0, Q5_1):  # qh: 4 bytes after the scales, weight l's fifth bit at bit l
        fields = [_side_by_side(blocks[..., :-20], 2), _side_by_side(blocks[..., -20:-16], 4)]
    return torch.cat([*fields, _quad_words(q)], dim=2).reshape(n, -1).contiguous()


def unrepack(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """The GGUF rows a t16 tensor was made from (`repack`'s inverse)."""
    base = wtype.base
    g, nb = data.shape[0] // GROUP_ROWS, data.shape[1] // base.nbytes
    groups = data.reshape(g, nb, GROUP_ROWS * base.nbytes)
    g, nb, _ = groups.shape
    if base == Q8_0:
        d, values = _by_row(groups[:, :, :32], 2), groups[:, :, 32:].reshape(g, nb, GROUP_ROWS, 32)
        return torch.cat([d, values.permute(0, 2, 1, 3)], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    if base == Q6_K:
        d, sc = _by_row(groups[:, :, :32], 2), _by_row(groups[:, :, 32:288], 1)
        subs = groups[:, :, 288:].reshape(g, nb * 8, 384)
        q = _quad_values(subs[:, :, 128:]) | _word_bits(subs[:, :, :64]) << 4 | _word_bits(subs[:, :, 64:128]) << 5
        values = _q6_bytes(q.reshape(g, GROUP_ROWS, nb, 256))
        return torch.cat([values, sc, d], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    if base == Q2_K:
        dm, sc = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:320], 1)
        qs = _bit_pair_bytes(_quad_values(groups[:, :, 320:].reshape(g, nb * 8, 128), 2))
        return torch.cat([sc, qs, dm], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    if base == Q3_K:
        d, sc = _by_row(groups[:, :, :32], 2), _by_row(groups[:, :, 32:224], 1)
        subs = groups[:, :, 224:].reshape(g, nb * 8, 192)
        hmask = _sub_block_bytes(_word_bits(subs[:, :, :64]))
        qs = _bit_pair_bytes(_quad_values(subs[:, :, 64:], 2))
        return torch.cat([hmask, qs, sc, d], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    if base == IQ4_XS:
        fields, low = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:128], 1)
        q = _quad_values(groups[:, :, 128:].reshape(g, nb * 8, 256))
        qs = (q[..., :16] | q[..., 16:] << 4).to(torch.uint8).reshape(g, GROUP_ROWS, nb, 128)
        return torch.cat([fields, low, qs], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    if base in (Q4_K, Q5_K):
        dm, sc = _by_row(groups[:, :, :64], 2), _by_row(groups[:, :, 64:256], 1)
        subs = groups[:, :, 256:].reshape(g, nb * 8, -1)
        q = _quad_values(subs[:, :, -256:]).reshape(g, GROUP_ROWS, nb, 4, 2, 32)
        qs = (q[:, :, :, :, 0] | q[:, :, :, :, 1] << 4).to(torch.uint8).reshape(g, GROUP_ROWS, nb, 128)
        fields = [dm, sc, _sub_block_bytes(_word_bits(subs[:, :, :64]))] if base == Q5_K else [dm, sc]
        return torch.cat([*fields, qs], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
    q = _quad_values(groups[:, :, -256:])
    fields = [_by_row(groups[:, :, :-256], 2)]
    if base in (Q5_0, Q5_1):
        fields = [_by_row(groups[:, :, :-320], 2), _by_row(groups[:, :, -320:-256], 4)]
    qs = (q[..., :16] | q[..., 16:] << 4).to(torch.uint8)
    return torch.cat([*fields, qs], dim=3).reshape(g * GROUP_ROWS, -1).contiguous()
