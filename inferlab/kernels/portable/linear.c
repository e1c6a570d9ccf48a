/* The linear layer in plain C, for every weight type: each thread takes a band of weight rows,
 * dequantizes one row at a time to fp32 (each weight exactly as its format defines it) and takes
 * its dot product with every input row. With int8 activations, inputs are quantized per 32 and
 * each block's products summed in integers, as llama.cpp does. The definition the ISA kernels are
 * tested against, and the path on CPUs without them.
 */
#include <stdlib.h>

#include "../common.h"

static int linear_int8(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                       int rows, int K, int N, int dtype, int ydtype, int num_threads) {
    const int nb = K / 32;
    const int64_t rb = il_row_bytes(wtype, K);
    int8_t *xq = malloc((size_t)rows * K);
    float *xd = malloc(sizeof(float) * (size_t)rows * nb), *xs = malloc(sizeof(float) * (size_t)rows * nb);
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return 2;
    }
    for (int m = 0; m < rows; m++)
        il_quantize_row_q8((const char *)x + (int64_t)m * ldx * il_elem_size(dtype), dtype, K, xq + (int64_t)m * K,
                           xd + (int64_t)m * nb, xs + (int64_t)m * nb);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const float b = bias ? il_ld(bias, n, dtype) : 0.f;
        for (int m = 0; m < rows; m++) {
            float acc = 0.f;
            for (int blk = 0; blk < nb; blk++) {
                int8_t q[32];
                float d, c;
                int sc[2], mn[2];
                il_block_ints(wtype, (const uint8_t *)w + n * rb, blk, q, &d, &c, sc, mn);
                const int8_t *a = xq + (int64_t)m * K + 32 * blk;
                int isum = 0, msum = 0;
                for (int j = 0; j < 32; j++) isum += sc[j / 16] * q[j] * a[j], msum += mn[j / 16] * a[j];
                const float dx = xd[(int64_t)m * nb + blk];
                acc += d * dx * isum + (il_k16_min_type(wtype) ? c * dx * msum : c * xs[(int64_t)m * nb + blk]);
            }
            il_st(y, (int64_t)m * ldy + n, acc + b, ydtype);
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (rows <= 0) return 0;
    if (il_regrouped_type(wtype)) return 1; /* only the AVX-512 (x16) and AMX (t16) builds multiply these */
    if (il_int8_call(act, wtype, K))
        return linear_int8(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    const int64_t rb = il_row_bytes(wtype, K);
    float *xf = malloc(sizeof(float) * (size_t)rows * K);
    if (!xf) return 2;
    for (int m = 0; m < rows; m++)
        for (int k = 0; k < K; k++) xf[(int64_t)m * K + k] = il_ld(x, (int64_t)m * ldx + k, dtype);
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *wr = malloc(sizeof(float) * (size_t)K);
        if (!wr) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!wr) continue;
            il_dequant_span(wtype, (const uint8_t *)w + n * rb, 0, K, wr);
            const float b = bias ? il_ld(bias, n, dtype) : 0.f;
            for (int m = 0; m < rows; m++) {
                const float *xm = xf + (int64_t)m * K;
                float acc = 0.f;
                for (int k = 0; k < K; k++) acc += wr[k] * xm[k];
                il_st(y, (int64_t)m * ldy + n, acc + b, ydtype);
            }
        }
        free(wr);
    }
    free(xf);
    return failed ? 2 : 0;
}

int IL(x16_products)(int mode, int num_threads) { /* no regrouped kernel in this build */
    (void)mode, (void)num_threads;
    return -1;
}
