/* AVX2's panel micro-kernel (avx2/gemm.h `micro`) at twice its width, for the AVX-512 builds'
 * linear layer where it hands a call to AVX2's paths (bf16 and f16 weights against fp32 inputs,
 * block types no regrouped kernel takes): one 512-bit register holds two input rows' 8 lanes side by
 * side, a weight row's 8 values fill both halves (a broadcast load), and each lane sums exactly the
 * products the AVX2 lane does, in its order; the same hsum4 then finishes every output. So a row's
 * result is AVX2's bit for bit at any row count, and the direct path at one or two rows (AVX2's, which
 * streams a few weight rows from memory best) gives the same outputs as these tiles.
 */
#ifndef INFERLAB_AVX512_PAIRS_H
#define INFERLAB_AVX512_PAIRS_H
#include <immintrin.h>
#include <string.h>

#include "../avx2/gemm.h"

#define PR 8 /* input rows per tile: four pairs */
#define PW 6 /* weight rows per tile: 24 accumulators, with 4 inputs and a weight 29 of 32 registers */

/* The `rows` rows of x (fp32, lx apart) as pairs: 8 values of row 2p, then the same 8 of row 2p + 1,
 * along K rounded up to 8 (zeros past K, and a missing last row zeros). Returns the pairs' stride. */
static int64_t pair_rows(const float *x, int64_t lx, int rows, int K, float *xp) {
    const int64_t K8 = (K + 7) / 8 * 8;
    for (int m = 0; m < rows; m += 2)
        for (int64_t c = 0; c < K8; c += 8)
            for (int h = 0; h < 2; h++) {
                float *to = xp + (int64_t)m * K8 + 2 * c + 8 * h;
                const int live = m + h >= rows ? 0 : K - c < 8 ? (int)(K - c) : 8;
                if (live) memcpy(to, x + (int64_t)(m + h) * lx + c, sizeof(float) * live);
                memset(to + live, 0, sizeof(float) * (8 - live));
            }
    return 2 * K8;
}

IL_INLINE __m256 high8(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }

/* out[j] lane i = sum_k x[i][k] w[j][k] for i < min(R, 4), and out[PW + j] lane i the same for row
 * 4 + i, j < C: `micro`'s sums (xp: pair_rows, lxp apart). Weight rows past C repeat the last one
 * (their sums are dropped), so only R varies between tiles. */
IL_INLINE void micro_pairs(const float *xp, int64_t lxp, const float *w, int64_t lw, int K, const int R, int C,
                           const int masked, __m128 out[2 * PW]) {
    const int P = (R + 1) / 2;
    const float *wr[PW];
    for (int j = 0; j < PW; j++) wr[j] = w + (j < C ? j : C - 1) * lw;
    __m512 acc[PR / 2][PW];
    for (int p = 0; p < P; p++)
        for (int j = 0; j < PW; j++) acc[p][j] = _mm512_setzero_ps();
    const int K8 = K & ~7;
    if (!masked && K8 < 8) __builtin_unreachable(); /* as in `micro`: the loop runs */
    for (int k = 0; k < K8; k += 8) {
        __m512 xv[PR / 2];
        for (int p = 0; p < P; p++) xv[p] = _mm512_loadu_ps(xp + p * lxp + 2 * k);
        for (int j = 0; j < PW; j++) {
            const __m512 wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(wr[j] + k));
            for (int p = 0; p < P; p++) acc[p][j] = _mm512_fmadd_ps(xv[p], wv, acc[p][j]);
        }
    }
    if (masked && K8 < K) { /* the tail: zeros past K on both sides, as `micro` loads them */
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(K - K8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int j = 0; j < PW; j++) {
            const __m512 wv = _mm512_broadcast_f32x8(_mm256_maskload_ps(wr[j] + K8, live));
            for (int p = 0; p < P; p++)
                acc[p][j] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + p * lxp + 2 * K8), wv, acc[p][j]);
        }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int h = 0; h < (R > 4 ? 2 : 1); h++) /* rows 4 h .. 4 h + 3: pairs 2 h and 2 h + 1 */
        for (int j = 0; j < C; j++) {
            const int r = R - 4 * h, a = 2 * h, b = 2 * h + 1 < P ? 2 * h + 1 : a;
            out[h * PW + j] = hsum4(_mm512_castps512_ps256(acc[a][j]), r > 1 ? high8(acc[a][j]) : zero,
                                    r > 2 ? _mm512_castps512_ps256(acc[b][j]) : zero, r > 3 ? high8(acc[b][j]) : zero);
        }
}

/* The whole tile on whole 8s, compiled on its own as `tile_full` is (its accumulators stay in registers). */
static __attribute__((noinline)) void pairs_full(const float *xp, int64_t lxp, const float *w, int64_t lw, int K,
                                                 __m128 out[2 * PW]) {
    micro_pairs(xp, lxp, w, lw, K, PR, PW, 0, out);
}

static inline void tile_pairs(const float *xp, int64_t lxp, const float *w, int64_t lw, int K, int R, int C,
                              __m128 out[2 * PW]) {
    if (R == PR && C == PW && K >= 8 && K % 8 == 0) {
        pairs_full(xp, lxp, w, lw, K, out);
        return;
    }
    switch (R) {
#define CASE(r) case r: micro_pairs(xp, lxp, w, lw, K, r, C, 1, out); break
        CASE(1); CASE(2); CASE(3); CASE(4); CASE(5); CASE(6); CASE(7);
        default: micro_pairs(xp, lxp, w, lw, K, PR, C, 1, out);
#undef CASE
    }
}

#endif
