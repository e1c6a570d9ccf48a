/* The linear layer's int8-activation path on AVX2 (see `linear` in api.h): each 32 inputs of a row
 * quantized as llama.cpp's Q8_0 blocks, each 32-weight block taken as bytes (unsigned 4/5-bit values,
 * or signed ones: Q8_0's, IQ4's looked up, Q6_K's and Q3_K's less their offsets), and every block
 * product done in integers, one weight row's block in each 128-bit lane of a register: two rows
 * side by side on AVX2 (int8_pairs.h), four on AVX-512 (avx512/int8_quads.h), the block's inputs
 * broadcast to every lane. In a lane, _mm_maddubs_epi16 multiplies 16 byte pairs into 8 int16 sums;
 * for the 4/5-bit types the two halves' (weights 0-15, 16-31) sums still fit 16 bits and are added
 * before one _mm_madd_epi16 widens them to 4 int32 (Q8_0's could overflow, so each half is widened;
 * Q6_K's, Q3_K's and Q2_K's are widened times their integer scale per 16 weights); with VNNI a
 * half's byte products are one dpbusd, the same 4 int32 sums. These are converted and scaled by
 * d_w * d_x into 4 fp32 lanes per output. A block's offset or minimum (w = d q + c) enters as one
 * scalar term, c * s_x, with s_x = d_x * (sum of the inputs' q): Q4_1 and Q5_1 store (d, m) side
 * by side, so (d, m) * (d_x, s_x) is one product; Q4_0 and Q5_0 sum d * s_x and scale the sum by
 * their c / d (-8, -16: exact); Q2_K's minimum per 16 weights takes a second product, each 16
 * inputs' sum times it. Each output is computed with the same lanes and operations whatever the
 * tile it falls in (one input row or up to four), so a row's result stays the same whatever its
 * batch.
 */
#include <stdlib.h>

#include "gemm.h"
#include "halves.h"

#define I8_PANEL 24

/* Whether a type's block bytes are signed weights with no offset (Q8_0's, IQ4_NL's looked up, Q6_K's
 * and Q3_K's less their offsets), so no c * s_x term. */
IL_INLINE int signed_weights(int wtype) {
    return wtype == IL_W_Q8_0 || wtype == IL_W_IQ4_NL || wtype == IL_W_IQ4_XS || il_k16_type(wtype);
}

/* The end of a tile: out[j] lane i = the sum of acc[i][j]'s lanes plus the offsets' term corr[j]. */
IL_INLINE void finish8(__m128 acc[4][4], const __m128 corr[4], int wtype, const int R, const int C, __m128 out[4]) {
    /* c / (what corr summed): 1 for (d, m) pairs, Q4_0's -8 and Q5_0's -16 (exact scalings) */
    const float cf = wtype == IL_W_Q4_0 ? -8.f : wtype == IL_W_Q5_0 ? -16.f : 1.f;
    const __m128 zero = _mm_setzero_ps();
    for (int j = 0; j < C; j++) {
        const __m128 sums = _mm_hadd_ps(_mm_hadd_ps(acc[0][j], R > 1 ? acc[1][j] : zero),
                                        _mm_hadd_ps(R > 2 ? acc[2][j] : zero, R > 3 ? acc[3][j] : zero));
        out[j] = _mm_add_ps(sums, _mm_mul_ps(corr[j], _mm_set1_ps(cf)));
    }
}

#ifdef __AVX512BW__ /* the AVX-512 builds (avx512/int8.c and the builds that include it) */
#include "../avx512/int8_quads.h"
#define I8_ONE(T) tilerx4_quads(xq, x4, K, w, T, 1, out)
#define I8_FEW(T, R) tilerx4_quads(xq, x4, K, w, T, R, out)
#define I8_TWO(T) I8_FEW(T, 2)
#define I8_COLS(T, R) 4 /* weight rows per tile */
#else
#include "int8_pairs.h"
#define I8_ONE(T) tile1x4_pairs(xq, x4, K, w, T, out)
#define I8_FEW(T, R) tilerx2_pairs(xq, x4, K, w, T, R, out)
#define I8_TWO(T) I8_FEW(T, 2)
#define I8_COLS(T, R) ((R) == 1 ? 4 : 2)
#endif
/* One input row against four weight rows, or up to four rows against two (on AVX-512, every tile
 * against four: I8_COLS); a tile past the last weight row repeats it (the extra outputs are not
 * stored). */
#define I8_CASE(T)                                                                                           \
    case T:                                                                                                \
        switch (R) {                                                                                       \
            case 1: I8_ONE(T); break;                                                            \
            case 2: I8_TWO(T); break;                                                            \
            case 3: I8_FEW(T, 3); break;                                                         \
            default: I8_FEW(T, 4);                                                               \
        }                                                                                                  \
        break
static void tile_int8(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], int wtype, int R,
                      __m128 out[4]) {
    switch (wtype) {
        I8_CASE(IL_W_Q8_0); I8_CASE(IL_W_Q4_0); I8_CASE(IL_W_Q4_1); I8_CASE(IL_W_Q5_0); I8_CASE(IL_W_IQ4_NL);
        I8_CASE(IL_W_IQ4_XS); I8_CASE(IL_W_Q4_K); I8_CASE(IL_W_Q5_K); I8_CASE(IL_W_Q6_K); I8_CASE(IL_W_Q3_K);
        I8_CASE(IL_W_Q2_K);
        default: I8_CASE(IL_W_Q5_1);
    }
}
#undef I8_CASE
#undef I8_ONE
#undef I8_FEW
#undef I8_TWO

int IL(linear_int8)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                     int rows, int K, int N, int dtype, int ydtype, int num_threads) {
    const int nb = K / 32;
    const int64_t rb = il_row_bytes(wtype, K);
    int8_t *xq = malloc((size_t)rows * K);
    float *ds = malloc(2 * sizeof(float) * (size_t)rows * nb); /* per row: d_x then s_x, as the quantizer writes */
    float *x4 = calloc((size_t)(rows + 3) / 4 * nb * 8, sizeof(float)); /* [row / 4][block]: 4 d_x, 4 s_x */
    if (!xq || !ds || !x4) {
        free(xq), free(ds), free(x4);
        return 2;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < rows; m++) {
            float *d = ds + 2 * (int64_t)m * nb, *s = d + nb;
            il_quantize_row_q8((const char *)x + (int64_t)m * ldx * il_elem_size(dtype), dtype, K, xq + (int64_t)m * K,
                               d, s);
            for (int b = 0; b < nb; b++) {
                float *blk = x4 + ((int64_t)(m / 4) * nb + b) * 8 + m % 4;
                blk[0] = d[b], blk[4] = s[b];
            }
        }
        const int panels = (N + I8_PANEL - 1) / I8_PANEL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const int n0 = p * I8_PANEL, n1 = n0 + I8_PANEL < N ? n0 + I8_PANEL : N;
            for (int m = 0; m < rows; m += 4) {
                const int R = rows - m < 4 ? rows - m : 4, cols = I8_COLS(wtype, R);
                for (int n = n0; n < n1; n += cols) {
                    const uint8_t *wr[4];
                    for (int j = 0; j < 4; j++) wr[j] = (const uint8_t *)w + (n + j < n1 ? n + j : n1 - 1) * rb;
                    __m128 out[4];
                    tile_int8(xq + (int64_t)m * K, x4 + (int64_t)m * nb * 2, K, wr, wtype, R, out);
                    const int C = n1 - n < cols ? n1 - n : cols;
                    for (int j = 0; j < C; j++) {
                        float v[4];
                        _mm_storeu_ps(v, out[j]);
                        const float bj = bias ? il_ld(bias, n + j, dtype) : 0.f;
                        for (int i = 0; i < R; i++) il_st(y, (int64_t)(m + i) * ldy + n + j, v[i] + bj, ydtype);
                    }
                }
            }
        }
    }
    free(xq), free(ds), free(x4);
    return 0;
}
#undef I8_COLS
