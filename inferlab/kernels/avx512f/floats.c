/* AVX2's float paths for AVX-512 CPUs without AVX512-BF16 (avx512/floats.c compiled again): bf16
 * checkpoints' weights against these CPUs' fp32 activations, above all. */
#include "../avx512/floats.c"
