/* The integer view of the weight types the int8-activation path multiplies (`linear` in api.h): which
 * types, their blocks as integers and scales, and the inputs quantized as llama.cpp's Q8_0 blocks.
 * The plain-C definition the ISA kernels are tested against. Included by common.h.
 */
#ifndef INFERLAB_INT8_BLOCKS_H
#define INFERLAB_INT8_BLOCKS_H

/* Whether a type's 32-weight blocks are integers under two integer scales, one per 16 weights, and
 * a float one (Q6_K, Q3_K, Q2_K): the int8 path folds the integer scales into its sums. */
static inline int il_k16_type(int wtype) { return wtype == IL_W_Q6_K || wtype == IL_W_Q3_K || wtype == IL_W_Q2_K; }

/* Whether each 16 weights also subtract an integer minimum under a second float scale (Q2_K): the
 * int8 path then sums each 16 inputs times their minimum too. */
static inline int il_k16_min_type(int wtype) { return wtype == IL_W_Q2_K; }

/* Whether the int8-activation path multiplies this type's blocks (integers under a float scale per
 * 32 weights, times an integer one per 16 for il_k16_type). */
static inline int il_int8_type(int wtype) {
    return wtype == IL_W_Q8_0 || wtype == IL_W_Q4_0 || wtype == IL_W_Q4_1 || wtype == IL_W_Q5_0 || wtype == IL_W_Q5_1 ||
           wtype == IL_W_IQ4_NL || wtype == IL_W_IQ4_XS || wtype == IL_W_Q4_K || wtype == IL_W_Q5_K ||
           il_k16_type(wtype);
}

/* Whether a linear call takes the int8-activation path: asked for (act), a type it multiplies, and
 * rows in whole 32-input blocks (else the float paths run it). */
static inline int il_int8_call(int act, int wtype, int K) {
    return act == IL_ACT_INT8 && il_int8_type(wtype) && K % 32 == 0;
}

/* Whether f is a NaN, by its bits: -ffast-math lets the compiler assume `f != f` false. */
static inline int il_is_nan(const float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7fffffffu) > 0x7f800000u;
}

/* Whether f is finite, by its bits, for the same reason. */
static inline int il_is_finite(const float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7fffffffu) < 0x7f800000u;
}

/* A row of K inputs (K a multiple of 32) as llama.cpp's Q8_0 blocks: per 32, d = max|x| / 127 and
 * q = round(x / d); s = d * (sum of q), which the blocks with a minimum need. A block holding a NaN
 * gets d = NaN (its q 0), so the NaN reaches the outputs as in the float paths (max|x| skipped it,
 * and the outputs were those of a 0 in its place). */
static inline void il_quantize_row_q8(const void *x, int dtype, int K, int8_t *q, float *d, float *s) {
    for (int b = 0; b < K / 32; b++) {
        float v[32], amax = 0.f;
        int nan = 0;
        for (int j = 0; j < 32; j++) {
            v[j] = il_ld(x, 32 * b + j, dtype), amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
            nan |= il_is_nan(v[j]);
        }
        const float scale = nan ? NAN : amax / 127.f, inv = scale != 0.f && !nan ? 1.f / scale : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) q[32 * b + j] = nan ? 0 : (int8_t)roundf(v[j] * inv), sum += q[32 * b + j];
        d[b] = scale, s[b] = scale * sum;
    }
}

/* Block b (weights 32 b ..) of a row of an int8-path type as integers: weight j = d * sc[j / 16] *
 * q[j] + c (sc = 1, 1 but for il_k16_type), or for Q2_K d * sc[j / 16] * q[j] + c * mn[j / 16]
 * (its unsigned 2-bit values, 4-bit scales and minimums, c = -dmin; mn = 0, 0 for the others). A Q4_K / Q5_K 32-weight sub-block is such a block: its
 * own scale and minimum, unsigned values; a Q6_K / Q3_K one has signed values (Q6_K's 6 bits less
 * 32, Q3_K's 3 bits less 4 where the high one is clear) under two of the block's integer scales. */
static inline void il_block_ints(int wtype, const uint8_t *row, int b, int8_t q[32], float *d, float *c, int sc[2],
                                 int mn[2]) {
    *c = 0.f, sc[0] = sc[1] = 1, mn[0] = mn[1] = 0;
    const int j = b % 8; /* a K-quant's sub-block */
    if (wtype == IL_W_Q2_K) { /* bit pair j % 4 of half j / 4's 32 bytes */
        const il_q2_K *k2 = (const il_q2_K *)row + b / 8;
        for (int l = 0; l < 32; l++) q[l] = (int8_t)((k2->qs[32 * (j / 4) + l] >> 2 * (j % 4)) & 3);
        for (int h = 0; h < 2; h++) sc[h] = k2->scales[2 * j + h] & 0xF, mn[h] = k2->scales[2 * j + h] >> 4;
        *d = il_f16_to_f32(k2->d), *c = -il_f16_to_f32(k2->dmin);
        return;
    }
    if (wtype == IL_W_Q6_K) {
        const il_q6_K *k6 = (const il_q6_K *)row + b / 8;
        const int h = j / 4, g = j % 4;
        const uint8_t *ql = k6->ql + 64 * h + 32 * (g % 2), *qh = k6->qh + 32 * h;
        for (int l = 0; l < 32; l++) q[l] = (int8_t)((((ql[l] >> 4 * (g / 2)) & 0xF) | ((qh[l] >> 2 * g) & 3) << 4) - 32);
        sc[0] = k6->scales[8 * h + 2 * g], sc[1] = k6->scales[8 * h + 2 * g + 1];
        *d = il_f16_to_f32(k6->d);
        return;
    }
    if (wtype == IL_W_Q3_K) {
        const il_q3_K *k3 = (const il_q3_K *)row + b / 8;
        const uint8_t *qs = k3->qs + 32 * (j / 4);
        for (int l = 0; l < 32; l++) q[l] = (int8_t)(((qs[l] >> 2 * (j % 4)) & 3) - (k3->hmask[l] >> j & 1 ? 0 : 4));
        sc[0] = il_q3_K_scale(k3, 2 * j), sc[1] = il_q3_K_scale(k3, 2 * j + 1);
        *d = il_f16_to_f32(k3->d);
        return;
    }
    if (wtype == IL_W_Q4_K || wtype == IL_W_Q5_K) {
        const int five = wtype == IL_W_Q5_K;
        const il_q4_K *b4 = (const il_q4_K *)row + b / 8;
        const il_q5_K *b5 = (const il_q5_K *)row + b / 8;
        const uint8_t *qs = (five ? b5->qs : b4->qs) + 32 * (j / 2);
        uint8_t sc, mn;
        il_scale_min_k4(j, five ? b5->scales : b4->scales, &sc, &mn);
        for (int l = 0; l < 32; l++) q[l] = (int8_t)(((qs[l] >> 4 * (j % 2)) & 0xF) | (five && (b5->qh[l] >> j) & 1 ? 16 : 0));
        *d = il_f16_to_f32(five ? b5->d : b4->d) * sc;
        *c = -(il_f16_to_f32(five ? b5->dmin : b4->dmin) * mn);
        return;
    }
    if (wtype == IL_W_Q8_0) {
        const il_q8_0 *blk = (const il_q8_0 *)row + b;
        memcpy(q, blk->qs, 32);
        *d = il_f16_to_f32(blk->d);
        return;
    }
    if (wtype == IL_W_IQ4_NL || wtype == IL_W_IQ4_XS) { /* the table's values are the integers */
        const il_iq4_nl *nl = (const il_iq4_nl *)row + b;
        const il_iq4_xs *xs = (const il_iq4_xs *)row + b / 8;
        const uint8_t *qs = wtype == IL_W_IQ4_NL ? nl->qs : xs->qs + 16 * j;
        for (int l = 0; l < 16; l++) q[l] = il_iq4_values[qs[l] & 0xF], q[l + 16] = il_iq4_values[qs[l] >> 4];
        *d = wtype == IL_W_IQ4_NL ? il_f16_to_f32(nl->d) : il_f16_to_f32(xs->d) * il_iq4_xs_scale(xs, j);
        return;
    }
    const int five = wtype == IL_W_Q5_0 || wtype == IL_W_Q5_1, with_min = wtype == IL_W_Q4_1 || wtype == IL_W_Q5_1;
    const uint8_t *blk = row + (int64_t)b * il_block_bytes(wtype);
    const uint16_t *scales = (const uint16_t *)blk;
    const uint8_t *qs = blk + (with_min ? 4 : 2) + (five ? 4 : 0);
    uint32_t h = 0;
    if (five) memcpy(&h, blk + (with_min ? 4 : 2), sizeof h);
    *d = il_f16_to_f32(scales[0]);
    if (with_min) *c = il_f16_to_f32(scales[1]);
    const int offset = with_min ? 0 : (five ? 16 : 8);
    for (int l = 0; l < 16; l++) {
        q[l] = (int8_t)(((qs[l] & 0xF) | (five ? ((h >> l) << 4) & 0x10 : 0)) - offset);
        q[l + 16] = (int8_t)(((qs[l] >> 4) | (five ? (h >> (l + 12)) & 0x10 : 0)) - offset);
    }
}
#endif
