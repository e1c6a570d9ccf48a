/* What the AMX kernels share: Linux's permission to use the tiles, the one tile shape they all use
 * (16 rows of 64 bytes: 16 x 32 bf16, or 16 x 16 fp32 / bf16 pairs), and a 16 x 16 transpose. */
#ifndef INFERLAB_AMX_H
#define INFERLAB_AMX_H
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../common.h"

/* Linux hands out the AMX register state only on request, once per process. */
static inline int amx_ready(void) {
    static int state = 0; /* 0: not asked yet, 1: granted, -1: refused (asking twice is harmless) */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) ? -1 : 1;
    return state == 1;
}

/* Configure tile t as rows[t] rows of colsb[t] bytes (t < 8), on the calling thread (tile state is
 * per thread). The whole 64-byte struct is the asm's operand: GCC's _tile_loadconfig names only its
 * first 8 bytes as read, so the compiler may drop the stores of the rest (it did, once the stack slot
 * was reused for a local zeroed after it: tiles of 0 rows, and the kernel died on an illegal
 * instruction). */
static inline void amx_configure_tiles(const uint8_t rows[8], const uint16_t colsb[8]) {
    struct {
        uint8_t palette_id, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg = {.palette_id = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = rows[t], cfg.colsb[t] = colsb[t];
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

/* All eight tiles as 16 rows x 64 bytes: the bf16 kernels' one shape. */
static inline void amx_configure(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    amx_configure_tiles(rows, colsb);
}

/* r[i] <- column i of the 16 x 16 matrix whose rows are r[0..15]. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {  /* lane l: rows 2i, 2i+1 at columns 4l, 4l+1 (lo) or 4l+2, 4l+3 (hi) */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++)  /* u[4i + e], lane l: rows 4i .. 4i+3 at column 4l + e */
        for (int h = 0; h < 2; h++) {
            const __m512d x = _mm512_castps_pd(t[4 * i + h]), y = _mm512_castps_pd(t[4 * i + 2 + h]);
            u[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            u[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
        }
    for (int e = 0; e < 4; e++) {  /* column 4l + e: lane l of u[e], u[4+e], u[8+e], u[12+e] */
        const __m512 x0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), x1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xee);
        const __m512 y0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
        const __m512 y1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xee);
        r[e] = _mm512_shuffle_f32x4(x0, y0, 0x88), r[4 + e] = _mm512_shuffle_f32x4(x0, y0, 0xdd);
        r[8 + e] = _mm512_shuffle_f32x4(x1, y1, 0x88), r[12 + e] = _mm512_shuffle_f32x4(x1, y1, 0xdd);
    }
}

/* The linear layer past a decode step's rows (rows.c): x bf16 with K a row, K a multiple of 32, N of 16,
 * W bf16 rows or a t16 matrix, bias bf16 or NULL, y bf16 or fp32 (ydtype). Returns 2 if out of memory. */
int IL(linear_rows)(const uint16_t *x, const void *w, int wtype, const uint16_t *bias, void *y, int64_t ldy,
                    int ydtype, int M, int K, int N, int num_threads);
/* The int8-activation path from INT8_TILE_ROWS rows (int8.c); fewer, and other types: the AVX-512 build's. */
int IL(linear_int8)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                    int rows, int K, int N, int dtype, int ydtype, int num_threads);
#endif
