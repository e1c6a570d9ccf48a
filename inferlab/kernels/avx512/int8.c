/* The linear layer's int8-activation path on AVX-512: the AVX2 file compiled again, four weight
 * rows a register (int8_quads.h), where each block product becomes two AVX512-VNNI byte dot products
 * (each sums 4 byte products per lane in 32 bits) instead of multiply-adds, a widening and an add. A
 * lane holds the same exact integers and takes the same fp32 operations as in AVX2's tiles, so the
 * results are AVX2's bit for bit. Needing no bf16 instruction, it is also the avx512vnni build's
 * (Cascade Lake, Ice Lake-SP), and without VNNI, avx512f's (Skylake-SP: the multiply-adds). */
#include "../avx2/int8.c"
