/* The int8 path's tiles on AVX-512 VNNI (included by avx2/int8.c in that build): four 128-bit lanes
 * side by side in one 512-bit register, each lane the same integer sums and fp32 operations as
 * tile8's, so a row's result stays the same whatever its batch. */
#ifndef INFERLAB_AVX512_INT8_QUADS_H
#define INFERLAB_AVX512_INT8_QUADS_H

/* Bytes off..off+15 of each of the four weight rows, row j in 128-bit lane j. */
IL_INLINE __m512i lanes4(const uint8_t *const w[4], int64_t off) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(w[0] + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[1] + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[2] + off)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w[3] + off)), 3);
}

/* dot32 on four 128-bit lanes at once: lane group g of the result is dot32 of lane g of each input
 * (_mm_sign_epi8 has no 512-bit form: x takes w's sign by a masked negation). */
IL_INLINE __m512i dot32x4(__m512i wl, __m512i wh, __m512i xl, __m512i xh, int signed_w) {
    const __m512i zero = _mm512_setzero_si512();
    if (signed_w) {
        xl = _mm512_mask_sub_epi8(xl, _mm512_movepi8_mask(wl), zero, xl);
        xh = _mm512_mask_sub_epi8(xh, _mm512_movepi8_mask(wh), zero, xh);
        wl = _mm512_abs_epi8(wl), wh = _mm512_abs_epi8(wh);
    }
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, wl, xl), wh, xh);
}

/* tile8's 1 x 4 case (one request's decode) for Q8_0, Q4_0 and Q4_1, the four weight rows side by
 * side in one 512-bit register, row j in 128-bit lane j: lane for lane the same integer sums and the
 * same fp32 operations as tile8, so a row's result stays the same whatever its batch, in about half
 * the instructions, which is what one row's int8 decode waits on. */
IL_INLINE void tile1x4_vnni(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], const int wtype,
                            __m128 out[4]) {
    __m512 acc = _mm512_setzero_ps();
    __m128 corrv = _mm_setzero_ps(); /* lane j: weight row j's c * s_x sum */
    const int nb = K / 32, bb = il_block_bytes(wtype);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i d_of = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m256i c_of = wtype == IL_W_Q4_1 ? _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7) /* m */
                                            : _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6); /* d */
    for (int b = 0; b < nb; b++) {
        const int64_t at = (int64_t)b * bb;
        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)w[j] + at + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + 32 * b)));
        const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + 32 * b + 16)));
        __m512i dot;
        if (wtype == IL_W_Q8_0) { /* each row's 32 weights in one load; low halves to wl, high ones to wh */
            const __m512i r01 = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[0] + at + 2))),
                _mm256_loadu_si256((const __m256i *)(w[1] + at + 2)), 1);
            const __m512i r23 = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[2] + at + 2))),
                _mm256_loadu_si256((const __m256i *)(w[3] + at + 2)), 1);
            const __m512i wl = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(2, 0, 2, 0));
            const __m512i wh = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(3, 1, 3, 1));
            dot = dot32x4(wl, wh, xl, xh, 1);
        } else {
            const __m512i v = lanes4(w, at + (wtype == IL_W_Q4_1 ? 4 : 2));
            dot = dot32x4(_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xl, xh, 0);
        }
        uint32_t h[4]; /* each block's first 4 bytes: d, then m (Q4_1) or a byte of weights */
        for (int j = 0; j < 4; j++) memcpy(h + j, w[j] + at, sizeof h[j]);
        const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
        const __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(d_of, _mm512_castps256_ps512(dm)),
                                           _mm512_set1_ps(x4[8 * b]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
        if (wtype != IL_W_Q8_0)
            corrv = _mm_fmadd_ps(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, c_of)), _mm_set1_ps(x4[8 * b + 4]),
                                 corrv);
    }
    __m128 accs[4][4], corr[4];
    accs[0][0] = _mm512_extractf32x4_ps(acc, 0), corr[0] = _mm_shuffle_ps(corrv, corrv, 0x00);
    accs[0][1] = _mm512_extractf32x4_ps(acc, 1), corr[1] = _mm_shuffle_ps(corrv, corrv, 0x55);
    accs[0][2] = _mm512_extractf32x4_ps(acc, 2), corr[2] = _mm_shuffle_ps(corrv, corrv, 0xaa);
    accs[0][3] = _mm512_extractf32x4_ps(acc, 3), corr[3] = _mm_shuffle_ps(corrv, corrv, 0xff);
    finish8(accs, corr, wtype, 1, 4, out);
}
/* 16 bytes at off of each of the first R rows of x (K apart), row i in 128-bit lane i (row 0 again
 * in the lanes past R, whose sums are dropped). */
IL_INLINE __m512i rows4(const int8_t *xq, int K, int off, const int R) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(xq + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xq + (R > 1 ? (int64_t)K : 0) + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xq + (R > 2 ? 2 * (int64_t)K : 0) + off)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xq + (R > 3 ? 3 * (int64_t)K : 0) + off)), 3);
}

/* R x 4 tiles (R = 3, 4: a few streams, and every tile of a larger batch): the R input rows side by
 * side in one 512-bit register, row i in 128-bit lane i, against each of four weight rows' blocks
 * broadcast; lane for lane tile8's integer sums and fp32 operations, as tile1x4_vnni. (Two rows
 * stay on tile8: assembling the register cost more than it saved.) */
IL_INLINE void tile4x4_vnni(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], const int wtype,
                            const int R, __m128 out[4]) {
    __m512 acc[4]; /* lane group i of acc[j]: tile8's acc[i][j] */
    __m128 corr[4];
    for (int j = 0; j < 4; j++) acc[j] = _mm512_setzero_ps(), corr[j] = _mm_setzero_ps();
    const int nb = K / 32, bb = il_block_bytes(wtype);
    const __m512i by_row = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int b = 0; b < nb; b++) {
        const __m512i xl = rows4(xq, K, 32 * b, R), xh = rows4(xq, K, 32 * b + 16, R);
        const __m128 dx = _mm_loadu_ps(x4 + 8 * b), sx = _mm_loadu_ps(x4 + 8 * b + 4);
        const __m512 dxz = _mm512_permutexvar_ps(by_row, _mm512_castps128_ps512(dx));
        for (int j = 0; j < 4; j++) {
            _mm_prefetch((const char *)w[j] + (int64_t)b * bb + PREFETCH_BYTES, _MM_HINT_T0);
            __m128i wl, wh, sc[4];
            const __m128 dm = block_halves(wtype, w[j], b, &wl, &wh, sc);
            const __m512i dot = dot32x4(_mm512_broadcast_i32x4(wl), _mm512_broadcast_i32x4(wh), xl, xh,
                                        signed_weights(wtype));
            const __m512 scale = _mm512_mul_ps(_mm512_broadcastss_ps(dm), dxz); /* lane group i: d * d_x of row i */
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[j]);
            if (!signed_weights(wtype))
                corr[j] = _mm_fmadd_ps(_mm_shuffle_ps(dm, dm, _MM_SHUFFLE(1, 1, 1, 1)), sx, corr[j]);
        }
    }
    __m128 accs[4][4];
    for (int j = 0; j < 4; j++) {
        accs[0][j] = _mm512_extractf32x4_ps(acc[j], 0);
        accs[1][j] = _mm512_extractf32x4_ps(acc[j], 1);
        accs[2][j] = _mm512_extractf32x4_ps(acc[j], 2);
        accs[3][j] = _mm512_extractf32x4_ps(acc[j], 3);
    }
    finish8(accs, corr, wtype, R, 4, out);
}
#endif
