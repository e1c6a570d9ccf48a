/* The linear layer on AMX tiles past a decode step's 64 rows (prefill chunks): a GEMM blocked as
 * oneDNN's, whose sums are the tiles' own, so that a long prompt's rows keep their bits.
 *
 * Here x is the left operand and W the right, the roles the 1-64-row kernel (linear.c) gives the
 * other way round: x's rows are copied once a call into 1 KB tiles (16 rows x 32 inputs), and the
 * outputs come out of the accumulators as y's rows, with no transpose. A task is a chunk of up to 32
 * column tiles over all rows: its thread packs the chunk's weights into the pair-interleaved tiles a
 * right operand takes (bf16 rows, or t16 blocks decoded to the bf16 weights they stand for, 16 rows x
 * 16 pairs transposed a tile), which then stay in its L2 while it walks x's rows 32 at a time, four
 * accumulating tiles a block (2 x 2: one tile load a product, the most eight tiles allow; tile loads,
 * not products, bound this loop). Packing all of W first, then multiplying, took a 128-row prompt's
 * first token from 36 to 44 ms: the packed matrix had left the cache by the time it was read. Past
 * 768 inputs the 32 rows' tiles would not fit L1, so K is summed in pieces of up to 512, each block's
 * accumulators stored between them (the MLP's down matrix at 2,048 rows: 1.67 -> 1.45-1.58 ms).
 *
 * The sums are linear.c's: output (m, n) is one chain of tile products over K in order from zero
 * (stored and reloaded as fp32 between pieces, which changes nothing), and swapping the operands
 * changes no bit (a product of bf16 values is exact in fp32 and each pair is added as it is; tested).
 * So a row's bits are the same at any row count, alone or in any batch. The embedded model's 120
 * layer matmuls, against oneDNN on the same bf16 weights: 12.7 against 15.8 ms at 65 rows, 44.8
 * against 46.6 at 512, 7% behind at 2,048 (with the Q4_1 blocks, whose oneDNN path also decoded them
 * to bf16 each call, level there).
 */
#include "amx.h"

#include <omp.h>
#include <stdlib.h>

#include "t16.h"

/* Column tiles a task at most: 512 columns, or fewer past K = 576, so that their packed weights (1 MB
 * at most) stay in L2 */
#define CHUNK_TILES 32
#define CHUNK_BYTES (1 << 20)
/* Packed weights up to this size are one chunk, packed by every thread, which then split the rows
 * (from 256 rows on): each reads only its share of x, where two column halves read all of it twice.
 * At 2,048 rows: q/k/v 0.83 -> 0.69 ms, o 0.59 -> 0.45; the MLP's down matrix (1.7 MB at K = 1,536)
 * measured slower so, as its rows' 96 KB of tiles no longer stay in L1 either way. */
#define SMALL_W (5 << 18)

/* wp[k] (1 KB) = the right operand of W's rows 16 nb .. 16 nb + 15 at inputs 32 k .. 32 k + 31: dword
 * 16 p + j holds inputs (32 k + 2 p, +1) of row 16 nb + j. */
IL_INLINE void pack_w(const void *w, const int wtype, int64_t nb, int K, uint32_t *wp) {
    uint16_t tile[512] __attribute__((aligned(64)));
    const int64_t group_bytes = 16 * (int64_t)il_block_bytes(wtype);
    const int per = il_block_elems(wtype) / 32 > 0 ? il_block_elems(wtype) / 32 : 1; /* steps a t16 block */
    const uint8_t *blocks = (const uint8_t *)w + nb * (K / 32) * (group_bytes / per);
    for (int k = 0; k < K / 32; k++) {
        const uint16_t *a = (const uint16_t *)w + nb * 16 * K + 32 * k;
        int64_t stride = K;
        if (il_t16_type(wtype)) {
            decode_t16(wtype, blocks + k / per * group_bytes, k % per, tile, 32);
            a = tile, stride = 32;
        }
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(a + stride * i);
        transpose16(r);
        for (int p = 0; p < 16; p++) _mm512_store_ps(wp + 256 * k + 16 * p, r[p]);
    }
}

/* c[32][32] = x's row tiles at a (two: 32 rows, else 16) times W's column tiles at b (two: 32, else 16),
 * each tile `ks` steps of 1 KB, over steps k0 .. k1 - 1 (from k0 > 0: added to c). */
IL_INLINE void block(const uint16_t *a, const uint32_t *b, const int ks, const int k0, const int k1,
                     const int two_rows, const int two_cols, float *c) {
    const uint16_t *a1 = a + 512 * ks;
    const uint32_t *b1 = b + 256 * ks;
    if (k0) { /* on from the sums of steps 0 .. k0 - 1, stored in c as they were (fp32: the same bits) */
        _tile_loadd(0, c, 128);
        if (two_cols) _tile_loadd(1, c + 16, 128);
        if (two_rows) _tile_loadd(2, c + 512, 128);
        if (two_rows && two_cols) _tile_loadd(3, c + 528, 128);
    } else {
        _tile_zero(0);
        if (two_cols) _tile_zero(1);
        if (two_rows) _tile_zero(2);
        if (two_rows && two_cols) _tile_zero(3);
    }
    for (int k = k0; k < k1; k++) { /* W's tiles loaded with the hint that they are not read again soon
                                    * (they are, from L2), so that x's stay in L1: 16% off at 2,048 rows */
        _tile_loadd(4, a + 512 * k, 64);
        _tile_stream_loadd(6, b + 256 * k, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_cols) {
            _tile_stream_loadd(7, b1 + 256 * k, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
            _tile_loadd(5, a1 + 512 * k, 64);
            _tile_dpbf16ps(2, 5, 6);
            if (two_cols) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 128);
    if (two_cols) _tile_stored(1, c + 16, 128);
    if (two_rows) _tile_stored(2, c + 512, 128);
    if (two_rows && two_cols) _tile_stored(3, c + 528, 128);
}

/* y's rows m .. m + 31 (those below M) at column tiles n, n + 1 (two_cols) from the block's c, the bias
 * added as linear.c adds it; a row's two tiles in one 64-byte store where y is bf16. */
IL_INLINE void emit(const float *c, const int m, const int n, const int two_cols, const uint16_t *bias, void *y,
                    const int64_t ldy, const int ydtype, const int M) {
    __m512 bv[2];
    for (int j = 0; j < 2; j++)
        bv[j] = bias && j <= two_cols ? _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + 16 * (n + j)))), 16))
                                        : _mm512_setzero_ps();
    for (int r = 0; r < 32 && m + r < M; r++) {
        const __m512 o0 = _mm512_add_ps(_mm512_load_ps(c + 32 * r), bv[0]);
        const __m512 o1 = _mm512_add_ps(_mm512_load_ps(c + 32 * r + 16), bv[1]);
        const int64_t at = (int64_t)(m + r) * ldy + 16 * n;
        if (ydtype == IL_F32) {
            _mm512_storeu_ps((float *)y + at, o0);
            if (two_cols) _mm512_storeu_ps((float *)y + at + 16, o1);
        } else if (two_cols) {
            _mm512_storeu_si512((uint16_t *)y + at, (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
        } else {
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), (__m256i)_mm512_cvtneps_pbh(o0));
        }
    }
}

/* A buffer of at least `bytes` that the calling thread keeps between calls (fresh pages each call cost a
 * page fault per 4 KB); NULL if out of memory. */
static void *kept(size_t bytes, const int which) {
    static __thread void *held[3] = {NULL, NULL, NULL};
    static __thread size_t held_bytes[3] = {0, 0, 0};
    if (bytes > held_bytes[which]) {
        free(held[which]);
        held[which] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        held_bytes[which] = held[which] ? bytes : 0;
    }
    return held[which];
}

int IL(linear_rows)(const uint16_t *x, const void *w, int wtype, const uint16_t *bias, void *y, int64_t ldy,
                    int ydtype, int M, int K, int N, int num_threads) {
    const int ks = K / 32, row_tiles = (M + 15) / 16, col_tiles = N / 16;
    uint16_t *xp = kept((size_t)row_tiles * 1024 * ks, 0); /* x's tiles [row tile][k], 1 KB each */
    if (!xp) return 2;
    /* Tasks: chunks of column tiles, each over all rows, so a chunk's weights are decoded once a call, by
     * the thread that multiplies them, into its own L2; the rows are split too where there are fewer
     * chunks than threads (a small W: one chunk, SMALL_W). */
    int most = CHUNK_BYTES / (1024 * ks); /* a column tile's packed weights: K / 32 KB */
    most = most < 2 ? 2 : most > CHUNK_TILES ? CHUNK_TILES : most;
    int chunks = (col_tiles + most - 1) / most;
    const int small = (int64_t)col_tiles * 1024 * ks <= SMALL_W && M >= 256;
    if (small) chunks = 1;
    while (!small && chunks < num_threads && 2 * chunks < col_tiles) chunks++;
    const int per_chunk = ((col_tiles + chunks - 1) / chunks + 1) / 2 * 2; /* column pairs whole */
    chunks = (col_tiles + per_chunk - 1) / per_chunk;
    int row_chunks = chunks >= num_threads ? 1 : (num_threads + chunks - 1) / chunks;
    if (row_chunks > (M + 31) / 32) row_chunks = (M + 31) / 32;
    const int chunk_rows = ((M + row_chunks - 1) / row_chunks + 31) / 32 * 32;
    /* K in pieces past 768 inputs, so that 32 rows' tiles of a piece (32 KB) stay in L1 */
    const int pieces = ks <= 24 ? 1 : (ks + 15) / 16, piece = (ks + pieces - 1) / pieces;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < row_tiles * ks; i++) {
            const int t = i / ks, k = i % ks;
            for (int r = 0; r < 16; r++) { /* rows past M: zeros (their outputs are not stored) */
                const int64_t row = 16 * (int64_t)t + r;
                _mm512_store_si512(xp + (int64_t)i * 512 + 32 * r,
                                   row < M ? _mm512_loadu_si512(x + row * K + 32 * k) : _mm512_setzero_si512());
            }
        }
        uint32_t *wp = kept((size_t)per_chunk * 1024 * ks, 1); /* this thread's chunk: [column tile][k] */
        /* c[pair][row][column]: each column pair's block over a piece of K (a lone tile's half unused) */
        const size_t c_bytes = (size_t)(pieces > 1 ? per_chunk / 2 : 1) * 4096;
        float *c = kept(c_bytes, 2);
        if (c) memset(c, 0, c_bytes);
        if (!wp || !c) {
#pragma omp atomic write
            failed = 1;
        }
        amx_configure();
#pragma omp for schedule(static)
        for (int task = 0; task < chunks * row_chunks; task++) {
            const int n0 = task / row_chunks * per_chunk, n1 = n0 + per_chunk < col_tiles ? n0 + per_chunk : col_tiles;
            const int m0 = task % row_chunks * chunk_rows, m1 = m0 + chunk_rows < M ? m0 + chunk_rows : M;
            if (!wp || !c) continue;
            for (int n = n0; n < n1; n++) pack_w(w, wtype, n, K, wp + (int64_t)(n - n0) * 256 * ks);
            for (int m = m0; m < m1; m += 32) {
                const uint16_t *a = xp + (int64_t)(m / 16) * 512 * ks;
                const int two_rows = m + 16 < M;
                for (int k0 = 0; k0 < ks; k0 += piece) {
                    const int k1 = k0 + piece < ks ? k0 + piece : ks;
                    for (int n = n0; n < n1; n += 2) {
                        const uint32_t *b = wp + (int64_t)(n - n0) * 256 * ks;
                        const int two_cols = n + 1 < n1;
                        float *cn = pieces > 1 ? c + (n - n0) / 2 * 1024 : c;
                        if (two_rows && two_cols)  /* each shape its own compiled loop */
                            block(a, b, ks, k0, k1, 1, 1, cn);
                        else if (two_rows)
                            block(a, b, ks, k0, k1, 1, 0, cn);
                        else if (two_cols)
                            block(a, b, ks, k0, k1, 0, 1, cn);
                        else
                            block(a, b, ks, k0, k1, 0, 0, cn);
                        if (k1 == ks) emit(cn, m, n, two_cols, bias, y, ldy, ydtype, M);
                    }
                }
            }
        }
        _tile_release();
    }
    return failed ? 2 : 0;
}
