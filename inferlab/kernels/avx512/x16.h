/* The AVX-512 linear layer for the regrouped Q4 types (x16.c), which `linear` hands those calls to:
 * bf16 x, K a multiple of 32, N of 16, y in bf16 or fp32 (ydtype), bias bf16 or NULL. */
#ifndef INFERLAB_AVX512_X16_H
#define INFERLAB_AVX512_X16_H
#include "../common.h"

int IL(linear_x16)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                   int rows, int K, int N, int ydtype, int num_threads);
#endif
