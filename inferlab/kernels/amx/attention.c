/* Paged attention of decode rows (and short chunks over a prefix) on AMX tiles, head_dim 64.
 *
 * One task per query row, all its heads; a call of one row, one task per KV head and its group of
 * query heads (the same sums, so the same bits: one request's step then keeps both threads busy, its
 * attention 16-23% faster from 1,024 keys on). A row past PIECE keys is summed in pieces, each from its
 * own maximum, then combined; in a call of one row each piece of each KV head is a task, so that a long
 * context's 3 KV heads do not leave one of 2 threads idle a third of the time (1 x 4,096 keys: 0.128 ->
 * 0.103 ms a layer). A row's pieces are fixed by its length, so its bits are the same alone, in a batch
 * and on any thread count. Where the AVX-512 row kernel spends most of its time in
 * horizontal sums (scores) and per-key multiply-adds (values), here both are tile products:
 *   scores: for each KV head h, S_h = K_h Q^T over 16 keys at a time. K_h's 16 x 32 tile is loaded
 *     straight from the pool (16 consecutive slots of one block, the pool's row stride); Q, as the
 *     right operand, holds every query head in a column. Column j of S_{j / group} is head j's.
 *   values: O += P_h V_h over 32 keys at a time, where P_h is the bf16 weights with only h's group
 *     of query heads filled in, so summing over h fills every head's row of O in four 16 x 16
 *     accumulator tiles. V_h is interleaved two keys at a time into AMX's pair layout on the way.
 * Measured on a 64-decode step (contexts ~325): 41.5 ms for the AVX-512 row kernel's 30 layers,
 * 31.1 ms here. Weights are rounded to bf16 for the value product, as in the AVX-512 kernel.
 */
#include "amx.h"

#include <float.h>
#include <stdlib.h>

#include "../common.h"
#include "paged.h"

#define D 64
#define MAX_TILE_HEADS 16 /* query heads in one tile's columns (scores) or rows (values) */
/* Keys a piece of a row at most: a longer row is summed in pieces, each from its own maximum, and the
 * pieces combined (so that one long row's pieces can go to every thread); at most PIECE keys, one. */
#define PIECE 512
#define PART (D + 16) /* floats a piece keeps a head: its D sums, maximum and weights' sum (padded) */

typedef struct {                                       /* one thread's scratch */
    float st[MAX_TILE_HEADS][16][MAX_TILE_HEADS];      /* [KV head][key][query head] scores of 16 keys */
    uint16_t pb[MAX_TILE_HEADS][32] __attribute__((aligned(64)));  /* [query head][key] weights, one KV group */
    uint32_t vb[4][16][16] __attribute__((aligned(64)));          /* [slot tile][key pair][slot] values */
    uint32_t qb[2][16][16] __attribute__((aligned(64)));          /* [32-dim piece][dim pair][query head] */
    float o[MAX_TILE_HEADS][D] __attribute__((aligned(64)));
} scratch;

/* A whole row's task sweeps its slots (every head), a KV head's fetches its head's lines */
#define FETCH_SLOTS(cache, key)                                                   \
    (num_kv_heads * D == ts ? prefetch_keys(cache, table, key, block_size, ts) \
                            : prefetch_head(cache, table, key, block_size, ts))

/* A head's output, D bf16 values, from its dims in the value tiles' order (dims 32c + 8L .. +7 are lane
 * L of slot tile 2c, then lane L of slot tile 2c+1) times inv. */
static inline void write_head(const float *o, const float inv, uint16_t *dst) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const __m512 f = _mm512_set1_ps(inv);
    for (int c = 0; c < 2; c++) {
        const __m512 lo = _mm512_load_ps(o + 32 * c), hi = _mm512_load_ps(o + 32 * c + 16);
        _mm256_storeu_si256((__m256i *)(dst + 32 * c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), f)));
        _mm256_storeu_si256((__m256i *)(dst + 32 * c + 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), f)));
    }
}

/* The heads of one row: num_kv_heads KV heads from k_cache and v_cache, whose key slots are ts
 * elements apart, and their num_heads query heads from q; out's rows are out_heads heads apart.
 * A row's heads, or one KV head's group alone (its caches and q moved to that head): a head's sums
 * are the same either way, as the other groups' rows of P are zeros, which add nothing. */
static void attend_row(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                       uint16_t *out, int64_t row, const int32_t *table, int k0, int n, int group, int num_heads,
                       int num_kv_heads, int64_t ts, int out_heads, int block_size, float scale,
                       float *restrict scores, scratch *w, float *part) {
    const int len = n - k0; /* keys k0 .. n - 1: the row's, or a piece of them */
    memset(w->qb, 0, sizeof w->qb);
    for (int j = 0; j < num_heads; j++)
        for (int p = 0; p < D / 2; p++) w->qb[p / 16][p % 16][j] = ((const uint32_t *)(q + row * q_stride + j * D))[p];
    _tile_loadd(4, w->qb[0], 64);
    _tile_loadd(5, w->qb[1], 64);
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(MAX_TILE_HEADS));
    __m512 mx[MAX_TILE_HEADS];
    for (int j = 0; j < num_heads; j++) mx[j] = _mm512_set1_ps(-FLT_MAX);
    for (int t0 = k0; t0 < n; t0 += 16) {  /* keys past n in the last 16 are read but masked */
        const __mmask16 valid = (__mmask16)(n - t0 >= 16 ? 0xffff : (1u << (n - t0)) - 1);
        const uint16_t *blk = key_row(k_cache, table, t0, block_size, ts);
        if (t0 + 16 < n) FETCH_SLOTS(k_cache, t0 + 16);
        for (int h = 0; h < num_kv_heads; h++) {
            _tile_zero(0);
            _tile_loadd(2, blk + h * D, ts * 2);
            _tile_dpbf16ps(0, 2, 4);
            _tile_loadd(3, blk + h * D + 32, ts * 2);
            _tile_dpbf16ps(0, 3, 5);
            _tile_stored(0, w->st[h], 64);
        }
        for (int j = 0; j < num_heads; j++) {
            const __m512 s = _mm512_mul_ps(_mm512_i32gather_ps(column, &w->st[j / group][0][j], 4), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + (int64_t)j * len + (t0 - k0), valid, s);
            mx[j] = _mm512_mask_max_ps(mx[j], valid, mx[j], s);
        }
    }
    for (int t = k0; t < k0 + 32 && t < n; t += 16) FETCH_SLOTS(v_cache, t); /* during the exps */
    float inv[MAX_TILE_HEADS];
    for (int j = 0; j < num_heads; j++) {
        float *s = scores + (int64_t)j * len, sum = 0.f;
        const float m = _mm512_reduce_max_ps(mx[j]);
        for (int t = 0; t < len; t++) s[t] = il_expf(s[t] - m);
        for (int t = 0; t < len; t++) sum += s[t];
        inv[j] = 1.f / sum;  /* >= 1: the maximum's own weight */
        if (part) part[(int64_t)j * PART + D] = m, part[(int64_t)j * PART + D + 1] = sum;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    memset(w->pb, 0, sizeof w->pb);
    for (int t0 = k0; t0 < n; t0 += 32) {
        const int left = n - t0;
        const __mmask16 lo = (__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1);
        const __mmask16 hi = (__mmask16)(left >= 32 ? 0xffff : left <= 16 ? 0 : (1u << (left - 16)) - 1);
        const uint16_t *va[16], *vb[16];  /* keys 2i and 2i+1 (past n: key n-1, with weight 0) */
        for (int i = 0; i < 16; i++) {
            const int a = t0 + 2 * i < n ? t0 + 2 * i : n - 1, b = t0 + 2 * i + 1 < n ? t0 + 2 * i + 1 : n - 1;
            va[i] = key_row(v_cache, table, a, block_size, ts);
            vb[i] = key_row(v_cache, table, b, block_size, ts);
        }
        for (int t = t0 + 32; t < t0 + 64 && t < n; t += 16) FETCH_SLOTS(v_cache, t);
        for (int h = 0; h < num_kv_heads; h++) {
            for (int j = h * group; j < (h + 1) * group; j++) {  /* this group's rows of P; the others stay 0 */
                const float *sj = scores + (int64_t)j * len + (t0 - k0);
                _mm256_store_si256((__m256i *)w->pb[j], (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lo, sj)));
                _mm256_store_si256((__m256i *)(w->pb[j] + 16),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(hi, sj + 16)));
            }
            for (int i = 0; i < 16; i++)
                for (int c = 0; c < 2; c++) {  /* slot 4L + e of tile 2c (lo) / 2c+1 (hi): dim 32c + 8L + 4*hi + e */
                    const __m512i x = _mm512_loadu_si512(va[i] + h * D + 32 * c);
                    const __m512i y = _mm512_loadu_si512(vb[i] + h * D + 32 * c);
                    _mm512_store_si512(w->vb[2 * c][i], _mm512_unpacklo_epi16(x, y));
                    _mm512_store_si512(w->vb[2 * c + 1][i], _mm512_unpackhi_epi16(x, y));
                }
            _tile_loadd(6, w->pb, 64);
            _tile_loadd(7, w->vb[0], 64);
            _tile_dpbf16ps(0, 6, 7);
            _tile_loadd(7, w->vb[1], 64);
            _tile_dpbf16ps(1, 6, 7);
            _tile_loadd(7, w->vb[2], 64);
            _tile_dpbf16ps(2, 6, 7);
            _tile_loadd(7, w->vb[3], 64);
            _tile_dpbf16ps(3, 6, 7);
            for (int j = h * group; j < (h + 1) * group; j++) memset(w->pb[j], 0, sizeof w->pb[j]);
        }
    }
    _tile_stored(0, &w->o[0][0], D * 4);
    _tile_stored(1, &w->o[0][16], D * 4);
    _tile_stored(2, &w->o[0][32], D * 4);
    _tile_stored(3, &w->o[0][48], D * 4);
    if (part) { /* a piece of a long row: its sums, for combine() */
        for (int j = 0; j < num_heads; j++) memcpy(part + (int64_t)j * PART, w->o[j], sizeof(float) * D);
        return;
    }
    for (int j = 0; j < num_heads; j++) write_head(w->o[j], inv[j], out + (row * out_heads + j) * D);
}

/* Head j of a row from its pieces' sums (part: pieces x num_heads x PART): each piece's weights and
 * values scaled from its own maximum to the row's, added in order. */
static void combine(const float *part, int pieces, int num_heads, int j, uint16_t *dst) {
    float m = -FLT_MAX, sum = 0.f, o[D] __attribute__((aligned(64)));
    for (int p = 0; p < pieces; p++) m = fmaxf(m, part[((int64_t)p * num_heads + j) * PART + D]);
    memset(o, 0, sizeof o);
    for (int p = 0; p < pieces; p++) {
        const float *at = part + ((int64_t)p * num_heads + j) * PART, f = il_expf(at[D] - m);
        sum += f * at[D + 1];
        for (int d = 0; d < D; d++) o[d] += f * at[d];
    }
    write_head(o, 1.f / sum, dst);
}

/* The end of piece p of a row of n keys. */
static inline int piece_end(const int n, const int p) { return n < (p + 1) * PIECE ? n : (p + 1) * PIECE; }

/* Rows from which a call takes a task per row (fewer: per row and KV head); by shape, never by thread count. */
#define ROW_TASKS_MIN 2

int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads) {
    /* every row count, even one row (one task): a row's result must not depend on how many rows
     * share the call, and the AVX-512 kernel sums in another order */
    if (dtype != IL_BF16 || head_dim != D || num_heads > MAX_TILE_HEADS || block_size % 16 || !amx_ready())
        return paged_attention_avx512(q, q_stride, k_cache, v_cache, out, row_ids, seqs, lens, rows, block_tables,
                                      table_stride, num_heads, num_kv_heads, head_dim, block_size, scale, dtype,
                                      num_threads);
    int max_len = 1, failed = 0;
    for (int r = 0; r < rows; r++) max_len = lens[r] > max_len ? lens[r] : max_len;
    const int most = (max_len + PIECE - 1) / PIECE, group = num_heads / num_kv_heads;
    /* below ROW_TASKS_MIN rows, a task per row, KV head and piece (one request's step keeps both threads
     * busy), their pieces combined after; from it, a task per row, its pieces one after another */
    const int splits = rows < ROW_TASKS_MIN ? num_kv_heads : 1, pieces = splits > 1 ? most : 1;
    float *shared = pieces > 1 ? malloc(sizeof(float) * PART * num_heads * (size_t)most) : NULL;
    if (pieces > 1 && !shared) return 2;
#pragma omp parallel num_threads(num_threads)
    {
        amx_configure();
        float *scores = malloc(sizeof(float) * num_heads * (size_t)(max_len < PIECE ? max_len : PIECE));
        const int owned = splits == 1 && most > 1; /* a thread's own pieces, for rows of a batch */
        float *own = owned ? malloc(sizeof(float) * PART * num_heads * (size_t)most) : NULL;
        scratch *w = aligned_alloc(64, sizeof(scratch));
        if (!scores || !w || (owned && !own)) {
#pragma omp atomic write
            failed = 1;
        }
        const int64_t ts = (int64_t)num_kv_heads * D; /* pool elements per key slot */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < rows * splits * pieces; task++) {
            const int r = task / (splits * pieces), h = task / pieces % splits, p = task % pieces;
            const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
            if (!scores || !w || (owned && !own)) continue;
            const int heads = splits == 1 ? num_kv_heads : 1; /* the task's KV heads, from KV head h */
            const int n = lens[r], cut = (n + PIECE - 1) / PIECE; /* the row's pieces */
            const uint16_t *qh = (const uint16_t *)q + h * group * D, *kh = (const uint16_t *)k_cache + h * D;
            const uint16_t *vh = (const uint16_t *)v_cache + h * D;
            uint16_t *oh = (uint16_t *)out + h * group * D;
            if (cut == 1) {
                attend_row(qh, q_stride, kh, vh, oh, row_ids[r], table, 0, n, group, heads * group, heads, ts,
                           num_heads, block_size, scale, scores, w, NULL);
                continue;
            }
            /* past PIECE keys: a one-row call's task sums its piece p into `shared` (combined below, as
             * then pieces == cut); any other, the row's pieces in turn, combined here */
            float *part = splits > 1 ? shared + (int64_t)h * group * PART : own;
            for (int i = splits > 1 ? p : 0; i < (splits > 1 ? p + 1 : cut); i++)
                attend_row(qh, q_stride, kh, vh, oh, row_ids[r], table, i * PIECE, piece_end(n, i), group,
                           heads * group, heads, ts, num_heads, block_size, scale, scores, w,
                           part + (int64_t)i * num_heads * PART);
            for (int j = 0; splits == 1 && j < num_heads; j++)
                combine(own, cut, num_heads, j, (uint16_t *)out + (row_ids[r] * num_heads + j) * D);
        }
        if (pieces > 1) { /* one row's pieces, from every thread: the loop's end waited for them */
#pragma omp for schedule(static)
            for (int j = 0; j < num_heads; j++)
                if (!failed) combine(shared, most, num_heads, j, (uint16_t *)out + row_ids[0] * num_heads * D + j * D);
        }
        free(scores);
        free(own);
        free(w);
        _tile_release();
    }
    free(shared);
    return failed ? 2 : 0;
}
