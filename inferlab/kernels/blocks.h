/* The weight types' block layouts, ggml's (so GGUF tensors are used as they are stored), each as a
 * plain struct with a plain C dequantizer, which is the type's definition here; the regrouped types'
 * layout; and the integer view of the types the int8-activation path multiplies. Included by
 * common.h, after the conversions it uses.
 */
#ifndef INFERLAB_BLOCKS_H
#define INFERLAB_BLOCKS_H

/* The weight types' blocks: d, m are fp16 scales and minimums; qs the low bits of each weight. */
typedef struct { uint16_t d; int8_t qs[32]; } il_q8_0;
typedef struct { uint16_t d; uint8_t qs[16]; } il_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } il_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } il_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } il_q5_1;
/* K-quants: 256 weights in 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks with their own 6/8-bit scales */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } il_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } il_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } il_q6_K;
/* Q2_K / Q3_K: 16 sub-blocks of 16, 2-bit values (Q3_K: a third bit in hmask) */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } il_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } il_q3_K;
/* IQ4_NL / IQ4_XS: nibbles index a fixed non-linear table (il_iq4_values); IQ4_XS has 8 sub-blocks of
 * 32 with 6-bit scales */
typedef struct { uint16_t d; uint8_t qs[16]; } il_iq4_nl;
typedef struct { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } il_iq4_xs;
static const int8_t il_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Q3_K's scale of 16 weights i (of 16): 6 bits, the low 4 in bytes 0-7, the high 2 in bytes 8-11, offset by 32. */
static inline int il_q3_K_scale(const il_q3_K *b, int i) {
    const int lo = i < 8 ? b->scales[i] & 0xF : b->scales[i - 8] >> 4;
    return (lo | ((b->scales[8 + i % 4] >> (2 * (i / 4))) & 3) << 4) - 32;
}

/* IQ4_XS sub-block j's scale: 6 bits (4 in scales_l, 2 in scales_h), offset by 32. */
static inline int il_iq4_xs_scale(const il_iq4_xs *b, int j) {
    return (((b->scales_l[j / 2] >> 4 * (j % 2)) & 0xF) | (((b->scales_h >> 2 * j) & 3) << 4)) - 32;
}
/* 16 rows' blocks regrouped (inferlab.h; the layout is described in avx512/x16.c) */
typedef struct { uint16_t d[16], m[16]; uint16_t q[128]; } il_q4_1x16;
typedef struct { uint16_t d[16]; uint16_t q[128]; } il_q4_0x16;
typedef struct { uint16_t d[16]; int8_t q[512]; } il_q8_0x16;
typedef struct { uint16_t d[16]; uint32_t h[16]; uint16_t q[128]; } il_q5_0x16;
typedef struct { uint16_t d[16], m[16]; uint32_t h[16]; uint16_t q[128]; } il_q5_1x16;

/* Weights per block (0 for a type this library does not know). */
static inline int il_block_elems(int wtype) {
    switch (wtype) {
        case IL_W_F32: case IL_W_F16: case IL_W_BF16: return 1;
        case IL_W_Q8_0: case IL_W_Q4_0: case IL_W_Q4_1: case IL_W_Q5_0: case IL_W_Q5_1: case IL_W_IQ4_NL: return 32;
        case IL_W_Q8_0X16: case IL_W_Q4_0X16: case IL_W_Q4_1X16: case IL_W_IQ4_NLX16: case IL_W_Q5_0X16:
        case IL_W_Q5_1X16: return 32; /* per row, as their GGUF type */
        case IL_W_Q4_K: case IL_W_Q5_K: case IL_W_Q6_K: case IL_W_Q2_K: case IL_W_Q3_K: case IL_W_IQ4_XS:
        case IL_W_Q4_KX16: case IL_W_Q5_KX16: case IL_W_Q6_KX16: case IL_W_IQ4_XSX16: return 256;
        default: return 0;
    }
}

static inline int il_block_bytes(int wtype) {
    switch (wtype) {
        case IL_W_F32: return 4;
        case IL_W_F16: case IL_W_BF16: return 2;
        case IL_W_Q8_0: case IL_W_Q8_0X16: return sizeof(il_q8_0);
        case IL_W_Q4_0: case IL_W_Q4_0X16: return sizeof(il_q4_0);
        case IL_W_Q4_1: case IL_W_Q4_1X16: return sizeof(il_q4_1);
        case IL_W_Q5_0: case IL_W_Q5_0X16: return sizeof(il_q5_0);
        case IL_W_Q5_1: case IL_W_Q5_1X16: return sizeof(il_q5_1);
        case IL_W_Q4_K: case IL_W_Q4_KX16: return sizeof(il_q4_K);
        case IL_W_Q5_K: case IL_W_Q5_KX16: return sizeof(il_q5_K);
        case IL_W_Q6_K: case IL_W_Q6_KX16: return sizeof(il_q6_K);
        case IL_W_Q2_K: return sizeof(il_q2_K);
        case IL_W_Q3_K: return sizeof(il_q3_K);
        case IL_W_IQ4_NL: case IL_W_IQ4_NLX16: return sizeof(il_iq4_nl);
        case IL_W_IQ4_XS: case IL_W_IQ4_XSX16: return sizeof(il_iq4_xs);
        default: return 0;
    }
}

static inline int64_t il_row_bytes(int wtype, int K) { return (int64_t)K / il_block_elems(wtype) * il_block_bytes(wtype); }

/* Q4_K / Q5_K: sub-block j's 6-bit scale and minimum, packed in 12 bytes. */
static inline void il_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Weights 32 j .. 32 j + 31 of a Q2_K / Q3_K / IQ4_XS block as fp32: the definition of those formats,
 * a sub-block at a time so that a kernel decoding 32 weights at once needs no whole-block buffer;
 * returns 0 (writing nothing) for the other types.
 * Q2_K / Q3_K: sub-block j is bit pair j % 4 of the 32 bytes of half j / 4, under two 16-weight scales
 * (Q3_K: 6-bit ones, packed in 12 bytes; the third bit is bit j of hmask, 4 subtracted where clear). */
static inline int il_dequant_sub32(int wtype, const void *block, int j, float *y) {
    const int half = j / 4, shift = 2 * (j % 4);
    switch (wtype) {
        case IL_W_Q2_K: {
            const il_q2_K *b = block;
            const float d = il_f16_to_f32(b->d), dmin = il_f16_to_f32(b->dmin);
            const uint8_t *q = b->qs + 32 * half;
            for (int s = 0; s < 2; s++) {
                const uint8_t sc = b->scales[2 * j + s];
                const float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
                for (int l = 0; l < 16; l++) y[16 * s + l] = dl * ((q[16 * s + l] >> shift) & 3) - ml;
            }
            return 1;
        }
        case IL_W_Q3_K: {
            const il_q3_K *b = block;
            const float d = il_f16_to_f32(b->d);
            const uint8_t *q = b->qs + 32 * half, m = (uint8_t)(1 << j);
            for (int s = 0; s < 2; s++) {
                const float dl = d * il_q3_K_scale(b, 2 * j + s);
                for (int l = 0; l < 16; l++)
                    y[16 * s + l] = dl * (((q[16 * s + l] >> shift) & 3) - (b->hmask[16 * s + l] & m ? 0 : 4));
            }
            return 1;
        }
        case IL_W_IQ4_XS: {
            const il_iq4_xs *b = block;
            const float dl = il_f16_to_f32(b->d) * il_iq4_xs_scale(b, j);
            const uint8_t *q = b->qs + 16 * j;
            for (int l = 0; l < 16; l++) y[l] = dl * il_iq4_values[q[l] & 0xF], y[l + 16] = dl * il_iq4_values[q[l] >> 4];
            return 1;
        }
        default: return 0;
    }
}

/* One block of weights (il_block_elems of them) as fp32: the format's definition. */
static inline void il_dequant_block(int wtype, const void *block, float *y) {
    switch (wtype) {
        case IL_W_Q2_K: case IL_W_Q3_K: case IL_W_IQ4_XS:
            for (int j = 0; j < 8; j++) il_dequant_sub32(wtype, block, j, y + 32 * j);
            return;
        case IL_W_IQ4_NL: {
            const il_iq4_nl *b = block;
            const float d = il_f16_to_f32(b->d);
            for (int j = 0; j < 16; j++) y[j] = d * il_iq4_values[b->qs[j] & 0xF], y[j + 16] = d * il_iq4_values[b->qs[j] >> 4];
            return;
        }
        case IL_W_F32: y[0] = *(const float *)block; return;
        case IL_W_F16: y[0] = il_f16_to_f32(*(const uint16_t *)block); return;
        case IL_W_BF16: y[0] = il_bf16_to_f32(*(const uint16_t *)block); return;
        case IL_W_Q8_0: {
            const il_q8_0 *b = block;
            const float d = il_f16_to_f32(b->d);
            for (int j = 0; j < 32; j++) y[j] = b->qs[j] * d;
            return;
        }
        case IL_W_Q4_0: {
            const il_q4_0 *b = block;
            const float d = il_f16_to_f32(b->d);
            for (int j = 0; j < 16; j++) y[j] = ((b->qs[j] & 0xF) - 8) * d, y[j + 16] = ((b->qs[j] >> 4) - 8) * d;
            return;
        }
        case IL_W_Q4_1: {
            const il_q4_1 *b = block;
            const float d = il_f16_to_f32(b->d), m = il_f16_to_f32(b->m);
            for (int j = 0; j < 16; j++) y[j] = (b->qs[j] & 0xF) * d + m, y[j + 16] = (b->qs[j] >> 4) * d + m;
            return;
        }
        case IL_W_Q5_0: case IL_W_Q5_1: {
            const int one = wtype == IL_W_Q5_1;
            const il_q5_0 *b0 = block;
            const il_q5_1 *b1 = block;
            const uint8_t *qh = one ? b1->qh : b0->qh, *qs = one ? b1->qs : b0->qs;
            const float d = il_f16_to_f32(one ? b1->d : b0->d), m = one ? il_f16_to_f32(b1->m) : 0.f;
            const int bias = one ? 0 : 16;
            uint32_t h;
            memcpy(&h, qh, sizeof h);
            for (int j = 0; j < 16; j++) {
                const int hi0 = ((h >> j) << 4) & 0x10, hi1 = (h >> (j + 12)) & 0x10;
                y[j] = (((qs[j] & 0xF) | hi0) - bias) * d + m;
                y[j + 16] = (((qs[j] >> 4) | hi1) - bias) * d + m;
            }
            return;
        }
        case IL_W_Q4_K: case IL_W_Q5_K: {
            const int five = wtype == IL_W_Q5_K;
            const il_q4_K *b4 = block;
            const il_q5_K *b5 = block;
            const uint8_t *scales = five ? b5->scales : b4->scales, *q = five ? b5->qs : b4->qs, *qh = b5->qh;
            const float d = il_f16_to_f32(five ? b5->d : b4->d), dmin = il_f16_to_f32(five ? b5->dmin : b4->dmin);
            for (int c = 0; c < 4; c++, q += 32, y += 64) { /* 64 weights: low nibbles, then high */
                uint8_t sc, mn;
                il_scale_min_k4(2 * c, scales, &sc, &mn);
                const float d1 = d * sc, m1 = dmin * mn;
                il_scale_min_k4(2 * c + 1, scales, &sc, &mn);
                const float d2 = d * sc, m2 = dmin * mn;
                for (int l = 0; l < 32; l++) {
                    const int h1 = five && (qh[l] & (1 << (2 * c))) ? 16 : 0;
                    const int h2 = five && (qh[l] & (2 << (2 * c))) ? 16 : 0;
                    y[l] = d1 * ((q[l] & 0xF) + h1) - m1;
                    y[l + 32] = d2 * ((q[l] >> 4) + h2) - m2;
                }
            }
            return;
        }
        case IL_W_Q6_K: {
            const il_q6_K *b = block;
            const float d = il_f16_to_f32(b->d);
            const uint8_t *ql = b->ql, *qh = b->qh;
            const int8_t *sc = b->scales;
            for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, y += 128)
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    y[l] = d * sc[is] * (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                    y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    y[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            return;
        }
        default: return;
    }
}

/* Whether a type is a regrouped one (inferlab.h), which only the AVX-512 linear kernel multiplies. */
static inline int il_x16_type(int wtype) {
    return wtype == IL_W_Q4_0X16 || wtype == IL_W_Q4_1X16 || wtype == IL_W_Q8_0X16 || wtype == IL_W_IQ4_NLX16 ||
           wtype == IL_W_Q4_KX16 || wtype == IL_W_Q5_0X16 || wtype == IL_W_Q5_1X16 || wtype == IL_W_Q5_KX16 ||
           wtype == IL_W_Q6_KX16 || wtype == IL_W_IQ4_XSX16;
}

/* The value at pair row p, lane l of a regrouped Q4/Q5 block: nibble p % 4 of word 32 (p / 4) + l,
 * and where `fifth` (16 32-bit masks, or NULL) is given, bit l of mask p XOR the bit above that
 * nibble in its word as the fifth bit (avx512/x16.c says why). */
static inline int il_x16_value(const uint16_t *words, const uint16_t *fifth, int p, int l) {
    const unsigned word = words[32 * (p / 4) + l];
    const int q = (word >> 4 * (p % 4)) & 15;
    if (!fifth) return q;
    const uint32_t mask = fifth[2 * p] | (uint32_t)fifth[2 * p + 1] << 16;
    return q | (((mask >> l) ^ (word >> (4 * (p % 4) + 4))) & 1) << 4;
}

/* Block b (inputs 32 b ..) of row n of a regrouped K-column matrix as fp32 (its layout:
 * avx512/x16.c), the definition the embedding lookup and the dequantizer read it by. Input k of
 * row i is in pair row k / 2, lane 2 i + k % 2. */
static inline void il_x16_block(int wtype, const void *w, int64_t n, int K, int b, float y[32]) {
    const int i = (int)(n % 16);
    if (wtype == IL_W_Q6_KX16) { /* d[16], scales[16][16], then per sub-block 2 x 16 masks and the words */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * (16 * (int64_t)sizeof(il_q6_K));
        const uint16_t *at = (const uint16_t *)(sb + 288 + 384 * (b % 8));
        const float d = il_f16_to_f32(((const uint16_t *)sb)[i]);
        for (int k = 0; k < 32; k++) {
            const int p = k / 2, lane = 2 * i + k % 2, sc = (int8_t)sb[32 + 16 * (2 * (b % 8) + k / 16) + i];
            const uint32_t sixth = at[32 + 2 * p] | (uint32_t)at[33 + 2 * p] << 16;
            const int q = il_x16_value(at + 64, at, p, lane) | ((sixth >> lane) & 1) << 5;
            y[k] = d * sc * (q - 32);
        }
        return;
    }
    if (wtype == IL_W_IQ4_XSX16) { /* d[16], scales_h[16], scales_l[4][16], then 8 sub-blocks of words */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * (16 * (int64_t)sizeof(il_iq4_xs));
        il_iq4_xs one = {((const uint16_t *)sb)[i], ((const uint16_t *)sb)[16 + i], {0}, {0}};
        for (int k = 0; k < 4; k++) one.scales_l[k] = sb[64 + 16 * k + i];
        const float dl = il_f16_to_f32(one.d) * il_iq4_xs_scale(&one, b % 8);
        const uint16_t *words = (const uint16_t *)(sb + 128 + 256 * (b % 8));
        for (int k = 0; k < 32; k++) y[k] = dl * il_iq4_values[il_x16_value(words, NULL, k / 2, 2 * i + k % 2)];
        return;
    }
    if (wtype == IL_W_Q4_KX16 || wtype == IL_W_Q5_KX16) {
        /* the group's 256-input block: d[16], dmin[16], scales[12][16], then 8 sub-blocks (Q5_K: each
         * its 16 fifth-bit masks, then the words) */
        const int five = wtype == IL_W_Q5_KX16, sub = five ? 320 : 256;
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * (16 * (int64_t)il_block_bytes(wtype));
        const uint16_t *h = (const uint16_t *)sb, *at = (const uint16_t *)(sb + 256 + sub * (b % 8));
        uint8_t scales[12], sc, mn;
        for (int k = 0; k < 12; k++) scales[k] = sb[64 + 16 * k + i];
        il_scale_min_k4(b % 8, scales, &sc, &mn);
        const float d = il_f16_to_f32(h[i]) * sc, m = il_f16_to_f32(h[16 + i]) * mn;
        for (int k = 0; k < 32; k++)
            y[k] = d * il_x16_value(at + (five ? 32 : 0), five ? at : NULL, k / 2, 2 * i + k % 2) - m;
        return;
    }
    const int64_t bytes = 16 * il_block_bytes(wtype); /* a group's block: the same bytes per row */
    const uint8_t *blk = (const uint8_t *)w + (n / 16 * (K / 32) + b) * bytes;
    const uint16_t *h = (const uint16_t *)blk;
    const int with_min = wtype == IL_W_Q4_1X16 || wtype == IL_W_Q5_1X16, five = wtype == IL_W_Q5_0X16 || wtype == IL_W_Q5_1X16;
    const float d = il_f16_to_f32(h[i]), m = with_min ? il_f16_to_f32(h[16 + i]) : 0.f;
    const uint16_t *fifth = h + (with_min ? 32 : 16), *words = fifth + (five ? 32 : 0);
    for (int k = 0; k < 32; k++) {
        const int p = k / 2, lane = 2 * i + k % 2;
        if (wtype == IL_W_Q8_0X16) {
            y[k] = d * ((const il_q8_0x16 *)blk)->q[32 * p + lane];
            continue;
        }
        const int q = il_x16_value(words, five ? fifth : NULL, p, lane);
        y[k] = with_min ? d * q + m : five ? d * (q - 16) : wtype == IL_W_IQ4_NLX16 ? d * il_iq4_values[q] : d * (q - 8);
    }
}

/* Whether a type's 32-weight blocks are signed integers under two integer scales, one per 16
 * weights, and a float one (Q6_K, Q3_K): the int8 path folds the integer scales into its sums. */
static inline int il_k16_type(int wtype) { return wtype == IL_W_Q6_K || wtype == IL_W_Q3_K; }

/* Whether the int8-activation path multiplies this type's blocks (integers under a float scale per
 * 32 weights, times an integer one per 16 for il_k16_type). */
static inline int il_int8_type(int wtype) {
    return wtype == IL_W_Q8_0 || wtype == IL_W_Q4_0 || wtype == IL_W_Q4_1 || wtype == IL_W_Q5_0 || wtype == IL_W_Q5_1 ||
           wtype == IL_W_IQ4_NL || wtype == IL_W_IQ4_XS || wtype == IL_W_Q4_K || wtype == IL_W_Q5_K ||
           il_k16_type(wtype);
}

/* A row of K inputs (K a multiple of 32) as llama.cpp's Q8_0 blocks: per 32, d = max|x| / 127 and
 * q = round(x / d); s = d * (sum of q), which the blocks with a minimum need. */
static inline void il_quantize_row_q8(const void *x, int dtype, int K, int8_t *q, float *d, float *s) {
    for (int b = 0; b < K / 32; b++) {
        float v[32], amax = 0.f;
        for (int j = 0; j < 32; j++) v[j] = il_ld(x, 32 * b + j, dtype), amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
        const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) q[32 * b + j] = (int8_t)roundf(v[j] * inv), sum += q[32 * b + j];
        d[b] = scale, s[b] = scale * sum;
    }
}

/* Block b (weights 32 b ..) of a row of an int8-path type as integers: weight j = d * sc[j / 16] *
 * q[j] + c (sc = 1, 1 but for il_k16_type). A Q4_K / Q5_K 32-weight sub-block is such a block: its
 * own scale and minimum, unsigned values; a Q6_K / Q3_K one has signed values (Q6_K's 6 bits less
 * 32, Q3_K's 3 bits less 4 where the high one is clear) under two of the block's integer scales. */
static inline void il_block_ints(int wtype, const uint8_t *row, int b, int8_t q[32], float *d, float *c, int sc[2]) {
    *c = 0.f, sc[0] = sc[1] = 1;
    const int j = b % 8; /* a K-quant's sub-block */
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

/* Weights k0 .. k0 + n - 1 of one row as fp32: whole blocks, or a part of one (a 32-weight sub-block
 * of the K-quants that have their own decoder, else the block decoded whole and the part copied). */
static inline void il_dequant_span(int wtype, const uint8_t *row, int k0, int n, float *y) {
    const int be = il_block_elems(wtype), bb = il_block_bytes(wtype);
    for (int k = k0; k < k0 + n;) {
        const uint8_t *block = row + (int64_t)k / be * bb;
        const int off = k % be, left = k0 + n - k;
        if (off == 0 && left >= be) {
            il_dequant_block(wtype, block, y + (k - k0));
            k += be;
        } else if (left >= 32 && off % 32 == 0 && il_dequant_sub32(wtype, block, off / 32, y + (k - k0))) {
            k += 32;
        } else { /* part of a block: the whole block, then the part */
            float t[256];
            il_dequant_block(wtype, block, t);
            const int m = be - off < left ? be - off : left;
            memcpy(y + (k - k0), t + off, sizeof(float) * m);
            k += m;
        }
    }
}
#endif
