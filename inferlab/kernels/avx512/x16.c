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
                      float *acc, const int fma) { /* acc: the thread's WIDE_SCRATCH floats */
    const int64_t block_bytes = group_block_bytes(kind), spb = sums_per_block(kind);
    __m512i wbuf[128] __attribute__((aligned(64))); /* 16 pair rows a group, or (fma) 32 fp32 rows */
    memset(acc, 0, sizeof(float) * 64 * R);
    for (int b = 0; b < nb; b++) {
        /* The 4 blocks' factors in the scratch just past acc, which the tiles' stores may alias: so the
         * compiler reads them from L1 where each tile scales its sums, instead of holding their 8
         * registers through the products (beside 16 sums, that spilled an input once each kind's region
         * was a function of its own: Q4_1's fp32 tiles 10% slower). */
        factors *f = (factors *)(acc + 64 * WIDE_CHUNK);
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

/* One call's arguments and scratch, as linear_x16 works them out before its parallel region. */
typedef struct {
    const void *x, *xs, *w, *bias; /* xs: x, or x widened to fp32 (xf) */
    void *y;
    float *sx, *sums, *xf;
    int64_t ldx, ldxs, ldy;
    int rows, nb, N, chunk, chunks, xf32, yf32, fma, wide, num_threads;
    tables table;
} x16_call;

/* The parallel region of one kind (a constant). Each kind's is a function of its own (x16_kind_*
 * below), not one region switching on the kind: one function holding every kind's inlined tiles took
 * GCC 1.1 GB to compile, more than a small container has. The fields are copied into locals first,
 * so the stores to y cannot alias them and the loops keep them in registers. */
IL_INLINE void x16_region(const x16_call *call, const int kind) {
    const x16_call c = *call;
    const int with_min = has_min(kind), spb = sums_per_block(kind);
    if (with_min || c.xf) {
#pragma omp for schedule(static)
        for (int r = 0; r < c.rows; r++)
            for (int b = 0; b < c.nb; b++) {
                const int64_t at = (int64_t)r * c.ldx + 32 * b;
                const __m512 lo = c.xf32 ? _mm512_loadu_ps((const float *)c.x + at) : bf16x16((const uint16_t *)c.x + at);
                const __m512 hi = c.xf32 ? _mm512_loadu_ps((const float *)c.x + at + 16)
                                         : bf16x16((const uint16_t *)c.x + at + 16);
                if (with_min) block_input_sums(lo, hi, c.sx + ((int64_t)r * c.nb + b) * spb, spb);
                if (c.xf) {
                    _mm512_storeu_ps(c.xf + (int64_t)r * c.ldxs + 32 * b, lo);
                    _mm512_storeu_ps(c.xf + (int64_t)r * c.ldxs + 32 * b + 16, hi);
                }
            }
    }
    if (c.wide) {
        float *acc = c.sums + (int64_t)WIDE_SCRATCH * omp_get_thread_num();
#pragma omp for schedule(static) collapse(2)
        for (int ch = 0; ch < c.chunks; ch++)
            for (int s = 0; s < c.N / 64; s++) {
                const int m0 = ch * c.chunk, R = c.rows - m0 < c.chunk ? c.rows - m0 : c.chunk;
                if (c.fma)
                    wide_rows(c.xs, c.ldxs, c.w, c.bias, c.xf32, c.y, c.ldy, c.yf32, c.sx, m0, R, c.nb, s, kind, c.table,
                              acc, 1);
                else
                    wide_rows(c.xs, c.ldxs, c.w, c.bias, c.xf32, c.y, c.ldy, c.yf32, c.sx, m0, R, c.nb, s, kind, c.table,
                              acc, 0);
            }
    } else {
#pragma omp for schedule(static)
        for (int g = 0; g < c.N / 16; g++) {
            if (c.fma)
                group_rows(c.xs, c.ldxs, c.w, c.bias, c.xf32, c.y, c.ldy, c.yf32, c.sx, c.rows, c.nb, g, kind, c.table, 1);
            else
                group_rows(c.xs, c.ldxs, c.w, c.bias, c.xf32, c.y, c.ldy, c.yf32, c.sx, c.rows, c.nb, g, kind, c.table, 0);
        }
    }
}

#define KIND_REGION(k)                                                        \
    static void x16_kind_##k(const x16_call *c) {                             \
        _Pragma("omp parallel num_threads(c->num_threads)") x16_region(c, k); \
    }
KIND_REGION(Q4_0)
KIND_REGION(Q4_1)
KIND_REGION(Q8_0)
KIND_REGION(Q4_K)
KIND_REGION(Q5_0)
KIND_REGION(Q5_1)
KIND_REGION(Q5_K)
KIND_REGION(Q6_K)
KIND_REGION(Q3_K)
KIND_REGION(Q2_K)
KIND_REGION(IQ4_XS)
KIND_REGION(BF16)
#undef KIND_REGION

int IL(linear_x16)(const void *x, int64_t ldx, int dtype, const void *w, int wtype, const void *bias, void *y,
                   int64_t ldy, int rows, int K, int N, int ydtype, int num_threads) {
    /* fp32 inputs always by FMAs: the pairs would round them to bf16 */
    const int nb = K / 32, xf32 = dtype == IL_F32, fma = fp32_products || xf32;
    const int kind = kind_of(wtype);
    /* many rows: chunks of rows (each thread's share, whole 4s, at most WIDE_CHUNK) x groups of 64 outputs */
    const int wide = rows >= WIDE_ROWS && N % 64 == 0;
    int chunk = ((rows + num_threads - 1) / num_threads + 3) / 4 * 4;
    const int most = fma ? WIDE_CHUNK / 2 : WIDE_CHUNK; /* fp32 x: 64 rows keep x, the sums and the weights in L1 */
    chunk = chunk > most ? most : chunk;
    /* each row's sums per block */
    float *sx = has_min(kind) ? malloc(sizeof(float) * (size_t)rows * nb * sums_per_block(kind)) : NULL;
    float *sums = wide ? aligned_alloc(64, sizeof(float) * WIDE_SCRATCH * num_threads) : NULL;
    /* bf16 x widened once for the FMAs: a product's input is a load (fp32 x is read in place) */
    float *xf = fma && !xf32 ? malloc(sizeof(float) * (size_t)rows * K) : NULL;
    if ((has_min(kind) && !sx) || (wide && !sums) || (fma && !xf32 && !xf)) {
        free(sx), free(sums), free(xf);
        return 2;
    }
    const x16_call c = {.x = x, .xs = xf ? (const void *)xf : x, .w = w, .bias = bias, .y = y, .sx = sx, .sums = sums,
                        .xf = xf, .ldx = ldx, .ldxs = xf ? K : ldx, .ldy = ldy, .rows = rows, .nb = nb, .N = N,
                        .chunk = chunk, .chunks = (rows + chunk - 1) / chunk, .xf32 = xf32, .yf32 = ydtype == IL_F32,
                        .fma = fma, .wide = wide, .num_threads = num_threads, .table = tables_of(wtype)};
#define RUN(k) x16_kind_##k(&c)
    BY_KIND(RUN);
#undef RUN
    free(sx), free(sums), free(xf);
    return 0;
}
