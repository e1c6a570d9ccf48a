/* The linear layer on AVX-512 for float weights: bf16 weights with bf16 inputs (bf16 pair
 * products, fp32 sums), or fp32 weights with fp32 or bf16 inputs (fp32 FMAs, bf16 widened). Tiles
 * of up to 4 input rows by up to 16 weight rows, each tile's 16 dot products finished together,
 * over panels of weight rows that stay in cache while every input row passes. At a few rows that
 * streams the weights once; at a batch of decodes it reuses each panel. The weights are read as
 * stored, never repacked per call as a library GEMM does (oneDNN's repacking of each layer's
 * weights, from memory, made a 64-row decode step's matmuls twice their in-cache time). One order
 * of sums for every row count, so a row's result never depends on its batch. The regrouped Q4
 * types go to x16.c; other block types, and bf16 or f16 weights against fp32 inputs, to AVX2's paths
 * compiled for AVX-512 (floats.c: the same outputs, its panels at twice the width).
 */
#include <immintrin.h>
#include <omp.h>

#include "../avx2/gemm.h" /* IL(linear_int8), from avx512/int8.c */
#include "../common.h"
#include "lanes.h"
#include "x16.h"

#define TM 4      /* input rows per tile, at most */
#define PANEL 32  /* weight rows a thread keeps in cache while every input row passes (96 KB at K = 1536 bf16) */

/* Weight and input formats of a tile (constants at each call site). */
enum { BF16_PAIRS, F32_X16, F32_X32 }; /* bf16 x bf16; fp32 weights x bf16 inputs; fp32 x fp32 */

/* 16 inputs from x + i as fp32: bf16 widened (shifted into the high half), or fp32 as is; the first
 * `left` of them (the rest zeros) where `full` is 0. */
IL_INLINE __m512 inputs16(const void *x, int64_t i, const int fmt, const int full, int left) {
    const __mmask16 live = (__mmask16)((1u << left) - 1);
    if (fmt == F32_X16) {
        const uint16_t *p = (const uint16_t *)x + i;
        const __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(live, p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return full ? _mm512_loadu_ps((const float *)x + i) : _mm512_maskz_loadu_ps(live, (const float *)x + i);
}

/* Bias, rounding and stores of a finished tile: lane i * T + j of sum_lanes16(acc) is y[m + i][n + j]
 * (bias and y in bf16, or fp32 where `bias_f32` / `yf32`). */
IL_INLINE void finish(__m512 acc[16], const void *bias, int bias_f32, void *y, int yf32, int64_t ldy, int64_t m,
                      int64_t n, const int R, const int T, int C) {
    __m512 sum = sum_lanes16(acc);
    if (bias) {
        float b[16] = {0};
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++)
                b[i * T + j] = bias_f32 ? ((const float *)bias)[n + j] : il_bf16_to_f32(((const uint16_t *)bias)[n + j]);
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(b));
    }
    if (yf32) { /* fp32 out: the sums as they are */
        float out[16];
        _mm512_storeu_ps(out, sum);
        for (int i = 0; i < R; i++) memcpy((float *)y + (m + i) * ldy + n, out + i * T, sizeof(float) * C);
        return;
    }
    uint16_t out[16];
    _mm256_storeu_si256((__m256i *)out, bf16_round16(sum)); /* nearest even, as PyTorch */
    for (int i = 0; i < R; i++) memcpy((uint16_t *)y + (m + i) * ldy + n, out + i * T, sizeof(uint16_t) * C);
}

/* y[m .. m+R) x [n .. n+C) of x W^T (+ bias), C <= T. R and T are constants at each call site (R x T
 * <= 16 accumulators, in registers), so one sum_lanes16 finishes the tile: 1 x 16, 2 x 8, 3 x 5 or
 * 4 x 4, the few-row shapes streaming more weight rows at once. Weight rows past C repeat the last
 * one (their sums are computed and dropped). Every output is one accumulator's lanes summed in one
 * fixed order, whatever the tile shape. This one: bf16 weights and inputs, 32 pairs a step. */
IL_INLINE void tile_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, const void *bias, void *y, int yf32,
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
            for (int j = 0; j < T; j++) acc[i * T + j] = bf16_dot(acc[i * T + j], xv, wv[j]);
        }
    }
    if (k < K) { /* masked tail: the missing pairs load as zeros */
        const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
        __m512bh wv[16];
        for (int j = 0; j < T; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr[j] + k);
        for (int i = 0; i < R; i++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m + i) * ldx + k);
            for (int j = 0; j < T; j++) acc[i * T + j] = bf16_dot(acc[i * T + j], xv, wv[j]);
        }
    }
    finish(acc, bias, 0, y, yf32, ldy, m, n, R, T, C);
}

/* One step of tile_f32: 16 values from k, the first `left` where `full` is 0 (the rest zeros).
 * Whole steps load without a mask, so the weights go straight into the multiply-adds. */
IL_INLINE void f32_step(__m512 acc[16], const void *x, int64_t ldx, const float *const wr[16], int64_t m, int k,
                        const int R, const int T, const int fmt, const int full, int left) {
    const __mmask16 live = (__mmask16)((1u << left) - 1);
    __m512 xv[TM];
    for (int i = 0; i < R; i++) xv[i] = inputs16(x, (m + i) * ldx + k, fmt, full, left);
    for (int j = 0; j < T; j++) {
        const __m512 wv = full ? _mm512_loadu_ps(wr[j] + k) : _mm512_maskz_loadu_ps(live, wr[j] + k);
        for (int i = 0; i < R; i++) acc[i * T + j] = _mm512_fmadd_ps(xv[i], wv, acc[i * T + j]);
    }
}

/* The same as tile_bf16 with fp32 weights, inputs fp32 or bf16 (widened; fmt), 16 values a step. */
IL_INLINE void tile_f32(const void *x, int64_t ldx, const float *w, const void *bias, void *y, int yf32,
                        int64_t ldy, int64_t m, int64_t n, const int R, const int T, int C, int K, const int fmt) {
    const float *wr[16];
    for (int j = 0; j < T; j++) wr[j] = w + (n + (j < C ? j : C - 1)) * (int64_t)K;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) f32_step(acc, x, ldx, wr, m, k, R, T, fmt, 1, 16);
    if (k < K) f32_step(acc, x, ldx, wr, m, k, R, T, fmt, 0, K - k);
    finish(acc, bias, fmt == F32_X32, y, yf32, ldy, m, n, R, T, C);
}

/* The tiles of input rows m .. m+R (R <= TM) against weight rows [p, p1), with a share of the next
 * panel's lines prefetched per tile (from `line`, `per_tile` a tile) so that they are in cache when
 * it starts instead of its first input rows waiting on memory. */
IL_INLINE int64_t row_group(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int yf32,
                            int64_t ldy, int64_t m, int64_t p, int64_t p1, const int R, const int T, int K,
                            const int fmt, const char *next, int64_t line, int64_t per_tile, int64_t next_lines) {
    for (int64_t n = p; n < p1; n += T) {
        for (const int64_t end = line + per_tile < next_lines ? line + per_tile : next_lines; line < end; line++)
            _mm_prefetch(next + 64 * line, _MM_HINT_T1);
        const int C = p1 - n < T ? (int)(p1 - n) : T;
        if (fmt == BF16_PAIRS)
            tile_bf16(x, ldx, w, bias, y, yf32, ldy, m, n, R, T, C, K);
        else
            tile_f32(x, ldx, w, bias, y, yf32, ldy, m, n, R, T, C, K, fmt);
    }
    return line;
}

IL_INLINE void gemm(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int yf32, int64_t ldy,
                    int rows, int K, int N, int num_threads, const int fmt) {
    const int groups = (N + 15) / 16; /* a thread's weight rows: one contiguous range, whole 16s */
    const int64_t row_bytes = (int64_t)K * (fmt == BF16_PAIRS ? 2 : 4);
#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num(), per = (groups + nt - 1) / nt;
        const int64_t n0 = (int64_t)id * per * 16, n_end = (int64_t)(id + 1) * per * 16 < N ? (id + 1) * per * 16 : N;
        for (int64_t p = n0; p < n_end; p += PANEL) {
            const int64_t p1 = p + PANEL < n_end ? p + PANEL : n_end;
            const char *next = (const char *)w + p1 * row_bytes;
            const int64_t next_lines = ((p1 + PANEL < n_end ? p1 + PANEL : n_end) - p1) * row_bytes / 64;
            const int64_t tiles = (rows + TM - 1) / TM * ((p1 - p + 3) / 4);
            const int64_t per_tile = (next_lines + tiles - 1) / tiles;
            int64_t line = 0;
            for (int64_t m = 0; m < rows; m += TM)
                switch (rows - m < TM ? rows - m : TM) {
#define GROUP(R, T) \
    line = row_group(x, ldx, w, bias, y, yf32, ldy, m, p, p1, R, T, K, fmt, next, line, per_tile, next_lines)
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
    const int out_ok = ydtype == dtype || ydtype == IL_F32, yf32 = ydtype == IL_F32;
    if (il_x16_type(wtype)) {
        if (rows <= 0) return 0;
        if (!out_ok || K % 32 || N % 16) return 1;
        return IL(linear_x16)(x, ldx, dtype, w, wtype, bias, y, ldy, rows, K, N, ydtype, num_threads);
    }
    /* a prefill where FMAs out-run the pair products (x16_products: fp32, Intel's cores): bf16_wide.c */
    if (out_ok && rows > IL_MAX_ROWS && wtype == IL_W_BF16 && dtype == IL_BF16 && K % 32 == 0 && N % 64 == 0 &&
        IL(x16_products)(-1, 1) == 1)
        return IL(linear_bf16_wide)(x, ldx, w, bias, y, ldy, rows, K, N, ydtype, num_threads);
    if (out_ok && rows > 0 && wtype == IL_W_BF16 && dtype == IL_BF16 && K % 2 == 0)
        gemm(x, ldx, w, bias, y, yf32, ldy, rows, K, N, num_threads, BF16_PAIRS);
    else if (out_ok && rows > 0 && wtype == IL_W_F32 && dtype == IL_BF16)
        gemm(x, ldx, w, bias, y, yf32, ldy, rows, K, N, num_threads, F32_X16);
    else if (out_ok && rows > 0 && wtype == IL_W_F32 && dtype == IL_F32)
        gemm(x, ldx, w, bias, y, yf32, ldy, rows, K, N, num_threads, F32_X32);
    else if (il_int8_call(act, wtype, K))
        return IL(linear_int8)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    else if (il_block_elems(wtype)) /* AVX2's paths, its panels at 512 bits (floats.c) */
        return IL(linear_floats)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    else
        return linear_avx2(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
    return 0;
}
