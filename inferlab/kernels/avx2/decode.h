/* Weight blocks of every type as fp32 in AVX2 registers, 32 weights at a time (decode32), and whole
 * rows of them (dequant_row): the decoding that the linear layer's panels and its direct one-row
 * path share, so both multiply the very same exact weights. Scales are read from il_f16_table, and
 * each format's bytes are widened with the shuffles that run beside the FMAs and conversions which
 * bound a one-row decode. Included by linear.c only.
 */
#ifndef INFERLAB_AVX2_DECODE_H
#define INFERLAB_AVX2_DECODE_H
#include <immintrin.h>

#include "../common.h"
#include "halves.h"

/* An fp16 scale in every lane, loaded from il_f16_table: no vector instruction at all, where F16C
 * and a broadcast take two of the shuffle port that bounds one-row decoding (Q4_1 0.94x the time,
 * Q5_0 0.89x, in cache). */
IL_INLINE __m256 f16x8(const uint16_t *h) { return _mm256_broadcast_ss(il_f16_table + *h); }

IL_INLINE __m256 widen_u8(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)); }

/* 32 unsigned values, bytes lo[0..15] then hi[0..15], as 4 x 8 floats: q * d + m. */
IL_INLINE void scale32(__m128i lo, __m128i hi, __m256 d, __m256 m, __m256 w[4]) {
    w[0] = _mm256_fmadd_ps(widen_u8(lo), d, m);
    w[1] = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(lo, 8)), d, m);
    w[2] = _mm256_fmadd_ps(widen_u8(hi), d, m);
    w[3] = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(hi, 8)), d, m);
}

/* The 32 weights of a Q4 block (low nibbles of bytes 0..15, then their high nibbles) as 4 x 8 floats:
 * q * d + m. The 16 bytes are loaded into both 128-bit halves, split into nibbles once, and one
 * in-half byte shuffle widens each 8 of them to 32 bits (half 0 takes bytes 8c .. 8c + 3, half 1
 * the next four): shuffles run beside the FMAs and conversions that bound this decoding, where
 * widening from memory then masking and shifting each 8 took two of their instructions more
 * (0.93-0.95x the time of a one-row Q4_1 or Q4_0 matmul in cache). */
IL_INLINE void nibbles32(const uint8_t *qs, __m256 d, __m256 m, __m256 w[4]) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    const int z = (int)0x80808000;
    const __m256i first = _mm256_setr_epi32(z | 0, z | 1, z | 2, z | 3, z | 4, z | 5, z | 6, z | 7);
    const __m256i second = _mm256_setr_epi32(z | 8, z | 9, z | 10, z | 11, z | 12, z | 13, z | 14, z | 15);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, first)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, second)), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, first)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, second)), d, m);
}

/* The 32 weights of a Q5 block (nibbles as Q4's, fifth bits in qh) as 4 x 8 floats: q * d + m. The
 * 5-bit values are put together as bytes in one 256-bit register, ordered so that neither the fifth
 * bits nor the widening need a shuffle across its two halves: byte b of 32-bit lane i is weight
 * 8 b + i (lanes 0-3) or 8 b + 4 + i' (lanes 4-7, i' = i - 4). Then the byte b of every lane is bit
 * i (or 4 + i') of qh's byte b, tested against qh broadcast as it is, and one in-half byte shuffle
 * widens weights 8 c .. 8 c + 7 to 32 bits. That takes 0.95x the time of widening two 128-bit halves
 * (`scale32`) and building the fifth bits by a byte shuffle of qh. */
IL_INLINE void fives32(const uint8_t *qs, const uint8_t *qh, __m256 d, __m256 m, __m256 w[4]) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    /* byte b of lane i: qs[i + 8 (b % 2)] (lanes 4-7: qs[4 + i' + ...]), its high nibble where b >= 2 */
    const __m256i s = _mm256_shuffle_epi8(both, _mm256_setr_epi8(0, 8, 0, 8, 1, 9, 1, 9, 2, 10, 2, 10, 3, 11, 3, 11,
                                                                  4, 12, 4, 12, 5, 13, 5, 13, 6, 14, 6, 14, 7, 15, 7, 15));
    const __m256i q4 = _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0x00000F0F)),
                                       _mm256_and_si256(_mm256_srli_epi32(s, 4), _mm256_set1_epi32(0x0F0F0000)));
    const __m256i h = _mm256_castps_si256(_mm256_broadcast_ss((const float *)qh)); /* a load, no shuffle */
    const __m256i bit = _mm256_setr_epi32(0x01010101, 0x02020202, 0x04040404, 0x08080808, 0x10101010, 0x20202020,
                                          0x40404040, (int)0x80808080);
    const __m256i q5 = _mm256_or_si256(q4, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit),
                                                            _mm256_set1_epi8(0x10)));
    for (int c = 0; c < 4; c++) { /* byte c of each lane, widened */
        const int z = (int)0x80808000;
        const __m256i at = _mm256_setr_epi32(z | c, z | (4 + c), z | (8 + c), z | (12 + c), z | c, z | (4 + c),
                                             z | (8 + c), z | (12 + c));
        w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(q5, at)), d, m);
    }
}

IL_INLINE __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Weights k .. k + 31 of a row (k a multiple of 32) as 4 x 8 floats: each format's decoding, used
 * by both the panel and the direct paths so both see the very same values. `wtype` is a constant
 * wherever this is inlined, so the switch folds away. ks: the block's k_scales where k_scaled. */
IL_INLINE void decode32(int wtype, const uint8_t *row, int k, const float *ks, __m256 w[4]) {
    switch (wtype) {
        case IL_W_F32:
            for (int c = 0; c < 4; c++) w[c] = _mm256_loadu_ps((const float *)row + k + 8 * c);
            return;
        case IL_W_BF16:
            for (int c = 0; c < 4; c++) w[c] = bf16x8((const uint16_t *)row + k + 8 * c);
            return;
        case IL_W_F16:
            for (int c = 0; c < 4; c++) w[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k + 8 * c)));
            return;
        case IL_W_Q8_0: {
            const il_q8_0 *b = (const il_q8_0 *)row + k / 32;
            const __m256 d = f16x8(&b->d);
            for (int c = 0; c < 4; c++)
                w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + 8 * c)))), d);
            return;
        }
        case IL_W_Q4_0: {
            const il_q4_0 *b = (const il_q4_0 *)row + k / 32;
            const __m256 d = f16x8(&b->d); /* (q - 8) d = q d - 8 d, with 8 d exact */
            nibbles32(b->qs, d, _mm256_mul_ps(d, _mm256_set1_ps(-8.f)), w);
            return;
        }
        case IL_W_Q4_1: {
            const il_q4_1 *b = (const il_q4_1 *)row + k / 32;
            nibbles32(b->qs, f16x8(&b->d), f16x8(&b->m), w);
            return;
        }
        case IL_W_Q5_0: {
            const il_q5_0 *b = (const il_q5_0 *)row + k / 32;
            const __m256 d = f16x8(&b->d);
            fives32(b->qs, b->qh, d, _mm256_mul_ps(d, _mm256_set1_ps(-16.f)), w);
            return;
        }
        case IL_W_Q5_1: {
            const il_q5_1 *b = (const il_q5_1 *)row + k / 32;
            fives32(b->qs, b->qh, f16x8(&b->d), f16x8(&b->m), w);
            return;
        }
        case IL_W_Q4_K: case IL_W_Q5_K: {
            __m128i lo, hi;
            float c;
            const float d = k4_halves(wtype, row, k / 32, &lo, &hi, &c, ks);
            scale32(lo, hi, _mm256_set1_ps(d), _mm256_set1_ps(c), w);
            return;
        }
        case IL_W_Q6_K: case IL_W_Q3_K: { /* signed values under a scale per 16 weights */
            __m128i lo, hi;
            int sc[2];
            const float d = k16_halves(wtype, row, k / 32, &lo, &hi, sc);
            const int i = k / 16 % 16, given = ks != NULL; /* from ks: the same products */
            const __m256 d0 = _mm256_set1_ps(given ? ks[i] : d * sc[0]);
            const __m256 d1 = _mm256_set1_ps(given ? ks[i + 1] : d * sc[1]);
            w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d0);
            w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d0);
            w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d1);
            w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d1);
            return;
        }
        case IL_W_Q2_K: { /* a scale and a minimum per 16 weights */
            __m128i half[2];
            int sc[2], mn[2];
            float dmin;
            const float dq = q2_K_halves(row, k / 32, half, half + 1, sc, mn, &dmin);
            for (int s = 0; s < 2; s++) {
                const __m128i v = half[s];
                const __m256 d = _mm256_set1_ps(dq * sc[s]), m = _mm256_set1_ps(-(dmin * mn[s]));
                w[2 * s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d, m);
                w[2 * s + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d, m);
            }
            return;
        }
        case IL_W_IQ4_NL: case IL_W_IQ4_XS: {
            __m128i lo, hi;
            const __m256 dv = _mm256_set1_ps(iq4_halves(wtype, row, k / 32, &lo, &hi, ks));
            w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), dv);
            w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), dv);
            w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), dv);
            w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), dv);
            return;
        }
        default: {
            float tmp[32];
            il_dequant_span(wtype, row, k, 32, tmp);
            for (int c = 0; c < 4; c++) w[c] = _mm256_loadu_ps(tmp + 8 * c);
        }
    }
}

/* Q4_K sub-blocks j and j + 1 (j even) at k, 64 weights: one run of 32 bytes holds j's in its low
 * nibbles and j + 1's in its high ones, so it is widened once for both, where decode32 widens it for
 * each. The same values as two decode32 calls (ks: the block's k_scales). */
IL_INLINE void q4_K_pair(const uint8_t *row, int k, const float *ks, __m256 w[8]) {
    const int j = k / 32 % 8;
    const uint8_t *q = ((const il_q4_K *)row + k / 256)->qs + 32 * (j / 2);
    const __m256 d0 = _mm256_set1_ps(ks[j]), c0 = _mm256_set1_ps(ks[8 + j]);
    const __m256 d1 = _mm256_set1_ps(ks[j + 1]), c1 = _mm256_set1_ps(ks[9 + j]);
    for (int c = 0; c < 4; c++) {
        const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * c)));
        w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, _mm256_set1_epi32(0x0F))), d0, c0);
        w[4 + c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), d1, c1);
    }
}

/* A row of K weights as fp32: whole 32s decoded as above, a tail (float types only) one by one. */
IL_INLINE void dequant_row_as(const int wtype, const uint8_t *row, int K, float *out) {
    int k = 0;
    if (il_block_elems(wtype) == 256) { /* K-quants: a block's sub-blocks unrolled, as in micro_direct */
        float ks[16] = {0};
        for (; k < K; k += 256) {
            const uint8_t *blk = row + (int64_t)k / 256 * il_block_bytes(wtype);
            if (k_scaled(wtype)) k_scales(wtype, blk, 0, ks);
#pragma GCC unroll 8
            for (int s = 0; s < 256; s += 32) {
                __m256 w[4];
                decode32(wtype, blk, s, ks, w);
                for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + k + s + 8 * c, w[c]);
            }
        }
        return;
    }
    for (; k + 32 <= K; k += 32) { /* no type here has k_scales */
        __m256 w[4];
        decode32(wtype, row, k, NULL, w);
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + k + 8 * c, w[c]);
    }
    for (; k < K; k++) il_dequant_block(wtype, row + (int64_t)k * il_block_bytes(wtype), out + k);
}

/* dequant_row_as instantiated per weight type, so each type's decoding is inlined with its constants. */
static void dequant_row(int wtype, const uint8_t *row, int K, float *out) {
#define ROW_CASE(T) case T: dequant_row_as(T, row, K, out); break
    switch (wtype) {
        ROW_CASE(IL_W_BF16); ROW_CASE(IL_W_F16); ROW_CASE(IL_W_Q8_0); ROW_CASE(IL_W_Q4_0); ROW_CASE(IL_W_Q4_1);
        ROW_CASE(IL_W_Q5_0); ROW_CASE(IL_W_Q5_1); ROW_CASE(IL_W_Q4_K); ROW_CASE(IL_W_Q5_K); ROW_CASE(IL_W_Q6_K);
        ROW_CASE(IL_W_Q2_K); ROW_CASE(IL_W_Q3_K); ROW_CASE(IL_W_IQ4_NL); ROW_CASE(IL_W_IQ4_XS);
        default: dequant_row_as(wtype, row, K, out);
    }
#undef ROW_CASE
}
#endif
