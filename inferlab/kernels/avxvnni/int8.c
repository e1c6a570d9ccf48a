/* The linear layer's int8-activation path on CPUs with AVX-VNNI and no AVX-512 (Intel's client cores
 * since Alder Lake): the AVX2 file compiled again, where each half of a block product is one VNNI
 * byte dot product (4 byte products summed per 32-bit lane) instead of a multiply-add, an add and a
 * widening. Lane k still sums bytes 4 k .. 4 k + 3 of both halves, the same exact integers in the
 * same lanes, so every result is AVX2's bit for bit. */
#include "../avx2/int8.c"
