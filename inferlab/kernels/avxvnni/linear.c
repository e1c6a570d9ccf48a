/* The linear layer on CPUs with AVX-VNNI and no AVX-512: the AVX2 file compiled again, so that its
 * int8-activation path calls this build's VNNI block products (int8.c here). The fp32 paths are
 * AVX2's. */
#include "../avx2/linear.c"
