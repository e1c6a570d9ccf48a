/* Causal attention of whole prefill chunks as matrix products, for the AVX2 and AVX-512 builds
 * (each includes this file once; the vector width follows the compiler's flags: 8 lanes, or 16
 * where AVX-512 is on). One task per (chunk, KV head, part of its queries; one part unless that
 * leaves threads idle) packs that head's keys transposed [D][n] and
 * its values as rows [n][DT] (DT: head_dim rounded up to a tile's TW columns, zero-padded), fp32;
 * then, for each query head of the group and each tile of up to PR query rows, S = Q K^T and
 * O = P V both run on a broadcast micro-kernel (PR rows x TW columns, 12 or 16 accumulators, no sums
 * across lanes), with an exact causal softmax between them over the tile's visible keys. */
#ifndef INFERLAB_PREFILL_H
#define INFERLAB_PREFILL_H
#include <float.h>
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"

#ifdef __AVX512F__
typedef __m512 pvec;
#define PV_LANES 16
#define pv_load _mm512_loadu_ps
#define pv_store _mm512_storeu_ps
#define pv_set1 _mm512_set1_ps
#define pv_zero _mm512_setzero_ps
#define pv_fmadd _mm512_fmadd_ps
#define pv_mul _mm512_mul_ps
#else
typedef __m256 pvec;
#define PV_LANES 8
#define pv_load _mm256_loadu_ps
#define pv_store _mm256_storeu_ps
#define pv_set1 _mm256_set1_ps
#define pv_zero _mm256_setzero_ps
#define pv_fmadd _mm256_fmadd_ps
#define pv_mul _mm256_mul_ps
#endif
#ifdef __AVX512F__
#define PR 8                /* query rows per tile: 16 accumulators of AVX-512's 32 registers */
#else
#define PR 6                /* query rows per tile: 12 accumulators of AVX2's 16 registers */
#endif
#define TW (2 * PV_LANES)   /* columns per tile: two vectors */

/* The pool slot of a sequence's key, through its block table. */
static inline int64_t slot(const int32_t *table, int key, int block_size) {
    return (int64_t)table[key / block_size] * block_size + key % block_size;
}

/* c[i][0 .. TW) = scale * sum over k of a[i][k] * b[k][0 .. TW), for i < R (a constant at each call). */
IL_INLINE void bcast_tile(const float *a, int64_t lda, const float *b, int64_t ldb, int K, const int R,
                          float *c, int64_t ldc, float scale) {
    pvec acc[PR][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = pv_zero();
    for (int k = 0; k < K; k++) {
        const pvec b0 = pv_load(b + (int64_t)k * ldb), b1 = pv_load(b + (int64_t)k * ldb + PV_LANES);
        for (int i = 0; i < R; i++) {
            const pvec av = pv_set1(a[i * lda + k]);
            acc[i][0] = pv_fmadd(av, b0, acc[i][0]);
            acc[i][1] = pv_fmadd(av, b1, acc[i][1]);
        }
    }
    const pvec f = pv_set1(scale);
    for (int i = 0; i < R; i++) {
        pv_store(c + i * ldc, pv_mul(acc[i][0], f));
        pv_store(c + i * ldc + PV_LANES, pv_mul(acc[i][1], f));
    }
}

static void bcast_tiles(const float *a, int64_t lda, const float *b, int64_t ldb, int K, int R, float *c,
                        int64_t ldc, float scale) {
    switch (R) {
        case 1: bcast_tile(a, lda, b, ldb, K, 1, c, ldc, scale); break;
        case 2: bcast_tile(a, lda, b, ldb, K, 2, c, ldc, scale); break;
        case 3: bcast_tile(a, lda, b, ldb, K, 3, c, ldc, scale); break;
        case 4: bcast_tile(a, lda, b, ldb, K, 4, c, ldc, scale); break;
        case 5: bcast_tile(a, lda, b, ldb, K, 5, c, ldc, scale); break;
#if PR > 6
        case 6: bcast_tile(a, lda, b, ldb, K, 6, c, ldc, scale); break;
        case 7: bcast_tile(a, lda, b, ldb, K, 7, c, ldc, scale); break;
#endif
        default: bcast_tile(a, lda, b, ldb, K, PR, c, ldc, scale);
    }
}

/* K transposed [D][ld] and V as rows [n][DT], fp32, for keys 0 .. n rounded up to TW (zeros past n,
 * whose scores are masked and weights 0): what the chunk's tiles read. Keys go 16 at a time so that
 * each store to kt fills a line: key by key, each key's D stores went down a column of kt, lines `ld`
 * floats apart (2 KB at 512 keys), all in the same few sets of L1. */
static void pack_kv(const void *k_cache, const void *v_cache, const int32_t *table, int n, int ld, int64_t ts,
                    int64_t head, int D, int DT, int block_size, int dtype, float *restrict kt, float *restrict vp) {
    for (int t0 = 0; t0 < (n + TW - 1) / TW * TW; t0 += 16) {
        int64_t at[16];
        for (int i = 0; i < 16; i++) at[i] = t0 + i < n ? slot(table, t0 + i, block_size) * ts + head : -1;
        for (int d = 0; d < D; d++)
            for (int i = 0; i < 16; i++)
                kt[(int64_t)d * ld + t0 + i] = at[i] >= 0 ? il_ld(k_cache, at[i] + d, dtype) : 0.f;
        for (int i = 0; i < 16; i++) {
            float *row = vp + (int64_t)(t0 + i) * DT;
            for (int d = 0; d < D; d++) row[d] = at[i] >= 0 ? il_ld(v_cache, at[i] + d, dtype) : 0.f;
            for (int d = D; d < DT; d++) row[d] = 0.f;
        }
    }
}

static void attend_chunk(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                         int64_t row0, int count, int n, const int32_t *table, int h, int group, int num_heads,
                         int num_kv_heads, int D, int block_size, float scale, int dtype, float *kt, float *vp,
                         float *s, int ld) {
    const int64_t ts = (int64_t)num_kv_heads * D, head = (int64_t)h * D;
    const int DT = (D + TW - 1) / TW * TW;
    pack_kv(k_cache, v_cache, table, n, ld, ts, head, D, DT, block_size, dtype, kt, vp);
    float qt[PR * IL_MAX_HEAD_DIM], o[PR * (IL_MAX_HEAD_DIM + TW)], inv[PR];
    for (int g = 0; g < group; g++) {
        const int j = h * group + g;
        for (int i0 = 0; i0 < count; i0 += PR) {
            const int R = count - i0 < PR ? count - i0 : PR;
            const int first = n - count + i0; /* position of the tile's first query */
            const int keys = (first + R + TW - 1) / TW * TW; /* keys any row of the tile sees, in TWs */
            for (int i = 0; i < R; i++)
                for (int d = 0; d < D; d++) qt[i * D + d] = il_ld(q, (row0 + i0 + i) * q_stride + (int64_t)j * D + d, dtype);
            for (int t = 0; t < keys; t += TW) bcast_tiles(qt, D, kt + t, ld, D, R, s + t, ld, scale);
            for (int i = 0; i < R; i++) { /* row i sees keys 0 .. first + i; the rest weigh 0 */
                float *si = s + (int64_t)i * ld, mx = -FLT_MAX, sum = 0.f;
                const int lim = first + i + 1;
                for (int t = 0; t < lim; t++) mx = si[t] > mx ? si[t] : mx;
                for (int t = 0; t < lim; t++) si[t] = il_expf(si[t] - mx);
                for (int t = 0; t < lim; t++) sum += si[t];
                memset(si + lim, 0, sizeof(float) * (keys - lim));
                inv[i] = 1.f / sum;
            }
            for (int d = 0; d < DT; d += TW) bcast_tiles(s, ld, vp + d, DT, keys, R, o + d, DT, 1.f);
            for (int i = 0; i < R; i++)
                for (int d = 0; d < D; d++)
                    il_st(out, ((row0 + i0 + i) * num_heads + j) * (int64_t)D + d, o[i * DT + d] * inv[i], dtype);
        }
    }
}

int IL(prefill_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          const int64_t *row0, const int32_t *count, const int32_t *ctx, const int32_t *seq,
                          int num_chunks, const int32_t *block_tables, int table_stride, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, int dtype, int num_threads) {
    const int D = head_dim, group = num_heads / num_kv_heads, DT = (D + TW - 1) / TW * TW;
    if (D % 8 || D > IL_MAX_HEAD_DIM || num_heads % num_kv_heads || group > IL_MAX_GROUP) return 1;
    int max_ctx = 1, failed = 0;
    for (int c = 0; c < num_chunks; c++) max_ctx = ctx[c] > max_ctx ? ctx[c] : max_ctx;
    const int width = (max_ctx + TW - 1) / TW * TW;
    /* kt's and s's rows a line past a multiple of 4 KB apart: at 4 KB multiples (1,024 keys and up) the
     * rows a tile reads fell in one L1 set */
    const int ld = width + 16;
    const int parts = il_prefill_parts(num_chunks, num_kv_heads, num_threads); /* common.h says why */
#pragma omp parallel num_threads(num_threads) if (num_chunks > 0)
    {
        float *kt = malloc(sizeof(float) * (size_t)ld * D), *vp = malloc(sizeof(float) * (size_t)width * DT);
        float *s = malloc(sizeof(float) * PR * (size_t)ld);
        if (!kt || !vp || !s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < num_chunks * num_kv_heads * parts; task++) {
            const int c = task / (num_kv_heads * parts), h = task / parts % num_kv_heads, part = task % parts;
            const int first = il_prefill_part_row(count[c], ctx[c], part, parts, PR);
            const int last = il_prefill_part_row(count[c], ctx[c], part + 1, parts, PR);
            if (kt && vp && s && first < last) /* the part's rows, over the keys its last row sees */
                attend_chunk(q, q_stride, k_cache, v_cache, out, row0[c] + first, last - first,
                             ctx[c] - count[c] + last, block_tables + (int64_t)seq[c] * table_stride, h, group,
                             num_heads, num_kv_heads, D, block_size, scale, dtype, kt, vp, s, ld);
        }
        free(kt), free(vp), free(s);
    }
    return failed ? 2 : 0;
}
#endif
