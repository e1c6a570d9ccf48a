/* The regrouped types' AVX-512 kernel (avx512/x16.c) on CPUs without AVX512-BF16: compiled again
 * without it, so it only multiplies by fp32 FMAs (`x16_products` is always fp32 here; the bf16
 * instructions it names for the pair products are integer stand-ins: avx512/lanes.h), and it takes
 * fp32 inputs, these CPUs' activations. A row's sums are the avx512 build's fp32 products' for the
 * same inputs. */
#include "../avx512/x16.c"
