/* The int8 quad tiles' K-quant blocks (included by int8_quads.h): what a 256-weight block's 8
 * sub-blocks share, read once a block for four weight rows side by side (their scales), and each
 * sub-block's weights, for the tile that unrolls the block so that where its bits lie is constant. */
#ifndef INFERLAB_AVX512_INT8_QUADS_K_H
#define INFERLAB_AVX512_INT8_QUADS_K_H

/* The four rows' (d sc_j, -dmin min_j) of Q4_K / Q5_K block B, as blocks_quad's dm of sub-block j: in
 * the low half of out[j / 2] for even j, the high half for odd (a block's 8 in twelve shuffles, where
 * one sub-block's took seven inserts). */
IL_INLINE void k4_quad_dm(const uint8_t *const w[4], int B, const int wtype, __m512 out[4]) {
    __m512d p[4]; /* row r's (sc_j, mn_j) pairs as doubles, j = 0-7 */
    for (int r = 0; r < 4; r++) {
        __m256 sc, mn;
        k4_scales(wtype, w[r], B, &sc, &mn);
        const __m512i pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        p[r] = _mm512_castps_pd(_mm512_permutex2var_ps(_mm512_castps256_ps512(sc), pairs, _mm512_castps256_ps512(mn)));
    }
    const __m512i lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    const __m512d t01 = _mm512_permutex2var_pd(p[0], lo, p[1]), t01h = _mm512_permutex2var_pd(p[0], hi, p[1]);
    const __m512d t23 = _mm512_permutex2var_pd(p[2], lo, p[3]), t23h = _mm512_permutex2var_pd(p[2], hi, p[3]);
    const __m512i even = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11); /* rows 0-3's j, then j + 1 */
    const __m512i odd = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    out[0] = _mm512_castpd_ps(_mm512_permutex2var_pd(t01, even, t23));
    out[1] = _mm512_castpd_ps(_mm512_permutex2var_pd(t01, odd, t23));
    out[2] = _mm512_castpd_ps(_mm512_permutex2var_pd(t01h, even, t23h));
    out[3] = _mm512_castpd_ps(_mm512_permutex2var_pd(t01h, odd, t23h));
}

/* What the 8 sub-blocks of the four rows' Q6_K, Q3_K or Q2_K block at byte `at` share, read once a
 * block: returns each row's 16 integer scales as bytes, row r in lane r (Q6_K's and Q3_K's signed,
 * Q3_K's unpacked from its 12 bytes of 6 bits as il_q3_K_scale; Q2_K's scale | minimum << 4), and
 * sets dm to the rows' (d, c) as blocks_quad does (c: Q2_K's -dmin, else 0). */
IL_INLINE __m512i k16_quad_scales(const uint8_t *const w[4], int64_t at, const int wtype, __m256 *dm) {
    uint32_t h[4]; /* fp16 d, then dmin (Q2_K) or 0 */
    for (int r = 0; r < 4; r++) {
        uint16_t d = 0;
        if (wtype == IL_W_Q2_K) memcpy(h + r, w[r] + at + offsetof(il_q2_K, d), sizeof h[r]);
        else memcpy(&d, w[r] + at + (wtype == IL_W_Q6_K ? offsetof(il_q6_K, d) : offsetof(il_q3_K, d)), 2), h[r] = d;
    }
    *dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    if (wtype == IL_W_Q2_K) {
        *dm = _mm256_xor_ps(*dm, _mm256_setr_ps(0.f, -0.f, 0.f, -0.f, 0.f, -0.f, 0.f, -0.f));
        return lanes4(w, at + offsetof(il_q2_K, scales));
    }
    if (wtype == IL_W_Q6_K) return lanes4(w, at + offsetof(il_q6_K, scales));
    /* Q3_K's 12 bytes s as lane bytes 4-15 (read from 4 before them, inside the block): scale i's low
     * 4 bits are s[i % 8]'s low (i < 8) or high nibble, its top 2 are bits 2 (i / 4) of s[8 + i % 4] */
    const __m512i v = lanes4(w, at + offsetof(il_q3_K, scales) - 4);
    const __m512i a = _mm512_shuffle_epi8(v, _mm512_broadcast_i32x4(_mm_setr_epi8(4, 5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7,
                                                                                  8, 9, 10, 11)));
    const __m512i lo4 = _mm512_and_si512(_mm512_mask_blend_epi64(0xAA, a, _mm512_srli_epi16(a, 4)),
                                         _mm512_set1_epi8(0x0F));
    const __m512i t = _mm512_shuffle_epi8(v, _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 12, 13, 14, 15, 12, 13,
                                                                                  14, 15, 12, 13, 14, 15)));
    const __m512i hi2 = _mm512_and_si512(_mm512_srlv_epi32(t, _mm512_broadcast_i32x4(_mm_setr_epi32(0, 2, 4, 6))),
                                         _mm512_set1_epi8(3));
    return _mm512_sub_epi8(_mm512_or_si512(lo4, _mm512_slli_epi16(hi2, 4)), _mm512_set1_epi8(32));
}

/* Sub-block j (a constant: the tile unrolls a block's 8) of the four rows' Q6_K, Q3_K or Q2_K block
 * at byte `at`, as k16_halves and q2_K_halves give it, row r in lane r: its weights as bytes, and in
 * every 16-bit lane of sc[s] the integer scale of its weights 16 s .. (scale 2 j + s of `scales`, from
 * k16_quad_scales), and Q2_K's minimums in sc[2 + s]. */
IL_INLINE void k16_quad_sub(const uint8_t *const w[4], int64_t at, const int j, const int wtype, __m512i scales,
                            __m512i *wl, __m512i *wh, __m512i sc[4]) {
    const int h = j / 4, g = j % 4;
    const __m512i three = _mm512_set1_epi8(3);
    /* the 2-bit values' bytes (Q6_K: its top 2 bits), 32 a half */
    const int64_t q2 = at + 32 * h + (wtype == IL_W_Q6_K ? offsetof(il_q6_K, qh) : wtype == IL_W_Q3_K ? offsetof(il_q3_K, qs)
                                                                                                       : offsetof(il_q2_K, qs));
    __m512i *out[2] = {wl, wh};
    for (int k = 0; k < 2; k++) {
        const __m512i two = _mm512_and_si512(_mm512_srli_epi16(lanes4(w, q2 + 16 * k), 2 * g), three); /* bit pair g */
        if (wtype == IL_W_Q6_K) { /* quarter g of half h: a nibble of ql under those 2 bits, less 32 */
            __m512i l = lanes4(w, at + offsetof(il_q6_K, ql) + 64 * h + 32 * (g % 2) + 16 * k);
            if (g >= 2) l = _mm512_srli_epi16(l, 4);
            l = _mm512_or_si512(_mm512_and_si512(l, _mm512_set1_epi8(0x0F)), _mm512_slli_epi16(two, 4));
            *out[k] = _mm512_sub_epi8(l, _mm512_set1_epi8(32));
        } else if (wtype == IL_W_Q3_K) { /* less 4 where hmask's bit j is clear */
            const __m512i hm = lanes4(w, at + offsetof(il_q3_K, hmask) + 16 * k);
            *out[k] = _mm512_mask_sub_epi8(two, _mm512_testn_epi8_mask(hm, _mm512_set1_epi8((char)(1 << j))), two,
                                           _mm512_set1_epi8(4));
        } else {
            *out[k] = two;
        }
        const int i = 2 * j + k;
        if (wtype == IL_W_Q2_K) { /* byte i zero-extended: scale in its low nibble, minimum in its high one */
            const __m512i t = _mm512_shuffle_epi8(scales, _mm512_set1_epi16((short)(0x8000 | i)));
            sc[k] = _mm512_and_si512(t, _mm512_set1_epi16(0x0F)), sc[2 + k] = _mm512_srli_epi16(t, 4);
        } else { /* byte i into each 16-bit lane's high byte, then sign-extended down */
            sc[k] = _mm512_srai_epi16(_mm512_shuffle_epi8(scales, _mm512_set1_epi16((short)(i << 8 | 0x80))), 8);
        }
    }
}
#endif
