/* The linear layer on AVX-512 CPUs with VNNI and without AVX512-BF16: Cascade Lake and Ice Lake-SP,
 * the bulk of cloud Xeons, and their workstation kin. It is avx512f's, except the int8-activation
 * path, whose block products are VNNI's byte dot products here (int8.c) and multiply-adds there. It
 * takes the calls avx512/linear.c gives its int8 path (il_int8_call: never a regrouped or float type),
 * so everything else is avx512f's, to the bit. */
#include "../avx2/gemm.h" /* IL(linear_int8), from int8.c here */
#include "../common.h"

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (il_int8_call(act, wtype, K))
        return IL(linear_int8)(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    return linear_avx512f(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
}
