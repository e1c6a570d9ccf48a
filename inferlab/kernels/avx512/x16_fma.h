/* The regrouped types' fp32 products, which x16.c runs where `x16_products` chose them: for cores whose
 * vdpbf16ps issues at a quarter of their fp32 FMA rate, Intel's AVX-512 cores (one every 2 cycles
 * against two FMAs a cycle: 32 products against 64), where the pair products bound every batch.
 * Zen 4/5 issue a vdpbf16ps as fast as an FMA, so there the pairs stay (the Python side chooses once,
 * at start). Each decoded pair row (x16_blocks.h) splits into its two inputs' 16 exact fp32 weights,
 * multiplied by FMAs against the inputs widened to fp32: every product is exact (an integer of at most
 * 8 bits times a bf16), only the sums round.
 *
 * Per block, input row and 16 weight rows: one chain of FMAs over the block's inputs in order (two
 * parts of 16 for Q6_K, Q3_K, Q2_K), then x16.c's scaling: the same sums whatever the number of rows,
 * the tile or the thread count.
 */
#ifndef INFERLAB_AVX512_X16_FMA_H
#define INFERLAB_AVX512_X16_FMA_H
#include "x16_tiles.h"

/* Pair row p's two inputs' weights as fp32: lane i of the even / odd one is row i's (bf16 widened). */
IL_INLINE __m512 even_inputs(__m512bh p) { return _mm512_castsi512_ps(_mm512_slli_epi32((__m512i)p, 16)); }
IL_INLINE __m512 odd_inputs(__m512bh p) {
    return _mm512_castsi512_ps(_mm512_and_si512((__m512i)p, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* R (a constant, <= 6) rows of fp32 x, ldx apart, against one decoded block: acc[i] += its scaled products. */
IL_INLINE void rows_block_fma(const float *x, int64_t ldx, const __m512bh wv[16], const factors *f, const float *sx,
                          int64_t sx_stride, float *acc, const int R, const int kind) {
    for (int h = 0; h < parts(kind); h++) {
        __m512 p[6];
        for (int i = 0; i < R; i++) p[i] = _mm512_setzero_ps();
        for (int j = 16 / parts(kind) * h; j < 16 / parts(kind) * (h + 1); j++) {
            const __m512 we = even_inputs(wv[j]), wo = odd_inputs(wv[j]);
            for (int i = 0; i < R; i++) p[i] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[i * ldx + 2 * j]), p[i]);
            for (int i = 0; i < R; i++) p[i] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x[i * ldx + 2 * j + 1]), p[i]);
        }
        for (int i = 0; i < R; i++) {
            const float s = has_min(kind) ? sx[i * sx_stride + sum_at(kind, h)] : 0.f;
            _mm512_store_ps(acc + 16 * i, add_part(_mm512_load_ps(acc + 16 * i), p[i], f, s, kind, h));
        }
    }
}

/* One row against a group's blocks b .. b + 3 (each `bytes` after the last): their four chains side by
 * side, as an FMA takes 4 cycles and one row has no other independent chain; the products, scaling
 * and order of four rows_block calls of one row. */
IL_INLINE void row_four_blocks(const float *x, const uint8_t *blk, int64_t bytes, int b, tables t, const float *sx,
                               float *acc, const int kind) {
    __m512 p[4][2];
    for (int c = 0; c < 4; c++) p[c][0] = p[c][1] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) {
        const int h = j / (16 / parts(kind));
        for (int c = 0; c < 4; c++) {
            const __m512bh pr = pair_row(blk + c * bytes, kind, t, j);
            p[c][h] = _mm512_fmadd_ps(even_inputs(pr), _mm512_set1_ps(x[32 * c + 2 * j]), p[c][h]);
            p[c][h] = _mm512_fmadd_ps(odd_inputs(pr), _mm512_set1_ps(x[32 * c + 2 * j + 1]), p[c][h]);
        }
    }
    const int spb = sums_per_block(kind);
    __m512 a = _mm512_load_ps(acc);
    for (int c = 0; c < 4; c++) {
        factors f;
        block_scales(blk + c * bytes, b + c, kind, &f);
        for (int h = 0; h < parts(kind); h++)
            a = add_part(a, p[c][h], &f, has_min(kind) ? sx[c * spb + sum_at(kind, h)] : 0.f, kind, h);
    }
    _mm512_store_ps(acc, a);
}

/* Group g's decoded block as the fp32 weights tile_wide_fma reads: input k's 16 at wbuf + 16 (32 g + k). */
IL_INLINE void spread_block(const __m512bh wv[16], float *wbuf, int g) {
    for (int j = 0; j < 16; j++) {
        _mm512_store_ps(wbuf + 16 * (32 * g + 2 * j), even_inputs(wv[j]));
        _mm512_store_ps(wbuf + 16 * (32 * g + 2 * j + 1), odd_inputs(wv[j]));
    }
}

/* Many rows: 4 rows x 4 groups a tile, 16 chains, the 4 groups' decoded blocks as fp32 in L1 (8 KB);
 * each output's sums are the group path's, in its order. */
IL_INLINE void tile_wide_fma(const float *x, int64_t ldx, const float *wbuf, const factors f[4], const float *sx,
                         int64_t sx_stride, float *acc, const int R, const int kind) {
    for (int h = 0; h < parts(kind); h++) {
        __m512 p[6][4]; /* R <= 4 where it runs; 6 for the tile dispatch's unreached cases */
        for (int i = 0; i < R; i++)
            for (int g = 0; g < 4; g++) p[i][g] = _mm512_setzero_ps();
        for (int k = 32 / parts(kind) * h; k < 32 / parts(kind) * (h + 1); k++) {
            __m512 xb[6];
            for (int i = 0; i < R; i++) xb[i] = _mm512_set1_ps(x[i * ldx + k]);
            for (int g = 0; g < 4; g++) {
                const __m512 wk = _mm512_load_ps(wbuf + 16 * (32 * g + k));
                for (int i = 0; i < R; i++) p[i][g] = _mm512_fmadd_ps(wk, xb[i], p[i][g]);
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

#endif
