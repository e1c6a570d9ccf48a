/* The linear layer on AVX2 + FMA, for every weight type, at any number of rows (the blocks decoded by decode.h).
 *
 * Each thread takes panels of PANEL weight rows. A panel is dequantized once to fp32 (fp32 weights
 * are read in place), then a micro-kernel multiplies it with the input rows, MR rows by NR weight
 * rows at a time: 12 accumulators of 8 lanes, each lane summing every 8th product along K, summed
 * across lanes in one fixed order at the end. Every output is computed the same way whatever the
 * number of rows, the thread count or where it falls in a tile, so a request's result never
 * depends on what else is in the batch. Dequantization costs about a uop per weight, once per
 * panel per MC input rows; the micro-kernel, MR * NR = 12 FMAs per 7 loads, runs near the FMA
 * units' peak for many rows and at memory speed for one.
 */
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"
#include "decode.h"
#include "gemm.h"
#include "halves.h"

#define PANEL 24  /* weight rows dequantized at a time (24 x 1536 fp32 = 147 KB: stays in L2) */
#define MC 256    /* input rows per pass over the weights (256 x 1536 fp32 = 1.5 MB: stays in L3) */

/* As `micro`, reading weight rows as stored, decoded in registers 32 at a time: for one or two
 * input rows, where decoding a panel first would cost more than it saves. More weight rows per call
 * than `micro` takes (four for one input row) keep enough independent FMA chains in flight. The
 * products are summed in the same order as `micro`'s, so both give the very same outputs. */
#define DC 4 /* weight rows per direct call, at most */

IL_INLINE void micro_direct(const float *x, int64_t lx, const uint8_t *const w[DC], int wtype, int K, const int R,
                            const int C, __m128 out[DC]) {
    __m256 acc[2][DC];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) acc[i][j] = _mm256_setzero_ps();
    const int be = il_block_elems(wtype), bb = il_block_bytes(wtype);
    float ks[DC][16]; /* each weight row's k_scales of its current block */
    const int step = wtype == IL_W_Q4_K ? 64 : 32; /* weights decoded at a time (q4_K_pair) */
    /* A 256-weight block's sub-blocks unrolled, so that where each one's bits and scales lie is a
     * constant rather than a dozen scalar instructions per 32 weights. */
    const int span = be == 256 ? 256 : step;
    for (int kb = 0; kb < K; kb += span) {
        const int64_t at = (int64_t)kb / be * bb; /* the block's first byte in each weight row */
#pragma GCC unroll 8
        for (int s = 0; s < span; s += step)
            for (int j = 0; j < C; j++) {
                __m256 wv[8];
                for (int o = 0; o < step * bb / be; o += 64) /* every line: 32 fp32 weights span two */
                    _mm_prefetch((const char *)w[j] + at + (int64_t)s / be * bb + PREFETCH_BYTES + o, _MM_HINT_T0);
                if (k_scaled(wtype) && s == 0) k_scales(wtype, w[j] + at, 0, ks[j]);
                if (step == 64) q4_K_pair(w[j] + at, s, ks[j], wv);
                else decode32(wtype, w[j] + at, s, ks[j], wv);
                for (int c = 0; c < step / 8; c++)
                    for (int i = 0; i < R; i++)
                        acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * lx + kb + s + 8 * c), wv[c], acc[i][j]);
            }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int j = 0; j < C; j++) out[j] = hsum4(acc[0][j], R > 1 ? acc[1][j] : zero, zero, zero);
}

/* The direct tile, instantiated per weight type (so each type's decoding is inlined): one input row
 * against six weight rows, or two against three. A tile past the last weight row repeats it (the
 * extra outputs are not stored), so no other shapes are needed. */
#define DIRECT_CASE(T)                                                                                       \
    case T:                                                                                                \
        if (R == 1) micro_direct(x, lx, w, T, K, 1, DC, out);                                              \
        else micro_direct(x, lx, w, T, K, 2, DC / 2, out);                                                 \
        break
static void tile_direct(const float *x, int64_t lx, const uint8_t *const w[DC], int wtype, int K, int R, __m128 out[DC]) {
    switch (wtype) {
        DIRECT_CASE(IL_W_BF16); DIRECT_CASE(IL_W_F16); DIRECT_CASE(IL_W_Q8_0); DIRECT_CASE(IL_W_Q4_0);
        DIRECT_CASE(IL_W_Q4_1); DIRECT_CASE(IL_W_Q5_0); DIRECT_CASE(IL_W_Q5_1); DIRECT_CASE(IL_W_Q4_K);
        DIRECT_CASE(IL_W_Q5_K); DIRECT_CASE(IL_W_Q6_K); DIRECT_CASE(IL_W_Q2_K); DIRECT_CASE(IL_W_Q3_K);
        DIRECT_CASE(IL_W_IQ4_NL); DIRECT_CASE(IL_W_IQ4_XS); default: DIRECT_CASE(IL_W_F32);
    }
}
#undef DIRECT_CASE

/* Rows up to which weights are decoded in registers for each call rather than into a panel. */
#define DIRECT_MAX_ROWS 2

/* A panel's tile of input rows m .. m + R against its weight rows wp (C of them): `tile` here; in the
 * AVX-512 builds pairs.h's, twice as wide, on the pass's input rows in pairs (xp, from row m0). */
#ifdef __AVX512F__
#include "../avx512/pairs.h"
#define PAIRED 1
#define TILE_ROWS PR
#define TILE_COLS PW
#define PANEL_TILE(m, R, C, wp, out) tile_pairs(xp + ((m) - m0) / 2 * lxp, lxp, wp, K, K, R, C, out)
#else
#define PAIRED 0
#define TILE_ROWS MR
#define TILE_COLS NR
#define PANEL_TILE(m, R, C, wp, out) tile(xf + (int64_t)(m) * lx, lx, wp, K, K, R, C, out)
static int64_t pair_rows(const float *x, int64_t lx, int rows, int K, float *xp) { return 0; }
#endif

static inline void store_tile(void *y, int64_t ldy, const void *bias, int dtype, int ydtype, int m, int n, int R,
                              int C, const __m128 *out) {
    for (int j = 0; j < C; j++) {
        float v[4];
        _mm_storeu_ps(v, out[j]);
        const float b = bias ? il_ld(bias, n + j, dtype) : 0.f;
        for (int i = 0; i < R; i++) il_st(y, (int64_t)(m + i) * ldy + n + j, v[i] + b, ydtype);
    }
}

/* The fp32 products of every weight type this file decodes (il_block_elems), with fp32 inputs or
 * others widened: the direct path at one or two rows, else panels. The AVX-512 builds compile this
 * file again for their linear layer (avx512/floats.c), whose panels run pairs.h's 512-bit tiles: the
 * same sums, so the same outputs as here. */
int IL(linear_floats)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                      int rows, int K, int N, int dtype, int ydtype, int num_threads) {
    if (rows <= 0) return 0;
    if (il_regrouped_type(wtype)) return 1; /* only the AVX-512 (x16) and AMX (t16) builds multiply these */
    const float *xf = x;
    int64_t lx = ldx;
    float *xbuf = NULL;
    if (dtype != IL_F32) { /* widen the input once; the products are fp32 either way */
        if (!(xbuf = malloc(sizeof(float) * (size_t)rows * K))) return 2;
        for (int m = 0; m < rows; m++)
            for (int k = 0; k < K; k++) xbuf[(int64_t)m * K + k] = il_ld(x, (int64_t)m * ldx + k, dtype);
        xf = xbuf, lx = K;
    }
    const int64_t rb = il_row_bytes(wtype, K);
    /* direct: few rows, whole 32s (the direct and panel paths sum in one order, so either may run) */
    const int direct = rows <= DIRECT_MAX_ROWS && K % 32 == 0;
    const int in_place = wtype == IL_W_F32, panels = (N + PANEL - 1) / PANEL;
    int failed = 0;
    /* AVX-512: each pass's input rows in pairs for pairs.h's tiles */
    const size_t pass_rows = (size_t)(rows < MC ? rows : MC) + 1;
    float *xp = PAIRED && !direct ? malloc(sizeof(float) * pass_rows * ((K + 7) / 8 * 8)) : NULL;
    if (PAIRED && !direct && !xp) {
        free(xbuf);
        return 2;
    }
    for (int m0 = 0; m0 < rows && !failed; m0 += MC) {
        const int m1 = m0 + MC < rows ? m0 + MC : rows;
        const int64_t lxp = xp ? pair_rows(xf + (int64_t)m0 * lx, lx, m1 - m0, K, xp) : 0;
        (void)lxp; /* read by the AVX-512 builds' PANEL_TILE only */
#pragma omp parallel num_threads(num_threads)
        {
            float *buf = in_place || direct ? NULL : malloc(sizeof(float) * PANEL * (size_t)K);
            if (!in_place && !direct && !buf) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++) {
                if (!in_place && !direct && !buf) continue;
                const int n0 = p * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
                const float *wp = in_place ? (const float *)w + (int64_t)n0 * K : buf;
                if (buf)
                    for (int n = n0; n < n1; n++) dequant_row(wtype, (const uint8_t *)w + n * rb, K, buf + (int64_t)(n - n0) * K);
                if (direct) {
                    const int R = m1 - m0, cols = R == 1 ? DC : DC / 2;
                    for (int n = n0; n < n1; n += cols) {
                        const uint8_t *rows_w[DC];
                        for (int j = 0; j < cols; j++) rows_w[j] = (const uint8_t *)w + (n + j < n1 ? n + j : n1 - 1) * rb;
                        __m128 out[DC];
                        tile_direct(xf + (int64_t)m0 * lx, lx, rows_w, wtype, K, R, out);
                        store_tile(y, ldy, bias, dtype, ydtype, m0, n, R, n1 - n < cols ? n1 - n : cols, out);
                    }
                    continue;
                }
                /* the next panel's weights, a share of their lines per tile: asked for while this
                 * panel's products run, they are in L2 when it starts (its first rows would
                 * otherwise wait on memory: 64 rows +5%, 16 rows +20%) */
                const char *next = (const char *)w + (int64_t)n1 * rb;
                const int64_t next_lines = n1 < N ? ((int64_t)((N - n1 < PANEL ? N - n1 : PANEL)) * rb + 63) / 64 : 0;
                const int64_t tiles = (int64_t)((m1 - m0 + TILE_ROWS - 1) / TILE_ROWS) * ((n1 - n0 + TILE_COLS - 1) / TILE_COLS);
                const int64_t per_tile = (next_lines + tiles - 1) / tiles;
                int64_t line = 0;
                for (int m = m0; m < m1; m += TILE_ROWS)
                    for (int n = n0; n < n1; n += TILE_COLS) {
                        const int R = m1 - m < TILE_ROWS ? m1 - m : TILE_ROWS, C = n1 - n < TILE_COLS ? n1 - n : TILE_COLS;
                        for (const int64_t end = line + per_tile < next_lines ? line + per_tile : next_lines; line < end; line++)
                            _mm_prefetch(next + 64 * line, _MM_HINT_T1);
                        __m128 out[TILE_ROWS / 4 * TILE_COLS]; /* rows 4 i .. 4 i + 3: out + i * TILE_COLS */
                        PANEL_TILE(m, R, C, wp + (int64_t)(n - n0) * K, out);
                        for (int i = 0; i < R; i += 4) {
                            const int rows4 = R - i < 4 ? R - i : 4;
                            store_tile(y, ldy, bias, dtype, ydtype, m + i, n, rows4, C, out + i / 4 * TILE_COLS);
                        }
                    }
            }
            free(buf);
        }
    }
    free(xp);
    free(xbuf);
    return failed ? 2 : 0;
}

#ifndef IL_FLOATS_ONLY /* avx512/floats.c takes the float paths alone */
int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (rows <= 0) return 0;
    if (il_int8_call(act, wtype, K))
        return IL(linear_int8)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    if (il_block_elems(wtype) == 0)
        return linear_generic(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
    return IL(linear_floats)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
}
#endif
