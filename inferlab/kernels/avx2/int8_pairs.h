/* The int8 path's tiles on AVX2 (included by int8.c in the builds without AVX-512: avx2, avxvnni):
 * two weight rows side by side in each 256-bit register, row j in 128-bit lane j % 2, so one
 * instruction does two rows' block products (Q8_0, the Q4 and Q5 types and the K-quants also load
 * and unpack two rows at once): one input row against four weight rows (tile1x4_pairs: one
 * request's decode), or two to four against two (tilerx2_pairs). Each lane's integer sums and fp32
 * operations are the same in both, so a row's result stays the same whatever its batch.
 * AVX-512's four-lane version is avx512/int8_quads.h. */
#ifndef INFERLAB_AVX2_INT8_PAIRS_H
#define INFERLAB_AVX2_INT8_PAIRS_H
#include <stddef.h>

/* Bytes off..off+15 of weight rows a (low lane) and b (high lane). */
IL_INLINE __m256i lanes2(const uint8_t *a, const uint8_t *b, int64_t off) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + off))),
                                   _mm_loadu_si128((const __m128i *)(b + off)), 1);
}

/* Per 128-bit lane, 4 int32 sums whose total is the integer dot product of the lane's block (32 weight
 * bytes, wl then wh) with its 32 inputs (il_k16_type: each half's products times the lane's integer
 * scale for it, sc[0] and sc[1], |w| <= 32 keeping a pair's sum in 16 bits). */
IL_INLINE __m256i dot32x2(__m256i wl, __m256i wh, __m256i xl, __m256i xh, int wtype, const __m256i sc[2]) {
    const int signed_w = signed_weights(wtype);
    if (signed_w)
        xl = _mm256_sign_epi8(xl, wl), xh = _mm256_sign_epi8(xh, wh), wl = _mm256_abs_epi8(wl), wh = _mm256_abs_epi8(wh);
    if (il_k16_type(wtype))
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wl, xl), sc[0]),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wh, xh), sc[1]));
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wl, xl), wh, xh);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (signed_w)
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wl, xl), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wh, xh), ones));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(wl, xl), _mm256_maddubs_epi16(wh, xh)), ones);
#endif
}

/* Weight rows a, b's block at byte `at` as bytes: weights 0-15 (*wl) and 16-31 (*wh), each row in its lane. */
IL_INLINE void block_pair(const uint8_t *a, const uint8_t *b, int64_t at, const int wtype, __m256i *wl, __m256i *wh) {
    if (wtype == IL_W_Q8_0) {
        *wl = lanes2(a, b, at + 2), *wh = lanes2(a, b, at + 18);
        return;
    }
    const __m256i v = lanes2(a, b, at + (wtype == IL_W_Q4_1 ? 4 : 2)), low4 = _mm256_set1_epi8(0x0F);
    *wl = _mm256_and_si256(v, low4), *wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
}

/* Rows 2 p, 2 p + 1's block b as bytes (*wl, *wh, each row in its lane), both rows read with each
 * instruction, and, in dm's lanes 0-3, each row's d and what multiplies its s_x (c: m for Q4_1 and
 * Q5_1; d for Q4_0, Q5_0 and Q8_0; 0 for the IQ4 types; Q4_K and Q5_K: k4_pair_dm). j: b % 8 for the
 * K-quants (a constant where the tiles unroll their blocks); ks: the rows' k_scales. Q6_K, Q3_K and
 * Q2_K: k16_pair_sub. */
IL_INLINE void blocks_pair(const uint8_t *const w[4], int p, int b, const int j, const int wtype, __m256i *wl,
                           __m256i *wh, __m128 *dm, float ks[][16]) {
    const int q5 = wtype == IL_W_Q5_0 || wtype == IL_W_Q5_1;
    if (wtype == IL_W_Q8_0 || wtype == IL_W_Q4_0 || wtype == IL_W_Q4_1 || q5) {
        const int64_t at = (int64_t)b * il_block_bytes(wtype);
        if (q5) { /* the nibbles as Q4's, and each row's fifth bits (qh: bit l for weight l) in its lane */
            const int qh = wtype == IL_W_Q5_1 ? 4 : 2;
            uint32_t ha, hb;
            memcpy(&ha, w[2 * p] + at + qh, sizeof ha), memcpy(&hb, w[2 * p + 1] + at + qh, sizeof hb);
            const __m256i v = lanes2(w[2 * p], w[2 * p + 1], at + qh + 4), low4 = _mm256_set1_epi8(0x0F);
            *wl = _mm256_or_si256(_mm256_and_si256(v, low4), fifth_bits((ha & 0xFFFF) | hb << 16));
            *wh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), fifth_bits(ha >> 16 | (hb & 0xFFFF0000)));
        } else {
            block_pair(w[2 * p], w[2 * p + 1], at, wtype, wl, wh);
        }
        uint32_t h[2]; /* each block's first 4 bytes: d, then m (Q4_1, Q5_1) or bytes of weights */
        memcpy(h, w[2 * p] + at, sizeof h[0]), memcpy(h + 1, w[2 * p + 1] + at, sizeof h[1]);
        uint64_t both;
        memcpy(&both, h, sizeof both);
        const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)both)); /* d0, m0, d1, m1 */
        const int dm_pair = wtype == IL_W_Q4_1 || wtype == IL_W_Q5_1;
        *dm = dm_pair ? f : _mm_shuffle_ps(f, f, _MM_SHUFFLE(2, 2, 0, 0)); /* Q4_0, Q5_0, Q8_0: (d, d) */
        return;
    }
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) { /* k4_halves on the two rows at once, scales from ks */
        const int five = wtype == IL_W_Q5_K;
        const int64_t at = (int64_t)(b / 8) * il_block_bytes(wtype);
        const int64_t qs = at + (five ? offsetof(il_q5_K, qs) : offsetof(il_q4_K, qs)) + 32 * (j / 2);
        __m256i l = lanes2(w[2 * p], w[2 * p + 1], qs), h = lanes2(w[2 * p], w[2 * p + 1], qs + 16);
        if (j % 2) l = _mm256_srli_epi16(l, 4), h = _mm256_srli_epi16(h, 4);
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        *wl = _mm256_and_si256(l, low4), *wh = _mm256_and_si256(h, low4);
        if (five) { /* bit j of qh[l] is weight l's fifth bit */
            const int64_t qh = at + offsetof(il_q5_K, qh);
            const __m256i bit = _mm256_set1_epi8((char)(1 << j)), sixteen = _mm256_set1_epi8(16);
            const __m256i h0 = lanes2(w[2 * p], w[2 * p + 1], qh), h1 = lanes2(w[2 * p], w[2 * p + 1], qh + 16);
            *wl = _mm256_or_si256(*wl, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h0, bit), bit), sixteen));
            *wh = _mm256_or_si256(*wh, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h1, bit), bit), sixteen));
        }
        return; /* dm: k4_pair_dm's, set by the tile */
    }
    /* IQ4_NL, IQ4_XS: the two rows' nibbles at once, looked up in the table (one byte shuffle a half) */
    const int64_t bb = il_block_bytes(wtype);
    const int64_t at = wtype == IL_W_IQ4_NL ? b * bb : (b / 8) * bb + offsetof(il_iq4_xs, qs) + 16 * j;
    const __m256i v = lanes2(w[2 * p], w[2 * p + 1], wtype == IL_W_IQ4_NL ? at + 2 : at), low4 = _mm256_set1_epi8(0x0F);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)il_iq4_values));
    *wl = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
    *wh = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    if (wtype == IL_W_IQ4_XS) {
        *dm = _mm_setr_ps(ks[2 * p][j], 0.f, ks[2 * p + 1][j], 0.f);
        return;
    }
    uint32_t d[2]; /* each block's d, then 2 bytes of weights, cleared to 0 */
    memcpy(d, w[2 * p] + at, sizeof d[0]), memcpy(d + 1, w[2 * p + 1] + at, sizeof d[1]);
    uint64_t both;
    memcpy(&both, d, sizeof both);
    *dm = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)(both & 0x0000FFFF0000FFFFull)));
}

#include "int8_pairs_k.h"

/* Q2_K's second product: each 16 inputs' sum times the lane's integer minimum (sc: the minimums), a
 * dot32x2 with weights of 1. */
IL_INLINE __m256i mins_dot32x2(__m256i xl, __m256i xh, const int wtype, const __m256i sc[2]) {
    const __m256i one = _mm256_set1_epi8(1);
    return dot32x2(one, one, xl, xh, wtype, sc);
}

/* One input row against weight rows 0-3, two pairs of lanes. */
IL_INLINE void tile1x4_pairs(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], const int wtype,
                             __m128 out[4]) {
    __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps();
    __m128 corrv = _mm_setzero_ps(); /* lane j: weight row j's c * s_x sum */
    const int nb = K / 32, signed_w = signed_weights(wtype), mins = il_k16_min_type(wtype);
    const __m256i d01 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), d23 = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
    const __m256i m01 = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3), m23 = _mm256_setr_epi32(5, 5, 5, 5, 7, 7, 7, 7);
    const __m256i c_of = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
    float ks[4][16];
    const int span = il_block_elems(wtype) / 32; /* a K-quant block's sub-blocks unrolled: their bits' places constant */
    for (int b0 = 0; b0 < nb; b0 += span) {
        const int64_t at = il_row_bytes(wtype, 32 * b0); /* the block (K-quants: its 256-weight block) */
        pair_block pb01, pb23;
        pair_block_start(w, 0, b0, wtype, &pb01, ks), pair_block_start(w, 1, b0, wtype, &pb23, ks);
#pragma GCC unroll 8
        for (int s = 0; s < span; s++) {
            const int b = b0 + s;
            if (64 * s < il_block_bytes(wtype))
                for (int j = 0; j < 4; j++) _mm_prefetch((const char *)w[j] + at + 64 * s + PREFETCH_BYTES, _MM_HINT_T0);
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + 32 * b)));
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + 32 * b + 16)));
            __m256i wl, wh, sc[4], min01 = _mm256_setzero_si256(), min23 = min01;
            __m128 dm01, dm23;
            pair_sub(w, 0, b0, s, wtype, &pb01, ks, &wl, &wh, &dm01, sc);
            const __m256i dot01 = dot32x2(wl, wh, xl, xh, wtype, sc);
            if (mins) min01 = mins_dot32x2(xl, xh, wtype, sc + 2);
            pair_sub(w, 1, b0, s, wtype, &pb23, ks, &wl, &wh, &dm23, sc);
            const __m256i dot23 = dot32x2(wl, wh, xl, xh, wtype, sc);
            if (mins) min23 = mins_dot32x2(xl, xh, wtype, sc + 2);
            const __m256 dm = _mm256_set_m128(dm23, dm01); /* d0, c0, ..., d3, c3 */
            const __m256 dx = _mm256_set1_ps(x4[8 * b]);
            acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot01), _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, d01), dx), acc01);
            acc23 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot23), _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, d23), dx), acc23);
            if (mins) { /* times -dmin, c's lane */
                acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min01), _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, m01), dx), acc01);
                acc23 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min23), _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, m23), dx), acc23);
            }
            if (!signed_w)
                corrv = _mm_fmadd_ps(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, c_of)), _mm_set1_ps(x4[8 * b + 4]),
                                     corrv);
        }
    }
    __m128 accs[4][4], corr[4];
    accs[0][0] = _mm256_castps256_ps128(acc01), corr[0] = _mm_shuffle_ps(corrv, corrv, 0x00);
    accs[0][1] = _mm256_extractf128_ps(acc01, 1), corr[1] = _mm_shuffle_ps(corrv, corrv, 0x55);
    accs[0][2] = _mm256_castps256_ps128(acc23), corr[2] = _mm_shuffle_ps(corrv, corrv, 0xaa);
    accs[0][3] = _mm256_extractf128_ps(acc23, 1), corr[3] = _mm_shuffle_ps(corrv, corrv, 0xff);
    finish8(accs, corr, wtype, 1, 4, out);
}

/* 2 to 4 input rows against weight rows 0 and 1 (a few requests' decode, and every tile of a prefill)
 * with the weight rows in the lanes as tile1x4_pairs has them: the pair's block is loaded and
 * unpacked once for the R rows, and each row's two block products are one dot32x2. Output for
 * output the same lanes and fp32 operations as tile1x4_pairs. */
IL_INLINE void tilerx2_pairs(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], const int wtype,
                             const int R, __m128 out[4]) {
    __m256 acc[4];
    for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
    __m128 corr[4] = {_mm_setzero_ps(), _mm_setzero_ps()}; /* weight row j's c * s_x, lane i: input row i */
    const int nb = K / 32, signed_w = signed_weights(wtype), mins = il_k16_min_type(wtype);
    const __m256i d01 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), m01 = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
    float ks[2][16];
    const int span = il_block_elems(wtype) / 32; /* as tile1x4_pairs */
    for (int b0 = 0; b0 < nb; b0 += span) {
        const int64_t at = il_row_bytes(wtype, 32 * b0); /* the block (K-quants: its 256-weight block) */
        pair_block pb;
        pair_block_start(w, 0, b0, wtype, &pb, ks);
#pragma GCC unroll 8
        for (int s = 0; s < span; s++) {
            const int b = b0 + s;
            if (64 * s < il_block_bytes(wtype))
                for (int j = 0; j < 2; j++) _mm_prefetch((const char *)w[j] + at + 64 * s + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i wl, wh, sc[4];
            __m128 dm; /* d0, c0, d1, c1 */
            pair_sub(w, 0, b0, s, wtype, &pb, ks, &wl, &wh, &dm, sc);
            const __m256 d = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), d01); /* d0 x 4, d1 x 4 */
            const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), m01); /* Q2_K's -dmin0, -dmin1 x 4 */
            for (int i = 0; i < R; i++) {
                const int8_t *xb = xq + (int64_t)i * K + 32 * b;
                const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xb));
                const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xb + 16)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32x2(wl, wh, xl, xh, wtype, sc)),
                                         _mm256_mul_ps(d, _mm256_set1_ps(x4[8 * b + i])), acc[i]);
                if (mins)
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins_dot32x2(xl, xh, wtype, sc + 2)),
                                             _mm256_mul_ps(c, _mm256_set1_ps(x4[8 * b + i])), acc[i]);
            }
            if (!signed_w) {
                const __m128 sx = _mm_loadu_ps(x4 + 8 * b + 4);
                corr[0] = _mm_fmadd_ps(_mm_shuffle_ps(dm, dm, 0x55), sx, corr[0]);
                corr[1] = _mm_fmadd_ps(_mm_shuffle_ps(dm, dm, 0xff), sx, corr[1]);
            }
        }
    }
    __m128 accs[4][4];
    for (int i = 0; i < R; i++) accs[i][0] = _mm256_castps256_ps128(acc[i]), accs[i][1] = _mm256_extractf128_ps(acc[i], 1);
    finish8(accs, corr, wtype, R, 2, out);
}
#endif
