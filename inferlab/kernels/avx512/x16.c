/* The linear layer for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL / Q4_K / Q5_K weights regrouped 16 rows at
 * a time (IL_W_*X16), with bf16 inputs, on AVX512-BF16: exact weights at the speed the blocks' bytes
 * allow. IQ4_NL's blocks are Q4_0's but for the values a nibble stands for, which are the table's.
 * Q5_0 / Q5_1 are Q4_0 / Q4_1 with a plane of the 16 rows' fifth bits between the scales and the
 * nibbles: per pair row, a 32-bit mask of its 32 lanes, which a masked add of 16 puts in bit 4 of
 * the table index (vpermw reads 5 bits: a 32-entry table of the values). That bit already holds the
 * low bit of the word's next nibble (0 past the last), so the mask stores the fifth bit XOR it, and
 * the add (bit 4 flips, carries go where vpermw does not look) leaves the fifth bit there. Q4_K's
 * 256-input blocks hold the 16 rows' d, dmin and 12 scale bytes side by side (256 bytes), then their
 * 8 sub-blocks of 32 inputs, each laid out as a Q4_1 group block's values: a sub-block is a Q4_1
 * block whose d and m are d * scale and -dmin * min, unpacked for 16 rows at once. Q5_K's are Q4_K's
 * with each sub-block's values after its 16 fifth-bit masks, as a Q5_1 group block's.
 *
 * Layout, made at load from the GGUF blocks (regroup.py's `repack`), the same bytes per row: groups of
 * 16 weight rows in row order, each one block of 32 inputs after another along K. A group's block
 * holds the 16 rows' fp16 scales d[16], Q4_1's minimums m[16], then 128 16-bit words: nibble j of
 * word 32 c + i is the 4-bit value of row i / 2 at input 2 (4 c + j) + i % 2 of the block. So one
 * 64-byte load and a shift give, per `vpermw` through a table of the exact bf16 integers, the
 * 16 rows' next two inputs side by side in the 32 bf16 lanes, where `vdpbf16ps` against the
 * input pair broadcast yields each row's dot product in its own fp32 lane: no horizontal sums,
 * no weight ever rounded. Per block and row of x, the integer dot q . x is scaled by the rows'
 * d, and Q4_1 adds m times the block's sum of inputs. 32 weights cost one permute and one shift
 * (the int-to-bf16 table replaces the masks and conversions of widening to fp32), and every input
 * row reuses the decoded block. At one row the products bound it: on Golden Cove a vdpbf16ps issues
 * every 2 cycles, shares a port with vpermw and takes 8 cycles, so one row runs two blocks' chains
 * side by side (docs/performance.md has the timings).
 * Q8_0's group block is d[16] and 16 rows of 32 bytes, byte 2 i + e of row p being weight row i's
 * input 2 p + e: the same pair lanes, its bytes widened to fp32 and narrowed to bf16 (exact).
 *
 * Every output is one chain of 16 pair products per block and the same scaling, whatever the number
 * of rows, the tile it falls in or the thread count.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

#include "../common.h"
#include "lanes.h"
#include "x16.h"

enum { Q4_0, Q4_1, Q8_0, Q4_K, Q5_0, Q5_1, Q5_K }; /* the kind of a call's blocks (a constant in every tile) */

IL_INLINE int is_k(const int kind) { return kind == Q4_K || kind == Q5_K; } /* 256-input blocks */
IL_INLINE int has_min(const int kind) { return kind == Q4_1 || kind == Q5_1 || is_k(kind); }
IL_INLINE int is_q5(const int kind) { return kind == Q5_0 || kind == Q5_1 || kind == Q5_K; }
#define ROWS_PASS 64   /* input rows whose 16 sums stay in L1 while a group's blocks pass */
#define WIDE_ROWS 32   /* rows from which the 4 x 4-group tiles run */
#define WIDE_CHUNK 128 /* rows a wide tile pass keeps in cache (x: 384 KB at K = 1536; sums: 32 KB) */

/* Pair row j (inputs 2 j, 2 j + 1 of the 16 weight rows) of a group's block, as exact bf16 values.
 * Q4: nibble j % 4 of the 64 bytes at word 32 (j / 4), through a table mapping each nibble to bf16(q)
 * (Q4_1) or bf16(q - 8) (Q4_0); vpermw reads 5 index bits, so the table repeats and the bit above
 * is free. Q8_0: its 32 bytes widened to fp32 and narrowed to bf16 (16 values at a time, in order). */
IL_INLINE __m512bh pair_row(const uint8_t *blk, const int kind, __m512i table, const int j) {
    if (kind == Q8_0) {
        const __m128i *q = (const __m128i *)(blk + 32 + 32 * j);
        return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    }
    const int fields = is_k(kind) ? 0 : has_min(kind) ? 32 : 16; /* words of scales before the values */
    const int at = fields + (is_q5(kind) ? 32 : 0);                 /* (and of Q5's fifth bits) */
    const __m512i v = _mm512_loadu_si512((const uint16_t *)blk + at + 32 * (j / 4));
    __m512i idx = j % 4 ? _mm512_srli_epi16(v, 4 * (j % 4)) : v;
    if (is_q5(kind)) {
        uint32_t mask;
        memcpy(&mask, (const uint16_t *)blk + fields + 2 * j, sizeof mask);
        idx = _mm512_mask_add_epi16(idx, (__mmask32)mask, idx, _mm512_set1_epi16(16));
    }
    return (__m512bh)_mm512_permutexvar_epi16(idx, table);
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

/* A group's bytes per 32 inputs (Q4_K, Q5_K: on average; their 256-input blocks hold a header and 8
 * sub-blocks). */
IL_INLINE int64_t group_block_bytes(const int kind) {
    return kind == Q8_0 ? sizeof(il_q8_0x16) : kind == Q4_1 ? sizeof(il_q4_1x16) : kind == Q5_0 ? sizeof(il_q5_0x16)
         : kind == Q5_1 ? sizeof(il_q5_1x16) : kind == Q4_K ? 16 * sizeof(il_q4_K) / 8
         : kind == Q5_K ? 16 * sizeof(il_q5_K) / 8 : sizeof(il_q4_0x16);
}

IL_INLINE int sub_block_bytes(const int kind) { return kind == Q5_K ? 320 : 256; } /* Q4_K / Q5_K: masks, words */

/* Where block b (inputs 32 b ..) of a group starting at w0 is: for Q4_K / Q5_K its sub-block, after
 * the 256-byte header of scales. */
IL_INLINE const uint8_t *block_at(const uint8_t *w0, int b, const int kind) {
    if (is_k(kind)) return w0 + (int64_t)(b / 8) * 8 * group_block_bytes(kind) + 256 + sub_block_bytes(kind) * (b % 8);
    return w0 + b * group_block_bytes(kind);
}

IL_INLINE __m512 scales(const uint8_t *blk, const int half) { /* the block's d (half 0) or Q4_1's / Q5_1's m (1) */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk + half));
}

/* Block b's scale d and what multiplies its inputs' sum m, as fp32 for the 16 rows: its own fp16 fields,
 * or for a Q4_K sub-block d * scale and -dmin * min, the 6-bit scale and min unpacked from the 12 bytes
 * of each row (byte k of the 16 rows side by side), as il_scale_min_k4 does for one. */
IL_INLINE void block_scales(const uint8_t *blk, int b, const int kind, __m512 *dv, __m512 *mv) {
    if (!is_k(kind)) {
        *dv = scales(blk, 0);
        *mv = has_min(kind) ? scales(blk, 1) : *dv;
        return;
    }
    const int j = b % 8;
    const uint8_t *head = blk - 256 - sub_block_bytes(kind) * j;
#define SCALE_BYTE(k) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(head + 64 + 16 * (k))))
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15);
    __m512i sc, mn;
    if (j < 4) {
        sc = _mm512_and_si512(SCALE_BYTE(j), six);
        mn = _mm512_and_si512(SCALE_BYTE(j + 4), six);
    } else {
        const __m512i hi = SCALE_BYTE(j + 4);
        sc = _mm512_or_si512(_mm512_and_si512(hi, four), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTE(j - 4), 6), 4));
        mn = _mm512_or_si512(_mm512_srli_epi32(hi, 4), _mm512_slli_epi32(_mm512_srli_epi32(SCALE_BYTE(j), 6), 4));
    }
#undef SCALE_BYTE
    *dv = _mm512_mul_ps(scales(head, 0), _mm512_cvtepi32_ps(sc));
    *mv = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(scales(head, 1), _mm512_cvtepi32_ps(mn)));
}

/* A block's products p of one input row added to that row's sums a: a + d p (+ m sum x, Q4_1), the
 * one scaling every path uses, in this order, so a row's result never depends on its tile. */
IL_INLINE __m512 add_block(__m512 a, __m512 p, __m512 dv, __m512 mv, float sx, const int with_min) {
    a = _mm512_fmadd_ps(p, dv, a);
    return with_min ? _mm512_fmadd_ps(mv, _mm512_set1_ps(sx), a) : a;
}

/* A block group's 16 pair rows decoded, its scales (and minimums) as fp32. */
IL_INLINE void decode_block(const uint8_t *blk, int b, const int kind, __m512i table, __m512bh wv[16], __m512 *dv,
                            __m512 *mv) {
    for (int j = 0; j < 16; j++) wv[j] = pair_row(blk, kind, table, j);
    block_scales(blk, b, kind, dv, mv);
}

/* R (a constant, <= 6) rows of x, ldx apart, against one decoded block: acc[i] (16 outputs) +=
 * d * (q . x) (+ m * sum x). Rows side by side only for the independent chains. */
IL_INLINE void rows_block(const uint16_t *x, int64_t ldx, const __m512bh wv[16], __m512 dv, __m512 mv,
                          const float *sx, int64_t sx_stride, float *acc, const int R, const int with_min) {
    __m512 p[6];
    for (int i = 0; i < R; i++) p[i] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < R; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * j, sizeof pair);
            p[i] = _mm512_dpbf16_ps(p[i], wv[j], (__m512bh)_mm512_set1_epi32(pair));
        }
    for (int i = 0; i < R; i++) {
        const float s = with_min ? sx[i * sx_stride] : 0.f;
        _mm512_store_ps(acc + 16 * i, add_block(_mm512_load_ps(acc + 16 * i), p[i], dv, mv, s, with_min));
    }
}

/* One row of x against a group's blocks b and b + 1 (blk, blk + bytes): their two chains side by side,
 * so the core overlaps them (a vdpbf16ps takes 8 cycles on Golden Cove, and one row has no other
 * independent chain); the same products, scaling and order as two rows_block calls of one row. */
IL_INLINE void row_two_blocks(const uint16_t *x, const uint8_t *blk, int64_t bytes, int b, __m512i table,
                              const float *sx, float *acc, const int kind) {
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
#pragma GCC unroll 16 /* whole: each pair row's shift is then a constant, and its 64 bytes are loaded once */
    for (int j = 0; j < 16; j++) {
        int32_t x0, x1;
        memcpy(&x0, x + 2 * j, sizeof x0);
        memcpy(&x1, x + 32 + 2 * j, sizeof x1);
        p0 = _mm512_dpbf16_ps(p0, pair_row(blk, kind, table, j), (__m512bh)_mm512_set1_epi32(x0));
        p1 = _mm512_dpbf16_ps(p1, pair_row(blk + bytes, kind, table, j), (__m512bh)_mm512_set1_epi32(x1));
    }
    const int with_min = has_min(kind);
    __m512 d0, m0, d1, m1;
    block_scales(blk, b, kind, &d0, &m0);
    block_scales(blk + bytes, b + 1, kind, &d1, &m1);
    __m512 a = add_block(_mm512_load_ps(acc), p0, d0, m0, with_min ? sx[0] : 0.f, with_min);
    a = add_block(a, p1, d1, m1, with_min ? sx[1] : 0.f, with_min);
    _mm512_store_ps(acc, a);
}

/* The 16 outputs of row r (+ bias), stored as bf16 (nearest even) or fp32. */
IL_INLINE void store16(const float *acc, const uint16_t *bias, void *y, int64_t at, int yf32) {
    __m512 out = _mm512_load_ps(acc);
    if (bias) out = _mm512_add_ps(out, bf16x16(bias));
    if (yf32)
        _mm512_storeu_ps((float *)y + at, out);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), (__m256i)_mm512_cvtneps_pbh(out));
}

static void group_rows(const uint16_t *x, int64_t ldx, const uint8_t *w, const uint16_t *bias, void *y, int64_t ldy,
                       int yf32, const float *sx, int rows, int nb, int g, const int kind, __m512i table) {
    const int64_t block_bytes = group_block_bytes(kind);
    const uint8_t *w0 = w + (int64_t)g * nb * block_bytes;
    float acc[ROWS_PASS * 16] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < rows; m0 += ROWS_PASS) {
        const int R = rows - m0 < ROWS_PASS ? rows - m0 : ROWS_PASS;
        memset(acc, 0, sizeof(float) * 16 * R);
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = block_at(w0, b, kind);
            for (int64_t line = 0; line < block_bytes; line += 64) /* the group's stream, 4 blocks ahead */
                _mm_prefetch((const char *)blk + 4 * block_bytes + line, _MM_HINT_T0);
            if (R == 1 && b + 1 < nb) {
                for (int64_t line = 0; line < block_bytes; line += 64)
                    _mm_prefetch((const char *)blk + 5 * block_bytes + line, _MM_HINT_T0);
                row_two_blocks(x + m0 * ldx + 32 * b, blk, block_at(w0, b + 1, kind) - blk, b, table,
                               sx ? sx + m0 * nb + b : NULL, acc, kind);
                b++;
                continue;
            }
            __m512bh wv[16];
            __m512 dv, mv;
            decode_block(blk, b, kind, table, wv, &dv, &mv);
#define ROWS(n) rows_block(x + (m0 + i) * ldx + 32 * b, ldx, wv, dv, mv, sx ? sx + (m0 + i) * nb + b : NULL, nb, \
                           acc + 16 * i, n, has_min(kind))
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
                         const float *sx, int64_t sx_stride, float *acc, const int R, const int with_min) {
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
            float *at = acc + 64 * i + 16 * g;
            _mm512_store_ps(at, add_block(_mm512_load_ps(at), p[i][g], dv[g], mv[g], with_min ? sx[i * sx_stride] : 0.f,
                                          with_min));
        }
}

/* Rows [m0, m0 + R) (R <= WIDE_CHUNK) against groups 4 s .. 4 s + 3. */
static void wide_rows(const uint16_t *x, int64_t ldx, const uint8_t *w, const uint16_t *bias, void *y, int64_t ldy,
                      int yf32, const float *sx, int m0, int R, int nb, int s, const int kind, __m512i table,
                      float *acc) {
    const int64_t block_bytes = group_block_bytes(kind);
    __m512i wbuf[64] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(float) * 64 * R);
    for (int b = 0; b < nb; b++) {
        __m512 dv[4], mv[4];
        for (int g = 0; g < 4; g++) {
            __m512bh wv[16];
            const uint8_t *w0 = w + (int64_t)(4 * s + g) * nb * block_bytes;
            decode_block(block_at(w0, b, kind), b, kind, table, wv, dv + g, mv + g);
            for (int j = 0; j < 16; j++) _mm512_store_si512(wbuf + 16 * g + j, (__m512i)wv[j]);
        }
#define TILE(n) tile_wide(x + (m0 + i) * ldx + 32 * b, ldx, wbuf, dv, mv, sx ? sx + (m0 + i) * nb + b : NULL, nb, \
                          acc + 64 * i, n, has_min(kind))
        BY_TILES(4, TILE);
#undef TILE
    }
    for (int i = 0; i < R; i++)
        for (int g = 0; g < 4; g++)
            store16(acc + 64 * i + 16 * g, bias ? bias + 64 * s + 16 * g : NULL, y, (int64_t)(m0 + i) * ldy + 64 * s + 16 * g, yf32);
}

/* Every call site with its kind a constant, so each kind gets its own compiled tiles. */
#define BY_KIND(CALL)                                                                                \
    (kind == Q4_1 ? CALL(Q4_1) : kind == Q8_0 ? CALL(Q8_0) : kind == Q4_K ? CALL(Q4_K) : kind == Q5_0 ? CALL(Q5_0) \
     : kind == Q5_1 ? CALL(Q5_1) : kind == Q5_K ? CALL(Q5_K) : CALL(Q4_0))

int IL(linear_x16)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                   int rows, int K, int N, int ydtype, int num_threads) {
    const int nb = K / 32, yf32 = ydtype == IL_F32;
    const int kind = wtype == IL_W_Q4_1X16 ? Q4_1 : wtype == IL_W_Q8_0X16 ? Q8_0 : wtype == IL_W_Q4_KX16 ? Q4_K
                   : wtype == IL_W_Q5_0X16 ? Q5_0 : wtype == IL_W_Q5_1X16 ? Q5_1 : wtype == IL_W_Q5_KX16 ? Q5_K : Q4_0;
    const int with_min = has_min(kind);
    uint16_t t[32];
    for (int i = 0; i < 32; i++) { /* IQ4_NL: Q4_0's layout, the values its table's (integers: exact in bf16) */
        const int q = is_q5(kind) ? i : i & 15;
        const int offset = kind == Q4_0 ? 8 : kind == Q5_0 ? 16 : 0;
        t[i] = il_f32_to_bf16((float)(wtype == IL_W_IQ4_NLX16 ? il_iq4_values[i & 15] : q - offset));
    }
    const __m512i table = _mm512_loadu_si512(t);
    /* many rows: chunks of rows (each thread's share, whole 4s, at most WIDE_CHUNK) x groups of 64 outputs */
    const int wide = rows >= WIDE_ROWS && N % 64 == 0;
    int chunk = ((rows + num_threads - 1) / num_threads + 3) / 4 * 4;
    chunk = chunk > WIDE_CHUNK ? WIDE_CHUNK : chunk;
    const int chunks = (rows + chunk - 1) / chunk;
    float *sx = with_min ? malloc(sizeof(float) * (size_t)rows * nb) : NULL; /* each row's sum per block */
    float *sums = wide ? aligned_alloc(64, sizeof(float) * 64 * WIDE_CHUNK * num_threads) : NULL;
    if ((with_min && !sx) || (wide && !sums)) {
        free(sx), free(sums);
        return 2;
    }
#pragma omp parallel num_threads(num_threads)
    {
        if (with_min) {
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < nb; b++) {
                    const uint16_t *p = (const uint16_t *)x + (int64_t)r * ldx + 32 * b;
                    sx[(int64_t)r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(bf16x16(p), bf16x16(p + 16)));
                }
        }
        if (wide) {
            float *acc = sums + (int64_t)64 * WIDE_CHUNK * omp_get_thread_num();
#pragma omp for schedule(static) collapse(2)
            for (int c = 0; c < chunks; c++)
                for (int s = 0; s < N / 64; s++) {
                    const int m0 = c * chunk, R = rows - m0 < chunk ? rows - m0 : chunk;
#define WIDE(k) wide_rows(x, ldx, w, bias, y, ldy, yf32, sx, m0, R, nb, s, k, table, acc)
                    BY_KIND(WIDE);
#undef WIDE
                }
        } else {
#pragma omp for schedule(static)
            for (int g = 0; g < N / 16; g++) {
#define GROUP(k) group_rows(x, ldx, w, bias, y, ldy, yf32, sx, rows, nb, g, k, table)
                BY_KIND(GROUP);
#undef GROUP
            }
        }
    }
    free(sx), free(sums);
    return 0;
}
