/* The regrouped types (IL_W_*X16: a GGUF type's blocks moved 16 weight rows at a time for the AVX-512
 * kernel; layout: avx512/x16_blocks.h) in plain C: their structs and the definition of their values,
 * which the embedding lookup and the dequantizer read on every build. Included by common.h.
 */
#ifndef INFERLAB_REGROUPED_H
#define INFERLAB_REGROUPED_H

/* The group blocks of the 32-input types */
typedef struct { uint16_t d[16], m[16]; uint16_t q[128]; } il_q4_1x16;
typedef struct { uint16_t d[16]; uint16_t q[128]; } il_q4_0x16;
typedef struct { uint16_t d[16]; int8_t q[512]; } il_q8_0x16;
typedef struct { uint16_t d[16]; uint32_t h[16]; uint16_t q[128]; } il_q5_0x16;
typedef struct { uint16_t d[16], m[16]; uint32_t h[16]; uint16_t q[128]; } il_q5_1x16;

/* Whether a type is a regrouped one (inferlab.h), which only the AVX-512 linear kernel multiplies. */
static inline int il_x16_type(int wtype) {
    return wtype == IL_W_Q4_0X16 || wtype == IL_W_Q4_1X16 || wtype == IL_W_Q8_0X16 || wtype == IL_W_IQ4_NLX16 ||
           wtype == IL_W_Q4_KX16 || wtype == IL_W_Q5_0X16 || wtype == IL_W_Q5_1X16 || wtype == IL_W_Q5_KX16 ||
           wtype == IL_W_Q6_KX16 || wtype == IL_W_Q3_KX16 || wtype == IL_W_Q2_KX16 || wtype == IL_W_IQ4_XSX16 ||
           wtype == IL_W_BF16X16;
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, the K-quants and IQ4_NL / IQ4_XS regrouped for the AMX tiles
 * (IL_W_*T16), where a tile row is 32 inputs of one weight row (under one scale; Q2_K, Q3_K, Q6_K: two,
 * one a 16 inputs): per group of 16 rows and block, the x16 structs' scale fields (Q5: then the 16 rows'
 * 32-bit fifth-bit words, row i's at 4 i; Q4_K and Q5_K: d[16], dmin[16], then their 12 scale bytes,
 * byte k of row i at 16 k + i; Q2_K: d[16], dmin[16], then its 16 scale bytes so; Q3_K: d[16], then its
 * 12 scale bytes so; Q6_K: d[16], then its 16 scale
 * bytes so; IQ4_XS: d[16], scales_h[16], then its 4 scales_l bytes so), then the low nibbles as 4 x 32
 * words, word j of quad g holding input j of rows 4g .. 4g + 3, row 4g + s in bits 4s .. 4s + 3 (Q4_K,
 * IQ4_XS: 8 sub-blocks of those; Q5_K: 8 of the rows' fifth-bit words, then those; Q6_K: 8 of the rows'
 * fifth-bit words, their sixth-bit words, then those; Q3_K: 8 of the rows' third-bit words, then the
 * low 2 bits as 2 x 32 words, word j of octet g holding input j of rows 8g .. 8g + 7, 2 bits each; Q2_K:
 * 8 of those 2-bit words), or
 * Q8_0's 16 rows' 32 bytes one row after another. IQ4_NL's is Q4_0's. */
#define IL_T16_TYPES(X)                                                                                        \
    X(IL_W_Q4_0T16) X(IL_W_Q4_1T16) X(IL_W_Q5_0T16) X(IL_W_Q5_1T16) X(IL_W_Q8_0T16) X(IL_W_Q4_KT16) X(IL_W_Q5_KT16) \
    X(IL_W_Q6_KT16) X(IL_W_IQ4_NLT16) X(IL_W_IQ4_XST16) X(IL_W_Q3_KT16) X(IL_W_Q2_KT16)
static inline int il_t16_type(int wtype) {
#define IL_IS(T) wtype == (T) ||
    return IL_T16_TYPES(IL_IS) 0;
#undef IL_IS
}

/* Whether a type is regrouped for one kernel (x16 or t16), which the other builds' linear refuses. */
static inline int il_regrouped_type(int wtype) { return il_x16_type(wtype) || il_t16_type(wtype); }

/* The value at pair row p, lane l of a regrouped block of `bits`-bit fields (4: Q4/Q5's nibbles, 2:
 * Q3_K's): field p % f of word 32 (p / f) + l, f = 16 / bits fields a word, and where `high` (16
 * 32-bit masks, or NULL) is given, bit l of mask p XOR the bit above that field in its word as the
 * next bit (Q5's fifth, Q3_K's third; avx512/x16_blocks.h says why). */
static inline int il_x16_value(const uint16_t *words, const uint16_t *high, int p, int l, int bits) {
    const int f = 16 / bits, shift = bits * (p % f);
    const unsigned word = words[32 * (p / f) + l];
    const int q = (word >> shift) & ((1 << bits) - 1);
    if (!high) return q;
    const uint32_t mask = high[2 * p] | (uint32_t)high[2 * p + 1] << 16;
    return q | (((mask >> l) ^ (word >> (shift + bits))) & 1) << bits;
}

/* Block b (inputs 32 b ..) of row n of a regrouped K-column matrix as fp32 (its layout:
 * avx512/x16_blocks.h), the definition the embedding lookup and the dequantizer read it by. Input k of
 * row i is in pair row k / 2, lane 2 i + k % 2. */
static inline void il_x16_block(int wtype, const void *w, int64_t n, int K, int b, float y[32]) {
    const int i = (int)(n % 16), per = il_block_elems(wtype);
    /* the group's block holding these inputs (a K type's 256-input one): the same bytes per row */
    const int64_t group_bytes = 16 * (int64_t)il_block_bytes(wtype);
    const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / per) + b * 32 / per) * group_bytes;
    if (wtype == IL_W_BF16X16) { /* the weights themselves, in the pair rows */
        for (int k = 0; k < 32; k++) y[k] = il_bf16_to_f32(((const uint16_t *)sb)[32 * (k / 2) + 2 * i + k % 2]);
        return;
    }
    if (wtype == IL_W_Q6_KX16) { /* d[16], scales[16][16], then per sub-block 2 x 16 masks and the words */
        const uint16_t *at = (const uint16_t *)(sb + 288 + 384 * (b % 8));
        const float d = il_f16_to_f32(((const uint16_t *)sb)[i]);
        for (int k = 0; k < 32; k++) {
            const int p = k / 2, lane = 2 * i + k % 2, sc = (int8_t)sb[32 + 16 * (2 * (b % 8) + k / 16) + i];
            const uint32_t sixth = at[32 + 2 * p] | (uint32_t)at[33 + 2 * p] << 16;
            const int q = il_x16_value(at + 64, at, p, lane, 4) | ((sixth >> lane) & 1) << 5;
            y[k] = d * sc * (q - 32);
        }
        return;
    }
    if (wtype == IL_W_Q3_KX16) { /* d[16], scales[12][16], then per sub-block 16 third-bit masks and the words */
        const uint16_t *at = (const uint16_t *)(sb + 224 + 192 * (b % 8));
        il_q3_K one = {{0}, {0}, {0}, ((const uint16_t *)sb)[i]};
        for (int k = 0; k < 12; k++) one.scales[k] = sb[32 + 16 * k + i];
        const float d = il_f16_to_f32(one.d);
        for (int k = 0; k < 32; k++)
            y[k] = d * il_q3_K_scale(&one, 2 * (b % 8) + k / 16) *
                   (il_x16_value(at + 32, at, k / 2, 2 * i + k % 2, 2) - 4);
        return;
    }
    if (wtype == IL_W_Q2_KX16) { /* d[16], dmin[16], scales[16][16], then per sub-block the words */
        const uint16_t *h = (const uint16_t *)sb, *words = (const uint16_t *)(sb + 320 + 128 * (b % 8));
        const float d = il_f16_to_f32(h[i]), dmin = il_f16_to_f32(h[16 + i]);
        for (int k = 0; k < 32; k++) {
            const uint8_t sc = sb[64 + 16 * (2 * (b % 8) + k / 16) + i];
            y[k] = d * (sc & 0xF) * il_x16_value(words, NULL, k / 2, 2 * i + k % 2, 2) - dmin * (sc >> 4);
        }
        return;
    }
    if (wtype == IL_W_IQ4_XSX16) { /* d[16], scales_h[16], scales_l[4][16], then 8 sub-blocks of words */
        il_iq4_xs one = {((const uint16_t *)sb)[i], ((const uint16_t *)sb)[16 + i], {0}, {0}};
        for (int k = 0; k < 4; k++) one.scales_l[k] = sb[64 + 16 * k + i];
        const float dl = il_f16_to_f32(one.d) * il_iq4_xs_scale(&one, b % 8);
        const uint16_t *words = (const uint16_t *)(sb + 128 + 256 * (b % 8));
        for (int k = 0; k < 32; k++) y[k] = dl * il_iq4_values[il_x16_value(words, NULL, k / 2, 2 * i + k % 2, 4)];
        return;
    }
    if (wtype == IL_W_Q4_KX16 || wtype == IL_W_Q5_KX16) {
        /* the group's 256-input block: d[16], dmin[16], scales[12][16], then 8 sub-blocks (Q5_K: each
         * its 16 fifth-bit masks, then the words) */
        const int five = wtype == IL_W_Q5_KX16, sub = five ? 320 : 256;
        const uint16_t *h = (const uint16_t *)sb, *at = (const uint16_t *)(sb + 256 + sub * (b % 8));
        uint8_t scales[12], sc, mn;
        for (int k = 0; k < 12; k++) scales[k] = sb[64 + 16 * k + i];
        il_scale_min_k4(b % 8, scales, &sc, &mn);
        const float d = il_f16_to_f32(h[i]) * sc, m = il_f16_to_f32(h[16 + i]) * mn;
        for (int k = 0; k < 32; k++)
            y[k] = d * il_x16_value(at + (five ? 32 : 0), five ? at : NULL, k / 2, 2 * i + k % 2, 4) - m;
        return;
    }
    const uint16_t *h = (const uint16_t *)sb;
    const int with_min = wtype == IL_W_Q4_1X16 || wtype == IL_W_Q5_1X16, five = wtype == IL_W_Q5_0X16 || wtype == IL_W_Q5_1X16;
    const float d = il_f16_to_f32(h[i]), m = with_min ? il_f16_to_f32(h[16 + i]) : 0.f;
    const uint16_t *fifth = h + (with_min ? 32 : 16), *words = fifth + (five ? 32 : 0);
    for (int k = 0; k < 32; k++) {
        const int p = k / 2, lane = 2 * i + k % 2;
        if (wtype == IL_W_Q8_0X16) {
            y[k] = d * ((const il_q8_0x16 *)sb)->q[32 * p + lane];
            continue;
        }
        const int q = il_x16_value(words, five ? fifth : NULL, p, lane, 4);
        y[k] = with_min ? d * q + m : five ? d * (q - 16) : wtype == IL_W_IQ4_NLX16 ? d * il_iq4_values[q] : d * (q - 8);
    }
}

/* Block b of row n of a t16 matrix as fp32: the bf16 weights it stands for, each its GGUF type's
 * value (blocks.h) rounded to bf16, which is what the AMX tiles multiply */
static inline void il_t16_block(int wtype, const void *w, int64_t n, int K, int b, float y[32]) {
    const int i = (int)(n % 16), one = wtype == IL_W_Q4_1T16;
    const int64_t at = n / 16 * (K / 32) + b;
    if (wtype == IL_W_Q4_KT16 || wtype == IL_W_Q5_KT16) { /* sub-block b % 8 of its group's 256-input block */
        const int five = wtype == IL_W_Q5_KT16, sub = five ? 320 : 256;
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * 16 * (int64_t)il_block_bytes(wtype);
        const uint8_t *at = sb + 256 + sub * (b % 8);
        const uint16_t *h = (const uint16_t *)sb, *words = (const uint16_t *)(at + (five ? 64 : 0)) + 32 * (i / 4);
        uint8_t scales[12], sc, mn;
        uint32_t fifth = 0;
        for (int k = 0; k < 12; k++) scales[k] = sb[64 + 16 * k + i];
        il_scale_min_k4(b % 8, scales, &sc, &mn);
        if (five) memcpy(&fifth, at + 4 * i, sizeof fifth);
        const float d1 = il_f16_to_f32(h[i]) * sc, m1 = il_f16_to_f32(h[16 + i]) * mn;
        for (int k = 0; k < 32; k++) {
            const int q = ((words[k] >> (4 * (i % 4))) & 0xF) | ((fifth >> k) & 1) << 4;
            y[k] = il_bf16_to_f32(il_f32_to_bf16(d1 * q - m1));
        }
        return;
    }
    if (wtype == IL_W_Q2_KT16) { /* sub-block b % 8 of its group's 256-input block: its scales 2 (b % 8) and + 1 */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * 16 * (int64_t)sizeof(il_q2_K);
        const uint16_t *h = (const uint16_t *)sb, *words = (const uint16_t *)(sb + 320 + 128 * (b % 8)) + 32 * (i / 8);
        const float d = il_f16_to_f32(h[i]), dmin = il_f16_to_f32(h[16 + i]);
        for (int k = 0; k < 32; k++) {
            const uint8_t sc = sb[64 + 16 * (2 * (b % 8) + k / 16) + i];
            const float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
            y[k] = il_bf16_to_f32(il_f32_to_bf16(dl * ((words[k] >> (2 * (i % 8))) & 3) - ml));
        }
        return;
    }
    if (wtype == IL_W_Q3_KT16) { /* sub-block b % 8 of its group's 256-input block: its scales 2 (b % 8) and + 1 */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * 16 * (int64_t)sizeof(il_q3_K);
        const uint8_t *at = sb + 224 + 192 * (b % 8);
        const uint16_t *words = (const uint16_t *)(at + 64) + 32 * (i / 8);
        il_q3_K one = {{0}, {0}, {0}, ((const uint16_t *)sb)[i]};
        for (int k = 0; k < 12; k++) one.scales[k] = sb[32 + 16 * k + i];
        const float d = il_f16_to_f32(one.d);
        uint32_t third;
        memcpy(&third, at + 4 * i, sizeof third);
        for (int k = 0; k < 32; k++) {
            const int q = ((words[k] >> (2 * (i % 8))) & 3) | ((third >> k) & 1) << 2;
            y[k] = il_bf16_to_f32(il_f32_to_bf16(d * il_q3_K_scale(&one, 2 * (b % 8) + k / 16) * (q - 4)));
        }
        return;
    }
    if (wtype == IL_W_Q6_KT16) { /* sub-block b % 8 of its group's 256-input block: its scales 2 (b % 8) and + 1 */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * 16 * (int64_t)sizeof(il_q6_K);
        const uint8_t *at = sb + 288 + 384 * (b % 8);
        const uint16_t *words = (const uint16_t *)(at + 128) + 32 * (i / 4);
        const float d = il_f16_to_f32(((const uint16_t *)sb)[i]);
        uint32_t fifth, sixth;
        memcpy(&fifth, at + 4 * i, sizeof fifth);
        memcpy(&sixth, at + 64 + 4 * i, sizeof sixth);
        for (int k = 0; k < 32; k++) {
            const int sc = (int8_t)sb[32 + 16 * (2 * (b % 8) + k / 16) + i];
            const int q = ((words[k] >> (4 * (i % 4))) & 0xF) | ((fifth >> k) & 1) << 4 | ((sixth >> k) & 1) << 5;
            y[k] = il_bf16_to_f32(il_f32_to_bf16(d * sc * (q - 32)));
        }
        return;
    }
    if (wtype == IL_W_Q5_0T16 || wtype == IL_W_Q5_1T16) { /* d[16] (m[16]), fifth bits[16], words */
        const int five1 = wtype == IL_W_Q5_1T16;
        const uint8_t *sb = (const uint8_t *)w + at * 16 * (int64_t)il_block_bytes(wtype);
        const uint16_t *h = (const uint16_t *)sb;
        const float d = il_f16_to_f32(h[i]), m = five1 ? il_f16_to_f32(h[16 + i]) : 0.f;
        uint32_t fifth;
        memcpy(&fifth, sb + (five1 ? 64 : 32) + 4 * i, sizeof fifth);
        const uint16_t *words = (const uint16_t *)(sb + (five1 ? 128 : 96)) + 32 * (i / 4);
        for (int k = 0; k < 32; k++) {
            const int q = ((words[k] >> (4 * (i % 4))) & 0xF) | ((fifth >> k) & 1) << 4;
            y[k] = il_bf16_to_f32(il_f32_to_bf16((q - (five1 ? 0 : 16)) * d + m));
        }
        return;
    }
    if (wtype == IL_W_Q8_0T16) {
        const il_q8_0x16 *blk = (const il_q8_0x16 *)w + at;
        const float d = il_f16_to_f32(blk->d[i]);
        for (int k = 0; k < 32; k++) y[k] = il_bf16_to_f32(il_f32_to_bf16(blk->q[32 * i + k] * d));
        return;
    }
    if (wtype == IL_W_IQ4_XST16) { /* sub-block b % 8 of its group's 256-input block */
        const uint8_t *sb = (const uint8_t *)w + (n / 16 * (K / 256) + b / 8) * 16 * (int64_t)sizeof(il_iq4_xs);
        il_iq4_xs one = {((const uint16_t *)sb)[i], ((const uint16_t *)sb)[16 + i], {0}, {0}};
        for (int k = 0; k < 4; k++) one.scales_l[k] = sb[64 + 16 * k + i];
        const float dl = il_f16_to_f32(one.d) * il_iq4_xs_scale(&one, b % 8);
        const uint16_t *words = (const uint16_t *)(sb + 128 + 256 * (b % 8)) + 32 * (i / 4);
        for (int k = 0; k < 32; k++) y[k] = il_bf16_to_f32(il_f32_to_bf16(dl * il_iq4_values[(words[k] >> (4 * (i % 4))) & 0xF]));
        return;
    }
    const uint16_t *h = one ? ((const il_q4_1x16 *)w + at)->d : ((const il_q4_0x16 *)w + at)->d;
    const float d = il_f16_to_f32(h[i]), m = one ? il_f16_to_f32(h[16 + i]) : 0.f;
    const uint16_t *words = h + (one ? 32 : 16) + 32 * (i / 4);
    for (int k = 0; k < 32; k++) {
        const int q = (words[k] >> (4 * (i % 4))) & 0xF;
        y[k] = il_bf16_to_f32(il_f32_to_bf16(one ? q * d + m : wtype == IL_W_IQ4_NLT16 ? d * il_iq4_values[q] : (q - 8) * d));
    }
}

/* Block b of row n of any regrouped matrix as fp32 */
static inline void il_regrouped_block(int wtype, const void *w, int64_t n, int K, int b, float y[32]) {
    if (il_t16_type(wtype))
        il_t16_block(wtype, w, n, K, b, y);
    else
        il_x16_block(wtype, w, n, K, b, y);
}
#endif
