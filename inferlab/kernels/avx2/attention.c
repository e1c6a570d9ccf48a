/* Paged attention on AVX2 + FMA, fp32 or bf16 caches (widened to fp32 on load), head_dim a
 * multiple of 8, K and V read straight from the pool through the block table, block by block.
 * Scores: 3 query heads of a group against 4 keys at a time, 8 dims per FMA, in 12 accumulators
 * summed across lanes at the end, as the linear layer's micro-kernel does; values: 3 query heads x
 * 32 dims in 12 accumulators, one broadcast weight per key and head.
 */
#include <float.h>
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"
#include "gemm.h"
#include "prefill.h" /* slot; and prefill_attention, on 8-lane vectors here */

#define PREFETCH_AHEAD 2 /* blocks */

IL_INLINE __m256 load8(const void *p, int64_t i, int dtype) {
    if (dtype == IL_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

static inline void prefetch_block(const void *cache, const int32_t *table, int t0, int n, int block_size,
                                  int64_t token_stride, int64_t head_off, int row_bytes, int elem) {
    if (t0 >= n) return;
    const char *base = (const char *)cache + (slot(table, t0 - t0 % block_size, block_size) * token_stride + head_off) * elem;
    for (int t = 0; t < block_size && t0 - t0 % block_size + t < n; t++)
        for (int b = 0; b < row_bytes; b += 64) _mm_prefetch(base + t * token_stride * elem + b, _MM_HINT_T1);
}

/* out[i] lane j = q row i (of R, D apart) . key j (of 4, pool rows at k[j]): a head's scores of 4 keys,
 * stored as one vector. */
IL_INLINE void score_tile(const float *qf, const void *const k[4], int dtype, const int D, const int R,
                          __m128 out[3]) {
    const int C = 4;
    __m256 acc[3][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) acc[i][j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) { /* 12 accumulators + 3 queries + 1 key: all 16 registers, no spill */
        __m256 qv[3];
        for (int i = 0; i < R; i++) qv[i] = _mm256_load_ps(qf + i * D + d);
        for (int j = 0; j < C; j++) {
            const __m256 kv = load8(k[j], d, dtype);
            for (int i = 0; i < R; i++) acc[i][j] = _mm256_fmadd_ps(qv[i], kv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++) out[i] = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

/* o[g][d0 .. d0 + 8W) += sum over nt keys of p[g][t] v[t][d0 ..], for G heads (p rows n apart; key t's
 * values at v + t * ts). `ahead`, unless NULL, is the same head's values in a block to come: each key
 * asks for the lines this pass will read there, so the reads ahead are spread evenly over the work. */
IL_INLINE void value_tile(const float *p, int n, const void *v, int64_t ts, int nt, int dtype, int d0, const int G,
                          const int W, float *o, const int D, const char *ahead) {
    const int elem = il_elem_size(dtype);
    __m256 acc[3][4];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < W; c++) acc[g][c] = _mm256_loadu_ps(o + g * D + d0 + 8 * c);
    for (int t = 0; t < nt; t++) {
        if (ahead)
            for (int b = 0; b < W * 8 * elem; b += 64) _mm_prefetch(ahead + (t * ts + d0) * elem + b, _MM_HINT_T0);
        __m256 w[3]; /* 12 accumulators + 3 weights + 1 value: all 16 registers, no spill */
        for (int g = 0; g < G; g++) w[g] = _mm256_set1_ps(p[(int64_t)g * n + t]);
        for (int c = 0; c < W; c++) {
            const __m256 vv = load8(v, t * ts + d0 + 8 * c, dtype);
            for (int g = 0; g < G; g++) acc[g][c] = _mm256_fmadd_ps(w[g], vv, acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < W; c++) _mm256_storeu_ps(o + g * D + d0 + 8 * c, acc[g][c]);
}

/* Query row `row`, KV heads h0 .. h1 - 1 with their query heads, one block of keys at a time, with a
 * running softmax (flash-decoding): a block's scores, then its values while its K and V are still in
 * cache; each query head's sum is rescaled when its maximum grows. A block's slots hold every head
 * side by side, so taking all of a row's heads in one task reads each block as one stretch.
 * Scratch: scores [heads][block_size], qf and o [heads][D]. */
IL_INLINE void attend_heads(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                            int64_t row, const int32_t *table, int n, int h0, int h1, int group, int num_heads,
                            int num_kv_heads, const int D, int block_size, float scale, int dtype,
                            float *restrict scores, float *restrict qf, float *restrict o) {
    const int64_t ts = (int64_t)num_kv_heads * D; /* pool elements per slot */
    const int elem = il_elem_size(dtype), nh = (h1 - h0) * group, span = (h1 - h0) * D * elem, bs = block_size;
    float mx[IL_MAX_HEADS], sum[IL_MAX_HEADS];
    for (int j = 0; j < nh; j++) {
        for (int i = 0; i < D; i++)
            qf[j * D + i] = il_ld(q, row * q_stride + (int64_t)(h0 * group + j) * D + i, dtype) * scale;
        mx[j] = -FLT_MAX, sum[j] = 0.f;
    }
    memset(o, 0, sizeof(float) * nh * D);
    for (int t = 0; t < n && t < PREFETCH_AHEAD * bs; t += bs) {
        prefetch_block(k_cache, table, t, n, bs, ts, (int64_t)h0 * D, span, elem);
        prefetch_block(v_cache, table, t, n, bs, ts, (int64_t)h0 * D, span, elem);
    }
    for (int t0 = 0; t0 < n; t0 += bs) {
        const int nt = n - t0 < bs ? n - t0 : bs;
        const int64_t first_slot = (int64_t)table[t0 / bs] * bs * ts;
        const char *kb = (const char *)k_cache + first_slot * elem, *vb = (const char *)v_cache + first_slot * elem;
        /* the block AHEAD blocks on: asked for a few slots at a time, spread over the work (a burst of
         * hundreds of prefetches stalls on the CPU's few outstanding-miss buffers) */
        const int64_t ahead = t0 + PREFETCH_AHEAD * bs < n ? (int64_t)table[t0 / bs + PREFETCH_AHEAD] * bs * ts : -1;
        for (int t = 0; t < nt; t += 4) { /* scores of this block's keys, 4 slots (all heads) at a time */
            for (int h = h0; h < h1; h++) {
                if (ahead >= 0) /* keys t .. t + 3 of the block ahead, this head's part (its values: below) */
                    for (int j = t; j < t + 4 && j < bs; j++)
                        for (int b = 0; b < D * elem; b += 64)
                            _mm_prefetch((const char *)k_cache + (ahead + j * ts + (int64_t)h * D) * elem + b, _MM_HINT_T0);
                const void *k[4]; /* past the block's keys: the last again, not stored */
                for (int j = 0; j < 4; j++) k[j] = kb + ((t + j < nt ? t + j : nt - 1) * ts + (int64_t)h * D) * elem;
                for (int g0 = 0; g0 < group; g0 += 3) {
                    const int R = group - g0 < 3 ? group - g0 : 3, first = (h - h0) * group + g0;
                    __m128 r[3];
                    switch (R) {
                        case 1: score_tile(qf + first * D, k, dtype, D, 1, r); break;
                        case 2: score_tile(qf + first * D, k, dtype, D, 2, r); break;
                        default: score_tile(qf + first * D, k, dtype, D, 3, r);
                    }
                    for (int g = 0; g < R; g++) { /* lanes past nt are never read */
                        float *dst = scores + (first + g) * bs + t;
                        if (t + 4 <= bs) _mm_storeu_ps(dst, r[g]);
                        else {
                            float v[4];
                            _mm_storeu_ps(v, r[g]);
                            for (int j = 0; j < 4 && t + j < nt; j++) dst[j] = v[j];
                        }
                    }
                }
            }
        }
        for (int j = 0; j < nh; j++) { /* running softmax: weights of this block, the sum so far rescaled */
            float *sj = scores + j * bs, m = mx[j], part = 0.f;
            for (int t = 0; t < nt; t++) m = sj[t] > m ? sj[t] : m;
            for (int t = 0; t < nt; t++) sj[t] = il_expf(sj[t] - m);
            for (int t = 0; t < nt; t++) part += sj[t];
            if (m > mx[j]) {
                const float shrink = il_expf(mx[j] - m);
                for (int i = 0; i < D; i++) o[j * D + i] *= shrink;
                sum[j] *= shrink, mx[j] = m;
            }
            sum[j] += part;
        }
        for (int h = h0; h < h1; h++) /* values: 3 heads x 32 dims per pass over the block's keys */
            for (int g0 = 0; g0 < group; g0 += 3) {
                const int G = group - g0 < 3 ? group - g0 : 3, first = (h - h0) * group + g0;
                const float *p = scores + first * bs;
                const void *v = vb + (int64_t)h * D * elem;
                const char *v_ahead = ahead >= 0 ? (const char *)v_cache + (ahead + (int64_t)h * D) * elem : NULL;
                for (int d0 = 0; d0 < D; d0 += 32) {
                    const int W = D - d0 < 32 ? (D - d0) / 8 : 4;
#define VALUES(g, w) value_tile(p, bs, v, ts, nt, dtype, d0, g, w, o + first * D, D, v_ahead)
                    switch (G * 4 + W) {
                        case 5: VALUES(1, 1); break; case 6: VALUES(1, 2); break; case 7: VALUES(1, 3); break;
                        case 8: VALUES(1, 4); break; case 9: VALUES(2, 1); break; case 10: VALUES(2, 2); break;
                        case 11: VALUES(2, 3); break; case 12: VALUES(2, 4); break; case 13: VALUES(3, 1); break;
                        case 14: VALUES(3, 2); break; case 15: VALUES(3, 3); break; default: VALUES(3, 4);
                    }
#undef VALUES
                }
            }
    }
    for (int j = 0; j < nh; j++) {
        const int64_t dst = (row * num_heads + h0 * group + j) * D;
        const float inv = 1.f / sum[j]; /* >= 1 at the end: the maximum's own weight */
        for (int i = 0; i < D; i++) il_st(out, dst + i, o[j * D + i] * inv, dtype);
    }
}

/* Calls of at least this many rows take a task per row (all heads: each block read as one stretch);
 * fewer take a task per (row, KV head), so one request's decode still spreads over the threads.
 * Every head is computed the same way either way. */
#define ROW_TASKS_MIN 4

int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads) {
    const int group = num_heads / num_kv_heads;
    if (head_dim % 8)
        return paged_attention_generic(q, q_stride, k_cache, v_cache, out, row_ids, seqs, lens, rows, block_tables,
                                       table_stride, num_heads, num_kv_heads, head_dim, block_size, scale, dtype,
                                       num_threads);
    const int per_row = rows >= ROW_TASKS_MIN, heads_per_task = per_row ? num_kv_heads : 1;
    const int tasks = per_row ? rows : rows * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const size_t nh = (size_t)heads_per_task * group;
        float *scores = malloc(sizeof(float) * nh * (size_t)block_size);
        float *qf = aligned_alloc(32, sizeof(float) * nh * head_dim), *o = malloc(sizeof(float) * nh * head_dim);
        if (!scores || !qf || !o) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            if (!scores || !qf || !o) continue;
            const int r = per_row ? task : task / num_kv_heads, h0 = per_row ? 0 : task % num_kv_heads;
            const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
#define ATTEND(D) attend_heads(q, q_stride, k_cache, v_cache, out, row_ids[r], table, lens[r], h0,                \
                               h0 + heads_per_task, group, num_heads, num_kv_heads, D, block_size, scale, dtype, \
                               scores, qf, o)
            switch (head_dim) { /* the common head sizes get loops of known length */
                case 64: ATTEND(64); break;
                case 128: ATTEND(128); break;
                default: ATTEND(head_dim);
            }
#undef ATTEND
        }
        free(scores), free(qf), free(o);
    }
    return failed ? 2 : 0;
}
