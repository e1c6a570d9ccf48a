/* The AVX-512 linear layer for the regrouped types (x16.c), which `linear` hands those calls to: x
 * in `dtype` (bf16; fp32 too with fp32 products: returns 1 else), K a multiple of 32, N of 16, y in
 * bf16 or fp32 (ydtype), bias in x's dtype or NULL. */
#ifndef INFERLAB_AVX512_X16_H
#define INFERLAB_AVX512_X16_H
#include "../common.h"

int IL(linear_x16)(const void *x, int64_t ldx, int dtype, const void *w, int wtype, const void *bias, void *y,
                   int64_t ldy, int rows, int K, int N, int ydtype, int num_threads);
/* bf16 weights, past a decode step's rows, by the same fp32-product tiles (bf16_wide.c): K a multiple of
 * 32, N of 64, bias bf16 or NULL. */
int IL(linear_bf16_wide)(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t ldy, int rows,
                         int K, int N, int ydtype, int num_threads);
#endif
