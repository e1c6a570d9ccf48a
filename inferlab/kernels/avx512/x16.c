/* The linear layer for Q4_0 / Q4_1 weights regrouped 16 rows at a time (IL_W_Q4_0X16, IL_W_Q4_1X16),
 * with bf16 inputs, on AVX512-BF16: exact weights at the speed the blocks' bytes allow.
 *
 * Layout, made at load from the GGUF blocks (quant.py's `repack`), the same bytes per row: groups of
 * 16 weight rows in row order, each one block of 32 inputs after another along K. A group's block
 * holds the 16 rows' fp16 scales d[16], Q4_1's minimums m[16], then 128 16-bit words: nibble j of
 * word 32 c + i is the 4-bit value of row i / 2 at input 2 (4 c + j) + i % 2 of the block. So one
 * 64-byte load and a shift give, per `vpermw` through a table of the exact bf16 integers, the
 * 16 rows' next two inputs side by side in the 32 bf16 lanes, where `vdpbf16ps` against the
 * input pair broadcast yields each row's dot product in its own fp32 lane: no horizontal sums,
 * no weight ever rounded. Per block and row of x, the integer dot q . x is scaled by the rows'
 * d, and Q4_1 adds m times the block's sum of inputs. A weight costs 1/8 of a permute at one row
 * (the int-to-bf16 table replaces the shifts, masks and conversions of widening to fp32), so a
 * few rows stream the 4.5-bit weights at memory speed, and every input row reuses the decoded block.
 *
 * Every output is one chain of 16 pair products per block and the same scaling, whatever the number
 * of rows, the tile it falls in or the thread count.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

#include "../common.h"
#include "x16.h"

#define ROWS_PASS 64   /* input rows whose 16 sums stay in L1 while a group's blocks pass */
#define WIDE_ROWS 32   /* rows from which the 4 x 4-group tiles run */
#define WIDE_CHUNK 128 /* rows a wide tile pass keeps in cache (x: 384 KB at K = 1536; sums: 32 KB) */

/* A block's 16 pair rows as exact bf16 values: the table maps each nibble to bf16(q) (Q4_1) or
 * bf16(q - 8) (Q4_0); vpermw reads 5 index bits, so the table repeats and the bit above is free. */
IL_INLINE void decode16(const uint16_t *q, __m512i table, __m512bh wv[16]) {
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_loadu_si512(q + 32 * c);
        wv[4 * c] = (__m512bh)_mm512_permutexvar_epi16(v, table);
        wv[4 * c + 1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        wv[4 * c + 2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
        wv[4 * c + 3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
    }
}

/* Rows 0 .. R as tiles of `most` rows (a constant, <= 6), then one of the rest: CALL(n), n a constant,
 * for the tile at row i. */
#define BY_TILES(most, CALL)                                                        \
    do {                                                                            \
        int i = 0;                                                                  \
        for (; i + (most) <= R; i += (most)) CALL(most);                            \
        switch (R - i) {                                                            \
            case 5: CALL(5); break;                                                 \
            case 4: CALL(4); break;                                                 \
            case 3: CALL(3); break;                                                 \
            case 2: CALL(2); break;                                                 \
            case 1: CALL(1); break;                                                 \
            default: break;                                                         \
        }                                                                           \
    } while (0)

/* A block group's 16 pair rows decoded, its scales (and Q4_1's minimums) as fp32. */
IL_INLINE void decode_block(const uint8_t *blk, const int has_min, __m512i table, __m512bh wv[16], __m512 *dv,
                            __m512 *mv) {
    const uint16_t *d = (const uint16_t *)blk;
    decode16(d + (has_min ? 32 : 16), table, wv);
    *dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
    *mv = has_min ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + 16))) : *dv;
}

/* R (a constant, <= 6) rows of x, ldx apart, against one decoded block: acc[i] (16 outputs) +=
 * d * (q . x) (+ m * sum x). Rows side by side only for the independent chains. */
IL_INLINE void rows_block(const uint16_t *x, int64_t ldx, const __m512bh wv[16], __m512 dv, __m512 mv,
                          const float *sx, int64_t sx_stride, float *acc, const int R, const int has_min) {
    __m512 p[6];
    for (int i = 0; i < R; i++) p[i] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < R; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * j, sizeof pair);
            p[i] = _mm512_dpbf16_ps(p[i], wv[j], (__m512bh)_mm512_set1_epi32(pair));
        }
    for (int i = 0; i < R; i++) {
        __m512 a = _mm512_fmadd_ps(p[i], dv, _mm512_load_ps(acc + 16 * i));
        if (has_min) a = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[i * sx_stride]), a);
        _mm512_store_ps(acc + 16 * i, a);
    }
}

/* The 16 outputs of row r (+ bias), stored as bf16 (nearest even) or fp32. */
IL_INLINE void store16(const float *acc, const uint16_t *bias, void *y, int64_t at, int yf32) {
    __m512 out = _mm512_load_ps(acc);
    if (bias)
        out = _mm512_add_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)bias)), 16)));
    if (yf32)
        _mm512_storeu_ps((float *)y + at, out);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), (__m256i)_mm512_cvtneps_pbh(out));
}

static void group_rows(const uint16_t *x, int64_t ldx, const uint8_t *w, const uint16_t *bias, void *y, int64_t ldy,
                       int yf32, const float *sx, int rows, int nb, int g, const int has_min, __m512i table) {
    const int64_t block_bytes = has_min ? sizeof(il_q4_1x16) : sizeof(il_q4_0x16);
    const uint8_t *w0 = w + (int64_t)g * nb * block_bytes;
    float acc[ROWS_PASS * 16] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < rows; m0 += ROWS_PASS) {
        const int R = rows - m0 < ROWS_PASS ? rows - m0 : ROWS_PASS;
        memset(acc, 0, sizeof(float) * 16 * R);
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = w0 + b * block_bytes;
            _mm_prefetch((const char *)blk + 4 * block_bytes, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 4 * block_bytes + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 4 * block_bytes + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 4 * block_bytes + 192, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 4 * block_bytes + 256, _MM_HINT_T0);
            __m512bh wv[16];
            __m512 dv, mv;
            decode_block(blk, has_min, table, wv, &dv, &mv);
#define ROWS(n) rows_block(x + (m0 + i) * ldx + 32 * b, ldx, wv, dv, mv, sx ? sx + (m0 + i) * nb + b : NULL, nb, \
                           acc + 16 * i, n, has_min)
            BY_TILES(6, ROWS);
#undef ROWS
        }
        for (int i = 0; i < R; i++)
            store16(acc + 16 * i, bias ? bias + 16 * g : NULL, y, (int64_t)(m0 + i) * ldy + 16 * g, yf32);
    }
}

/* Many rows: 4 rows x 4 groups (64 outputs) a tile, 16 chains, the decoded blocks read from L1 as
 * the products' memory operands: a third of a load per product, where the group path above
 * broadcasts one input pair per product. Each output's sums are the group path's, in its order. */
IL_INLINE void tile_wide(const uint16_t *x, int64_t ldx, const __m512i *wbuf, const __m512 dv[4], const __m512 mv[4],
                         const float *sx, int64_t sx_stride, float *acc, const int R, const int has_min) {
    __m512 p[6][4]; /* R <= 4 where it runs; 6 for the tile dispatch's unreached cases */
    for (int i = 0; i < R; i++)
        for (int g = 0; g < 4; g++) p[i][g] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) {
        __m512bh xb[6];
        for (int i = 0; i < R; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * j, sizeof pair);
            xb[i] = (__m512bh)_mm512_set1_epi32(pair);
        }
        for (int g = 0; g < 4; g++) {
            const __m512bh wv = (__m512bh)_mm512_load_si512(wbuf + 16 * g + j);
            for (int i = 0; i < R; i++) p[i][g] = _mm512_dpbf16_ps(p[i][g], wv, xb[i]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int g = 0; g < 4; g++) {
            __m512 a = _mm512_fmadd_ps(p[i][g], dv[g], _mm512_load_ps(acc + 64 * i + 16 * g));
            if (has_min) a = _mm512_fmadd_ps(mv[g], _mm512_set1_ps(sx[i * sx_stride]), a);
            _mm512_store_ps(acc + 64 * i + 16 * g, a);
        }
}

/* Rows [m0, m0 + R) (R <= WIDE_CHUNK) against groups 4 s .. 4 s + 3. */
static void wide_rows(const uint16_t *x, int64_t ldx, const uint8_t *w, const uint16_t *bias, void *y, int64_t ldy,
                      int yf32, const float *sx, int m0, int R, int nb, int s, const int has_min, __m512i table,
                      float *acc) {
    const int64_t block_bytes = has_min ? sizeof(il_q4_1x16) : sizeof(il_q4_0x16);
    __m512i wbuf[64] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(float) * 64 * R);
    for (int b = 0; b < nb; b++) {
        __m512 dv[4], mv[4];
        for (int g = 0; g < 4; g++) {
            __m512bh wv[16];
            decode_block(w + ((int64_t)(4 * s + g) * nb + b) * block_bytes, has_min, table, wv, dv + g, mv + g);
            for (int j = 0; j < 16; j++) _mm512_store_si512(wbuf + 16 * g + j, (__m512i)wv[j]);
        }
#define TILE(n) tile_wide(x + (m0 + i) * ldx + 32 * b, ldx, wbuf, dv, mv, sx ? sx + (m0 + i) * nb + b : NULL, nb, \
                          acc + 64 * i, n, has_min)
        BY_TILES(4, TILE);
#undef TILE
    }
    for (int i = 0; i < R; i++)
        for (int g = 0; g < 4; g++)
            store16(acc + 64 * i + 16 * g, bias ? bias + 64 * s + 16 * g : NULL, y, (int64_t)(m0 + i) * ldy + 64 * s + 16 * g, yf32);
}

int IL(linear_x16)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                   int rows, int K, int N, int ydtype, int num_threads) {
    const int nb = K / 32, has_min = wtype == IL_W_Q4_1X16, yf32 = ydtype == IL_F32;
    float *sx = NULL; /* Q4_1: each row's sum per block of 32 inputs, for the minimums */
    if (has_min && !(sx = malloc(sizeof(float) * (size_t)rows * nb))) return 2;
    uint16_t t[32];
    for (int i = 0; i < 32; i++) t[i] = il_f32_to_bf16((float)((i & 15) - (has_min ? 0 : 8)));
    const __m512i table = _mm512_loadu_si512(t);
    /* many rows: chunks of rows (each thread's share, whole 4s, at most WIDE_CHUNK) x groups of 64 outputs */
    const int wide = rows >= WIDE_ROWS && N % 64 == 0;
    int chunk = ((rows + num_threads - 1) / num_threads + 3) / 4 * 4;
    chunk = chunk > WIDE_CHUNK ? WIDE_CHUNK : chunk;
    const int chunks = (rows + chunk - 1) / chunk;
#pragma omp parallel num_threads(num_threads)
    {
        if (has_min) {
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < nb; b++) {
                    const uint16_t *p = (const uint16_t *)x + (int64_t)r * ldx + 32 * b;
                    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
                    const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16))), 16));
                    sx[(int64_t)r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
                }
        }
        if (wide) {
            float *acc = aligned_alloc(64, sizeof(float) * 64 * WIDE_CHUNK);
#pragma omp for schedule(static) collapse(2)
            for (int c = 0; c < chunks; c++)
                for (int s = 0; s < N / 64; s++) {
                    const int m0 = c * chunk, R = rows - m0 < chunk ? rows - m0 : chunk;
                    if (has_min)
                        wide_rows(x, ldx, w, bias, y, ldy, yf32, sx, m0, R, nb, s, 1, table, acc);
                    else
                        wide_rows(x, ldx, w, bias, y, ldy, yf32, NULL, m0, R, nb, s, 0, table, acc);
                }
            free(acc);
        } else {
#pragma omp for schedule(static)
            for (int g = 0; g < N / 16; g++)
                if (has_min)
                    group_rows(x, ldx, w, bias, y, ldy, yf32, sx, rows, nb, g, 1, table);
                else
                    group_rows(x, ldx, w, bias, y, ldy, yf32, NULL, rows, nb, g, 0, table);
        }
    }
    free(sx);
    return 0;
}
