/* The int8-activation path on AVX-512 CPUs without VNNI (Skylake-SP): the avx512 build's file, four
 * weight rows' blocks a 512-bit register, each block half's byte products by AVX2's multiply-adds at
 * twice the width (avx512/int8_quads.h). The results are AVX2's bit for bit. */
#include "../avx512/int8.c"
