/* Paged attention on CPU, reading K/V in place through each sequence's block table.
 *
 * One task per (query row, KV head): the row's query heads that share that KV head (GQA group)
 * score every visible key, take a softmax, and sum the values. K and V are each read once per
 * task, straight from the pool: nothing is gathered into a new tensor. Rows of one prefill chunk
 * see keys up to their own position (causal); a decode row sees its whole context.
 *
 * Plain C with loops the compiler vectorizes (-O3 -march=native -ffast-math: no inf or NaN
 * arises here, so the finite-math assumption holds); bf16 is widened to fp32 on
 * load and all arithmetic is fp32. OpenMP splits tasks over threads; the library links the same
 * libgomp as PyTorch, so both share one thread pool.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1 };
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define MAX_HEADS 128
#define PREFETCH_AHEAD 4 /* blocks */

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* Copy n elements of type `dtype` starting at element `offset` of `base` into fp32 `dst`. */
static inline void load_row(float *restrict dst, const void *base, int64_t offset, int n, int dtype) {
    if (dtype == BF16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    }
}

#if defined(__AVX512BF16__)
/* q . k for bf16 rows of length D (a multiple of 32): one instruction per 32 pairs, fp32 sums. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < D; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    return _mm512_reduce_add_ps(acc);
}
#endif

/* Softmax numerators in place: s[t] = exp(s[t] - mx); returns their sum (the denominator). */
static inline float exp_and_sum(float *restrict s, int n, float mx) {
    float sum = 0.f;
    for (int t = 0; t < n; t++) s[t] = expf(s[t] - mx);
    for (int t = 0; t < n; t++) sum += s[t];
    return sum;
}

/* Ask for the next block's rows of this head ahead of use: blocks sit anywhere in the pool, so
 * the hardware prefetcher cannot guess where the next one starts. */
static inline void prefetch_block(const void *cache, const int32_t *table, int t0, int n, int block_size,
                                  int64_t token_stride, int64_t head_off, int row_bytes, int elem) {
    if (t0 >= n) return;
    const int64_t first = (int64_t)table[t0 / block_size] * block_size * token_stride + head_off;
    const char *base = (const char *)cache + first * elem;
    const int nt = n - t0 < block_size ? n - t0 : block_size;
    for (int t = 0; t < nt; t++)
        for (int b = 0; b < row_bytes; b += 64) __builtin_prefetch(base + t * token_stride * elem + b, 0, 1);
}

/* One task: query row r's heads h*group .. h*group+group-1 against KV head h. `D` is a
 * compile-time constant at each call site below, so the inner loops vectorize without tails. */
static inline void attend_one(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                              void *out, int64_t row, const int32_t *table, int n, int h, int group,
                              int num_heads, int num_kv_heads, const int D, int block_size, float scale,
                              int dtype, float *restrict scores) {
    float qv[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], kv[MAX_HEAD_DIM];
    const int64_t token_stride = (int64_t)num_kv_heads * D;
    const int elem = dtype == BF16 ? 2 : 4;
    for (int g = 0; g < group; g++) {
        load_row(qv[g], q, row * q_stride + (h * group + g) * D, D, dtype);
        for (int i = 0; i < D; i++) qv[g][i] *= scale;
    }
    /* pass 1: scores and their maximum */
    float mx[MAX_GROUP];
    for (int g = 0; g < group; g++) mx[g] = -FLT_MAX;
    for (int t0 = 0; t0 < n; t0 += block_size) {  /* block by block: a block's tokens are contiguous */
        const int64_t base = ((int64_t)table[t0 / block_size] * block_size * num_kv_heads + h) * D;
        const int nt = n - t0 < block_size ? n - t0 : block_size;
        prefetch_block(k_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride,
                       (int64_t)h * D, D * elem, elem);
#if defined(__AVX512BF16__)
        if (dtype == BF16 && D % 32 == 0) {  /* bf16 pairs straight from the pool, no widening */
            const uint16_t *qb = (const uint16_t *)q + row * q_stride + h * group * D;
            for (int t = 0; t < nt; t++) {
                const uint16_t *k = (const uint16_t *)k_cache + base + t * token_stride;
                for (int g = 0; g < group; g++) {
                    const float s = dot_bf16(qb + g * D, k, D) * scale;
                    scores[g * n + t0 + t] = s;
                    mx[g] = s > mx[g] ? s : mx[g];
                }
            }
            continue;
        }
#endif
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
    /* pass 2: softmax weights, then the weighted sum of values */
    float denom[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        denom[g] = exp_and_sum(scores + g * n, n, mx[g]);
        memset(acc[g], 0, sizeof(float) * D);
    }
#if defined(__AVX512BF16__)
    if (dtype == BF16 && D % 16 == 0 && D <= 128) {  /* a query head at a time, its sum in registers */
        for (int g = 0; g < group; g++) {
            __m512 sum[8];
            for (int c = 0; c < D / 16; c++) sum[c] = _mm512_setzero_ps();
            for (int t0 = 0; t0 < n; t0 += block_size) {
                const int64_t base = ((int64_t)table[t0 / block_size] * block_size * num_kv_heads + h) * D;
                const int nt = n - t0 < block_size ? n - t0 : block_size;
                if (g == 0)
                    prefetch_block(v_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride,
                                   (int64_t)h * D, D * elem, elem);
                for (int t = 0; t < nt; t++) {
                    const uint16_t *v = (const uint16_t *)v_cache + base + t * token_stride;
                    const __m512 p = _mm512_set1_ps(scores[g * n + t0 + t]);
                    for (int c = 0; c < D / 16; c++) {
                        __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 16 * c)));
                        sum[c] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)), sum[c]);
                    }
                }
            }
            for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(acc[g] + 16 * c, sum[c]);
        }
    } else
#endif
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const int64_t base = ((int64_t)table[t0 / block_size] * block_size * num_kv_heads + h) * D;
        const int nt = n - t0 < block_size ? n - t0 : block_size;
        prefetch_block(v_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride,
                       (int64_t)h * D, D * elem, elem);
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
        if (dtype == BF16) {
            for (int i = 0; i < D; i++) ((uint16_t *)out)[o + i] = f32_to_bf16(acc[g][i] * inv);
        } else {
            for (int i = 0; i < D; i++) ((float *)out)[o + i] = acc[g][i] * inv;
        }
    }
}

#if defined(__AVX512BF16__)
#define CHUNK 16 /* keys per step of the row kernel: one score per fp32 lane */

/* Lane t of the result = the sum of v[t]'s 16 lanes: 16 dot products finished with 45 shuffles
 * and adds, where 16 separate horizontal sums would take about 130. */
static inline __m512 sum_lanes16(const __m512 v[CHUNK]) {
    __m512 s2[8], s4[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) */
        s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: (a, b, c, d), each a quarter of its sum */
        const __m512d x = _mm512_castps_pd(s2[2 * i]), y = _mm512_castps_pd(s2[2 * i + 1]);
        s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[0], s4[1], 0x88), _mm512_shuffle_f32x4(s4[0], s4[1], 0xdd));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2], s4[3], 0x88), _mm512_shuffle_f32x4(s4[2], s4[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

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
 * accumulator: acc[j][c][4L + i] holds dim 32c + 8L + i (lo) and 32c + 8L + 4 + i (hi). */
static inline void attend_row_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                                   const uint16_t *v_cache, uint16_t *out, int64_t row, const int32_t *table,
                                   int n, int group, int num_heads, int num_kv_heads, const int D, int block_size,
                                   float scale, float *restrict scores, float *restrict acc) {
    const int64_t token_stride = (int64_t)num_kv_heads * D;
    const int nc = D / 32;  /* 32-dim pieces of a head */
    const uint16_t *qr = q + row * q_stride;
    const uint16_t *rows[CHUNK];
    __m512 mx[MAX_HEADS];
    for (int j = 0; j < num_heads; j++) mx[j] = _mm512_set1_ps(-FLT_MAX);
    for (int t0 = 0; t0 < n; t0 += CHUNK) {
        const int nt = chunk_rows(rows, k_cache, table, t0, n, block_size, token_stride);
        const __mmask16 valid = (__mmask16)((1u << nt) - 1);
        if (t0 % block_size == 0)
            prefetch_block(k_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride, 0,
                           (int)(token_stride * 2), 2);
        for (int j = 0; j < num_heads; j++) {  /* query head j reads KV head j / group */
            const int64_t off = (int64_t)(j / group) * D;
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
    float inv[MAX_HEADS];
    for (int j = 0; j < num_heads; j++) {
        const float sum = exp_and_sum(scores + (int64_t)j * n, n, _mm512_reduce_max_ps(mx[j]));
        inv[j] = sum > 0.f ? 1.f / sum : 0.f;
        memset(acc + j * D, 0, sizeof(float) * D);
    }
    for (int t0 = 0; t0 < n; t0 += CHUNK) {
        const int nt = chunk_rows(rows, v_cache, table, t0, n, block_size, token_stride);
        const __mmask16 valid = (__mmask16)((1u << nt) - 1);
        if (t0 % block_size == 0)
            prefetch_block(v_cache, table, t0 + PREFETCH_AHEAD * block_size, n, block_size, token_stride, 0,
                           (int)(token_stride * 2), 2);
        for (int j = 0; j < num_heads; j++) {
            const int64_t off = (int64_t)(j / group) * D;
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
    for (int j = 0; j < num_heads; j++) {
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
#endif

int paged_attention_amx(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *rows, const int32_t *seqs, const int32_t *lens, int num_rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads,
                        int head_dim, int block_size, float scale, int num_threads);  /* attention_amx.c */

/* q, out: [num_tokens, num_heads, head_dim], q's rows q_stride elements apart;
 * k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; for each of num_rows tasks:
 * rows[r] (its row in q/out), seqs[r] (its row in block_tables, which has table_stride ints per
 * sequence) and lens[r] (keys it sees). */
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                    const int64_t *rows, const int32_t *seqs, const int32_t *lens, int num_rows,
                    const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads,
                    int head_dim, int block_size, float scale, int dtype, int num_threads) {
    const int group = num_heads / num_kv_heads;
    if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP || num_heads % num_kv_heads) return 1;
    int max_len = 1;
    for (int r = 0; r < num_rows; r++) max_len = lens[r] > max_len ? lens[r] : max_len;
    int failed = 0;

    /* whole rows per task where there are enough rows to keep every thread busy (measured 20% faster
     * at 64 decodes: blocks are read whole), else (row, KV head) tasks; on AMX tiles where they run */
    if (dtype == BF16 && num_rows >= 2 * num_threads) {
        const int status = paged_attention_amx(q, q_stride, k_cache, v_cache, out, rows, seqs, lens, num_rows,
                                               block_tables, table_stride, num_heads, num_kv_heads, head_dim,
                                               block_size, scale, num_threads);
        if (status != 1) return status;
    }
#if defined(__AVX512BF16__)
    if (dtype == BF16 && head_dim % 32 == 0 && head_dim <= 128 && num_heads <= MAX_HEADS &&
        num_rows >= 2 * num_threads) {
#pragma omp parallel num_threads(num_threads)
        {
            float *scores = malloc(sizeof(float) * num_heads * (size_t)max_len);
            float *acc = malloc(sizeof(float) * num_heads * head_dim);
            if (!scores || !acc) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < num_rows; r++) {
                if (!scores || !acc) continue;
                const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
                if (head_dim == 64)
                    attend_row_bf16(q, q_stride, k_cache, v_cache, out, rows[r], table, lens[r], group, num_heads,
                                    num_kv_heads, 64, block_size, scale, scores, acc);
                else
                    attend_row_bf16(q, q_stride, k_cache, v_cache, out, rows[r], table, lens[r], group, num_heads,
                                    num_kv_heads, head_dim, block_size, scale, scores, acc);
            }
            free(scores);
            free(acc);
        }
        return failed ? 2 : 0;
    }
#endif
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * (size_t)max_len);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int r = 0; r < num_rows; r++) {
            for (int h = 0; h < num_kv_heads; h++) {
                if (!scores) continue;
                const int32_t *table = block_tables + (int64_t)seqs[r] * table_stride;
#define ATTEND(D) attend_one(q, q_stride, k_cache, v_cache, out, rows[r], table, lens[r], h, group, num_heads, \
                             num_kv_heads, D, block_size, scale, dtype, scores)
                switch (head_dim) {  /* the common head sizes get loops of known length */
                    case 64: ATTEND(64); break;
                    case 128: ATTEND(128); break;
                    default: ATTEND(head_dim);
                }
#undef ATTEND
            }
        }
        free(scores);
    }
    return failed ? 2 : 0;
}
