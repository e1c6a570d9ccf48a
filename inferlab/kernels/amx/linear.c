/* The linear layer on AMX tiles, for bf16 weights and activations at the 1 to 64 rows of a decode
 * step, where PyTorch's matmul falls well short of memory speed (measured on the embedded model's
 * layers, 2 threads: 20 ms a step at 1 to 16 rows against 11 ms here, 27 ms against 20 ms at 64). Past
 * 64 rows (prefill chunks) rows.c runs them, summing each output in the same order.
 *
 * W is used as it is stored, row-major, as the left operand: an A tile is 16 weight rows x 32
 * inputs, loaded with W's row stride. x is repacked once per call into the pair-interleaved layout
 * AMX wants for its right operand (K pairs x 16 rows of x; up to 16 rows, by each thread for itself),
 * so each tile product yields 16 outputs x 16 rows of x; those are transposed (up to 4 rows: gathered)
 * on the way out and stored as bf16, or as fp32 where the
 * caller asks (a bf16 model's logits). No weight copy or prepacking. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
 * Q4_K blocks regrouped for the tiles (t16, regrouped.h) are decoded one A tile at a time into exactly the bf16 weights a load-time
 * dequantization would have made, so they give the same bits from a quarter of the bytes. The int8
 * path from INT8_TILE_ROWS rows runs on the integer tiles (int8.c). Other types, shapes and CPUs
 * without the tile permission go to the AVX-512 kernels.
 */
#include "amx.h"

#include <omp.h>
#include <stdlib.h>

#include "../common.h"
#include "t16.h"

#define BLOCK_ROWS 64
/* Rows from which the int8 path's integer tiles (int8.c) run: fewer take the AVX-512 kernel */
#define INT8_TILE_ROWS 16

/* The B tile of pairs 16 c .. 16 c + 15 of x's rows 0 .. live - 1 (x's rows `pairs` dwords apart; rows
 * from live to 16 are zeros) at dst: dst[16 p + i] = pair 16 c + p of row i. A 16 x 16 transpose, or
 * for one row a permute a tile row (masked gathers did it before, 16 loads a tile row). */
IL_INLINE void pack_b_tile(const uint32_t *x, int64_t pairs, int live, int c, uint32_t *dst) {
    if (live == 1) {
        const __m512i v = _mm512_loadu_si512(x + 16 * c);
        for (int p = 0; p < 16; p++)
            _mm512_store_si512(dst + 16 * p, _mm512_maskz_permutexvar_epi32(1, _mm512_set1_epi32(p), v));
        return;
    }
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = i < live ? _mm512_loadu_ps(x + i * pairs + 16 * c) : _mm512_setzero_ps();
    transpose16(r);
    for (int p = 0; p < 16; p++) _mm512_store_ps(dst + 16 * p, r[p]);
}

/* Fetch the rows of W's A tile `ahead` steps past step k (running on into the next blocks of rows)
 * into L1 (l1) or L2. */
IL_INLINE void prefetch_a(const uint16_t *w, const uint16_t *a, int k, int ahead, int N, int K, const int l1) {
    int ka = k + ahead;
    while (ka >= K / 32) ka -= K / 32, a += (int64_t)16 * K;
    if (a >= w + (int64_t)N * K) return;
    for (int r = 0; r < 16; r++) {
        const char *p = (const char *)(a + (int64_t)r * K + 32 * ka);
        if (l1)
            _mm_prefetch(p, _MM_HINT_T0);
        else
            _mm_prefetch(p, _MM_HINT_T1);
    }
}

/* Tiles: 0-3 accumulate 16 outputs x 16 rows of x each (up to 64 rows), 4 holds W's A tile, 5-7 take
 * turns holding x's B tiles. Every tile is 16 rows of 64 bytes; rows of x past M are zeros. Each output
 * is one chain of tile products over K in order, as rows.c's past 64 rows, so a row's bits do not
 * depend on the rows that came with it. */
IL_INLINE void linear_tiles(const uint32_t *x, const void *w, const int wtype, const uint16_t *bias, void *y,
                            int64_t ldy, int ydtype, int M, int K, int N, int num_threads, uint32_t *restrict xp) {
    const int mb = (M + 15) / 16, pairs = K / 2;
#pragma omp parallel num_threads(num_threads)
    {
        /* xp[j][p][i] = pair p of x row 16 j + i: a B tile (16 pairs of 16 rows) is 1 KB in one piece.
         * From L1, tile products with such B tiles ran at 8 ns against 14 with rows 256 bytes apart
         * (the layout xp[p][m] had); the layers' matmuls at 64 rows, weights from memory: 14.6 -> 14.1 ms.
         * Up to 16 rows each thread packs all of x for itself (xp holds a copy a thread): a shared copy
         * costs a barrier and the other core's cache lines, which took longer than the packing. */
        const int own = mb == 1, tiles_k = pairs / 16;
        uint32_t *xt = own ? xp + (int64_t)omp_get_thread_num() * pairs * 16 : xp;
        if (own) {
            for (int c = 0; c < tiles_k; c++) pack_b_tile(x, pairs, M, c, xt + (int64_t)c * 256);
        } else {
#pragma omp for schedule(static)
            for (int jc = 0; jc < mb * tiles_k; jc++) { /* row tile j, pairs 16 c .. 16 c + 15 */
                const int j = jc / tiles_k, c = jc % tiles_k, left = M - 16 * j;
                pack_b_tile(x + (int64_t)16 * j * pairs, pairs, left < 16 ? left : 16, c,
                            xp + ((int64_t)j * pairs + 16 * c) * 16);
            }
        }
        amx_configure();
        float c[16 * BLOCK_ROWS] __attribute__((aligned(64)));  /* c[n][m]: one block's outputs */
        const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32(16 * mb)); /* c's column m (M <= 4): c + m + n mp */
        uint16_t decoded[2][512] __attribute__((aligned(64)));    /* t16: A tiles, in turn */
        /* t16: a group's block, its 32-input steps, and the bytes a step takes on average */
        const int64_t group_bytes = 16 * (int64_t)il_block_bytes(wtype);
        const int per = il_block_elems(wtype) / 32 > 0 ? il_block_elems(wtype) / 32 : 1;
        const int64_t step_bytes = group_bytes / per;
#pragma omp for schedule(static)
        for (int nb = 0; nb < N / 16; nb++) {
            const uint16_t *a = (const uint16_t *)w + (int64_t)nb * 16 * K;
            const uint8_t *blocks = (const uint8_t *)w + (int64_t)nb * (K / 32) * step_bytes; /* t16 */
            const int tb = mb, bp = 16 * tb;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int k = 0; k < K / 32; k++) {
                const uint32_t *b = xt + (int64_t)k * 256;  /* row tile j's at b + j * 16 * pairs */
                /* The hardware prefetcher falls behind on W's 16 row streams and cannot guess where
                 * the next block of rows starts. Fetching 2 steps ahead took the layers' matmuls at
                 * 64 rows from 21 to 17.5 ms; running on into the next block (only K / 32 = 18 steps
                 * long here) from 17.5 to 16.4, and at 16 rows from 11.6 to 10.6. Also fetching 8 steps
                 * ahead into L2: 7-8% off at 1 and 16 rows, 1-7% at 64 (the AMX Xeon VM, 2 threads) */
                if (il_t16_type(wtype)) { /* one stream: 8 blocks ahead into L1, 32 into L2 */
                    for (int o = 0; o < step_bytes; o += 64) {
                        _mm_prefetch((const char *)blocks + (k + 8) * step_bytes + o, _MM_HINT_T0);
                        _mm_prefetch((const char *)blocks + (k + 32) * step_bytes + o, _MM_HINT_T1);
                    }
                    decode_t16(wtype, blocks + k / per * group_bytes, k % per, decoded[k & 1], 32);
                    _tile_loadd(4, decoded[k & 1], 64);
                } else {
                    prefetch_a(w, a, k, 2, N, K, 1);
                    prefetch_a(w, a, k, 8, N, K, 0);
                    _tile_loadd(4, a + 32 * k, K * 2);
                }
                _tile_loadd(5, b, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (tb > 1) {
                    _tile_loadd(6, b + 1 * 16 * pairs, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (tb > 2) {
                    _tile_loadd(7, b + 2 * 16 * pairs, 64);
                    _tile_dpbf16ps(2, 4, 7);
                }
                if (tb > 3) {
                    _tile_loadd(5, b + 3 * 16 * pairs, 64);
                    _tile_dpbf16ps(3, 4, 5);
                }
            }
            _tile_stored(0, c, bp * 4);
            if (tb > 1) _tile_stored(1, c + 16, bp * 4);
            if (tb > 2) _tile_stored(2, c + 32, bp * 4);
            if (tb > 3) _tile_stored(3, c + 48, bp * 4);
            const __m512 bv = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                         _mm256_loadu_si256((const __m256i *)(bias + 16 * nb))), 16))
                                   : _mm512_setzero_ps();
            for (int m = 0; M <= 4 && m < M; m++) { /* a few columns: gathered (the transpose takes 64 shuffles) */
                const __m512 out = _mm512_add_ps(_mm512_i32gather_ps(column, c + m, 4), bv);
                if (ydtype == IL_F32)
                    _mm512_storeu_ps((float *)y + (int64_t)m * ldy + 16 * nb, out);
                else
                    _mm256_storeu_si256((__m256i *)((uint16_t *)y + (int64_t)m * ldy + 16 * nb),
                                        (__m256i)_mm512_cvtneps_pbh(out));
            }
            for (int j = 0; M > 4 && j < tb; j++) {  /* column m of c is row m's 16 outputs */
                __m512 r[16];
                for (int n = 0; n < 16; n++) r[n] = _mm512_load_ps(c + n * bp + 16 * j);
                transpose16(r);
                for (int m = 16 * j; m < M && m < 16 * j + 16; m++) {
                    const __m512 out = _mm512_add_ps(r[m - 16 * j], bv);
                    const int64_t at = (int64_t)m * ldy + 16 * nb;
                    if (ydtype == IL_F32) /* a bf16 model's logits: kept in fp32 */
                        _mm512_storeu_ps((float *)y + at, out);
                    else
                        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), (__m256i)_mm512_cvtneps_pbh(out));
                }
            }
        }
        _tile_release();
    }
}

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (il_int8_call(act, wtype, K) && rows >= INT8_TILE_ROWS) /* the same bits as the AVX-512 path's */
        return IL(linear_int8)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    if ((wtype != IL_W_BF16 && !il_t16_type(wtype)) || dtype != IL_BF16 || (ydtype != IL_BF16 && ydtype != IL_F32) ||
        rows < 1 || K % 32 || N % 16 || ldx != K || !amx_ready()) {
        if (!il_t16_type(wtype) || rows < 1)
            return linear_avx512(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
        /* t16 where the tiles do not run (no tile permission, a strided x): its bf16 weights, whole */
        uint16_t *dense = aligned_alloc(64, sizeof(uint16_t) * (size_t)N * K);
        int64_t *ids = malloc(sizeof(int64_t) * (size_t)N);
        int status = dense && ids ? 0 : 2;
        if (!status) {
            for (int n = 0; n < N; n++) ids[n] = n;
            IL(get_rows)(dense, w, wtype, ids, N, K, IL_BF16, num_threads);
            status = linear_avx512(x, ldx, dense, IL_W_BF16, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
        }
        free(dense);
        free(ids);
        return status;
    }
    if (rows > BLOCK_ROWS) return IL(linear_rows)(x, w, wtype, bias, y, ldy, ydtype, rows, K, N, num_threads);
    const int copies = rows <= 16 ? num_threads : (rows + 15) / 16;
    uint32_t *xp = aligned_alloc(64, sizeof(uint32_t) * (size_t)(K / 2) * 16 * copies); /* linear_tiles says why */
    if (!xp) return 2;
    switch (wtype) { /* each type its own compiled loop */
#define TILES(T) case T: linear_tiles(x, w, T, bias, y, ldy, ydtype, rows, K, N, num_threads, xp); break;
        IL_T16_TYPES(TILES)
#undef TILES
        default: linear_tiles(x, w, IL_W_BF16, bias, y, ldy, ydtype, rows, K, N, num_threads, xp);
    }
    free(xp);
    return 0;
}

/* t16 rows to bf16 with the tiles' decoding (t16_rows); any other type or dtype as the AVX-512 build
 * does it. */
void IL(get_rows)(void *out, const void *w, int wtype, const int64_t *ids, int rows, int K, int dtype,
                  int num_threads) {
    if (!il_t16_type(wtype) || dtype != IL_BF16 || K % il_block_elems(wtype)) {
        get_rows_avx512(out, w, wtype, ids, rows, K, dtype, num_threads);
        return;
    }
    switch (wtype) { /* each type its own compiled loop */
#define ROWS(T) case T: t16_rows(T, out, w, ids, rows, K, num_threads); break;
        IL_T16_TYPES(ROWS)
#undef ROWS
    }
}
