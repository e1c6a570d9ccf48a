/* The linear layer for the regrouped types (IL_W_*X16: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K, Q5_K,
 * Q6_K, Q3_K, Q2_K and IQ4_XS blocks, 16 weight rows at a time, and bf16 weights in the same pair rows
 * (BF16X16); their layout and decoding: x16_blocks.h), with bf16
 * inputs, on AVX512-BF16: exact weights at the speed the blocks' bytes allow, no weight ever rounded
 * and no horizontal sums. Per block and row of x, the integer dot q . x of each of the 16 weight
 * rows sits in its own fp32 lane; it is scaled by the rows' d, and Q4_1-like types add m times the
 * block's sum of inputs (Q6_K, Q3_K, Q2_K: two parts, each times its scale; Q2_K's each adds its
 * minimum times its own 16 inputs' sum). Every input row reuses the decoded
 * block. At one row the products bound it: on Golden Cove a vdpbf16ps issues every 2 cycles, shares
 * a port with vpermw and takes 8 cycles, so one row runs two blocks' chains side by side
 * (docs/performance.md has the timings).
 *
 * Every output is one chain of pair products per block (part) and the same scaling, whatever the
 * number of rows, the tile it falls in or the thread count. Where `x16_products` chose fp32 products
 * (x16_fma.h: Intel's cores, whose vdpbf16ps runs at a quarter of the FMA rate), the same paths run
 * one chain of fp32 FMAs per block instead, on x widened once; so do fp32 inputs on every CPU (a model
 * run in fp32), which pairs would round to bf16.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

#include "x16.h"
#include "x16_fma.h"
#include "x16_tiles.h"

#ifdef __AVX512BF16__
static int fp32_products; /* x16_products: 0 (the pairs) until set at start */
#else
static const int fp32_products = 1; /* avx512f/: no pair instruction, so FMAs whatever is asked */
#endif

int IL(x16_products)(int mode, int num_threads) {
    (void)num_threads;
#ifdef __AVX512BF16__
    if (mode >= 0) fp32_products = mode != 0;
#else
    (void)mode;
#endif
    return fp32_products;
}

/* R (a constant, <= 6) rows of x, ldx apart, against one decoded block: acc[i] (16 outputs) +=
 * d * (q . x) (+ m * sum x). Rows side by side only for the independent chains. */
IL_INLINE void rows_block(const uint16_t *x, int64_t ldx, const __m512bh wv[16], const factors *f,
                          const float *sx, int64_t sx_stride, float *acc, const int R, const int kind) {
    for (int h = 0; h < parts(kind); h++) {
        __m512 p[6];
        for (int i = 0; i < R; i++) p[i] = _mm512_setzero_ps();
        for (int j = 16 / parts(kind) * h; j < 16 / parts(kind) * (h + 1); j++)
            for (int i = 0; i < R; i++) {
                int32_t pair;
                memcpy(&pair, x + i * ldx + 2 * j, sizeof pair);
                p[i] = bf16_dot(p[i], wv[j], (__m512bh)_mm512_set1_epi32(pair));
            }
        for (int i = 0; i < R; i++) {
            const float s = has_min(kind) ? sx[i * sx_stride + sum_at(kind, h)] : 0.f;
            _mm512_store_ps(acc + 16 * i, add_part(_mm512_load_ps(acc + 16 * i), p[i], f, s, kind, h));
        }
    }
}

/* One row of x against a group's blocks b and b + 1 (blk, blk + bytes): their two chains side by side,
 * so the core overlaps them (a vdpbf16ps takes 8 cycles on Golden Cove, and one row has no other
 * independent chain); the same products, scaling and order as two rows_block calls of one row. */
IL_INLINE void row_two_blocks(const uint16_t *x, const uint8_t *blk, int64_t bytes, int b, tables t,
                              const float *sx, float *acc, const int kind) {
    __m512 p0[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, p1[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 16 /* whole: each pair row's shift is then a constant, and its 64 bytes are loaded once */
    for (int j = 0; j < 16; j++) {
        int32_t x0, x1;
        memcpy(&x0, x + 2 * j, sizeof x0);
        memcpy(&x1, x + 32 + 2 * j, sizeof x1);
        const int h = j / (16 / parts(kind));
        p0[h] = bf16_dot(p0[h], pair_row(blk, kind, t, j), (__m512bh)_mm512_set1_epi32(x0));
        p1[h] = bf16_dot(p1[h], pair_row(blk + bytes, kind, t, j), (__m512bh)_mm512_set1_epi32(x1));
    }
    const int with_min = has_min(kind), spb = sums_per_block(kind);
    factors f0, f1;
    block_scales(blk, b, kind, &f0);
    block_scales(blk + bytes, b + 1, kind, &f1);
    __m512 a = _mm512_load_ps(acc);
    for (int h = 0; h < parts(kind); h++) a = add_part(a, p0[h], &f0, with_min ? sx[sum_at(kind, h)] : 0.f, kind, h);
    for (int h = 0; h < parts(kind); h++)
        a = add_part(a, p1[h], &f1, with_min ? sx[spb + sum_at(kind, h)] : 0.f, kind, h);
    _mm512_store_ps(acc, a);
}

/* x: bf16, or (fma) widened to fp32 */
IL_INLINE void group_rows(const void *x, int64_t ldx, const uint8_t *w, const void *bias, int xf32, void *y,
                       int64_t ldy, int yf32, const float *sx, int rows, int nb, int g, const int kind, tables t, const int fma) {
    const int64_t block_bytes = group_block_bytes(kind), spb = sums_per_block(kind);
    const uint8_t *w0 = w + (int64_t)g * nb * block_bytes;
    float acc[ROWS_PASS * 16] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < rows; m0 += ROWS_PASS) {
        const int R = rows - m0 < ROWS_PASS ? rows - m0 : ROWS_PASS;
        memset(acc, 0, sizeof(float) * 16 * R);
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = block_at(w0, b, kind);
            for (int64_t line = 0; line < block_bytes; line += 64) /* the group's stream, 4 blocks ahead */
                _mm_prefetch((const char *)blk + 4 * block_bytes + line, _MM_HINT_T0);
            if (fma && R == 1 && b + 4 <= nb) {
                /* and the next pass's other blocks; not bf16's (1 KB blocks, 64 fetches a pass: 6.1-6.4
                 * against 5.6-5.7 ms for the 120 layer matmuls without them, the Xeon held to avx512) */
                for (int64_t line = 0; kind != BF16 && line < 3 * block_bytes; line += 64)
                    _mm_prefetch((const char *)blk + 5 * block_bytes + line, _MM_HINT_T0);
                row_four_blocks((const float *)x + m0 * ldx + 32 * b, blk, block_at(w0, b + 1, kind) - blk, b, t,
                                sx ? sx + ((int64_t)m0 * nb + b) * spb : NULL, acc, kind);
                b += 3;
                continue;
            }
            if (!fma && R == 1 && b + 1 < nb) {
                for (int64_t line = 0; line < block_bytes; line += 64)
                    _mm_prefetch((const char *)blk + 5 * block_bytes + line, _MM_HINT_T0);
                row_two_blocks((const uint16_t *)x + m0 * ldx + 32 * b, blk, block_at(w0, b + 1, kind) - blk, b, t,
                               sx ? sx + ((int64_t)m0 * nb + b) * spb : NULL, acc, kind);
                b++;
                continue;
            }
            __m512bh wv[16];
            factors f;
            decode_block(blk, b, kind, t, wv, &f);
            const float *sxb = sx ? sx + ((int64_t)m0 * nb + b) * spb : NULL;
#define ROWS(n)                                                                                               \
    (fma ? rows_block_fma((const float *)x + (m0 + i) * ldx + 32 * b, ldx, wv, &f, sxb ? sxb + i * nb * spb : NULL, \
                          nb * spb, acc + 16 * i, n, kind)                                                     \
         : rows_block((const uint16_t *)x + (m0 + i) * ldx + 32 * b, ldx, wv, &f, sxb ? sxb + i * nb * spb : NULL,  \
                      nb * spb, acc + 16 * i, n, kind))
            BY_TILES(6, ROWS);
#undef ROWS
        }
        for (int i = 0; i < R; i++)
            store16(acc + 16 * i, bias, 16 * g, xf32, y, (int64_t)(m0 + i) * ldy + 16 * g, yf32);
    }
}

/* Many rows: 4 rows x 4 groups (64 outputs) a tile, 16 chains, the decoded blocks read from L1 as
 * the products' memory operands: a third of a load per product, where the group path above
 * broadcasts one input pair per product. Each output's sums are the group path's, in its order. */
IL_INLINE void tile_wide(const uint16_t *x, int64_t ldx, const __m512i *wbuf, const factors f[4], const float *sx,
                         int64_t sx_stride, float *acc, const int R, const int kind) {
    for (int h = 0; h < parts(kind); h++) {
        __m512 p[6][4]; /* R <= 4 where it runs; 6 for the tile dispatch's unreached cases */
        for (int i = 0; i < R; i++)
            for (int g = 0; g < 4; g++) p[i][g] = _mm512_setzero_ps();
        for (int j = 16 / parts(kind) * h; j < 16 / parts(kind) * (h + 1); j++) {
            __m512bh xb[6];
            for (int i = 0; i < R; i++) {
                int32_t pair;
                memcpy(&pair, x + i * ldx + 2 * j, sizeof pair);
                xb[i] = (__m512bh)_mm512_set1_epi32(pair);
            }
            for (int g = 0; g < 4; g++) {
                const __m512bh wv = (__m512bh)_mm512_load_si512(wbuf + 16 * g + j);
                for (int i = 0; i < R; i++) p[i][g] = bf16_dot(p[i][g], wv, xb[i]);
            }
        }
        for (int i = 0; i < R; i++)
            for (int g = 0; g < 4; g++) {
                float *at = acc + 64 * i + 16 * g;
                const float s = has_min(kind) ? sx[i * sx_stride + sum_at(kind, h)] : 0.f;
                _mm512_store_ps(at, add_part(_mm512_load_ps(at), p[i][g], f + g, s, kind, h));
            }
    }
}

/* Rows [m0, m0 + R) (R <= WIDE_CHUNK) against groups 4 s .. 4 s + 3. */
IL_INLINE void wide_rows(const void *x, int64_t ldx, const uint8_t *w, const void *bias, int xf32, void *y, int64_t ldy,
                      int yf32, const float *sx, int m0, int R, int nb, int s, const int kind, tables t,
                      float *acc, const int fma) {
    const int64_t block_bytes = group_block_bytes(kind), spb = sums_per_block(kind);
    __m512i wbuf[128] __attribute__((aligned(64))); /* 16 pair rows a group, or (fma) 32 fp32 rows */
    memset(acc, 0, sizeof(float) * 64 * R);
    for (int b = 0; b < nb; b++) {
        factors f[4];
        for (int g = 0; g < 4; g++) {
            __m512bh wv[16];
            const uint8_t *w0 = w + (int64_t)(4 * s + g) * nb * block_bytes;
            decode_block(block_at(w0, b, kind), b, kind, t, wv, f + g);
            if (fma)
                spread_block(wv, (float *)wbuf, g);
            else
                for (int j = 0; j < 16; j++) _mm512_store_si512(wbuf + 16 * g + j, (__m512i)wv[j]);
        }
        const float *sxb = sx ? sx + ((int64_t)m0 * nb + b) * spb : NULL;
#define TILE(n)                                                                                                   \
    (fma ? tile_wide_fma((const float *)x + (m0 + i) * ldx + 32 * b, ldx, (const float *)wbuf, f,                  \
                         sxb ? sxb + i * nb * spb : NULL, nb * spb, acc + 64 * i, n, kind)                         \
         : tile_wide((const uint16_t *)x + (m0 + i) * ldx + 32 * b, ldx, wbuf, f, sxb ? sxb + i * nb * spb : NULL, \
                     nb * spb, acc + 64 * i, n, kind))
        BY_TILES(4, TILE);
#undef TILE
    }
    for (int i = 0; i < R; i++)
        for (int g = 0; g < 4; g++)
            store16(acc + 64 * i + 16 * g, bias, 64 * s + 16 * g, xf32, y, (int64_t)(m0 + i) * ldy + 64 * s + 16 * g,
                    yf32);
}

int IL(linear_x16)(const void *x, int64_t ldx, int dtype, const void *w, int wtype, const void *bias, void *y,
                   int64_t ldy, int rows, int K, int N, int ydtype, int num_threads) {
    /* fp32 inputs always by FMAs: the pairs would round them to bf16 */
    const int nb = K / 32, yf32 = ydtype == IL_F32, xf32 = dtype == IL_F32, fma = fp32_products || xf32;
    const int kind = kind_of(wtype);
    const int with_min = has_min(kind);
    const tables table = tables_of(wtype);
    /* many rows: chunks of rows (each thread's share, whole 4s, at most WIDE_CHUNK) x groups of 64 outputs */
    const int wide = rows >= WIDE_ROWS && N % 64 == 0;
    int chunk = ((rows + num_threads - 1) / num_threads + 3) / 4 * 4;
    const int most = fma ? WIDE_CHUNK / 2 : WIDE_CHUNK; /* fp32 x: 64 rows keep x, the sums and the weights in L1 */
    chunk = chunk > most ? most : chunk;
    const int chunks = (rows + chunk - 1) / chunk;
    const int spb = sums_per_block(kind);
    float *sx = with_min ? malloc(sizeof(float) * (size_t)rows * nb * spb) : NULL; /* each row's sums per block */
    float *sums = wide ? aligned_alloc(64, sizeof(float) * 64 * WIDE_CHUNK * num_threads) : NULL;
    /* bf16 x widened once for the FMAs: a product's input is a load (fp32 x is read in place) */
    float *xf = fma && !xf32 ? malloc(sizeof(float) * (size_t)rows * K) : NULL;
    if ((with_min && !sx) || (wide && !sums) || (fma && !xf32 && !xf)) {
        free(sx), free(sums), free(xf);
        return 2;
    }
    const void *xs = xf ? (const void *)xf : x;
    const int64_t ldxs = xf ? K : ldx;
#pragma omp parallel num_threads(num_threads)
    {
        if (with_min || xf) {
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < nb; b++) {
                    const int64_t at = (int64_t)r * ldx + 32 * b;
                    const __m512 lo = xf32 ? _mm512_loadu_ps((const float *)x + at) : bf16x16((const uint16_t *)x + at);
                    const __m512 hi = xf32 ? _mm512_loadu_ps((const float *)x + at + 16)
                                           : bf16x16((const uint16_t *)x + at + 16);
                    if (with_min) block_input_sums(lo, hi, sx + ((int64_t)r * nb + b) * spb, spb);
                    if (xf) {
                        _mm512_storeu_ps(xf + (int64_t)r * K + 32 * b, lo);
                        _mm512_storeu_ps(xf + (int64_t)r * K + 32 * b + 16, hi);
                    }
                }
        }
        if (wide) {
            float *acc = sums + (int64_t)64 * WIDE_CHUNK * omp_get_thread_num();
#pragma omp for schedule(static) collapse(2)
            for (int c = 0; c < chunks; c++)
                for (int s = 0; s < N / 64; s++) {
                    const int m0 = c * chunk, R = rows - m0 < chunk ? rows - m0 : chunk;
#define WIDE(k) wide_rows(xs, ldxs, w, bias, xf32, y, ldy, yf32, sx, m0, R, nb, s, k, table, acc, 0)
#define WIDE_FMA(k) wide_rows(xs, ldxs, w, bias, xf32, y, ldy, yf32, sx, m0, R, nb, s, k, table, acc, 1)
                    fma ? BY_KIND(WIDE_FMA) : BY_KIND(WIDE);
#undef WIDE
#undef WIDE_FMA
                }
        } else {
#pragma omp for schedule(static)
            for (int g = 0; g < N / 16; g++) {
#define GROUP(k) group_rows(xs, ldxs, w, bias, xf32, y, ldy, yf32, sx, rows, nb, g, k, table, 0)
#define GROUP_FMA(k) group_rows(xs, ldxs, w, bias, xf32, y, ldy, yf32, sx, rows, nb, g, k, table, 1)
                fma ? BY_KIND(GROUP_FMA) : BY_KIND(GROUP);
#undef GROUP
#undef GROUP_FMA
            }
        }
    }
    free(sx), free(sums), free(xf);
    return 0;
}
