/* The decoder layer's elementwise ops, the embedding lookup, (de)quantization and argmax, in plain
 * C: each is one pass over memory where the PyTorch reference makes several. Compiled once per ISA
 * (the compiler vectorizes the loops for each); math in fp32, rounded once on store; rows split
 * over OpenMP threads, so results never depend on the thread count (a single row stays on the
 * calling thread: one request's decode step has 120 such calls, each a fork and a barrier for work
 * that only one thread can do).
 */
#include <limits.h>
#include <stdlib.h>

#include "../common.h"

/* The loops below are written once, as row functions taking their dtypes as constants, and called
 * with each dtype the models use spelled out: gcc split a loop that tested a dtype per element into
 * one loop per dtype by itself, clang did not, and left every such loop scalar (a prefill step's
 * elementwise ops 4x gcc's). */
#define BY_DTYPE(dtype, call) ((dtype) == IL_BF16 ? call(IL_BF16) : call(IL_F32))

IL_INLINE void norm_row(void *out, const void *x, int64_t xi, void *residual, const void *weight, int64_t o, int dim,
                        float eps, const int dtype, const int xdtype, const int rdtype) {
    const void *src = x;
    int64_t si = xi;
    int sdtype = xdtype;
    if (residual) { /* residual += x, rounded as stored: the next layer adds to what is normalized */
        for (int i = 0; i < dim; i++)
            il_st(residual, o + i, il_ld(x, xi + i, xdtype) + il_ld(residual, o + i, rdtype), rdtype);
        src = residual, si = o, sdtype = rdtype;
    }
    float ss = 0.f;
    for (int i = 0; i < dim; i++) {
        const float a = il_ld(src, si + i, sdtype);
        ss += a * a;
    }
    /* a sum of squares past fp32's range: 0, as PyTorch's rsqrt(inf) (the fast reciprocal square
     * root's refinement step made it NaN) */
    const float ms = ss / dim + eps, inv = il_is_finite(ms) ? 1.f / sqrtf(ms) : 0.f;
    for (int i = 0; i < dim; i++) il_st(out, o + i, il_ld(src, si + i, sdtype) * inv * il_ld(weight, i, dtype), dtype);
}

void IL(rms_norm)(void *out, const void *x, int64_t x_stride, void *residual, const void *weight, int rows, int groups,
                  int dim, float eps, int dtype, int xdtype, int rdtype, int num_threads) {
    const int same = xdtype == dtype && (!residual || rdtype == dtype);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static) if (rows * groups > 1)
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            const int64_t xi = (int64_t)r * x_stride + (int64_t)g * dim, o = ((int64_t)r * groups + g) * dim;
#define NORM(t) norm_row(out, x, xi, residual, weight, o, dim, eps, t, t, t)
            if (same)
                BY_DTYPE(dtype, NORM);
            else
                norm_row(out, x, xi, residual, weight, o, dim, eps, dtype, xdtype, rdtype);
#undef NORM
        }
}

IL_INLINE void silu_row(void *out, const void *gate_up, int64_t g, int64_t o, int dim, const int dtype) {
    for (int i = 0; i < dim; i++) {
        const float a = il_ld(gate_up, g + i, dtype), b = il_ld(gate_up, g + dim + i, dtype);
        il_st(out, o + i, a / (1.f + il_expf(-a)) * b, dtype);
    }
}

void IL(silu_and_mul)(void *out, const void *gate_up, int rows, int dim, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) {
#define SILU(t) silu_row(out, gate_up, (int64_t)r * 2 * dim, (int64_t)r * dim, dim, t)
        BY_DTYPE(dtype, SILU);
#undef SILU
    }
}

/* Each head's halves are read into locals first: with x read and written in place, the compiler
 * checked at run time whether x overlapped cos and sin, and the vector and the scalar loop it chose
 * between fused the products differently, so a row's result hung on where its buffers lay (a row
 * alone and in a batch differed in the last bit). */
IL_INLINE void rope_head(void *x, int64_t o, const float *restrict c, const float *restrict s, int half,
                         const int dtype) {
    float a[IL_MAX_HEAD_DIM / 2], b[IL_MAX_HEAD_DIM / 2];
    for (int i = 0; i < half; i++) a[i] = il_ld(x, o + i, dtype), b[i] = il_ld(x, o + half + i, dtype);
    for (int i = 0; i < half; i++) {
        il_st(x, o + i, a[i] * c[i] - b[i] * s[i], dtype);
        il_st(x, o + half + i, b[i] * c[i] + a[i] * s[i], dtype);
    }
}

void IL(rope)(void *x, int64_t x_stride, const float *cos, const float *sin, int rows, int heads, int head_dim,
              int dtype, int num_threads) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *restrict c = cos + (int64_t)r * half, *restrict s = sin + (int64_t)r * half;
        for (int h = 0; h < heads; h++) {
#define ROPE(t) rope_head(x, (int64_t)r * x_stride + (int64_t)h * head_dim, c, s, half, t)
            BY_DTYPE(dtype, ROPE);
#undef ROPE
        }
    }
}

void IL(write_kv)(void *k_cache, void *v_cache, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
                  const int64_t *slots, int rows, int row_elems, int elem_size, int num_threads) {
    const size_t bytes = (size_t)row_elems * elem_size;
    /* each row's stores miss the cache (and fault in fresh pool pages): two threads overlap them */
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= 16)
    for (int t = 0; t < rows; t++) {
        memcpy((char *)k_cache + slots[t] * bytes, (const char *)k + t * k_stride * elem_size, bytes);
        memcpy((char *)v_cache + slots[t] * bytes, (const char *)v + t * v_stride * elem_size, bytes);
    }
}

void IL(get_rows)(void *out, const void *w, int wtype, const int64_t *ids, int rows, int K, int dtype,
                  int num_threads) {
    const int64_t rb = il_row_bytes(wtype, K);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= 16)
    for (int r = 0; r < rows; r++) {
        float tmp[256];
        const uint8_t *row = (const uint8_t *)w + ids[r] * rb;
        const int span = il_block_elems(wtype) == 256 && !il_regrouped_type(wtype) ? 256 : 32;
        for (int k0 = 0; k0 < K; k0 += span) {
            const int n = K - k0 < span ? K - k0 : span;
            if (il_regrouped_type(wtype))
                il_regrouped_block(wtype, w, ids[r], K, k0 / 32, tmp);
            else
                il_dequant_span(wtype, row, k0, n, tmp);
            for (int i = 0; i < n; i++) il_st(out, (int64_t)r * K + k0 + i, tmp[i], dtype);
        }
    }
}

void IL(dequantize)(float *out, const void *w, int wtype, int64_t n, int K, int num_threads) {
    const int64_t rb = il_row_bytes(wtype, K);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        if (il_regrouped_type(wtype))
            for (int b = 0; b < K / 32; b++) il_regrouped_block(wtype, w, r, K, b, out + r * K + 32 * b);
        else
            il_dequant_span(wtype, (const uint8_t *)w + r * rb, 0, K, out + r * K);
}

/* ggml's reference quantizers (round half away from zero for Q8_0; truncation after an offset for
 * the 4-bit types), so a row quantized here is byte for byte what llama.cpp's would be: without
 * -ffast-math's reciprocals (amax / 127 as amax * (1 / 127) moved a scale's last bit, and x * id
 * a value across a rounding boundary, in a few blocks of every large matrix). */
#if defined(__clang__)
#pragma float_control(precise, on, push)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("no-fast-math")
#endif
static void quantize_block(int wtype, const float *x, void *block) {
    int nan = 0;
    for (int j = 0; j < 32; j++) nan |= il_is_nan(x[j]);
    if (nan) { /* a NaN weight: a NaN scale, so the whole block reads NaN, as in gguf's quantizer (the
                * largest |x| skipped the NaN, and the block read as if it held a 0 there) */
        memset(block, 0, (size_t)il_block_bytes(wtype));
        *(uint16_t *)block = 0x7e00; /* fp16 NaN: d, the first field of all three types */
        return;
    }
    if (wtype == IL_W_Q8_0) {
        il_q8_0 *b = block;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        b->d = il_f32_to_f16(d);
        for (int j = 0; j < 32; j++) b->qs[j] = (int8_t)roundf(x[j] * id);
    } else if (wtype == IL_W_Q4_0) {
        il_q4_0 *b = block;
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < 32; j++)
            if (fabsf(x[j]) > amax) amax = fabsf(x[j]), max = x[j];
        const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
        b->d = il_f32_to_f16(d);
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + 16] * id + 8.5f);
            b->qs[j] = (uint8_t)((q0 > 15 ? 15 : q0) | (q1 > 15 ? 15 : q1) << 4);
        }
    } else { /* IL_W_Q4_1 */
        il_q4_1 *b = block;
        float mn = x[0], mx = x[0];
        for (int j = 1; j < 32; j++) mn = x[j] < mn ? x[j] : mn, mx = x[j] > mx ? x[j] : mx;
        const float d = (mx - mn) / 15.f, id = d != 0.f ? 1.f / d : 0.f;
        b->d = il_f32_to_f16(d), b->m = il_f32_to_f16(mn);
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)((x[j] - mn) * id + 0.5f), q1 = (int)((x[j + 16] - mn) * id + 0.5f);
            b->qs[j] = (uint8_t)((q0 > 15 ? 15 : q0) | (q1 > 15 ? 15 : q1) << 4);
        }
    }
}
#if defined(__clang__)
#pragma float_control(pop)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

int IL(quantize)(void *w, int wtype, const float *x, int64_t n, int K, int num_threads) {
    if (wtype != IL_W_Q8_0 && wtype != IL_W_Q4_0 && wtype != IL_W_Q4_1 && wtype != IL_W_F32 && wtype != IL_W_F16 &&
        wtype != IL_W_BF16)
        return 1;
    const int be = il_block_elems(wtype), bb = il_block_bytes(wtype);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int k = 0; k < K; k += be) {
            uint8_t *dst = (uint8_t *)w + r * il_row_bytes(wtype, K) + (int64_t)k / be * bb;
            const float f = x[r * K + k];
            if (wtype == IL_W_F32) memcpy(dst, &f, 4);
            else if (wtype == IL_W_F16) *(uint16_t *)dst = il_f32_to_f16(f);
            else if (wtype == IL_W_BF16) *(uint16_t *)dst = il_f32_to_bf16(f);
            else quantize_block(wtype, x + r * K + k, dst);
        }
    return 0;
}

/* bf16 bits, sign-magnitude, become order-preserving integers by flipping the magnitude of
 * negatives; fp32 likewise with 31 bits. Two passes (the largest key, then its first index), as
 * each vectorizes where one pass tracking the index would not. */
static inline int32_t order_key(const void *x, int64_t i, int dtype) {
    if (dtype == IL_BF16) {
        const int32_t v = (int16_t)((const uint16_t *)x)[i];
        return v ^ ((v >> 31) & 0x7fff);
    }
    const int32_t v = ((const int32_t *)x)[i];
    return v ^ ((v >> 31) & 0x7fffffff);
}

void IL(argmax)(int64_t *out, const void *x, int64_t n, int64_t cols, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int64_t o = r * cols;
        int32_t best = INT32_MIN;
        for (int64_t c = 0; c < cols; c++) {
            const int32_t key = order_key(x, o + c, dtype);
            best = key > best ? key : best;
        }
        int64_t at = 0;
        while (at < cols - 1 && order_key(x, o + at, dtype) != best) at++;
        out[r] = at;
    }
}
