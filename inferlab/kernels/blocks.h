/* The weight types' block layouts, ggml's (so GGUF tensors are used as they are stored), each as a
 * plain struct with a plain C dequantizer, which is the type's definition here. Included by common.h,
 * after the conversions it uses, as are regrouped.h (the AVX-512 kernel's regrouped types) and
 * int8_blocks.h (the integer view of the types the int8-activation path multiplies).
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
/* Weights per block (0 for a type this library does not know). */
static inline int il_block_elems(int wtype) {
    switch (wtype) {
        case IL_W_F32: case IL_W_F16: case IL_W_BF16: return 1;
        case IL_W_Q8_0: case IL_W_Q4_0: case IL_W_Q4_1: case IL_W_Q5_0: case IL_W_Q5_1: case IL_W_IQ4_NL: return 32;
        case IL_W_Q8_0X16: case IL_W_Q4_0X16: case IL_W_Q4_1X16: case IL_W_IQ4_NLX16: case IL_W_Q5_0X16:
        case IL_W_Q5_1X16: case IL_W_Q4_0T16: case IL_W_Q4_1T16: case IL_W_Q8_0T16: case IL_W_Q5_0T16:
        case IL_W_Q5_1T16: case IL_W_IQ4_NLT16: case IL_W_BF16X16: return 32; /* per row, as their GGUF type */
        case IL_W_Q4_K: case IL_W_Q5_K: case IL_W_Q6_K: case IL_W_Q2_K: case IL_W_Q3_K: case IL_W_IQ4_XS:
        case IL_W_Q4_KX16: case IL_W_Q5_KX16: case IL_W_Q6_KX16: case IL_W_Q3_KX16: case IL_W_Q2_KX16:
        case IL_W_IQ4_XSX16: case IL_W_Q4_KT16: case IL_W_Q6_KT16: case IL_W_Q5_KT16: case IL_W_IQ4_XST16:
        case IL_W_Q3_KT16: case IL_W_Q2_KT16: return 256;
        default: return 0;
    }
}

static inline int il_block_bytes(int wtype) {
    switch (wtype) {
        case IL_W_F32: return 4;
        case IL_W_F16: case IL_W_BF16: return 2;
        case IL_W_BF16X16: return 64;
        case IL_W_Q8_0: case IL_W_Q8_0X16: case IL_W_Q8_0T16: return sizeof(il_q8_0);
        case IL_W_Q4_0: case IL_W_Q4_0X16: case IL_W_Q4_0T16: return sizeof(il_q4_0);
        case IL_W_Q4_1: case IL_W_Q4_1X16: case IL_W_Q4_1T16: return sizeof(il_q4_1);
        case IL_W_Q5_0: case IL_W_Q5_0X16: case IL_W_Q5_0T16: return sizeof(il_q5_0);
        case IL_W_Q5_1: case IL_W_Q5_1X16: case IL_W_Q5_1T16: return sizeof(il_q5_1);
        case IL_W_Q4_K: case IL_W_Q4_KX16: case IL_W_Q4_KT16: return sizeof(il_q4_K);
        case IL_W_Q5_K: case IL_W_Q5_KX16: case IL_W_Q5_KT16: return sizeof(il_q5_K);
        case IL_W_Q6_K: case IL_W_Q6_KX16: case IL_W_Q6_KT16: return sizeof(il_q6_K);
        case IL_W_Q2_K: case IL_W_Q2_KX16: case IL_W_Q2_KT16: return sizeof(il_q2_K);
        case IL_W_Q3_K: case IL_W_Q3_KX16: case IL_W_Q3_KT16: return sizeof(il_q3_K);
        case IL_W_IQ4_NL: case IL_W_IQ4_NLX16: case IL_W_IQ4_NLT16: return sizeof(il_iq4_nl);
        case IL_W_IQ4_XS: case IL_W_IQ4_XSX16: case IL_W_IQ4_XST16: return sizeof(il_iq4_xs);
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
