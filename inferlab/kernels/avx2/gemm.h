/* The AVX2 micro-kernel both the linear layer and prefill attention run: a tile of R rows of x
 * against C rows of w, both along a contiguous inner dimension, with 12 accumulators of 8 lanes
 * (each lane summing every 8th product) summed across lanes in one fixed order at the end. */
#ifndef INFERLAB_AVX2_GEMM_H
#define INFERLAB_AVX2_GEMM_H
#include <immintrin.h>

#include "../common.h"

/* The int8-activation path (int8.c; the AVX-512 build's avx512/int8.c), which `linear` hands those
 * calls to. */
int IL(linear_int8)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                     int rows, int K, int N, int dtype, int ydtype, int num_threads);

/* The fp32 products of every weight type avx2/linear.c decodes (its `linear` hands them these calls;
 * the AVX-512 builds compile that file again as avx512/floats.c, for theirs). */
int IL(linear_floats)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                      int rows, int K, int N, int dtype, int ydtype, int num_threads);

/* Bytes ahead of a row's current block the few-row paths ask for: a few weight rows stream at once,
 * too slowly for the hardware prefetcher to run far enough ahead (measured, one core, weights in
 * DRAM: bf16 2.6 -> 4.4, Q8_0 int8 4.5 -> 6.4, Q4_1 int8 5.5 -> 6.7 Gweights/s): 8 KB reaches into
 * the next tile's rows. */
#define PREFETCH_BYTES 8192

#define MR 4 /* rows of x per call */
#define NR 3 /* rows of w per call: 12 accumulators + 3 weights + 1 input = 16 registers */

IL_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    /* lane i = the sum of the i-th argument's 8 lanes, always as ((0+1)+(2+3))+((4+5)+(6+7)) */
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* out[j] lane i = sum_k x[i][k] w[j][k], for i < R (rows) and j < C (weight rows); R, C are
 * constants at every call site, so the accumulators stay in registers. `masked` (a constant too)
 * adds the tail for K not a multiple of 8; without it K must be a multiple of 8, at least 8. */
IL_INLINE void micro(const float *x, int64_t lx, const float *w, int64_t lw, int K, const int R, const int C,
                     const int masked, __m128 out[NR]) {
    __m256 acc[MR][NR];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) acc[i][j] = _mm256_setzero_ps();
    const int K8 = K & ~7;
    if (!masked && K8 < 8) /* the caller's promise: without it the loop may not run, and the compiler */
        __builtin_unreachable(); /* keeps the accumulators on the stack to join that case */
    for (int k = 0; k < K8; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < C; j++) wv[j] = _mm256_loadu_ps(w + j * lw + k);
        for (int i = 0; i < R; i++) {
            const __m256 xv = _mm256_loadu_ps(x + i * lx + k);
            for (int j = 0; j < C; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (masked && K8 < K) { /* masked tail: both sides load zeros past K */
        const int k = K8;
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(K - k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 wv[NR];
        for (int j = 0; j < C; j++) wv[j] = _mm256_maskload_ps(w + j * lw + k, live);
        for (int i = 0; i < R; i++) {
            const __m256 xv = _mm256_maskload_ps(x + i * lx + k, live);
            for (int j = 0; j < C; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int j = 0; j < C; j++)
        out[j] = hsum4(acc[0][j], R > 1 ? acc[1][j] : zero, R > 2 ? acc[2][j] : zero, R > 3 ? acc[3][j] : zero);
}

/* The whole tile on whole 8s, the one nearly every call is, compiled on its own: with the loop sure
 * to run and no other shape's code to share an epilogue with, its 12 accumulators stay in registers
 * (the general `micro` stored and reloaded all 12 after its loop: ~5% of a tile at K = 576). */
static __attribute__((noinline)) void tile_full(const float *x, int64_t lx, const float *w, int64_t lw, int K,
                                                __m128 out[NR]) {
    micro(x, lx, w, lw, K, MR, NR, 0, out);
}

static inline void tile(const float *x, int64_t lx, const float *w, int64_t lw, int K, int R, int C, __m128 out[NR]) {
    if (R == MR && C == NR && K >= 8 && K % 8 == 0) {
        tile_full(x, lx, w, lw, K, out);
        return;
    }
#define CASE(r, c) case (r) * 4 + (c): micro(x, lx, w, lw, K, r, c, 1, out); break
    switch (R * 4 + C) {
        CASE(1, 1); CASE(1, 2); CASE(1, 3); CASE(2, 1); CASE(2, 2); CASE(2, 3);
        CASE(3, 1); CASE(3, 2); CASE(3, 3); CASE(4, 1); CASE(4, 2); default: micro(x, lx, w, lw, K, 4, 3, 1, out);
    }
#undef CASE
}

#endif
