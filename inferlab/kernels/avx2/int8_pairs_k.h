/* The int8 pair tiles' K-quant blocks (included by int8_pairs.h): what a 256-weight block's 8
 * sub-blocks share, read once a block for two weight rows side by side (their scales), and each
 * sub-block's weights, for the tiles that unroll the block so that where its bits lie is constant. */
#ifndef INFERLAB_AVX2_INT8_PAIRS_K_H
#define INFERLAB_AVX2_INT8_PAIRS_K_H

/* Rows 2 p, 2 p + 1's (d sc_j, -dmin min_j) of Q4_K / Q5_K block B, as blocks_pair's dm of sub-block j:
 * in the low half of out[j % 4] for j < 4, the high half for j >= 4 (a block's 8 in four shuffles a
 * row pair, where one sub-block's took three inserts). */
IL_INLINE void k4_pair_dm(const uint8_t *const w[4], int p, int B, const int wtype, __m256 out[4]) {
    __m256 sa, ma, sb, mb;
    k4_scales(wtype, w[2 * p], B, &sa, &ma), k4_scales(wtype, w[2 * p + 1], B, &sb, &mb);
    /* a row's (sc_j, mn_j) pairs as doubles: j = 0, 1 | 4, 5 (lo) and 2, 3 | 6, 7 (hi) */
    const __m256d la = _mm256_castps_pd(_mm256_unpacklo_ps(sa, ma)), ha = _mm256_castps_pd(_mm256_unpackhi_ps(sa, ma));
    const __m256d lb = _mm256_castps_pd(_mm256_unpacklo_ps(sb, mb)), hb = _mm256_castps_pd(_mm256_unpackhi_ps(sb, mb));
    out[0] = _mm256_castpd_ps(_mm256_unpacklo_pd(la, lb)), out[1] = _mm256_castpd_ps(_mm256_unpackhi_pd(la, lb));
    out[2] = _mm256_castpd_ps(_mm256_unpacklo_pd(ha, hb)), out[3] = _mm256_castpd_ps(_mm256_unpackhi_pd(ha, hb));
}

/* Sub-block j's dm from k4_pair_dm's out. */
IL_INLINE __m128 k4_dm(const __m256 k4[4], const int j) {
    return j < 4 ? _mm256_castps256_ps128(k4[j % 4]) : _mm256_extractf128_ps(k4[j % 4], 1);
}

/* What the 8 sub-blocks of rows 2 p, 2 p + 1's Q6_K, Q3_K or Q2_K block at byte `at` share, read once a
 * block: returns each row's 16 integer scales as bytes, row 2 p + r in lane r (Q6_K's and Q3_K's
 * signed, Q3_K's unpacked from its 12 bytes of 6 bits as il_q3_K_scale; Q2_K's scale | minimum << 4),
 * and sets dm to the rows' (d, c) as blocks_pair does (c: Q2_K's -dmin, else 0). */
IL_INLINE __m256i k16_pair_scales(const uint8_t *const w[4], int p, int64_t at, const int wtype, __m128 *dm) {
    const uint8_t *a = w[2 * p], *b = w[2 * p + 1];
    uint32_t h[2] = {0, 0}; /* fp16 d, then dmin (Q2_K) or 0 */
    const size_t d_at = wtype == IL_W_Q6_K ? offsetof(il_q6_K, d)
                        : wtype == IL_W_Q3_K ? offsetof(il_q3_K, d) : offsetof(il_q2_K, d);
    const size_t n = wtype == IL_W_Q2_K ? 4 : 2;
    memcpy(h, a + at + d_at, n), memcpy(h + 1, b + at + d_at, n);
    uint64_t both;
    memcpy(&both, h, sizeof both);
    *dm = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)both));
    if (wtype == IL_W_Q2_K) {
        *dm = _mm_xor_ps(*dm, _mm_setr_ps(0.f, -0.f, 0.f, -0.f));
        return lanes2(a, b, at + offsetof(il_q2_K, scales));
    }
    if (wtype == IL_W_Q6_K) return lanes2(a, b, at + offsetof(il_q6_K, scales));
    /* Q3_K's 12 bytes s as lane bytes 4-15 (read from 4 before them, inside the block): scale i's low
     * 4 bits are s[i % 8]'s low (i < 8) or high nibble, its top 2 are bits 2 (i / 4) of s[8 + i % 4] */
    const __m256i v = lanes2(a, b, at + offsetof(il_q3_K, scales) - 4);
    const __m256i t = _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(_mm_setr_epi8(4, 5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7,
                                                                                       8, 9, 10, 11)));
    const __m256i lo4 = _mm256_and_si256(_mm256_blend_epi32(t, _mm256_srli_epi16(t, 4), 0xCC), _mm256_set1_epi8(0x0F));
    const __m256i u = _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 12, 13, 14, 15, 12,
                                                                                       13, 14, 15, 12, 13, 14, 15)));
    const __m256i hi2 = _mm256_and_si256(_mm256_srlv_epi32(u, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)),
                                         _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_slli_epi16(hi2, 4)), _mm256_set1_epi8(32));
}

/* Sub-block j (a constant: the tiles unroll a block's 8) of rows 2 p, 2 p + 1's Q6_K, Q3_K or Q2_K block
 * at byte `at`, as k16_halves and q2_K_halves give it, row 2 p + r in lane r: its weights as bytes,
 * and in every 16-bit lane of sc[s] the integer scale of its weights 16 s .. (scale 2 j + s of
 * `scales`, from k16_pair_scales), and Q2_K's minimums in sc[2 + s]. */
IL_INLINE void k16_pair_sub(const uint8_t *const w[4], int p, int64_t at, const int j, const int wtype, __m256i scales,
                            __m256i *wl, __m256i *wh, __m256i sc[4]) {
    const uint8_t *a = w[2 * p], *b = w[2 * p + 1];
    const int h = j / 4, g = j % 4;
    const __m256i three = _mm256_set1_epi8(3);
    /* the 2-bit values' bytes (Q6_K: its top 2 bits), 32 a half */
    const int64_t q2 = at + 32 * h + (wtype == IL_W_Q6_K ? offsetof(il_q6_K, qh) : wtype == IL_W_Q3_K ? offsetof(il_q3_K, qs)
                                                                                                       : offsetof(il_q2_K, qs));
    __m256i *out[2] = {wl, wh};
    for (int k = 0; k < 2; k++) {
        const __m256i two = _mm256_and_si256(_mm256_srli_epi16(lanes2(a, b, q2 + 16 * k), 2 * g), three); /* bit pair g */
        if (wtype == IL_W_Q6_K) { /* quarter g of half h: a nibble of ql under those 2 bits, less 32 */
            __m256i l = lanes2(a, b, at + offsetof(il_q6_K, ql) + 64 * h + 32 * (g % 2) + 16 * k);
            if (g >= 2) l = _mm256_srli_epi16(l, 4);
            l = _mm256_or_si256(_mm256_and_si256(l, _mm256_set1_epi8(0x0F)), _mm256_slli_epi16(two, 4));
            *out[k] = _mm256_sub_epi8(l, _mm256_set1_epi8(32));
        } else if (wtype == IL_W_Q3_K) { /* less 4 where hmask's bit j is clear */
            const __m256i bit = _mm256_set1_epi8((char)(1 << j));
            const __m256i hm = _mm256_and_si256(lanes2(a, b, at + offsetof(il_q3_K, hmask) + 16 * k), bit);
            *out[k] = _mm256_sub_epi8(two, _mm256_andnot_si256(_mm256_cmpeq_epi8(hm, bit), _mm256_set1_epi8(4)));
        } else {
            *out[k] = two;
        }
        const int i = 2 * j + k;
        if (wtype == IL_W_Q2_K) { /* byte i zero-extended: scale in its low nibble, minimum in its high one */
            const __m256i t = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)(0x8000 | i)));
            sc[k] = _mm256_and_si256(t, _mm256_set1_epi16(0x0F)), sc[2 + k] = _mm256_srli_epi16(t, 4);
        } else { /* byte i into each 16-bit lane's high byte, then sign-extended down */
            sc[k] = _mm256_srai_epi16(_mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)(i << 8 | 0x80))), 8);
        }
    }
}
/* What rows 2 p, 2 p + 1 share across a 256-weight block's sub-blocks, read once a block by
 * pair_block_start (for 32-weight types, nothing). */
typedef struct {
    __m256i k16; /* Q6_K, Q3_K, Q2_K: the rows' integer scales (k16_pair_scales) */
    __m128 dm;   /* and their (d, c) */
    __m256 k4[4]; /* Q4_K, Q5_K: the sub-blocks' (d sc, -dmin min) (k4_pair_dm) */
} pair_block;

/* Reads what rows 2 p, 2 p + 1's block starting at sub-block b0 shares (ks: IQ4_XS's k_scales). */
IL_INLINE void pair_block_start(const uint8_t *const w[4], int p, int b0, const int wtype, pair_block *pb,
                                float ks[][16]) {
    pb->dm = _mm_setzero_ps();
    if (il_k16_type(wtype)) pb->k16 = k16_pair_scales(w, p, il_row_bytes(wtype, 32 * b0), wtype, &pb->dm);
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) k4_pair_dm(w, p, b0 / 8, wtype, pb->k4);
    k_scales_rows(wtype, w + 2 * p, 2, b0 / 8, ks + 2 * p);
}

/* Rows 2 p, 2 p + 1's sub-block s (a constant; 0 for 32-weight types) of the block starting at b0:
 * weights, dm and sc as blocks_pair and k16_pair_sub give them. */
IL_INLINE void pair_sub(const uint8_t *const w[4], int p, int b0, const int s, const int wtype, const pair_block *pb,
                        float ks[][16], __m256i *wl, __m256i *wh, __m128 *dm, __m256i sc[4]) {
    if (il_k16_type(wtype)) {
        k16_pair_sub(w, p, il_row_bytes(wtype, 32 * b0), s, wtype, pb->k16, wl, wh, sc);
        *dm = pb->dm;
        return;
    }
    blocks_pair(w, p, b0 + s, s, wtype, wl, wh, dm, ks);
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) *dm = k4_dm(pb->k4, s);
}
#endif
