/* AVX2's linear layer (avx2/linear.c) compiled for AVX-512: the float paths alone, as this build's
 * `linear_floats`, which its linear layer hands every weight type the 512-bit tiles here do not take.
 * The direct path at one or two rows is AVX2's; the panels run pairs.h's tiles, AVX2's sums at twice
 * the width, so a row's result is the AVX2 build's at any row count. */
#define IL_FLOATS_ONLY
#include "../avx2/linear.c"
