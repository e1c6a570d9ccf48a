/* The linear layer on AVX512-BF16, for bf16 weights and activations: tiles of up to 4 input rows
 * by 4 weight rows, each tile's 16 dot products of bf16 pairs (fp32 sums) finished together, over
 * panels of weight rows that stay in cache while every input row passes. At a few rows that
 * streams the weights once; at a batch of decodes it reuses each panel. The weights are read as
 * stored, never repacked per call as a library GEMM does (oneDNN's repacking of each layer's
 * weights, from memory, made a 64-row decode step's matmuls twice their in-cache time). One tile
 * shape and one order of sums for every row count, so a row's result never depends on its batch.
 * Everything else goes to the AVX2 kernels, which this CPU also runs.
 */
#include <immintrin.h>
#include <omp.h>

#include "../common.h"
#include "lanes.h"

#define TM 4      /* input rows per tile, at most */
#define PANEL 32  /* weight rows a thread keeps in cache while every input row passes (96 KB at K = 1536) */

/* y[m .. m+R) x [n .. n+C) of x W^T (+ bias), C <= T. R and T are constants at each call site (R x T
 * <= 16 accumulators, in registers), so one sum_lanes16 finishes the tile: 1 x 16, 2 x 8, 3 x 5 or
 * 4 x 4, the few-row shapes streaming more weight rows at once. Weight rows past C repeat the last
 * one (their sums are computed and dropped). Every output is one accumulator's lanes summed in one
 * fixed order, whatever the tile shape. */
IL_INLINE void tile(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, void *y, int f32,
                    int64_t ldy, int64_t m, int64_t n, const int R, const int T, int C, int K) {
    const uint16_t *wr[16];
    for (int j = 0; j < T; j++) wr[j] = w + (n + (j < C ? j : C - 1)) * (int64_t)K;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[16];
        for (int j = 0; j < T; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
        for (int i = 0; i < R; i++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m + i) * ldx + k);
            for (int j = 0; j < T; j++) acc[i * T + j] = _mm512_dpbf16_ps(acc[i * T + j], xv, wv[j]);
        }
    }
    if (k < K) { /* masked tail: the missing pairs load as zeros */
        const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
        __m512bh wv[16];
        for (int j = 0; j < T; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr[j] + k);
        for (int i = 0; i < R; i++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m + i) * ldx + k);
            for (int j = 0; j < T; j++) acc[i * T + j] = _mm512_dpbf16_ps(acc[i * T + j], xv, wv[j]);
        }
    }
    __m512 sum = sum_lanes16(acc); /* lane i * T + j: y[m + i][n + j] */
    if (bias) {
        float b[16] = {0};
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++) b[i * T + j] = il_bf16_to_f32(bias[n + j]);
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(b));
    }
    if (f32) { /* fp32 out: the sums as they are */
        float out[16];
        _mm512_storeu_ps(out, sum);
        for (int i = 0; i < R; i++) memcpy((float *)y + (m + i) * ldy + n, out + i * T, sizeof(float) * C);
        return;
    }
    uint16_t out[16];
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(sum)); /* nearest even, as PyTorch */
    for (int i = 0; i < R; i++) memcpy((uint16_t *)y + (m + i) * ldy + n, out + i * T, sizeof(uint16_t) * C);
}

/* The tiles of input rows m .. m+R (R <= TM) against weight rows [p, p1), with a share of the next
 * panel's lines prefetched per tile (from `line`, `per_tile` a tile) so that they are in cache when
 * it starts instead of its first input rows waiting on memory. */
IL_INLINE int64_t row_group(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, void *y,
                            int f32, int64_t ldy, int64_t m, int64_t p, int64_t p1, const int R, const int T, int K,
                            const char *next, int64_t line, int64_t per_tile, int64_t next_lines) {
    for (int64_t n = p; n < p1; n += T) {
        for (const int64_t end = line + per_tile < next_lines ? line + per_tile : next_lines; line < end; line++)
            _mm_prefetch(next + 64 * line, _MM_HINT_T1);
        tile(x, ldx, w, bias, y, f32, ldy, m, n, R, T, p1 - n < T ? (int)(p1 - n) : T, K);
    }
    return line;
}

static void gemm(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, void *y, int f32,
                 int64_t ldy, int rows, int K, int N, int num_threads) {
    const int groups = (N + 15) / 16; /* a thread's weight rows: one contiguous range, whole 16s */
#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num(), per = (groups + nt - 1) / nt;
        const int64_t n0 = (int64_t)id * per * 16, n_end = (int64_t)(id + 1) * per * 16 < N ? (id + 1) * per * 16 : N;
        for (int64_t p = n0; p < n_end; p += PANEL) {
            const int64_t p1 = p + PANEL < n_end ? p + PANEL : n_end;
            const char *next = (const char *)(w + p1 * K);
            const int64_t next_lines = ((p1 + PANEL < n_end ? p1 + PANEL : n_end) - p1) * K * 2 / 64;
            const int64_t tiles = (rows + TM - 1) / TM * ((p1 - p + 3) / 4);
            const int64_t per_tile = (next_lines + tiles - 1) / tiles;
            int64_t line = 0;
            for (int64_t m = 0; m < rows; m += TM)
                switch (rows - m < TM ? rows - m : TM) {
#define GROUP(R, T) line = row_group(x, ldx, w, bias, y, f32, ldy, m, p, p1, R, T, K, next, line, per_tile, next_lines)
                    case 1: GROUP(1, 16); break;
                    case 2: GROUP(2, 8); break;
                    case 3: GROUP(3, 5); break;
                    default: GROUP(4, 4);
#undef GROUP
                }
        }
    }
}

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (wtype != IL_W_BF16 || dtype != IL_BF16 || (ydtype != IL_BF16 && ydtype != IL_F32) || rows < 1 || K % 2)
        return linear_avx2(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
    gemm(x, ldx, w, bias, y, ydtype == IL_F32, ldy, rows, K, N, num_threads);
    return 0;
}
