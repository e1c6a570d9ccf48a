/* The linear layer on AVX-512 CPUs without AVX512-BF16: Intel's server cores from Skylake-SP to Ice
 * Lake-SP (most cloud Xeons), and their desktop kin. Without this build they ran the AVX2 kernels at
 * half the vector width. The regrouped types (the blocks of a GGUF, moved 16 rows at a time at load)
 * go to x16.c, the avx512 build's kernel compiled here without bf16 instructions: fp32 FMAs of the
 * exact weights against fp32 (or bf16) inputs, 16 weight rows a register. Every other call goes to
 * the AVX2 kernels, which these CPUs also run. */
#include "../avx512/x16.h"
#include "../common.h"

int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads) {
    if (!il_x16_type(wtype))
        return linear_avx2(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, act, num_threads);
    if (rows <= 0) return 0;
    if (!(ydtype == dtype || ydtype == IL_F32) || K % 32 || N % 16) return 1;
    return IL(linear_x16)(x, ldx, dtype, w, wtype, bias, y, ldy, rows, K, N, ydtype, num_threads);
}
