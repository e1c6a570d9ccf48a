/* The int8 path's tiles on AVX-512 (included by avx2/int8.c in those builds): four weight rows'
 * blocks side by side in one 512-bit register, row j in 128-bit lane j, each lane the same integer
 * sums and fp32 operations as int8_pairs.h's, whatever the tile's input rows, so a row's result
 * stays the same whatever its batch (and is AVX2's). A block half's byte products are one VNNI
 * dpbusd where the CPU has it, else AVX2's multiply-adds at twice the width (avx512f: Skylake-SP). */
#ifndef INFERLAB_AVX512_INT8_QUADS_H
#define INFERLAB_AVX512_INT8_QUADS_H
#include <stddef.h>

/* Bytes off..off+15 of each of the four weight rows, row j in 128-bit lane j. */
IL_INLINE __m512i lanes4(const uint8_t *const w[4], int64_t off) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(w[0] + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[1] + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[2] + off)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[3] + off)), 3);
}

/* dot32x2 (int8_pairs.h) on four 128-bit lanes (_mm_sign_epi8 has no 512-bit form: x takes w's sign
 * by a masked negation). */
IL_INLINE __m512i dot32x4(__m512i wl, __m512i wh, __m512i xl, __m512i xh, int wtype, const __m512i sc[2]) {
    const __m512i zero = _mm512_setzero_si512();
    if (signed_weights(wtype)) {
        xl = _mm512_mask_sub_epi8(xl, _mm512_movepi8_mask(wl), zero, xl);
        xh = _mm512_mask_sub_epi8(xh, _mm512_movepi8_mask(wh), zero, xh);
        wl = _mm512_abs_epi8(wl), wh = _mm512_abs_epi8(wh);
    }
    if (il_k16_type(wtype))
        return _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(wl, xl), sc[0]),
                                _mm512_madd_epi16(_mm512_maddubs_epi16(wh, xh), sc[1]));
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, wl, xl), wh, xh);
#else /* Skylake-SP: dot32x2's multiply-adds, 512 bits wide */
    const __m512i ones = _mm512_set1_epi16(1);
    if (signed_weights(wtype))
        return _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(wl, xl), ones),
                                _mm512_madd_epi16(_mm512_maddubs_epi16(wh, xh), ones));
    return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(wl, xl), _mm512_maddubs_epi16(wh, xh)), ones);
#endif
}

/* Four 128-bit values as the lanes of one register, v[j] in lane j. */
IL_INLINE __m512i join4(const __m128i v[4]) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(v[1], v[0])), _mm256_set_m128i(v[3], v[2]), 1);
}

/* Weight rows 0-3's block b as bytes (*wl, *wh: weights 0-15 and 16-31, row r in 128-bit lane r), the
 * four rows read with each instruction, and their (d, c) in lanes 2 r, 2 r + 1 of *dm, as blocks_pair
 * gives them (Q4_0's and Q5_0's lane 2 r + 1 holds weight bytes: tilerx4_quads takes their d as c).
 * j: b % 8 for the K-quants; ks: the rows' k_scales. Q4_K, Q5_K: dm from k4_quad_dm; Q6_K, Q3_K
 * and Q2_K: k16_quad_sub. */
IL_INLINE void blocks_quad(const uint8_t *const w[4], int b, const int j, const int wtype, __m512i *wl, __m512i *wh,
                           __m256 *dm, float ks[4][16]) {
    const int q5 = wtype == IL_W_Q5_0 || wtype == IL_W_Q5_1;
    if (wtype == IL_W_Q8_0 || wtype == IL_W_Q4_0 || wtype == IL_W_Q4_1 || q5) {
        const int64_t at = (int64_t)b * il_block_bytes(wtype);
        if (q5) { /* the nibbles as Q4's; the fifth bits (qh: bit l for weight l) as byte masks, 16 a lane */
            const int qh = wtype == IL_W_Q5_1 ? 4 : 2;
            uint64_t lo = 0, hi = 0;
            for (int r = 0; r < 4; r++) {
                uint32_t h;
                memcpy(&h, w[r] + at + qh, sizeof h);
                lo |= (uint64_t)(h & 0xFFFF) << 16 * r, hi |= (uint64_t)(h >> 16) << 16 * r;
            }
            const __m512i v = lanes4(w, at + qh + 4), low4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
            *wl = _mm512_or_si512(_mm512_and_si512(v, low4), _mm512_maskz_mov_epi8(lo, sixteen));
            *wh = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), _mm512_maskz_mov_epi8(hi, sixteen));
        } else if (wtype == IL_W_Q8_0) { /* each row's 32 weights in one load; low halves to wl, high ones to wh */
            const __m512i r01 = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[0] + at + 2))),
                _mm256_loadu_si256((const __m256i *)(w[1] + at + 2)), 1);
            const __m512i r23 = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[2] + at + 2))),
                _mm256_loadu_si256((const __m256i *)(w[3] + at + 2)), 1);
            *wl = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(2, 0, 2, 0));
            *wh = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(3, 1, 3, 1));
        } else {
            const __m512i v = lanes4(w, at + (wtype == IL_W_Q4_1 ? 4 : 2)), low4 = _mm512_set1_epi8(0x0F);
            *wl = _mm512_and_si512(v, low4), *wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        uint32_t h[4]; /* each block's first 4 bytes: d, then m (Q4_1, Q5_1) or bytes of weights */
        for (int r = 0; r < 4; r++) memcpy(h + r, w[r] + at, sizeof h[r]);
        *dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
        return;
    }
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) { /* k4_halves on the four rows at once, scales from ks */
        const int five = wtype == IL_W_Q5_K;
        const int64_t at = (int64_t)(b / 8) * il_block_bytes(wtype);
        const int64_t qs = at + (five ? offsetof(il_q5_K, qs) : offsetof(il_q4_K, qs)) + 32 * (j / 2);
        __m512i l = lanes4(w, qs), h = lanes4(w, qs + 16);
        if (j % 2) l = _mm512_srli_epi16(l, 4), h = _mm512_srli_epi16(h, 4);
        const __m512i low4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16), bit = _mm512_set1_epi8((char)(1 << j));
        *wl = _mm512_and_si512(l, low4), *wh = _mm512_and_si512(h, low4);
        if (five) { /* bit j of qh[l] is weight l's fifth bit */
            const int64_t qh = at + offsetof(il_q5_K, qh);
            *wl = _mm512_or_si512(*wl, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(lanes4(w, qh), bit), sixteen));
            *wh = _mm512_or_si512(*wh, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(lanes4(w, qh + 16), bit), sixteen));
        }
        return; /* dm: k4_quad_dm's, set by the tile */
    }
    /* IQ4_NL, IQ4_XS: the four rows' nibbles at once, looked up in the table (one byte shuffle a half) */
    const int64_t bb = il_block_bytes(wtype);
    const int64_t at = wtype == IL_W_IQ4_NL ? b * bb : (b / 8) * bb + offsetof(il_iq4_xs, qs) + 16 * j;
    const __m512i v = lanes4(w, wtype == IL_W_IQ4_NL ? at + 2 : at), low4 = _mm512_set1_epi8(0x0F);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)il_iq4_values));
    *wl = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4));
    *wh = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    if (wtype == IL_W_IQ4_XS) {
        *dm = _mm256_setr_ps(ks[0][j], 0.f, ks[1][j], 0.f, ks[2][j], 0.f, ks[3][j], 0.f);
        return;
    }
    uint32_t h[4]; /* each block's d, then 2 bytes of weights, cleared to 0 */
    for (int r = 0; r < 4; r++) memcpy(h + r, w[r] + at, sizeof h[r]);
    *dm = _mm256_cvtph_ps(_mm_and_si128(_mm_loadu_si128((const __m128i *)h), _mm_set1_epi32(0xFFFF)));
}

#include "int8_quads_k.h"

/* R input rows (R = 1: one request's decode; 2-4: a few streams, and every tile of a larger batch)
 * against four weight rows, for every int8 type (Q2_K with its minimums' second product), the
 * weight rows side by side in one 512-bit register, row j in 128-bit lane j: the blocks are loaded
 * and unpacked once for the R input rows, and each row's four block products are one dot32x4. */
IL_INLINE void tilerx4_quads(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], const int wtype,
                             const int R, __m128 out[4]) {
    __m512 acc[4]; /* lane group j of acc[i]: input row i against weight row j */
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    __m128 corrv[4]; /* lane j of corrv[i]: weight row j's c * s_x sum for input row i */
    for (int i = 0; i < 4; i++) corrv[i] = _mm_setzero_ps();
    const int nb = K / 32, signed_w = signed_weights(wtype), mins = il_k16_min_type(wtype);
    const __m512i d_of = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m512i one = _mm512_set1_epi8(1), m_of = _mm512_add_epi32(d_of, _mm512_set1_epi32(1));
    const __m256i c_of = wtype == IL_W_Q4_0 || wtype == IL_W_Q5_0 ? _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6) /* d */
                                                                : _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
    float ks[4][16];
    const int span = il_block_elems(wtype) / 32; /* a K-quant block's sub-blocks unrolled: their bits' places constant */
    for (int b0 = 0; b0 < nb; b0 += span) {
        const int64_t at = il_row_bytes(wtype, 32 * b0); /* the block (K-quants: its 256-weight block) */
        __m256 k16_dm = _mm256_setzero_ps();
        const __m512i k16 = il_k16_type(wtype) ? k16_quad_scales(w, at, wtype, &k16_dm) : _mm512_setzero_si512();
        const int k4 = wtype == IL_W_Q4_K || wtype == IL_W_Q5_K;
        __m512 k4_dm[4];
        if (k4) k4_quad_dm(w, b0 / 8, wtype, k4_dm);
        k_scales_rows(wtype, w, 4, b0 / 8, ks);
#pragma GCC unroll 8
        for (int j = 0; j < span; j++) {
            const int b = b0 + j;
            if (64 * j < il_block_bytes(wtype))
                for (int r = 0; r < 4; r++) _mm_prefetch((const char *)w[r] + at + 64 * j + PREFETCH_BYTES, _MM_HINT_T0);
            __m512i wl, wh, sc[4];
            __m256 dm = k16_dm; /* d0, c0, ..., d3, c3 */
            if (il_k16_type(wtype)) k16_quad_sub(w, at, j, wtype, k16, &wl, &wh, sc);
            else blocks_quad(w, b, j, wtype, &wl, &wh, &dm, ks);
            if (k4) dm = j % 2 ? _mm512_extractf32x8_ps(k4_dm[j / 2], 1) : _mm512_castps512_ps256(k4_dm[j / 2]);
            const __m512 d = _mm512_permutexvar_ps(d_of, _mm512_castps256_ps512(dm));
            const __m512 c = _mm512_permutexvar_ps(m_of, _mm512_castps256_ps512(dm)); /* Q2_K's -dmin */
            for (int i = 0; i < R; i++) {
                const int8_t *xb = xq + (int64_t)i * K + 32 * b;
                const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb));
                const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 16)));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot32x4(wl, wh, xl, xh, wtype, sc)),
                                         _mm512_mul_ps(d, _mm512_set1_ps(x4[8 * b + i])), acc[i]);
                if (mins) /* Q2_K's second product: each 16 inputs' sum times its minimum */
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot32x4(one, one, xl, xh, wtype, sc + 2)),
                                             _mm512_mul_ps(c, _mm512_set1_ps(x4[8 * b + i])), acc[i]);
            }
            if (!signed_w) {
                const __m128 c = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, c_of));
                for (int i = 0; i < R; i++) corrv[i] = _mm_fmadd_ps(c, _mm_set1_ps(x4[8 * b + 4 + i]), corrv[i]);
            }
        }
    }
    __m128 accs[4][4];
    for (int i = 0; i < R; i++) { /* the lane's index spelled out: clang wants a constant before unrolling */
        accs[i][0] = _mm512_extractf32x4_ps(acc[i], 0), accs[i][1] = _mm512_extractf32x4_ps(acc[i], 1);
        accs[i][2] = _mm512_extractf32x4_ps(acc[i], 2), accs[i][3] = _mm512_extractf32x4_ps(acc[i], 3);
    }
    _MM_TRANSPOSE4_PS(corrv[0], corrv[1], corrv[2], corrv[3]); /* lane i of corrv[j]: input row i, weight row j */
    finish8(accs, corrv, wtype, R, 4, out);
}
#endif
