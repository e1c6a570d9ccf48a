/* How the AVX-512 kernel (x16.c) reads the regrouped types (IL_W_*X16): their layout, made at load
 * from the GGUF blocks by regroup.py's `repack` with the same bytes per row, and the decoding of a
 * block into exact bf16 pair rows and fp32 scales.
 *
 * Groups of 16 weight rows in row order, each one block of 32 inputs after another along K. A Q4_0 /
 * Q4_1 group block holds the 16 rows' fp16 scales d[16], Q4_1's minimums m[16], then 128 16-bit
 * words: nibble j of word 32 c + i is the 4-bit value of row i / 2 at input 2 (4 c + j) + i % 2 of
 * the block. So one 64-byte load and a shift give, per `vpermw` through a table of the exact bf16
 * integers, the 16 rows' next two inputs side by side in the 32 bf16 lanes ("pair row" j), where
 * `vdpbf16ps` against the input pair broadcast yields each row's dot product in its own fp32 lane.
 * 32 weights cost one permute and one shift (the int-to-bf16 table replaces the masks and
 * conversions of widening to fp32). IQ4_NL's blocks are Q4_0's but for the values a nibble stands
 * for, which are the table's. Q8_0's group block is d[16] and 16 rows of 32 bytes, byte 2 i + e of
 * row p being weight row i's input 2 p + e: the same pair lanes, its bytes widened to fp32 and
 * narrowed to bf16 (exact: the high halves).
 * Q5_0 / Q5_1 are Q4_0 / Q4_1 with a plane of the 16 rows' fifth bits between the scales and the
 * nibbles: per pair row, a 32-bit mask of its 32 lanes, which a masked add of 16 puts in bit 4 of
 * the table index (vpermw reads 5 bits: a 32-entry table of the values). That bit already holds the
 * low bit of the word's next nibble (0 past the last), so the mask stores the fifth bit XOR it, and
 * the add (bit 4 flips, carries go where vpermw does not look) leaves the fifth bit there.
 * Q4_K's 256-input blocks hold the 16 rows' d, dmin and 12 scale bytes side by side (256 bytes), then
 * their 8 sub-blocks of 32 inputs, each laid out as a Q4_1 group block's values: a sub-block is a
 * Q4_1 block whose d and m are d * scale and -dmin * min, unpacked for 16 rows at once. Q5_K's are
 * Q4_K's with each sub-block's values after its 16 fifth-bit masks, as a Q5_1 group block's. Q6_K's
 * 256-input group blocks start with the 16 rows' d and their 16 scales (one per 16 inputs, byte
 * s * 16 + row), then 8 sub-blocks of 16 masks of the fifth bit (as Q5's), 16 masks of the sixth and
 * the low nibbles' words; a sub-block's products come in two parts, inputs 0-15 and 16-31, each
 * scaled by d times its scale. IQ4_XS's hold the 16 rows' d, then their scales' high bits (16-bit
 * words) and low nibbles (4 bytes) side by side (128 bytes), then 8 sub-blocks as IQ4_NL's values.
 * Q3_K's hold the 16 rows' d and 12 scale bytes side by side (224 bytes), then 8 sub-blocks of 16
 * masks of the third bit and 64 words of 2-bit fields (field j of word 32 c + i: pair row 8 c + j),
 * Q6_K's two parts: 3 bits a weight fit its bytes only so. The masked add of 4 puts the third bit
 * in bit 2 of the index, stored XOR the next field's low bit, as Q5's fifth. Q2_K's hold the 16
 * rows' d, dmin and 16 scale bytes side by side (320 bytes), then 8 sub-blocks of 64 such words (no
 * masks); its two parts each add their minimum times the sum of their 16 inputs.
 * bf16 weights (BF16X16) are the pair rows themselves, 16 of 64 bytes a group block and no scales: a
 * bf16 model's matrices regrouped so, where no AMX takes them, run through the same chains at every row
 * count as the blocks do, so a row's sums never depend on the rows beside it.
 */
#ifndef INFERLAB_AVX512_X16_BLOCKS_H
#define INFERLAB_AVX512_X16_BLOCKS_H
#include <immintrin.h>

#include "../common.h"

/* a call's blocks (a constant in every tile) */
enum { Q4_0, Q4_1, Q8_0, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS, BF16 };

/* 256-input blocks */
IL_INLINE int is_k(const int kind) {
    return kind == Q4_K || kind == Q5_K || kind == Q6_K || kind == Q3_K || kind == Q2_K || kind == IQ4_XS;
}
IL_INLINE int has_min(const int kind) {
    return kind == Q4_1 || kind == Q5_1 || kind == Q4_K || kind == Q5_K || kind == Q2_K;
}
IL_INLINE int is_q5(const int kind) { return kind == Q5_0 || kind == Q5_1 || kind == Q5_K; }
/* A block's products come in parts, each under its own scale: Q6_K's, Q3_K's and Q2_K's two halves of
 * 16 inputs. */
IL_INLINE int parts(const int kind) { return kind == Q6_K || kind == Q3_K || kind == Q2_K ? 2 : 1; }
/* Sums of a row's inputs a block's minimums multiply: Q2_K's one a part, else the block's. */
IL_INLINE int sums_per_block(const int kind) { return kind == Q2_K ? 2 : 1; }
/* Bits of a value in the words (the rest in masks): Q3_K's and Q2_K's 2, else 4. */
IL_INLINE int field_bits(const int kind) { return kind == Q3_K || kind == Q2_K ? 2 : 4; }
/* Kinds whose pair rows take one more bit from a mask (see the top). */
IL_INLINE int has_high(const int kind) { return is_q5(kind) || kind == Q6_K || kind == Q3_K; }

/* vpermw's tables of the exact bf16 values: lo for indices 0-31, hi for Q6_K's q >= 32. */
typedef struct { __m512i lo, hi; } tables;

/* A block's fp32 factors for its 16 rows: d[h] multiplies part h's products, m[h] the sum of inputs
 * that goes with it (the block's, Q2_K: the part's); one-part kinds use [0]. */
typedef struct { __m512 d[2], m[2]; } factors;

/* A regrouped type's kind, and vpermw's tables of its values (IQ4_NL: its table's, integers exact in bf16). */
IL_INLINE int kind_of(int wtype) {
    return wtype == IL_W_Q4_1X16 ? Q4_1 : wtype == IL_W_Q8_0X16 ? Q8_0 : wtype == IL_W_Q4_KX16 ? Q4_K
         : wtype == IL_W_Q5_0X16 ? Q5_0 : wtype == IL_W_Q5_1X16 ? Q5_1 : wtype == IL_W_Q5_KX16 ? Q5_K
         : wtype == IL_W_Q6_KX16 ? Q6_K : wtype == IL_W_Q3_KX16 ? Q3_K : wtype == IL_W_Q2_KX16 ? Q2_K
         : wtype == IL_W_IQ4_XSX16 ? IQ4_XS : wtype == IL_W_BF16X16 ? BF16 : Q4_0;
}

static inline tables tables_of(int wtype) {
    const int kind = kind_of(wtype);
    uint16_t v[64];
    for (int i = 0; i < 64; i++) {
        const int q = kind == Q3_K ? i & 7 : kind == Q2_K ? i & 3 : is_q5(kind) || kind == Q6_K ? i : i & 15;
        const int offset = kind == Q4_0 ? 8 : kind == Q3_K ? 4 : kind == Q5_0 ? 16 : kind == Q6_K ? 32 : 0;
        const int iq4 = wtype == IL_W_IQ4_NLX16 || wtype == IL_W_IQ4_XSX16;
        v[i] = il_f32_to_bf16((float)(iq4 ? il_iq4_values[i & 15] : q - offset));
    }
    return (tables){_mm512_loadu_si512(v), _mm512_loadu_si512(v + 32)};
}

/* Pair row j (inputs 2 j, 2 j + 1 of the 16 weight rows) of a group's block, as exact bf16 values.
 * Q4: nibble j % 4 of the 64 bytes at word 32 (j / 4), through a table mapping each nibble to bf16(q)
 * (Q4_1) or bf16(q - 8) (Q4_0); vpermw reads 5 index bits, so the table repeats and the bit above
 * is free. Q5: the fifth bit put there by a masked add (see the top). Q6_K: so, then its sixth bit
 * (a plain mask) picks the second table's values. Q8_0: its 32 bytes widened to fp32 and narrowed
 * to bf16 (16 values at a time, in order). */
IL_INLINE __m512bh pair_row(const uint8_t *blk, const int kind, tables t, const int j) {
    if (kind == BF16) return (__m512bh)_mm512_loadu_si512(blk + 64 * j);
    if (kind == Q8_0) { /* each value's bf16 is its fp32's high half (exact: |q| <= 128); no bf16 instruction */
        static const uint16_t high_halves[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                                 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
        const __m128i *q = (const __m128i *)(blk + 32 + 32 * j);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
        return (__m512bh)_mm512_permutex2var_epi16(_mm512_castps_si512(lo), _mm512_loadu_si512(high_halves),
                                                   _mm512_castps_si512(hi));
    }
    const int fields = is_k(kind) ? 0 : has_min(kind) ? 32 : 16; /* words of scales before the values */
    const int at = fields + (has_high(kind) ? 32 : 0) + (kind == Q6_K ? 32 : 0); /* and of masks (16, Q6_K: 32) */
    const int bits = field_bits(kind), f = 16 / bits; /* f fields a word */
    const __m512i v = _mm512_loadu_si512((const uint16_t *)blk + at + 32 * (j / f));
    __m512i idx = j % f ? _mm512_srli_epi16(v, bits * (j % f)) : v;
    if (has_high(kind)) {
        uint32_t mask;
        memcpy(&mask, (const uint16_t *)blk + fields + 2 * j, sizeof mask);
        idx = _mm512_mask_add_epi16(idx, (__mmask32)mask, idx, _mm512_set1_epi16(1 << bits));
    }
    const __m512i values = _mm512_permutexvar_epi16(idx, t.lo);
    if (kind != Q6_K) return (__m512bh)values;
    uint32_t sixth; /* Q6_K: lanes whose q has bit 5 set take their value from the second table */
    memcpy(&sixth, (const uint16_t *)blk + 32 + 2 * j, sizeof sixth);
    return (__m512bh)_mm512_mask_permutexvar_epi16(values, (__mmask32)sixth, idx, t.hi);
}

/* A group's bytes per 32 inputs (the K types: on average; their 256-input blocks hold a header and 8
 * sub-blocks). */
IL_INLINE int64_t group_block_bytes(const int kind) {
    return kind == BF16 ? 1024 : kind == Q8_0 ? sizeof(il_q8_0x16) : kind == Q4_1 ? sizeof(il_q4_1x16) : kind == Q5_0 ? sizeof(il_q5_0x16)
         : kind == Q5_1 ? sizeof(il_q5_1x16) : kind == Q4_K ? 16 * sizeof(il_q4_K) / 8
         : kind == Q5_K ? 16 * sizeof(il_q5_K) / 8 : kind == Q6_K ? 16 * sizeof(il_q6_K) / 8
         : kind == Q3_K ? 16 * sizeof(il_q3_K) / 8 : kind == Q2_K ? 16 * sizeof(il_q2_K) / 8
         : kind == IQ4_XS ? 16 * sizeof(il_iq4_xs) / 8 : sizeof(il_q4_0x16);
}

/* The K types' group blocks: a header of the 16 rows' scales (Q6_K: d[16], then its 16 scales of the
 * 16 rows side by side), then 8 sub-blocks of masks (Q5_K, Q3_K: 16, Q6_K: 32) and 128 words (Q3_K: 64). */
IL_INLINE int header_bytes(const int kind) {
    return kind == Q6_K ? 288 : kind == Q3_K ? 224 : kind == Q2_K ? 320 : kind == IQ4_XS ? 128 : 256;
}
IL_INLINE int sub_block_bytes(const int kind) {
    return kind == Q6_K ? 384 : kind == Q5_K ? 320 : kind == Q3_K ? 192 : kind == Q2_K ? 128 : 256;
}

/* Where block b (inputs 32 b ..) of a group starting at w0 is: for the K types its sub-block, after
 * the header of scales. */
IL_INLINE const uint8_t *block_at(const uint8_t *w0, int b, const int kind) {
    if (is_k(kind))
        return w0 + (int64_t)(b / 8) * 8 * group_block_bytes(kind) + header_bytes(kind) + sub_block_bytes(kind) * (b % 8);
    return w0 + b * group_block_bytes(kind);
}

IL_INLINE __m512 scales(const uint8_t *blk, const int half) { /* the block's d (half 0) or Q4_1's / Q5_1's m (1) */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk + half));
}

/* Block b's factors (see `factors`), as fp32 for the 16 rows: its own fp16 fields (d, Q4_1's m),
 * or for a Q4_K sub-block d * scale and -dmin * min, the 6-bit scale and min unpacked from the 12 bytes
 * of each row (byte k of the 16 rows side by side), as il_scale_min_k4 does for one. */
IL_INLINE void block_scales(const uint8_t *blk, int b, const int kind, factors *f) {
    if (kind == BF16) { /* none: add_part adds the products as they are */
        f->d[0] = f->m[0] = _mm512_set1_ps(1.f);
        return;
    }
    if (!is_k(kind)) {
        f->d[0] = scales(blk, 0);
        f->m[0] = has_min(kind) ? scales(blk, 1) : f->d[0];
        return;
    }
    const int j = b % 8;
    const uint8_t *head = blk - header_bytes(kind) - sub_block_bytes(kind) * j; /* the 256-input block's */
    if (kind == Q6_K) { /* d times the scales of inputs 0-15 and 16-31 */
        const __m512 d = scales(head, 0);
        const __m128i *sc = (const __m128i *)(head + 32) + 2 * j;
        for (int h = 0; h < 2; h++)
            f->d[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc + h))));
        return;
    }
    if (kind == Q2_K) { /* d times the low nibble of each part's scale byte; -dmin times the high one */
        const __m512 d = scales(head, 0), dmin = scales(head, 1);
        for (int h = 0; h < 2; h++) {
            const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(head + 64) + 2 * j + h));
            f->d[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15))));
            const __m512 mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4));
            f->m[h] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, mn));
        }
        return;
    }
    if (kind == Q3_K) { /* d times the scales of inputs 0-15 and 16-31, as il_q3_K_scale reads them */
        const __m512 d = scales(head, 0);
        for (int h = 0; h < 2; h++) {
            const int s = 2 * j + h;
#define SCALE_BYTE(k) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(head + 32 + 16 * (k))))
            const __m512i lo = s < 8 ? SCALE_BYTE(s) : _mm512_srli_epi32(SCALE_BYTE(s - 8), 4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(SCALE_BYTE(8 + s % 4), 2 * (s / 4)),
                                                _mm512_set1_epi32(3));
#undef SCALE_BYTE
            const __m512i sc = _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(15)), _mm512_slli_epi32(hi, 4));
            f->d[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(sc, _mm512_set1_epi32(32))));
        }
        return;
    }
    if (kind == IQ4_XS) { /* d times the 6-bit scale less 32, as il_iq4_xs_scale reads it for one row */
        const __m512i high = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(head + 32)));
        const __m512i low = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(head + 64) + j / 2));
        const __m512i ls = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(low, 4 * (j % 2)), _mm512_set1_epi32(15)),
                                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(high, 2 * j),
                                                                              _mm512_set1_epi32(3)), 4));
        f->d[0] = _mm512_mul_ps(scales(head, 0), _mm512_cvtepi32_ps(_mm512_sub_epi32(ls, _mm512_set1_epi32(32))));
        return;
    }
#define SCALE_BYTE(k) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(head + 64 + 16 * (k))))
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15);
    __m512i sc, mn;
    if (j < 4) {
        sc = _mm512_and_si512(SCALE_BYTE(j), six);
        mn = _mm512_and_si512(SCALE_BYTE(j + 4), six);
    } else {
        const __m512i hi = SCALE_BYTE(j + 4);
        sc = _mm512_or_si512(_mm512_and_si512(hi, four), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTE(j - 4), 6), 4));
        mn = _mm512_or_si512(_mm512_srli_epi32(hi, 4), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTE(j), 6), 4));
    }
#undef SCALE_BYTE
    f->d[0] = _mm512_mul_ps(scales(head, 0), _mm512_cvtepi32_ps(sc));
    f->m[0] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(scales(head, 1), _mm512_cvtepi32_ps(mn)));
}

/* A block group's 16 pair rows decoded, its scales (and minimums) as fp32. */
IL_INLINE void decode_block(const uint8_t *blk, int b, const int kind, tables t, __m512bh wv[16], factors *f) {
    for (int j = 0; j < 16; j++) wv[j] = pair_row(blk, kind, t, j);
    block_scales(blk, b, kind, f);
}
#endif
