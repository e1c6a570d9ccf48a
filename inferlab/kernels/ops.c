/* Fused elementwise ops of the decoder layer, for CPU: each is one pass over memory where the
 * PyTorch reference makes several (and PyTorch's bf16 elementwise kernels are slow on CPU).
 * Math in fp32, rounded once on store. Rows are split over OpenMP threads.
 */
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>
#include <limits.h>

enum { F32 = 0, BF16 = 1 };

static inline float ld(const void *p, int64_t i, int dtype) {
    if (dtype == BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float f, int dtype) {
    if (dtype == BF16) { /* round to nearest even, as PyTorch does */
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        u += 0x7fff + ((u >> 16) & 1);
        ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    } else {
        ((float *)p)[i] = f;
    }
}

/* x: [rows, dim]. With a residual: residual += x, then out = norm(residual) * weight (the sum
 * is kept for the next layer). Without one (residual NULL): out = norm(x) * weight. */
void rms_norm(void *out, const void *x, void *residual, const void *weight, int64_t rows, int dim, float eps,
              int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float v[8192];
        const int64_t o = r * dim;
        float ss = 0.f;
        for (int i = 0; i < dim; i++) {
            float a = ld(x, o + i, dtype);
            if (residual) {
                a += ld(residual, o + i, dtype);
                st(residual, o + i, a, dtype);
                a = ld(residual, o + i, dtype); /* normalize what the next layer will add to */
            }
            v[i] = a;
            ss += a * a;
        }
        const float inv = 1.f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) st(out, o + i, v[i] * inv * ld(weight, i, dtype), dtype);
    }
}

/* gate_up: [rows, 2 * dim] (gate then up); out: [rows, dim] = silu(gate) * up. */
void silu_and_mul(void *out, const void *gate_up, int64_t rows, int dim, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r * 2 * (int64_t)dim, o = r * (int64_t)dim;
        for (int i = 0; i < dim; i++) {
            const float a = ld(gate_up, g + i, dtype), b = ld(gate_up, g + dim + i, dtype);
            st(out, o + i, a / (1.f + expf(-a)) * b, dtype);
        }
    }
}

/* y: [rows, dim] += bias: [dim], rounded once on store, as PyTorch's add_ does. */
void add_bias(void *y, const void *bias, int64_t rows, int dim, int dtype) {
    for (int64_t r = 0; r < rows; r++)
        for (int i = 0; i < dim; i++) st(y, r * dim + i, ld(y, r * dim + i, dtype) + ld(bias, i, dtype), dtype);
}

/* In place on x: [rows, heads, head_dim] with `row_stride` elements between rows (a view into
 * the fused qkv output). Rotate-half RoPE (HF's convention) with fp32 cos, sin: [rows, head_dim/2]. */
void rope(void *x, int64_t row_stride, const float *cos, const float *sin, int64_t rows, int heads,
          int head_dim, int dtype, int num_threads) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * half, *s = sin + r * half;
        for (int h = 0; h < heads; h++) {
            const int64_t o = r * row_stride + (int64_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const float x1 = ld(x, o + i, dtype), x2 = ld(x, o + half + i, dtype);
                st(x, o + i, x1 * c[i] - x2 * s[i], dtype);
                st(x, o + half + i, x2 * c[i] + x1 * s[i], dtype);
            }
        }
    }
}

/* Store this step's keys and values in the pool: row t of k and v (views into the fused qkv
 * output, `src_stride` elements apart) goes to slot slots[t] of k_cache and v_cache. */
void write_kv(void *k_cache, void *v_cache, const void *k, const void *v, int64_t src_stride,
              const int64_t *slots, int64_t rows, int row_elems, int elem_size, int num_threads) {
    const size_t bytes = (size_t)row_elems * elem_size;
    /* each row's stores miss the cache (and fault in fresh pool pages): two threads overlap them */
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= 16)
    for (int64_t t = 0; t < rows; t++) {
        memcpy((char *)k_cache + slots[t] * bytes, (const char *)k + t * src_stride * elem_size, bytes);
        memcpy((char *)v_cache + slots[t] * bytes, (const char *)v + t * src_stride * elem_size, bytes);
    }
}

/* out[r] = the first index of the maximum of row r of x: [rows, cols] bf16 (greedy sampling
 * straight from the LM head's output, without widening the logits to fp32 first). bf16 bits,
 * sign-magnitude, become order-preserving integers by flipping the magnitude of negatives. */
static inline int32_t order_key(int32_t v) { return v ^ ((v >> 31) & 0x7fff); } /* v: sign-extended bits */

void argmax_bf16(int64_t *out, const uint16_t *x, int64_t rows, int64_t cols, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * cols;
        int32_t best = INT32_MIN;
        int64_t at = 0;
#if defined(__AVX512F__)
        __m512i kbest = _mm512_set1_epi32(INT32_MIN), kat = _mm512_setzero_si512();
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        int64_t c = 0;
        for (; c + 16 <= cols && c + 16 < INT32_MAX; c += 16) {  /* per lane: its first maximum */
            const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(row + c)));
            const __m512i key = _mm512_xor_si512(v, _mm512_and_si512(_mm512_srai_epi32(v, 31), _mm512_set1_epi32(0x7fff)));
            const __mmask16 more = _mm512_cmpgt_epi32_mask(key, kbest);
            kbest = _mm512_mask_mov_epi32(kbest, more, key);
            kat = _mm512_mask_mov_epi32(kat, more, _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)c)));
        }
        best = _mm512_reduce_max_epi32(kbest);  /* then the first index among lanes holding it */
        at = _mm512_mask_reduce_min_epi32(_mm512_cmpeq_epi32_mask(kbest, _mm512_set1_epi32(best)), kat);
        for (; c < cols; c++) {
#else
        for (int64_t c = 0; c < cols; c++) {
#endif
            const int32_t key = order_key((int16_t)row[c]);
            if (key > best) best = key, at = c;
        }
        out[r] = at;
    }
}
