/* Decoding the blocks regrouped for the tiles (the t16 types; layout: regrouped.h) into bf16: a tile
 * for the linear kernel, or whole rows. Included by linear.c.
 */
#ifndef INFERLAB_AMX_T16_H
#define INFERLAB_AMX_T16_H
#include <immintrin.h>
#include <string.h>

#include "../common.h"

/* d[i] = d sc and m[i] = -dmin mn of the 16 rows of a Q4_K / Q5_K group block for its 32 inputs `sub`:
 * the 6-bit scale and minimum as il_scale_min_k4 unpacks them, for the 16 rows at once. */
IL_INLINE void k_scales(const uint8_t *blk, const int sub, float d[16], float m[16]) {
    const uint8_t *sc = blk + 64;
#define SCALE_BYTES(k) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16 * (k))))
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15);
    __m512i s, mn;
    if (sub < 4) {
        s = _mm512_and_si512(SCALE_BYTES(sub), six), mn = _mm512_and_si512(SCALE_BYTES(sub + 4), six);
    } else {
        const __m512i a = SCALE_BYTES(sub + 4);
        s = _mm512_or_si512(_mm512_and_si512(a, four), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTES(sub - 4), 6), 4));
        mn = _mm512_or_si512(_mm512_srli_epi32(a, 4), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTES(sub), 6), 4));
    }
#undef SCALE_BYTES
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
    _mm512_store_ps(d, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(s)));
    _mm512_store_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn))));
}

/* 32 inputs (the 32 `sub` of a 256-input block; the block itself otherwise) of a group of a t16
 * matrix (IL_W_*T16) as the 16 x 32 bf16 tile, rows `stride` elements apart, of the weights the
 * dequantizer makes, each rounded once to bf16 (nearest even), as PyTorch's conversion does: bf16(q d + m)
 * (Q4_0: bf16((q - 8) d); Q5_0: bf16((q - 16) d); Q8_0: bf16(q d); Q4_K, Q5_K: bf16(q d sc - dmin m);
 * Q6_K: bf16(d sc (q - 32)); Q3_K: bf16(d sc (q - 4)); Q2_K: bf16(q d sc - dmin m); IQ4_NL: bf16(d v[q]),
 * v its table; IQ4_XS: bf16(d (ls - 32) v[q])). The products are exact in fp32, so the only roundings
 * are the dequantizer's. A Q4 row's 32 inputs have one scale and offset, so their 16 possible values are
 * a table that one vpermw reads by the row's nibbles; two rows share a table register (words 0-15 and
 * 16-31), bit 4 of an index picks the row (Q5's 32 values fill one, bit 4 its fifth bit; Q3_K's and
 * Q2_K's two scales a row, of 8 and 4 values, take half a register as Q4's 16 do). About 4 cycles a tile
 * row, less than reading bf16 weights from memory takes; Q8_0 and Q6_K, too many values for a table,
 * are widened and scaled at about twice that. */
IL_INLINE void decode_t16(const int wtype, const uint8_t *blk, const int sub, uint16_t *tile, const int64_t stride) {
    float d[16] __attribute__((aligned(64))), m[16] __attribute__((aligned(64)));
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    const uint8_t *words = blk + (wtype == IL_W_Q4_0T16 || wtype == IL_W_IQ4_NLT16 ? 32 : 64);
    if (wtype == IL_W_Q8_0T16) { /* 256 values a row: widened and scaled (d q is exact too), no table */
        const int8_t *q = ((const il_q8_0x16 *)blk)->q;
        _mm512_store_ps(d, dv);
        __asm__ volatile("" ::: "memory");
        for (int r = 0; r < 16; r++) {
            const __m512 dr = _mm512_set1_ps(d[r]);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * r))));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * r + 16))));
            _mm512_storeu_si512(tile + stride * r, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, dr), _mm512_mul_ps(lo, dr)));
        }
        return;
    }
    if (wtype == IL_W_Q6_KT16) { /* 64 values under each 16 inputs' scale: widened and scaled, as Q8_0 */
        float s0[16] __attribute__((aligned(64))), s1[16] __attribute__((aligned(64)));
        const int8_t *sc = (const int8_t *)blk + 32 + 32 * sub; /* scales 2 sub and 2 sub + 1 of the 16 rows */
#define SCALES(p) _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))))
        _mm512_store_ps(s0, SCALES(sc));
        _mm512_store_ps(s1, SCALES(sc + 16)); /* d sc: exact (11 x 7 bits), and so is d sc (q - 32) */
#undef SCALES
        const uint8_t *at = blk + 288 + 384 * sub;
        const uint32_t *fifth = (const uint32_t *)at, *sixth = fifth + 16;
        const __m512i low4 = _mm512_set1_epi16(0xF), bit4 = _mm512_set1_epi16(16), bit5 = _mm512_set1_epi16(32);
        __asm__ volatile("" ::: "memory");
        for (int g = 0; g < 4; g++) {
            const __m512i wg = _mm512_loadu_si512(at + 128 + 64 * g);
            for (int s = 0; s < 4; s++) {
                const int r = 4 * g + s;
                const __m512i i4 = _mm512_and_si512(s ? _mm512_srli_epi16(wg, 4 * s) : wg, low4);
                __m512i q = _mm512_mask_add_epi16(i4, _cvtu32_mask32(fifth[r]), i4, bit4);
                q = _mm512_sub_epi16(_mm512_mask_add_epi16(q, _cvtu32_mask32(sixth[r]), q, bit5), bit5); /* q - 32 */
                /* times the scale, as the dequantizer: a zero takes the scale's sign */
                const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(q))),
                                                _mm512_set1_ps(s0[r]));
                const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(q, 1))),
                                                _mm512_set1_ps(s1[r]));
                _mm512_storeu_si512(tile + stride * r, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        return;
    }
    if (wtype == IL_W_Q3_KT16 || wtype == IL_W_Q2_KT16) { /* 8 (Q2_K: 4) values a 16 inputs' scale: half a table a row */
        float s0[16] __attribute__((aligned(64))), s1[16] __attribute__((aligned(64)));
        float m0[16] __attribute__((aligned(64))), m1[16] __attribute__((aligned(64)));
        const int two = wtype == IL_W_Q2_KT16;
        const uint8_t *sc = blk + (two ? 64 : 32);
#define SB(k) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16 * (k))))
#define SCALE(j)                                                                                                    \
    _mm512_sub_epi32(_mm512_or_si512((j) < 8 ? _mm512_and_si512(SB(j), _mm512_set1_epi32(15)) : _mm512_srli_epi32(SB((j) - 8), 4), \
                                     _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(SB(8 + (j) % 4), 2 * ((j) / 4)),      \
                                                                        _mm512_set1_epi32(3)), 4)),                              \
                     _mm512_set1_epi32(32)) /* il_q3_K_scale of the 16 rows */
        if (two) { /* d (sc & 15) q - dmin (sc >> 4) */
            const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
            for (int h = 0; h < 2; h++) {
                const __m512i b = SB(2 * sub + h);
                _mm512_store_ps(h ? s1 : s0, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)))));
                _mm512_store_ps(h ? m1 : m0, _mm512_sub_ps(_mm512_setzero_ps(),
                                                           _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)))));
            }
        } else {
            _mm512_store_ps(s0, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(SCALE(2 * sub))));
            _mm512_store_ps(s1, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(SCALE(2 * sub + 1))));
        }
#undef SCALE
#undef SB
        const uint8_t *at = two ? blk + 320 + 128 * sub : blk + 224 + 192 * sub;
        const uint32_t *third = (const uint32_t *)at;
        /* words 0-15 of a table: row r's d sc (q - 4) for q = 0..7 (Q2_K: d sc q - m for q = 0..3), inputs
         * 0-15 then 16-31; 16-31: row r + 1's */
        const __m512 qv = two ? _mm512_setr_ps(0, 1, 2, 3, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0)
                              : _mm512_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2, -1, 0, 1, 2, 3);
        const __m512i three = _mm512_set1_epi16(3), bit2 = _mm512_set1_epi16(4);
        const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(8), 1); /* inputs 16-31 */
        const __m512i half1 = _mm512_add_epi16(half, _mm512_set1_epi16(16));
        __asm__ volatile("" ::: "memory");
        for (int o = 0; o < 2; o++) {
            const __m512i wo = _mm512_loadu_si512(at + (two ? 0 : 64) + 64 * o);
            for (int s = 0; s < 8; s += 2) {
                const int r = 8 * o + s;
#define SCALES(r) _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0[r]), _mm512_set1_ps(s1[r]))
#define ROW_TABLE(r)                                                                                                  \
    (two ? _mm512_fmadd_ps(qv, SCALES(r), _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(m0[r]), _mm512_set1_ps(m1[r]))) \
         : _mm512_mul_ps(qv, SCALES(r))) /* Q3_K: a zero takes the scale's sign, as the dequantizer's */
                const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(ROW_TABLE(r + 1), ROW_TABLE(r));
#undef ROW_TABLE
#undef SCALES
                __m512i i0 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wo, 2 * s), three, half, 0xEA);
                __m512i i1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wo, 2 * s + 2), three, half1, 0xEA);
                if (!two) { /* the third bit */
                    i0 = _mm512_mask_add_epi16(i0, _cvtu32_mask32(third[r]), i0, bit2);
                    i1 = _mm512_mask_add_epi16(i1, _cvtu32_mask32(third[r + 1]), i1, bit2);
                }
                _mm512_storeu_si512(tile + stride * r, _mm512_permutexvar_epi16(i0, table));
                _mm512_storeu_si512(tile + stride * (r + 1), _mm512_permutexvar_epi16(i1, table));
            }
        }
        return;
    }
    if (wtype == IL_W_Q5_0T16 || wtype == IL_W_Q5_1T16 || wtype == IL_W_Q5_KT16) { /* 32 values a row: a whole table */
        const int five1 = wtype != IL_W_Q5_0T16; /* Q5_K: Q5_1's with its sub-block's d and m */
        const uint8_t *at = wtype == IL_W_Q5_KT16 ? blk + 256 + 320 * sub : blk + (five1 ? 64 : 32);
        const uint32_t *fifth = (const uint32_t *)at;
        if (wtype == IL_W_Q5_KT16) {
            k_scales(blk, sub, d, m);
        } else {
            _mm512_store_ps(d, dv);
            _mm512_store_ps(m, five1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32))) : _mm512_setzero_ps());
        }
        __asm__ volatile("" ::: "memory");
        const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 lo = five1 ? q : _mm512_sub_ps(q, _mm512_set1_ps(16.f)), hi = _mm512_add_ps(lo, _mm512_set1_ps(16.f));
        const __m512i low4 = _mm512_set1_epi16(0xF), bit4 = _mm512_set1_epi16(0x10);
        const uint8_t *nibbles = at + 64;
        for (int g = 0; g < 4; g++) {
            const __m512i wg = _mm512_loadu_si512(nibbles + 64 * g);
            for (int s = 0; s < 4; s++) {
                const int r = 4 * g + s; /* (q - 16) d + 0: as the dequantizer, +0 for a zero */
                const __m512 dr = _mm512_set1_ps(d[r]), mr = _mm512_set1_ps(m[r]);
                const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, dr, mr), _mm512_fmadd_ps(lo, dr, mr));
                const __m512i i4 = _mm512_and_si512(s ? _mm512_srli_epi16(wg, 4 * s) : wg, low4);
                const __m512i idx = _mm512_mask_add_epi16(i4, _cvtu32_mask32(fifth[r]), i4, bit4); /* + the fifth bit */
                _mm512_storeu_si512(tile + stride * r, _mm512_permutexvar_epi16(idx, table));
            }
        }
        return;
    }
    if (wtype == IL_W_Q4_KT16) {
        k_scales(blk, sub, d, m);
        words = blk + 256 + 256 * sub;
    } else if (wtype == IL_W_IQ4_XST16) { /* d (ls - 32), ls this sub-block's 6-bit scale (il_iq4_xs_scale) */
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + 32)));
        const __m512i l = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 64 + 16 * (sub / 2))));
        const __m512i ls = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(l, 4 * (sub % 2)), _mm512_set1_epi32(15)),
                                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2 * sub), _mm512_set1_epi32(3)), 4));
        _mm512_store_ps(d, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_sub_epi32(ls, _mm512_set1_epi32(32)))));
        words = blk + 128 + 256 * sub;
    } else {
        _mm512_store_ps(d, dv);
        if (wtype == IL_W_Q4_1T16) _mm512_store_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32))));
    }
    __asm__ volatile("" ::: "memory"); /* each scale broadcast by a load: GCC's permutes instead took 2x */
    const int iq4 = wtype == IL_W_IQ4_NLT16 || wtype == IL_W_IQ4_XST16, offset = wtype != IL_W_Q4_0T16 && !iq4;
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 qc = iq4      ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)il_iq4_values)))
                      : offset ? q
                               : _mm512_sub_ps(q, _mm512_set1_ps(8.f));
    const __m512i low4 = _mm512_set1_epi16(0xF), second = _mm512_set1_epi16(0x10);
    for (int g = 0; g < 4; g++) {
        const __m512i wg = _mm512_loadu_si512(words + 64 * g);
        for (int s = 0; s < 4; s += 2) {
            const int r = 4 * g + s;
            const __m512 t0 = offset ? _mm512_fmadd_ps(qc, _mm512_set1_ps(d[r]), _mm512_set1_ps(m[r]))
                                     : _mm512_mul_ps(qc, _mm512_set1_ps(d[r]));
            const __m512 t1 = offset ? _mm512_fmadd_ps(qc, _mm512_set1_ps(d[r + 1]), _mm512_set1_ps(m[r + 1]))
                                     : _mm512_mul_ps(qc, _mm512_set1_ps(d[r + 1]));
            const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(t1, t0); /* words 0-15: row r's, 16-31: r + 1's */
            const __m512i i0 = _mm512_and_si512(s ? _mm512_srli_epi16(wg, 4 * s) : wg, low4);
            const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wg, 4 * s + 4), low4, second, 0xEA);
            _mm512_storeu_si512(tile + stride * r, _mm512_permutexvar_epi16(i0, table));
            _mm512_storeu_si512(tile + stride * (r + 1), _mm512_permutexvar_epi16(i1, table));
        }
    }
}

/* The rows ids[rows] of a t16 matrix as bf16 with the tiles' decoding (an embedding's rows, and the
 * weights that PyTorch or the AVX-512 kernels take where the tiles do not run: the same values as the
 * tiles'), a group's blocks decoded straight into the output where 16 ids are its rows in order. */
IL_INLINE void t16_rows(const int wtype, uint16_t *out, const uint8_t *w, const int64_t *ids, int rows, int K,
                        int num_threads) {
    const int64_t group_bytes = 16 * (int64_t)il_block_bytes(wtype);
    const int per = il_block_elems(wtype) / 32; /* 32-input steps a block */
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= 16)
    for (int r0 = 0; r0 < rows; r0 += 16) {
        uint16_t tile[512] __attribute__((aligned(64)));
        int whole = r0 + 16 <= rows && ids[r0] % 16 == 0;
        for (int i = 1; whole && i < 16; i++) whole = ids[r0 + i] == ids[r0] + i;
        for (int r = r0; r < (whole ? r0 + 1 : rows < r0 + 16 ? rows : r0 + 16); r++)
            for (int b = 0; b < K / 32; b++) {
                const uint8_t *blk = w + (ids[r] / 16 * (K / 32 / per) + b / per) * group_bytes;
                if (whole) {
                    decode_t16(wtype, blk, b % per, out + (int64_t)r * K + 32 * b, K);
                } else {
                    decode_t16(wtype, blk, b % per, tile, 32);
                    memcpy(out + (int64_t)r * K + 32 * b, tile + 32 * (ids[r] % 16), 64);
                }
            }
    }
}
#endif
