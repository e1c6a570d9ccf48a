/* The linear layer on AVX512-BF16, for bf16 weights and activations at the 1 to 4 rows of a few
 * decodes: each thread streams a band of weight rows once and takes every input row's dot product
 * against it with bf16 pair instructions (fp32 sums). Everything else goes to the AVX2 kernels,
 * which this CPU also runs.
 */
#include <immintrin.h>
#include <omp.h>

#include "../common.h"

#define GEMV_MAX_ROWS 4

static inline void band(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                        int64_t ldy, int64_t n0, int64_t n1, int K, const int M) {
    const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *wr = w + n * K;
        __m512 acc[GEMV_MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * ldx + k), wv);
        }
        if (k < K) { /* masked tail: the missing pairs load as zeros */
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + k);
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * ldx + k), wv);
        }
        const float b = bias ? il_bf16_to_f32(bias[n]) : 0.f;
        for (int m = 0; m < M; m++) y[m * ldy + n] = il_f32_to_bf16(_mm512_reduce_add_ps(acc[m]) + b);
    }
}

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int act, int num_threads) {
    if (wtype != IL_W_BF16 || dtype != IL_BF16 || rows > GEMV_MAX_ROWS || rows < 1 || K % 2)
        return linear_avx2(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, act, num_threads);
#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t per = (N + nt - 1) / nt, n0 = id * per, n1 = n0 + per < N ? n0 + per : N;
        switch (rows) { /* a constant row count per call site, so the accumulators stay in registers */
            case 1: band(x, ldx, w, bias, y, ldy, n0, n1, K, 1); break;
            case 2: band(x, ldx, w, bias, y, ldy, n0, n1, K, 2); break;
            case 3: band(x, ldx, w, bias, y, ldy, n0, n1, K, 3); break;
            default: band(x, ldx, w, bias, y, ldy, n0, n1, K, 4);
        }
    }
    return 0;
}
