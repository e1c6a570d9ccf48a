/* The linear layer's int8-activation path on AVX-512: the AVX2 file compiled again, where each
 * block product becomes two AVX512-VNNI byte dot products (each sums 4 byte products per lane in 32
 * bits) instead of multiply-adds, a widening and an add. The block products are the same exact
 * integers; their lanes are split differently, so the fp32 sums may differ from AVX2's in the last
 * bits. */
#include "../avx2/int8.c"
