/* What the regrouped types' two kernels share (x16.c: bf16 pair products; x16_fma.c: fp32 products):
 * the tile dispatch, the scaling of a block's products and the stores, so that both scale and round
 * a row's sums alike. */
#ifndef INFERLAB_AVX512_X16_TILES_H
#define INFERLAB_AVX512_X16_TILES_H
#include <immintrin.h>

#include "../common.h"
#include "lanes.h"
#include "x16_blocks.h"

#define ROWS_PASS 64   /* input rows whose 16 sums stay in L1 while a group's blocks pass */
#define WIDE_ROWS 32   /* rows from which the 4 x 4-group tiles run */
#define WIDE_CHUNK 128 /* rows a wide tile pass keeps in cache (x: 384 KB at K = 1536; sums: 32 KB) */
#define WIDE_SCRATCH (64 * WIDE_CHUNK + 4 * (int)(sizeof(factors) / sizeof(float))) /* a thread's: sums, factors */

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

/* A block's products p of one input row (part h of them: pairs 8 h .. for the two-part kinds) added to
 * that row's sums a: a + d[h] p (+ m[h] sum x), the one scaling every path uses, part after part, so
 * a row's result never depends on its tile. */
IL_INLINE __m512 add_part(__m512 a, __m512 p, const factors *f, float sx, const int kind, const int h) {
    if (kind == BF16) /* the builtin with its rounding spelled out: -ffast-math reassociates plain adds */
        return _mm512_add_round_ps(a, p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    a = _mm512_fmadd_ps(p, f->d[h], a);
    return has_min(kind) ? _mm512_fmadd_ps(f->m[h], _mm512_set1_ps(sx), a) : a;
}

/* Where part h's input sum is among a block's (sums_per_block). */
IL_INLINE int sum_at(const int kind, const int h) { return sums_per_block(kind) == 2 ? h : 0; }

/* The 16 outputs of row r (+ bias, in the inputs' dtype: bf16, or fp32 where xf32), stored as bf16
 * (nearest even) or fp32. */
IL_INLINE void store16(const float *acc, const void *bias, int64_t bias_at, int xf32, void *y, int64_t at, int yf32) {
    __m512 out = _mm512_load_ps(acc);
    if (bias)
        out = _mm512_add_ps(out, xf32 ? _mm512_loadu_ps((const float *)bias + bias_at)
                                      : bf16x16((const uint16_t *)bias + bias_at));
    if (yf32)
        _mm512_storeu_ps((float *)y + at, out);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), bf16_round16(out));
}

/* Every call site with its kind a constant, so each kind gets its own compiled tiles (group_rows and
 * wide_rows are always inlined for that: left to GCC's cloning, some kinds ran with the kind a
 * variable, up to 1.6x slower). */
#define BY_KIND(CALL)                                                                                \
    (kind == Q4_1 ? CALL(Q4_1) : kind == Q8_0 ? CALL(Q8_0) : kind == Q4_K ? CALL(Q4_K) : kind == Q5_0 ? CALL(Q5_0) \
     : kind == Q5_1 ? CALL(Q5_1) : kind == Q5_K ? CALL(Q5_K) : kind == Q6_K ? CALL(Q6_K) : kind == Q3_K ? CALL(Q3_K) \
     : kind == Q2_K ? CALL(Q2_K) : kind == IQ4_XS ? CALL(IQ4_XS) : kind == BF16 ? CALL(BF16) \
     : CALL(Q4_0))

/* The sums of a row's 32 inputs of a block (lo: the first 16, hi: the rest; Q2_K: of each 16) that its
 * minimums multiply. */
IL_INLINE void block_input_sums(__m512 lo, __m512 hi, float *out, const int spb) {
    if (spb == 2) {
        out[0] = _mm512_reduce_add_ps(lo);
        out[1] = _mm512_reduce_add_ps(hi);
    } else {
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}
#endif
