/* The int8-activation path on AVX-512 CPUs with VNNI and without AVX512-BF16 (Cascade Lake, Ice
 * Lake-SP): the avx512 build's file, whose block products are AVX512-VNNI byte dot products, four
 * weight rows a register. It needs no bf16 instruction, so these CPUs' results are the avx512
 * build's bit for bit. */
#include "../avx512/int8.c"
