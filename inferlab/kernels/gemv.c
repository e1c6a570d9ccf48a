/* y = x W^T for a few rows of x (decode at small batch), bf16, on CPUs with AVX512-BF16.
 *
 * At one to four rows a linear layer is a pass over its weights; the work is reading them at
 * memory speed. Each thread streams a contiguous band of weight rows once and takes every x row's
 * dot product against it with bf16 pair instructions (fp32 sums). Built only where the compiler
 * targets AVX512-BF16; elsewhere `gemv_bf16` reports that it cannot run and PyTorch's path is used.
 */
#include <omp.h>
#include <stdint.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define MAX_ROWS 4

#if defined(__AVX512BF16__)
static inline void band(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n0, int64_t n1, int K, int N,
                        const int M) {
    const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *wr = w + n * K;
        __m512 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
        }
        if (k < K) {  /* masked tail: the missing pairs load as zeros */
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + k);
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k), wv);
        }
        for (int m = 0; m < M; m++) {
            float f = _mm512_reduce_add_ps(acc[m]);
            uint32_t u = *(uint32_t *)&f;
            u += 0x7fff + ((u >> 16) & 1);  /* round to nearest even */
            y[m * (int64_t)N + n] = (uint16_t)(u >> 16);
        }
    }
}
#endif

/* x: [M, K], w: [N, K], y: [M, N], all bf16 and contiguous; K even. Returns 0, or 1 where this
 * build has no AVX512-BF16 or M is out of range. */
int gemv_bf16(const void *x, const void *w, void *y, int M, int K, int N, int num_threads) {
#if defined(__AVX512BF16__)
    if (M < 1 || M > MAX_ROWS || K % 2) return 1;
#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t per = (N + nt - 1) / nt, n0 = id * per, n1 = n0 + per < N ? n0 + per : N;
        switch (M) {  /* a constant row count per call site, so the accumulators stay in registers */
            case 1: band(x, w, y, n0, n1, K, N, 1); break;
            case 2: band(x, w, y, n0, n1, K, N, 2); break;
            case 3: band(x, w, y, n0, n1, K, N, 3); break;
            default: band(x, w, y, n0, n1, K, N, 4);
        }
    }
    return 0;
#else
    (void)x, (void)w, (void)y, (void)M, (void)K, (void)N, (void)num_threads;
    return 1;
#endif
}
