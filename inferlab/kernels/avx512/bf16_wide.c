/* bf16 weights past a decode step's rows (prefill) on cores whose fp32 FMAs do twice the products of
 * their bf16 pair instruction (`x16_products` chose fp32: Intel's AVX-512 cores without AMX), where
 * oneDNN's bf16 matmul is bound by those pairs. Each 4 groups of 16 weight rows are turned once per
 * call into x16.c's pair rows (a 16 x 16 transpose of 32-bit pairs a block) and widened to fp32, then
 * every input row passes through x16_fma.h's 4 x 4-group tiles: the products exact (bf16 times bf16),
 * each output one chain of FMAs per block of 32 inputs, so a row's sums are the same in any batch.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

#include "x16.h"
#include "x16_fma.h"
#include "x16_tiles.h"

/* r[i] = 16 dwords of row i -> r[j] = dword j of every row (lane i: row i's). */
IL_INLINE void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* b[4 i + j], 128-bit lane L: column 4 L + j of rows 4 i .. 4 i + 3 */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i x0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), y0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xdd);
        const __m512i x1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        const __m512i y1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(x0, x1, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(x0, x1, 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(y0, y1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(y0, y1, 0xdd);
    }
}

/* Weight rows 64 s .. 64 s + 63 as the fp32 blocks tile_wide_fma reads: block b at wbuf + 2048 b. */
static void widen_quad(const uint16_t *w, int K, int s, float *wbuf) {
    for (int b = 0; b < K / 32; b++)
        for (int g = 0; g < 4; g++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(w + (int64_t)(64 * s + 16 * g + i) * K + 32 * b);
            transpose16(r);
            spread_block((const __m512bh *)r, wbuf + 2048 * b, g);
        }
}

int IL(linear_bf16_wide)(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t ldy, int rows,
                         int K, int N, int ydtype, int num_threads) {
    const int nb = K / 32, yf32 = ydtype == IL_F32;
    float *xf = malloc(sizeof(float) * (size_t)rows * K);
    float *bufs = aligned_alloc(64, sizeof(float) * ((size_t)64 * K + 64 * ROWS_PASS) * num_threads);
    if (!xf || !bufs) {
        free(xf), free(bufs);
        return 2;
    }
    factors unit; /* no scales: each block's products added as they are (times 1, exact) */
    unit.d[0] = unit.d[1] = _mm512_set1_ps(1.f);
    unit.m[0] = unit.m[1] = _mm512_setzero_ps();
    const factors f[4] = {unit, unit, unit, unit};
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < K; k += 16)
                _mm512_storeu_ps(xf + (int64_t)r * K + k, bf16x16((const uint16_t *)x + r * ldx + k));
        float *wbuf = bufs + ((size_t)64 * K + 64 * ROWS_PASS) * omp_get_thread_num(), *acc = wbuf + (size_t)64 * K;
#pragma omp for schedule(static)
        for (int s = 0; s < N / 64; s++) {
            widen_quad(w, K, s, wbuf);
            for (int m0 = 0; m0 < rows; m0 += ROWS_PASS) {
                const int R = rows - m0 < ROWS_PASS ? rows - m0 : ROWS_PASS;
                memset(acc, 0, sizeof(float) * 64 * R);
                for (int b = 0; b < nb; b++) {
#define TILE(n) tile_wide_fma(xf + (int64_t)(m0 + i) * K + 32 * b, K, wbuf + 2048 * b, f, NULL, 0, acc + 64 * i, n, Q8_0)
                    BY_TILES(4, TILE);
#undef TILE
                }
                for (int i = 0; i < R; i++)
                    for (int g = 0; g < 4; g++)
                        store16(acc + 64 * i + 16 * g, bias, 64 * s + 16 * g, 0, y, (int64_t)(m0 + i) * ldy + 64 * s + 16 * g,
                                yf32);
            }
        }
    }
    free(xf), free(bufs);
    return 0;
}
