/* Paged attention on AVX512-BF16 for bf16 caches with head_dim a multiple of 32 (up to 128): one
 * task per query row, all its heads, 16 keys at a time, so each row streams its K and V blocks
 * whole, once. Scores are bf16 pair products summed 16 keys at a time; values take the softmax
 * weights rounded to bf16 (as flash attention does), two keys per pair instruction. Other shapes
 * and dtypes go to the AVX2 kernel. Prefill chunks: the AVX2 build's matrix-product kernel
 * (avx2/prefill.h), compiled here on 16-lane vectors.
 */
#include <float.h>
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"
#include "lanes.h"

#define PREFETCH_AHEAD 4 /* blocks */

/* Softmax numerators in place: s[t] = exp(s[t] - mx); returns their sum (the denominator). */
static inline float exp_and_sum(float *restrict s, int n, float mx) {
    float sum = 0.f;
    for (int t = 0; t < n; t++) s[t] = il_expf(s[t] - mx);
    for (int t = 0; t < n; t++) sum += s[t];
    return sum;
}

/* Where the block holding token t0 starts, and how many cache lines its tokens take (0 past n):
 * blocks sit anywhere in the pool, so the hardware prefetcher cannot guess where the next one
 * starts; the caller asks for them ahead of use, a share of the lines per head it scores, as a
 * block's 96 requests at once would wait on the core's few miss buffers instead of overlapping
 * with the arithmetic. */
static inline int block_lines(const void *cache, const int32_t *table, int t0, int n, int block_size,
                              int64_t token_stride, const char **base) {
    if (t0 >= n) return 0;
    *base = (const char *)cache + (int64_t)table[t0 / block_size] * block_size * token_stride * 2;
    return (int)(((n - t0 < block_size ? n - t0 : block_size) * token_stride * 2 + 63) / 64);
}

#define CHUNK 16 /* keys per step of the row kernel: one score per fp32 lane */

/* Row pointers of keys t0 .. t0+CHUNK-1 (past n: key t0 again, whose weight will be 0). */
static inline int chunk_rows(const uint16_t **rows, const uint16_t *cache, const int32_t *table, int t0, int n,
                             int block_size, int64_t token_stride) {
    const int nt = n - t0 < CHUNK ? n - t0 : CHUNK;
    for (int t = 0; t < CHUNK; t++) {
        const int key = t0 + (t < nt ? t : 0);
        rows[t] = cache + ((int64_t)table[key / block_size] * block_size + key % block_size) * token_stride;
    }
    return nt;
}

/* bf16, head_dim D a multiple of 32 (at most 128): one task per query row, all its heads, CHUNK keys
 * at a time so K and V are streamed whole, block by block, once. Scores: bf16 pair products
 * summed 16 keys at a time. Values: the weights rounded to bf16 (as flash attention does) so that
 * two keys' values go into one bf16 pair instruction per 16 outputs, against one fp32 multiply-add
 * per key when widening V. The pair instruction leaves output dims interleaved in the fp32
 * accumulator: acc[j][c][4L + i] holds dim 32c + 8L + i (lo) and 32c + 8L + 4 + i (hi). Heads
 * h0 .. h1-1 only: the caller may split a row's heads over tasks, which then prefetch nothing (a
 * task of all heads, h0 = 0, asks for the blocks ahead). */
static inline void attend_row_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                                   const uint16_t *v_cache, uint16_t *out, int64_t row, const int32_t *table,
                                   int n, int group, int num_heads, int num_kv_heads, const int D, int block_size,
                                   float scale, int h0, int h1, float *restrict scores, float *restrict acc) {
    const int64_t token_stride = (int64_t)num_kv_heads * D;
    const int nc = D / 32;  /* 32-dim pieces of a head */
    const uint16_t *qr = q + row * q_stride;
    const uint16_t *rows[CHUNK];
    __m512 mx[IL_MAX_HEADS];
    for (int j = h0; j < h1; j++) mx[j] = _mm512_set1_ps(-FLT_MAX);
    /* K's blocks then V's are one stream to prefetch: the first few of K now, then while a block
     * is scored the stream's PREFETCH_AHEAD-th next, so V's first blocks arrive while K's last are */
    const int span = PREFETCH_AHEAD * block_size, whole = h1 - h0 == num_heads;
    const char *pf = NULL;
    for (int t = 0; whole && t < span && t < n; t += block_size)
        for (int l = 0, lines = block_lines(k_cache, table, t, n, block_size, token_stride, &pf); l < lines; l++)
            __builtin_prefetch(pf + 64 * l, 0, 1);
    for (int t0 = 0; t0 < n; t0 += CHUNK) {
        const int nt = chunk_rows(rows, k_cache, table, t0, n, block_size, token_stride);
        const __mmask16 valid = (__mmask16)((1u << nt) - 1);
        int pf_lines = 0;
        if (whole && t0 % block_size == 0) {
            const int ahead = t0 + span, v_at = ahead - (n + block_size - 1) / block_size * block_size;
            pf_lines = v_at < 0 ? block_lines(k_cache, table, ahead, n, block_size, token_stride, &pf)
                                : block_lines(v_cache, table, v_at, n, block_size, token_stride, &pf);
        }
        for (int j = h0; j < h1; j++) {  /* query head j reads KV head j / group */
            const int64_t off = (int64_t)(j / group) * D;
            for (int l = j * pf_lines / num_heads; l < (j + 1) * pf_lines / num_heads; l++)
                __builtin_prefetch(pf + 64 * l, 0, 1);
            __m512 dots[CHUNK];
            for (int t = 0; t < CHUNK; t++) {
                dots[t] = _mm512_setzero_ps();
                for (int c = 0; c < nc; c++)
                    dots[t] = _mm512_dpbf16_ps(dots[t], (__m512bh)_mm512_loadu_si512(qr + j * D + 32 * c),
                                               (__m512bh)_mm512_loadu_si512(rows[t] + off + 32 * c));
            }
            const __m512 s = _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + (int64_t)j * n + t0, valid, s);
            mx[j] = _mm512_mask_max_ps(mx[j], valid, mx[j], s);
        }
    }
    float inv[IL_MAX_HEADS];
    for (int j = h0; j < h1; j++) {
        const float sum = exp_and_sum(scores + (int64_t)j * n, n, _mm512_reduce_max_ps(mx[j]));
        inv[j] = sum > 0.f ? 1.f / sum : 0.f;
        memset(acc + j * D, 0, sizeof(float) * D);
    }
    for (int t0 = 0; t0 < n; t0 += CHUNK) {
        const int nt = chunk_rows(rows, v_cache, table, t0, n, block_size, token_stride);
        const __mmask16 valid = (__mmask16)((1u << nt) - 1);
        const int pf_lines = !whole || t0 % block_size ? 0 : block_lines(v_cache, table, t0 + span, n, block_size, token_stride, &pf);
        for (int j = h0; j < h1; j++) {
            const int64_t off = (int64_t)(j / group) * D;
            for (int l = j * pf_lines / num_heads; l < (j + 1) * pf_lines / num_heads; l++)
                __builtin_prefetch(pf + 64 * l, 0, 1);
            uint32_t pairs[CHUNK / 2];  /* weights of keys (2i, 2i+1) as one bf16 pair; 0 past n */
            _mm256_storeu_si256((__m256i *)pairs,
                                (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, scores + (int64_t)j * n + t0)));
            __m512 sum[8];
            for (int c = 0; c < 2 * nc; c++) sum[c] = _mm512_loadu_ps(acc + j * D + 16 * c);
            for (int i = 0; 2 * i < nt; i++) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32((int)pairs[i]);
                for (int c = 0; c < nc; c++) {
                    const __m512i a = _mm512_loadu_si512(rows[2 * i] + off + 32 * c);
                    const __m512i b = _mm512_loadu_si512(rows[2 * i + 1] + off + 32 * c);
                    sum[2 * c] = _mm512_dpbf16_ps(sum[2 * c], (__m512bh)_mm512_unpacklo_epi16(a, b), p);
                    sum[2 * c + 1] = _mm512_dpbf16_ps(sum[2 * c + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), p);
                }
            }
            for (int c = 0; c < 2 * nc; c++) _mm512_storeu_ps(acc + j * D + 16 * c, sum[c]);
        }
    }
    /* undo the interleave: dims 32c + 8L .. +7 are lane L of lo, then lane L of hi */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int j = h0; j < h1; j++) {
        const __m512 scale_j = _mm512_set1_ps(inv[j]);
        for (int c = 0; c < nc; c++) {
            const __m512 lo = _mm512_loadu_ps(acc + j * D + 32 * c), hi = _mm512_loadu_ps(acc + j * D + 32 * c + 16);
            uint16_t *dst = out + (row * num_heads + j) * D + 32 * c;
            _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(
                                                    _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale_j)));
            _mm256_storeu_si256((__m256i *)(dst + 16), (__m256i)_mm512_cvtneps_pbh(
                                                           _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale_j)));
        }
    }
}

/* Rows per call from which a task per row keeps every thread busy; fewer rows are split further, a
 * task per row and KV head. Each head's arithmetic is the same either way, so a row's result never
 * depends on how many rows share the call (by shape, never by thread count). */
#define ROW_TASKS_MIN 8

int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads) {
    if (dtype != IL_BF16 || head_dim % 32 || head_dim > 128 || num_heads > IL_MAX_HEADS)
        return paged_attention_avx2(q, q_stride, k_cache, v_cache, out, row_ids, seqs, lens, rows, block_tables,
                                    table_stride, num_heads, num_kv_heads, head_dim, block_size, scale, dtype,
                                    num_threads);
    const int group = num_heads / num_kv_heads;
    int max_len = 1, failed = 0;
    for (int r = 0; r < rows; r++) max_len = lens[r] > max_len ? lens[r] : max_len;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * num_heads * (size_t)max_len);
        float *acc = malloc(sizeof(float) * num_heads * head_dim);
        if (!scores || !acc) {
#pragma omp atomic write
            failed = 1;
        }
        const int splits = rows < ROW_TASKS_MIN ? num_kv_heads : 1;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < rows * splits; task++) {
            if (!scores || !acc) continue;
            const int r = task / splits, h0 = task % splits * num_heads / splits;
            const int h1 = (task % splits + 1) * num_heads / splits;
            const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
            if (head_dim == 64)
                attend_row_bf16(q, q_stride, k_cache, v_cache, out, row_ids[r], table, lens[r], group, num_heads,
                                num_kv_heads, 64, block_size, scale, h0, h1, scores, acc);
            else
                attend_row_bf16(q, q_stride, k_cache, v_cache, out, row_ids[r], table, lens[r], group, num_heads,
                                num_kv_heads, head_dim, block_size, scale, h0, h1, scores, acc);
        }
        free(scores);
        free(acc);
    }
    return failed ? 2 : 0;
}

#include "../avx2/prefill.h" /* prefill_attention, on 16-lane vectors here */
