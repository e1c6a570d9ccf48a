/* The linear layer in plain C, for every weight type: each thread takes a band of weight rows,
 * dequantizes one row at a time to fp32 (each weight exactly as its format defines it) and takes
 * its dot product with every input row. The definition the ISA kernels are tested against, and
 * the path on CPUs without them.
 */
#include <stdlib.h>

#include "../common.h"

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int num_threads) {
    if (rows <= 0) return 0;
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
                il_st(y, (int64_t)m * ldy + n, acc + b, dtype);
            }
        }
        free(wr);
    }
    free(xf);
    return failed ? 2 : 0;
}
