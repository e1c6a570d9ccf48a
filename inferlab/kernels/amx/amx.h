/* What the AMX kernels share: Linux's permission to use the tiles, and the one tile shape they all
 * use (16 rows of 64 bytes: 16 x 32 bf16, or 16 x 16 fp32 / bf16 pairs). */
#ifndef INFERLAB_AMX_H
#define INFERLAB_AMX_H
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out the AMX register state only on request, once per process. */
static inline int amx_ready(void) {
    static int state = 0; /* 0: not asked yet, 1: granted, -1: refused (asking twice is harmless) */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) ? -1 : 1;
    return state == 1;
}

/* Configure all eight tiles as 16 rows x 64 bytes, on the calling thread (tile state is per thread). */
static inline void amx_configure(void) {
    struct {
        uint8_t palette_id, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg = {.palette_id = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}
#endif
