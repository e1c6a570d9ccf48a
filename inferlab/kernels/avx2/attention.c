/* Paged attention on AVX2 + FMA, fp32 or bf16 caches (widened to fp32 on load), head_dim a
 * multiple of 8. One task per (query row, KV head), as in the portable kernel, so one request's
 * decode still spreads over the threads: the group's query heads score 8 keys at a time (8
 * accumulators summed across lanes together), take a softmax, and sum the values 16 keys at a
 * time. K and V are read straight from the pool through the block table, once per task.
 */
#include <float.h>
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"
#include "gemm.h"

#define PREFETCH_AHEAD 4 /* blocks */

IL_INLINE __m256 load8(const void *p, int64_t i, int dtype) {
    if (dtype == IL_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

/* lane i = the sum of v[i]'s 8 lanes */
IL_INLINE __m256 hsum8(const __m256 v[8]) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

static inline int64_t slot(const int32_t *table, int key, int block_size) {
    return (int64_t)table[key / block_size] * block_size + key % block_size;
}

static inline void prefetch_block(const void *cache, const int32_t *table, int t0, int n, int block_size,
                                  int64_t token_stride, int64_t head_off, int row_bytes, int elem) {
    if (t0 >= n) return;
    const char *base = (const char *)cache + (slot(table, t0 - t0 % block_size, block_size) * token_stride + head_off) * elem;
    for (int t = 0; t < block_size && t0 - t0 % block_size + t < n; t++)
        for (int b = 0; b < row_bytes; b += 64) _mm_prefetch(base + t * token_stride * elem + b, _MM_HINT_T1);
}

IL_INLINE void attend(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          int64_t row, const int32_t *table, int n, int h, int group, int num_heads, int num_kv_heads,
                          const int D, int block_size, float scale, int dtype, float *restrict scores,
                          float *restrict acc) {
    const int64_t ts = (int64_t)num_kv_heads * D, head = (int64_t)h * D; /* pool elements per slot; this head's offset */
    const int elem = il_elem_size(dtype);
    float qf[IL_MAX_GROUP * IL_MAX_HEAD_DIM] __attribute__((aligned(32))), mx[IL_MAX_GROUP];
    for (int g = 0; g < group; g++) {
        for (int i = 0; i < D; i++) qf[g * D + i] = il_ld(q, row * q_stride + (int64_t)(h * group + g) * D + i, dtype) * scale;
        mx[g] = -FLT_MAX;
    }
    for (int t0 = 0; t0 < n; t0 += 8) { /* scores, 8 keys at a time (past n: the last key again, not stored) */
        int64_t at[8];
        for (int t = 0; t < 8; t++) at[t] = slot(table, t0 + t < n ? t0 + t : n - 1, block_size) * ts + head;
        if (t0 % block_size < 8)
            prefetch_block(k_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, ts, head, D * elem, elem);
        const int nt = n - t0 < 8 ? n - t0 : 8;
        for (int g = 0; g < group; g++) {
            __m256 dot[8];
            for (int t = 0; t < 8; t++) {
                dot[t] = _mm256_setzero_ps();
                for (int c = 0; c < D; c += 8)
                    dot[t] = _mm256_fmadd_ps(_mm256_load_ps(qf + g * D + c), load8(k_cache, at[t] + c, dtype), dot[t]);
            }
            float s[8];
            _mm256_storeu_ps(s, hsum8(dot));
            for (int t = 0; t < nt; t++) {
                scores[g * n + t0 + t] = s[t];
                mx[g] = s[t] > mx[g] ? s[t] : mx[g];
            }
        }
    }
    float inv[IL_MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *sg = scores + g * n, sum = 0.f;
        for (int t = 0; t < n; t++) sg[t] = expf(sg[t] - mx[g]);
        for (int t = 0; t < n; t++) sum += sg[t];
        inv[g] = 1.f / sum; /* >= 1: the maximum's own weight */
        memset(acc + g * D, 0, sizeof(float) * D);
    }
    for (int t0 = 0; t0 < n; t0 += 16) { /* values, 16 keys at a time, every query head of the group */
        const int nt = n - t0 < 16 ? n - t0 : 16;
        int64_t at[16];
        for (int t = 0; t < nt; t++) at[t] = slot(table, t0 + t, block_size) * ts + head;
        if (t0 % block_size < 16)
            prefetch_block(v_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, ts, head, D * elem, elem);
        for (int g = 0; g < group; g++)
            for (int c = 0; c < D; c += 32) { /* 4 accumulators in registers per pass over the 16 keys */
                const int w = D - c < 32 ? (D - c) / 8 : 4;
                __m256 a[4];
                for (int i = 0; i < w; i++) a[i] = _mm256_loadu_ps(acc + g * D + c + 8 * i);
                for (int t = 0; t < nt; t++) {
                    const __m256 p = _mm256_set1_ps(scores[g * n + t0 + t]);
                    for (int i = 0; i < w; i++) a[i] = _mm256_fmadd_ps(p, load8(v_cache, at[t] + c + 8 * i, dtype), a[i]);
                }
                for (int i = 0; i < w; i++) _mm256_storeu_ps(acc + g * D + c + 8 * i, a[i]);
            }
    }
    for (int g = 0; g < group; g++) {
        const int64_t o = (row * num_heads + h * group + g) * D;
        for (int i = 0; i < D; i++) il_st(out, o + i, acc[g * D + i] * inv[g], dtype);
    }
}

int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads) {
    const int group = num_heads / num_kv_heads;
    if (head_dim % 8)
        return paged_attention_generic(q, q_stride, k_cache, v_cache, out, row_ids, seqs, lens, rows, block_tables,
                                       table_stride, num_heads, num_kv_heads, head_dim, block_size, scale, dtype,
                                       num_threads);
    int max_len = 1, failed = 0;
    for (int r = 0; r < rows; r++) max_len = lens[r] > max_len ? lens[r] : max_len;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * (size_t)max_len);
        float *acc = malloc(sizeof(float) * group * head_dim);
        if (!scores || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < num_kv_heads; h++) {
                if (!scores || !acc) continue;
                const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
#define ATTEND(D) attend(q, q_stride, k_cache, v_cache, out, row_ids[r], table, lens[r], h, group, num_heads, \
                         num_kv_heads, D, block_size, scale, dtype, scores, acc)
                switch (head_dim) { /* the common head sizes get loops of known length */
                    case 64: ATTEND(64); break;
                    case 128: ATTEND(128); break;
                    default: ATTEND(head_dim);
                }
#undef ATTEND
            }
        free(scores);
        free(acc);
    }
    return failed ? 2 : 0;
}

/* Causal attention of whole prefill chunks as matrix products. One task per (chunk, KV head) packs
 * that head's keys as rows [n][D] and its values transposed [D][n], fp32; then, for each query head
 * of the group and each tile of MR query rows, S = Q K^T and O = P V both run on the linear layer's
 * micro-kernel (`gemm.h`), with an exact softmax between them over the tile's visible keys. */
static void attend_chunk(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                         int64_t row0, int count, int n, const int32_t *table, int h, int group, int num_heads,
                         int num_kv_heads, int D, int block_size, float scale, int dtype, float *kp, float *vt,
                         float *s, int width) {
    const int64_t ts = (int64_t)num_kv_heads * D, head = (int64_t)h * D;
    for (int t = 0; t < n; t++) {
        const int64_t at = slot(table, t, block_size) * ts + head;
        for (int d = 0; d < D; d++) kp[(int64_t)t * D + d] = il_ld(k_cache, at + d, dtype);
        for (int d = 0; d < D; d++) vt[(int64_t)d * width + t] = il_ld(v_cache, at + d, dtype);
    }
    for (int d = 0; d < D; d++) memset(vt + (int64_t)d * width + n, 0, sizeof(float) * (width - n));
    float qt[MR * IL_MAX_HEAD_DIM] __attribute__((aligned(32))), o[MR * IL_MAX_HEAD_DIM], inv[MR];
    for (int g = 0; g < group; g++) {
        const int j = h * group + g;
        for (int i0 = 0; i0 < count; i0 += MR) {
            const int R = count - i0 < MR ? count - i0 : MR;
            const int first = n - count + i0; /* position of the tile's first query */
            const int keys = first + R, keys8 = (keys + 7) / 8 * 8;
            for (int i = 0; i < R; i++)
                for (int d = 0; d < D; d++)
                    qt[i * D + d] = il_ld(q, (row0 + i0 + i) * q_stride + (int64_t)j * D + d, dtype) * scale;
            for (int t = 0; t < keys; t += NR) { /* S = Q K^T over the keys any row of the tile sees */
                const int C = keys - t < NR ? keys - t : NR;
                __m128 r[NR];
                tile(qt, D, kp + (int64_t)t * D, D, D, R, C, r);
                for (int c = 0; c < C; c++) {
                    float v[4];
                    _mm_storeu_ps(v, r[c]);
                    for (int i = 0; i < R; i++) s[(int64_t)i * width + t + c] = v[i];
                }
            }
            for (int i = 0; i < R; i++) { /* row i sees keys 0 .. first + i; the rest weigh 0 */
                float *si = s + (int64_t)i * width, mx = -FLT_MAX, sum = 0.f;
                const int lim = first + i + 1;
                for (int t = 0; t < lim; t++) mx = si[t] > mx ? si[t] : mx;
                for (int t = 0; t < lim; t++) si[t] = expf(si[t] - mx);
                for (int t = 0; t < lim; t++) sum += si[t];
                memset(si + lim, 0, sizeof(float) * (keys8 - lim));
                inv[i] = 1.f / sum;
            }
            for (int d = 0; d < D; d += NR) { /* O = P V, V transposed so both run along the keys */
                const int C = D - d < NR ? D - d : NR;
                __m128 r[NR];
                tile(s, width, vt + (int64_t)d * width, width, keys8, R, C, r);
                for (int c = 0; c < C; c++) {
                    float v[4];
                    _mm_storeu_ps(v, r[c]);
                    for (int i = 0; i < R; i++) o[i * D + d + c] = v[i] * inv[i];
                }
            }
            for (int i = 0; i < R; i++)
                for (int d = 0; d < D; d++)
                    il_st(out, ((row0 + i0 + i) * num_heads + j) * (int64_t)D + d, o[i * D + d], dtype);
        }
    }
}

int IL(prefill_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          const int64_t *row0, const int32_t *count, const int32_t *ctx, const int32_t *seq,
                          int num_chunks, const int32_t *block_tables, int table_stride, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, int dtype, int num_threads) {
    const int D = head_dim, group = num_heads / num_kv_heads;
    if (D % 8 || D > IL_MAX_HEAD_DIM || num_heads % num_kv_heads || group > IL_MAX_GROUP) return 1;
    int max_ctx = 1, failed = 0;
    for (int c = 0; c < num_chunks; c++) max_ctx = ctx[c] > max_ctx ? ctx[c] : max_ctx;
    const int width = (max_ctx + 7) / 8 * 8;
#pragma omp parallel num_threads(num_threads) if (num_chunks > 0)
    {
        float *kp = malloc(sizeof(float) * (size_t)width * D), *vt = malloc(sizeof(float) * (size_t)width * D);
        float *s = malloc(sizeof(float) * MR * (size_t)width);
        if (!kp || !vt || !s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int c = 0; c < num_chunks; c++)
            for (int h = 0; h < num_kv_heads; h++)
                if (kp && vt && s)
                    attend_chunk(q, q_stride, k_cache, v_cache, out, row0[c], count[c], ctx[c],
                                 block_tables + (int64_t)seq[c] * table_stride, h, group, num_heads, num_kv_heads, D,
                                 block_size, scale, dtype, kp, vt, s, width);
        free(kp), free(vt), free(s);
    }
    return failed ? 2 : 0;
}
