/* bf16 weights past a decode step's rows by fp32 FMAs (avx512/bf16_wide.c), for bf16 activations on
 * AVX-512 CPUs without AVX512-BF16, which only run fp32 products: compiled again without it. */
#include "../avx512/bf16_wide.c"
