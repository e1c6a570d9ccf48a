/* The linear layer's int8-activation path on AVX2 (see `linear` in api.h): each 32 inputs of a row
 * quantized as llama.cpp's Q8_0 blocks, each 32-weight block taken as bytes (unsigned 4/5-bit values,
 * or Q8_0's signed ones), and every block product done in integers: _mm256_maddubs_epi16 multiplies
 * the 32 byte pairs into 16 int16 sums, _mm256_madd_epi16 into 8 int32, which are converted and
 * scaled by d_w * d_x into 8 fp32 lanes per output. A block's offset or minimum (w = d q + c) enters
 * as one scalar term, c * s_x, with s_x = d_x * (sum of the inputs' q). About a third of the
 * instructions per weight of the fp32 path, which is what one request's decode is bound by here.
 * Each output is computed the same way whatever the tile it falls in, as in the fp32 path.
 */
#include <stdlib.h>

#include "gemm.h"

#define I8_PANEL 24

/* 16 bytes of nibble pairs as 32 bytes: the 16 low nibbles, then the 16 high ones. */
IL_INLINE __m256i low_nibbles(__m128i v) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
}

/* Byte j of the result is 0x10 where bit j of h is set (the fifth bit of Q5 weight j). */
IL_INLINE __m256i fifth_bits8(uint32_t h) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                               _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                  0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

/* Block b of a row as 32 bytes, its scale d and its offset c (weight j = d * byte j + c). */
IL_INLINE __m256i block_bytes(int wtype, const uint8_t *row, int b, float *d, float *c) {
    switch (wtype) {
        case IL_W_Q8_0: {
            const il_q8_0 *blk = (const il_q8_0 *)row + b;
            *d = _cvtsh_ss(blk->d), *c = 0.f;
            return _mm256_loadu_si256((const __m256i *)blk->qs);
        }
        case IL_W_Q4_0: case IL_W_Q4_1: {
            const il_q4_1 *b1 = (const il_q4_1 *)row + b;
            const il_q4_0 *b0 = (const il_q4_0 *)row + b;
            const int one = wtype == IL_W_Q4_1;
            *d = _cvtsh_ss(one ? b1->d : b0->d);
            *c = one ? _cvtsh_ss(b1->m) : -8.f * *d;
            return low_nibbles(_mm_loadu_si128((const __m128i *)(one ? b1->qs : b0->qs)));
        }
        default: { /* Q5_0, Q5_1 */
            const il_q5_1 *b1 = (const il_q5_1 *)row + b;
            const il_q5_0 *b0 = (const il_q5_0 *)row + b;
            const int one = wtype == IL_W_Q5_1;
            uint32_t h;
            memcpy(&h, one ? b1->qh : b0->qh, sizeof h);
            *d = _cvtsh_ss(one ? b1->d : b0->d);
            *c = one ? _cvtsh_ss(b1->m) : -16.f * *d;
            return _mm256_or_si256(low_nibbles(_mm_loadu_si128((const __m128i *)(one ? b1->qs : b0->qs))),
                                   fifth_bits8(h));
        }
    }
}

/* 8 lanes whose sum is the integer dot product of a block's 32 bytes with 32 int8 inputs. */
IL_INLINE __m256 dot32(__m256i wq, __m256i xq, int signed_w) {
    const __m256i pairs = signed_w ? _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq))
                                   : _mm256_maddubs_epi16(wq, xq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* out[j] lane i = row i of x against weight row j, for i < R and j < C (constants at each call). */
IL_INLINE void tile8(const int8_t *xq, const float *xd, const float *xs, int K, const uint8_t *const w[4], int wtype,
                     const int R, const int C, __m128 out[4]) {
    __m256 acc[4][4];
    float corr[4][4] = {{0}};
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) acc[i][j] = _mm256_setzero_ps();
    const int nb = K / 32;
    const int bb = il_block_bytes(wtype);
    for (int b = 0; b < nb; b++)
        for (int j = 0; j < C; j++) {
            float d, c;
            _mm_prefetch((const char *)w[j] + (int64_t)b * bb + PREFETCH_BYTES, _MM_HINT_T0);
            const __m256i wq = block_bytes(wtype, w[j], b, &d, &c);
            for (int i = 0; i < R; i++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)i * K + 32 * b));
                acc[i][j] = _mm256_fmadd_ps(dot32(wq, x, wtype == IL_W_Q8_0), _mm256_set1_ps(d * xd[i * nb + b]),
                                            acc[i][j]);
                corr[i][j] += c * xs[i * nb + b];
            }
        }
    const __m256 zero = _mm256_setzero_ps();
    for (int j = 0; j < C; j++)
        out[j] = _mm_add_ps(hsum4(acc[0][j], R > 1 ? acc[1][j] : zero, R > 2 ? acc[2][j] : zero, R > 3 ? acc[3][j] : zero),
                            _mm_setr_ps(corr[0][j], corr[1][j], corr[2][j], corr[3][j]));
}

/* One input row against four weight rows, or up to four rows against two; a tile past the last
 * weight row repeats it (the extra outputs are not stored). */
#define I8_CASE(T)                                                                                           \
    case T:                                                                                                \
        switch (R) {                                                                                       \
            case 1: tile8(xq, xd, xs, K, w, T, 1, 4, out); break;                                          \
            case 2: tile8(xq, xd, xs, K, w, T, 2, 2, out); break;                                          \
            case 3: tile8(xq, xd, xs, K, w, T, 3, 2, out); break;                                          \
            default: tile8(xq, xd, xs, K, w, T, 4, 2, out);                                                \
        }                                                                                                  \
        break
static void tile_int8(const int8_t *xq, const float *xd, const float *xs, int K, const uint8_t *const w[4], int wtype,
                      int R, __m128 out[4]) {
    switch (wtype) { I8_CASE(IL_W_Q8_0); I8_CASE(IL_W_Q4_0); I8_CASE(IL_W_Q4_1); I8_CASE(IL_W_Q5_0); default: I8_CASE(IL_W_Q5_1); }
}
#undef I8_CASE

int linear_int8_avx2(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                     int rows, int K, int N, int dtype, int num_threads) {
    const int nb = K / 32;
    const int64_t rb = il_row_bytes(wtype, K);
    int8_t *xq = malloc((size_t)rows * K);
    float *xd = malloc(sizeof(float) * (size_t)rows * nb), *xs = malloc(sizeof(float) * (size_t)rows * nb);
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return 2;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < rows; m++)
            il_quantize_row_q8((const char *)x + (int64_t)m * ldx * il_elem_size(dtype), dtype, K, xq + (int64_t)m * K,
                               xd + (int64_t)m * nb, xs + (int64_t)m * nb);
        const int panels = (N + I8_PANEL - 1) / I8_PANEL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const int n0 = p * I8_PANEL, n1 = n0 + I8_PANEL < N ? n0 + I8_PANEL : N;
            for (int m = 0; m < rows; m += 4) {
                const int R = rows - m < 4 ? rows - m : 4, cols = R == 1 ? 4 : 2;
                for (int n = n0; n < n1; n += cols) {
                    const uint8_t *wr[4];
                    for (int j = 0; j < 4; j++) wr[j] = (const uint8_t *)w + (n + j < n1 ? n + j : n1 - 1) * rb;
                    __m128 out[4];
                    tile_int8(xq + (int64_t)m * K, xd + (int64_t)m * nb, xs + (int64_t)m * nb, K, wr, wtype, R, out);
                    const int C = n1 - n < cols ? n1 - n : cols;
                    for (int j = 0; j < C; j++) {
                        float v[4];
                        _mm_storeu_ps(v, out[j]);
                        const float bj = bias ? il_ld(bias, n + j, dtype) : 0.f;
                        for (int i = 0; i < R; i++) il_st(y, (int64_t)(m + i) * ldy + n + j, v[i] + bj, dtype);
                    }
                }
            }
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}
