/* A 32-weight block's values as bytes in two 128-bit halves (weights 0-15, 16-31), for the block
 * types whose decoding the fp32 path (decode.h, then widened and scaled) and the int8 path (int8.c,
 * multiplied as bytes) share, so both read the very same values. Block b holds weights 32 b .. of a row. */
#ifndef INFERLAB_AVX2_HALVES_H
#define INFERLAB_AVX2_HALVES_H
#include <immintrin.h>

#include "../common.h"

/* Byte j of the result is 0x10 where bit j of h is set (the fifth bit of Q5 weight j). */
IL_INLINE __m256i fifth_bits(uint32_t h) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                               _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                  0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

/* Whether a type's 256-weight blocks have float scales per sub-block that k_scales computes. */
IL_INLINE int k_scaled(int wtype) {
    return wtype == IL_W_Q4_K || wtype == IL_W_Q5_K || wtype == IL_W_Q6_K || wtype == IL_W_Q3_K || wtype == IL_W_IQ4_XS;
}

/* Q4_K / Q5_K block B's 8 sub-block scales d * sc_j (*sc) and what each of their weights adds,
 * -(dmin * min_j) (*mn), from its 12 bytes of 6-bit scales and minimums (il_scale_min_k4). */
IL_INLINE void k4_scales(int wtype, const uint8_t *row, int B, __m256 *sc, __m256 *mn) {
    const il_q4_K *b4 = (const il_q4_K *)row + B;
    const il_q5_K *b5 = (const il_q5_K *)row + B;
    const int five = wtype == IL_W_Q5_K;
    uint32_t q[3];
    memcpy(q, five ? b5->scales : b4->scales, sizeof q);
    const uint32_t six = 0x3F3F3F3F, two = 0x03030303, four = 0x0F0F0F0F; /* per byte */
    const uint32_t sc03 = q[0] & six, mn03 = q[1] & six; /* sub-blocks 0-3: bytes 0-3 and 4-7 */
    const uint32_t sc47 = (q[2] & four) | ((q[0] >> 6 & two) << 4); /* 4-7: nibbles of bytes 8-11, */
    const uint32_t mn47 = (q[2] >> 4 & four) | ((q[1] >> 6 & two) << 4); /* top bits of 0-3 and 4-7 */
    const __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32((int)sc03, (int)sc47, 0, 0)));
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32((int)mn03, (int)mn47, 0, 0)));
    *sc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(five ? b5->d : b4->d)), s);
    *mn = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(five ? b5->dmin : b4->dmin)), m), _mm256_set1_ps(-0.f));
}

/* Block B's float scales for all of its sub-blocks at once, with the same operations the decoders
 * below use for one (unpacking them a sub-block at a time cost about as much as its 32 weights):
 * Q4_K / Q5_K: ks[j] = d * sc_j and ks[8 + j] = -(dmin * min_j), sub-block j (k4_scales); Q6_K, Q3_K:
 * ks[i] = d * scale_i, weights 16 i ..; IQ4_XS: ks[j] = d * scale_j. */
IL_INLINE void k_scales(int wtype, const uint8_t *row, int B, float ks[16]) {
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) {
        __m256 sc, mn;
        k4_scales(wtype, row, B, &sc, &mn);
        _mm256_storeu_ps(ks, sc), _mm256_storeu_ps(ks + 8, mn);
    } else if (wtype == IL_W_Q6_K) {
        const il_q6_K *k6 = (const il_q6_K *)row + B;
        const __m128i sc = _mm_loadu_si128((const __m128i *)k6->scales);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(k6->d));
        _mm256_storeu_ps(ks, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
        _mm256_storeu_ps(ks + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
    } else if (wtype == IL_W_Q3_K) {
        const il_q3_K *k3 = (const il_q3_K *)row + B;
        for (int i = 0; i < 16; i++) ks[i] = _cvtsh_ss(k3->d) * il_q3_K_scale(k3, i);
    } else if (wtype == IL_W_IQ4_XS) {
        const il_iq4_xs *xs = (const il_iq4_xs *)row + B;
        for (int j = 0; j < 8; j++) ks[j] = _cvtsh_ss(xs->d) * il_iq4_xs_scale(xs, j);
    }
}

/* Rows w[0..n)'s k_scales of IQ4_XS block B, for the int8 tiles (a no-op for other types: the
 * tiles take Q4_K's and Q5_K's from k4_scales, and multiply the integer ones of Q6_K, Q3_K, Q2_K). */
IL_INLINE void k_scales_rows(int wtype, const uint8_t *const w[], int n, int B, float ks[][16]) {
    if (wtype == IL_W_IQ4_XS)
        for (int j = 0; j < n; j++) k_scales(wtype, w[j], B, ks[j]);
}

/* A 32-byte vector's halves: bytes 0-15 and 16-31 (the K-quants' 32 weights are unpacked 256 bits
 * at a time, then widened from the halves). */
IL_INLINE void halves_of(__m256i v, __m128i *lo, __m128i *hi) {
    *lo = _mm256_castsi256_si128(v), *hi = _mm256_extracti128_si256(v, 1);
}

/* Q4_K / Q5_K sub-block b % 8 as unsigned 4/5-bit values, returning its scale d * sc; *c is what
 * each weight adds, -dmin * min (weight = d q + c, as Q4_1 / Q5_1). With ks (k_scales of the block),
 * both are read from there. */
IL_INLINE float k4_halves(int wtype, const uint8_t *row, int b, __m128i *lo, __m128i *hi, float *c, const float *ks) {
    const int five = wtype == IL_W_Q5_K, j = b % 8;
    const il_q4_K *b4 = (const il_q4_K *)row + b / 8;
    const il_q5_K *b5 = (const il_q5_K *)row + b / 8;
    const uint8_t *q = (five ? b5->qs : b4->qs) + 32 * (j / 2);
    __m256i v = _mm256_loadu_si256((const __m256i *)q);
    if (j % 2) v = _mm256_srli_epi16(v, 4); /* the low (j even) or high nibbles */
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    if (five) { /* bit j of qh[l] is weight l's fifth bit */
        const __m256i bit = _mm256_set1_epi8((char)(1 << j));
        const __m256i fifth = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)b5->qh), bit), bit);
        v = _mm256_or_si256(v, _mm256_and_si256(fifth, _mm256_set1_epi8(16)));
    }
    halves_of(v, lo, hi);
    if (ks) {
        *c = ks[8 + j];
        return ks[j];
    }
    uint8_t sc, mn;
    il_scale_min_k4(j, five ? b5->scales : b4->scales, &sc, &mn);
    *c = -(_cvtsh_ss(five ? b5->dmin : b4->dmin) * mn);
    return _cvtsh_ss(five ? b5->d : b4->d) * sc;
}

/* Q6_K / Q3_K sub-block b % 8 as signed values (il_block_ints), returning the block's d; sc gets
 * the integer scales of weights 0-15 and 16-31. */
IL_INLINE float k16_halves(int wtype, const uint8_t *row, int b, __m128i *lo, __m128i *hi, int sc[2]) {
    const int j = b % 8;
    if (wtype == IL_W_Q6_K) { /* half j / 4 of the block, quarter g of it: a nibble of ql, 2 bits of qh */
        const il_q6_K *k6 = (const il_q6_K *)row + b / 8;
        const int h = j / 4, g = j % 4;
        __m256i l = _mm256_loadu_si256((const __m256i *)(k6->ql + 64 * h + 32 * (g % 2)));
        if (g >= 2) l = _mm256_srli_epi16(l, 4);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(k6->qh + 32 * h));
        const __m256i top = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), _mm256_set1_epi8(3));
        l = _mm256_or_si256(_mm256_and_si256(l, _mm256_set1_epi8(0x0F)), _mm256_slli_epi16(top, 4));
        halves_of(_mm256_sub_epi8(l, _mm256_set1_epi8(32)), lo, hi);
        sc[0] = k6->scales[8 * h + 2 * g], sc[1] = k6->scales[8 * h + 2 * g + 1];
        return _cvtsh_ss(k6->d);
    }
    const il_q3_K *k3 = (const il_q3_K *)row + b / 8; /* bit pair j % 4 of half j / 4; 4 less where bit j of hmask is clear */
    const __m256i v = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(k3->qs + 32 * (j / 4))),
                                                         2 * (j % 4)), _mm256_set1_epi8(3));
    const __m256i bit = _mm256_set1_epi8((char)(1 << j));
    const __m256i hm = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)k3->hmask), bit);
    halves_of(_mm256_sub_epi8(v, _mm256_andnot_si256(_mm256_cmpeq_epi8(hm, bit), _mm256_set1_epi8(4))), lo, hi);
    sc[0] = il_q3_K_scale(k3, 2 * j), sc[1] = il_q3_K_scale(k3, 2 * j + 1);
    return _cvtsh_ss(k3->d);
}

/* Q2_K sub-block b % 8 as unsigned 2-bit values (bit pair j % 4 of half j / 4's 32 bytes), returning
 * the block's d; sc and mn get the 4-bit scales and minimums of weights 0-15 and 16-31, dmin the
 * minimums' scale: weight l = d sc[l / 16] q[l] - dmin mn[l / 16]. */
IL_INLINE float q2_K_halves(const uint8_t *row, int b, __m128i *lo, __m128i *hi, int sc[2], int mn[2], float *dmin) {
    const int j = b % 8;
    const il_q2_K *k2 = (const il_q2_K *)row + b / 8;
    const __m256i q = _mm256_loadu_si256((const __m256i *)(k2->qs + 32 * (j / 4)));
    halves_of(_mm256_and_si256(_mm256_srli_epi16(q, 2 * (j % 4)), _mm256_set1_epi8(3)), lo, hi);
    for (int s = 0; s < 2; s++) sc[s] = k2->scales[2 * j + s] & 0xF, mn[s] = k2->scales[2 * j + s] >> 4;
    *dmin = _cvtsh_ss(k2->dmin);
    return _cvtsh_ss(k2->d);
}

/* IQ4_NL block b, or IQ4_XS sub-block b % 8, as the signed values of its table (one byte shuffle a
 * half), returning its scale (IQ4_XS: from ks, k_scales of the block, where given). */
IL_INLINE float iq4_halves(int wtype, const uint8_t *row, int b, __m128i *lo, __m128i *hi, const float *ks) {
    const __m128i low4 = _mm_set1_epi8(0x0F), table = _mm_loadu_si128((const __m128i *)il_iq4_values);
    const il_iq4_nl *nl = (const il_iq4_nl *)row + b;
    const il_iq4_xs *xs = (const il_iq4_xs *)row + b / 8;
    const __m128i v = _mm_loadu_si128((const __m128i *)(wtype == IL_W_IQ4_NL ? nl->qs : xs->qs + 16 * (b % 8)));
    *lo = _mm_shuffle_epi8(table, _mm_and_si128(v, low4));
    *hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), low4));
    if (wtype == IL_W_IQ4_NL) return _cvtsh_ss(nl->d);
    return ks ? ks[b % 8] : _cvtsh_ss(xs->d) * il_iq4_xs_scale(xs, b % 8);
}
#endif
