/* The linear layer on AVX-512 CPUs without AVX512-BF16: Intel's server cores from Skylake-SP to Ice
 * Lake-SP (most cloud Xeons), and their desktop kin, which ran the AVX2 kernels at half the vector
 * width before this build. It is the avx512 build's file compiled again without bf16 instructions
 * (their stand-ins in avx512/lanes.h): fp32 weights against fp32 inputs in its 512-bit tiles, and
 * the regrouped blocks (x16.c here) by fp32 FMAs against fp32 inputs, these CPUs' activations, and
 * the int8 path at 512 bits without VNNI (int8.c here; avx512vnni/ adds VNNI's products). Other block
 * types, and bf16 weights against fp32 inputs, run AVX2's paths compiled for AVX-512 (floats.c). */
#include "../avx512/linear.c"
