/* Paged attention in plain C, reading K/V in place through each sequence's block table.
 *
 * One task per (query row, KV head): the row's query heads that share that KV head (GQA group)
 * score every visible key, take a softmax, and sum the values. K and V are each read once per
 * task, straight from the pool: nothing is gathered into a new tensor. Rows of one prefill chunk
 * see keys up to their own position (causal); a decode row sees its whole context. bf16 is widened
 * to fp32 on load and all arithmetic is fp32. The definition the ISA kernels are tested against.
 */
#include <float.h>
#include <stdlib.h>

#include "../common.h"

#define PREFETCH_AHEAD 4 /* blocks */

static inline void load_row(float *restrict dst, const void *base, int64_t offset, int n, int dtype) {
    for (int i = 0; i < n; i++) dst[i] = il_ld(base, offset + i, dtype);
}

/* Ask for a later block's rows of this head ahead of use: blocks sit anywhere in the pool, so the
 * hardware prefetcher cannot guess where the next one starts. */
static inline void prefetch_block(const void *cache, const int32_t *table, int t0, int n, int block_size,
                                  int64_t token_stride, int64_t head_off, int row_bytes, int elem) {
    if (t0 >= n) return;
    const char *base = (const char *)cache + ((int64_t)table[t0 / block_size] * block_size * token_stride + head_off) * elem;
    const int nt = n - t0 < block_size ? n - t0 : block_size;
    for (int t = 0; t < nt; t++)
        for (int b = 0; b < row_bytes; b += 64) __builtin_prefetch(base + t * token_stride * elem + b, 0, 1);
}

/* One task: query row `row`'s heads h*group .. h*group+group-1 against KV head h. `D` is a
 * compile-time constant at the call sites below, so the inner loops vectorize without tails. */
static inline void attend_one(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                              int64_t row, const int32_t *table, int n, int h, int group, int num_heads,
                              int num_kv_heads, const int D, int block_size, float scale, int dtype,
                              float *restrict scores) {
    float qv[IL_MAX_GROUP][IL_MAX_HEAD_DIM], acc[IL_MAX_GROUP][IL_MAX_HEAD_DIM], kv[IL_MAX_HEAD_DIM], mx[IL_MAX_GROUP];
    const int64_t token_stride = (int64_t)num_kv_heads * D;
    const int elem = il_elem_size(dtype);
    for (int g = 0; g < group; g++) {
        load_row(qv[g], q, row * q_stride + (int64_t)(h * group + g) * D, D, dtype);
        for (int i = 0; i < D; i++) qv[g][i] *= scale;
        mx[g] = -FLT_MAX;
    }
    for (int t0 = 0; t0 < n; t0 += block_size) { /* pass 1: scores and their maximum, block by block */
        const int64_t base = ((int64_t)table[t0 / block_size] * block_size * num_kv_heads + h) * D;
        const int nt = n - t0 < block_size ? n - t0 : block_size;
        prefetch_block(k_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride, (int64_t)h * D,
                       D * elem, elem);
        for (int t = 0; t < nt; t++) {
            load_row(kv, k_cache, base + t * token_stride, D, dtype);
            for (int g = 0; g < group; g++) {
                float s = 0.f;
                for (int i = 0; i < D; i++) s += qv[g][i] * kv[i];
                scores[g * n + t0 + t] = s;
                mx[g] = s > mx[g] ? s : mx[g];
            }
        }
    }
    float denom[IL_MAX_GROUP];
    for (int g = 0; g < group; g++) { /* pass 2: softmax weights, then the weighted sum of values */
        float sum = 0.f;
        for (int t = 0; t < n; t++) scores[g * n + t] = il_expf(scores[g * n + t] - mx[g]);
        for (int t = 0; t < n; t++) sum += scores[g * n + t];
        denom[g] = sum;
        memset(acc[g], 0, sizeof(float) * D);
    }
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const int64_t base = ((int64_t)table[t0 / block_size] * block_size * num_kv_heads + h) * D;
        const int nt = n - t0 < block_size ? n - t0 : block_size;
        prefetch_block(v_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride, (int64_t)h * D,
                       D * elem, elem);
        for (int t = 0; t < nt; t++) {
            load_row(kv, v_cache, base + t * token_stride, D, dtype);
            for (int g = 0; g < group; g++) {
                const float p = scores[g * n + t0 + t];
                for (int i = 0; i < D; i++) acc[g][i] += p * kv[i];
            }
        }
    }
    for (int g = 0; g < group; g++) {
        const int64_t o = (row * num_heads + h * group + g) * D;
        const float inv = denom[g] > 0.f ? 1.f / denom[g] : 0.f;
        for (int i = 0; i < D; i++) il_st(out, o + i, acc[g][i] * inv, dtype);
    }
}

int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads) {
    const int group = num_heads / num_kv_heads;
    int max_len = 1, failed = 0;
    for (int r = 0; r < rows; r++) max_len = lens[r] > max_len ? lens[r] : max_len;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * (size_t)max_len);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < num_kv_heads; h++) {
                if (!scores) continue;
                const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
#define ATTEND(D) attend_one(q, q_stride, k_cache, v_cache, out, row_ids[r], table, lens[r], h, group, num_heads, \
                             num_kv_heads, D, block_size, scale, dtype, scores)
                switch (head_dim) { /* the common head sizes get loops of known length */
                    case 64: ATTEND(64); break;
                    case 128: ATTEND(128); break;
                    default: ATTEND(head_dim);
                }
#undef ATTEND
            }
        free(scores);
    }
    return failed ? 2 : 0;
}

int IL(prefill_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          const int64_t *row0, const int32_t *count, const int32_t *ctx, const int32_t *seq,
                          int num_chunks, const int32_t *block_tables, int table_stride, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, int dtype, int num_threads) {
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)out, (void)row0, (void)count, (void)ctx, (void)seq;
    (void)num_chunks, (void)block_tables, (void)table_stride, (void)num_heads, (void)num_kv_heads, (void)head_dim;
    (void)block_size, (void)scale, (void)dtype, (void)num_threads;
    return 1; /* no matrix-product kernel in plain C: PyTorch's SDPA does it better */
}
