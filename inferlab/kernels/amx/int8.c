/* The int8-activation path's calls from 16 rows (a prefill or a large batch with --int8-activations)
 * on AMX's integer tiles, for Q8_0, Q4_0 and Q4_1 blocks, with the AVX2 kernel's results bit for
 * bit (avx2/int8.c); other types go to the AVX-512 kernel.
 *
 * That kernel keeps four partial sums of each block per output, one a 32-bit lane: lane t sums
 * inputs 4t..4t+3 and 16+4t..16+4t+3 (two VNNI dwords), then converts and scales each lane by
 * d_w * d_x into its own fp32 accumulator, block after block, and adds the four lanes at the end. A
 * tile product gives those very integers from a B tile that holds only dwords t and t + 4 of the
 * block (the other rows zeros): per block, one product a lane t (16 rows of x by 16 outputs).
 * Integer sums are exact, so the tiles' order does not matter; each lane's fp32 operations are then
 * the AVX2 kernel's, in its order. Three quarters of each product multiply zeros, and the fp32 work
 * a lane bounds the kernel (1.2-1.7x the AVX-512 one's speed from 64 rows, level at 16), but a whole-block
 * sum a tile would change the AVX2 and AVX-512 kernels' bits. An output tile's B tiles are built
 * once per call (gathers of the 16 rows' blocks) and used by every 16 rows of x.
 */
#include "amx.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"

/* The AVX-512 build's int8 path (avx2/int8.c; avx2/gemm.h declares it for the builds that include it) */
int linear_int8_avx512(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                       int rows, int K, int N, int dtype, int ydtype, int num_threads);

/* Tiles 0-3: lane t of each block's sums (16 rows x 16 outputs, int32); 4: x, 16 rows of one
 * block's 32 bytes; 5: a B tile, 8 dwords of 16 columns. */
static inline void int8_configure(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 16, 8, 0, 0};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 32, 64, 0, 0};
    amx_configure_tiles(rows, colsb);
}

/* Output tile o's B tiles for every block (bt[b][t]: dwords t and t + 4 of its 16 outputs' bytes;
 * the other rows, zeroed once, are never written), their d (dv[b][n]) and c, the offset that takes
 * the inputs' sum (Q4_1: m; Q4_0: d, scaled by -8 at the end; Q8_0: none). */
static void build_b(const uint8_t *w, int wtype, int64_t rb, int o, int nb, uint8_t *bt, float *dv, float *cv) {
    const int bytes = il_block_bytes(wtype), q = wtype == IL_W_Q4_1 ? 4 : 2;
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)rb)); /* the 16 rows' offsets */
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t *rows = w + (int64_t)16 * o * rb;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = rows + (int64_t)b * bytes;
        const __m512i h = _mm512_i32gather_epi32(at, blk, 1); /* d, then m (Q4_1) or weight bytes */
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
        _mm512_store_ps(dv + 16 * b, d);
        _mm512_store_ps(cv + 16 * b, wtype == IL_W_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16))) : d);
        for (int t = 0; t < 4; t++) { /* B tile t's dwords t (weights 4t..4t+3) and t + 4 (16+4t..) */
            uint8_t *tile = bt + ((int64_t)b * 4 + t) * 512;
            const __m512i v = _mm512_i32gather_epi32(at, blk + q + 4 * t, 1);
            if (wtype == IL_W_Q8_0) {
                _mm512_store_si512(tile + 64 * t, v);
                _mm512_store_si512(tile + 64 * (t + 4), _mm512_i32gather_epi32(at, blk + q + 16 + 4 * t, 1));
            } else { /* Q4: byte j's low nibble is weight j, its high one weight 16 + j */
                _mm512_store_si512(tile + 64 * t, _mm512_and_si512(v, low4));
                _mm512_store_si512(tile + 64 * (t + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
            }
        }
    }
}

/* Block b's 16 x 16 x 4 lane sums (in the four C tiles): x's tile, then each lane's B tile. */
static inline void products(const int8_t *xq, int K, const uint8_t *bt, int b, int wtype) {
    _tile_loadd(4, xq + 32 * b, K);
#define PRODUCT(t)                                                               \
    _tile_zero(t);                                                               \
    _tile_loadd(5, bt + ((int64_t)b * 4 + (t)) * 512, 64);                       \
    if (wtype == IL_W_Q8_0) _tile_dpbssd(t, 4, 5); else _tile_dpbsud(t, 4, 5);
    PRODUCT(0) PRODUCT(1) PRODUCT(2) PRODUCT(3)
#undef PRODUCT
}

int IL(linear_int8)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                     int rows, int K, int N, int dtype, int ydtype, int num_threads) {
    if ((wtype != IL_W_Q8_0 && wtype != IL_W_Q4_0 && wtype != IL_W_Q4_1) || K % 32 || N % 16 || rows < 1 ||
        !amx_ready())
        return linear_int8_avx512(x, ldx, w, wtype, bias, y, ldy, rows, K, N, dtype, ydtype, num_threads);
    const int nb = K / 32, padded = (rows + 15) / 16 * 16;
    const int64_t rb = il_row_bytes(wtype, K);
    int8_t *xq = calloc((size_t)padded * K, 1); /* rows past the last are zeros: their sums unused */
    float *ds = malloc(2 * sizeof(float) * (size_t)rows * nb); /* per row: d_x then s_x */
    if (!xq || !ds) {
        free(xq), free(ds);
        return 2;
    }
    const float cf = wtype == IL_W_Q4_0 ? -8.f : 1.f; /* finish8's c / (what the offsets' sum took) */
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < rows; m++)
            il_quantize_row_q8((const char *)x + (int64_t)m * ldx * il_elem_size(dtype), dtype, K, xq + (int64_t)m * K,
                               ds + 2 * (int64_t)m * nb, ds + 2 * (int64_t)m * nb + nb);
        uint8_t *bt = aligned_alloc(64, (size_t)nb * 4 * 512);
        float *dv = aligned_alloc(64, sizeof(float) * (size_t)nb * 16), *cv = aligned_alloc(64, sizeof(float) * (size_t)nb * 16);
        if (!bt || !dv || !cv) {
#pragma omp atomic write
            status = 2;
        } else {
            memset(bt, 0, (size_t)nb * 4 * 512);
        }
        int32_t sums[2][4][256] __attribute__((aligned(64))); /* a block's, then the next one's */
        __m512 acc[16][4], corr[16];
        int8_configure();
#pragma omp for schedule(static)
        for (int o = 0; o < N / 16; o++) {
            if (status) continue;
            build_b(w, wtype, rb, o, nb, bt, dv, cv);
            for (int m0 = 0; m0 < rows; m0 += 16) {
                const int live = rows - m0 < 16 ? rows - m0 : 16;
                const int8_t *xt = xq + (int64_t)m0 * K;
                for (int r = 0; r < live; r++) {
                    for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
                    corr[r] = _mm512_setzero_ps();
                }
                products(xt, K, bt, 0, wtype);
                for (int b = 0; b < nb; b++) {
                    int32_t (*s)[256] = sums[b & 1];
                    _tile_stored(0, s[0], 64);
                    _tile_stored(1, s[1], 64);
                    _tile_stored(2, s[2], 64);
                    _tile_stored(3, s[3], 64);
                    if (b + 1 < nb) products(xt, K, bt, b + 1, wtype); /* runs beside this block's fp32 work */
                    const __m512 d = _mm512_load_ps(dv + 16 * b), c = _mm512_load_ps(cv + 16 * b);
                    for (int r = 0; r < live; r++) { /* int8_quads.h's operations, lane for lane */
                        const float *dsr = ds + 2 * (int64_t)(m0 + r) * nb;
                        const __m512 dd = _mm512_mul_ps(d, _mm512_set1_ps(dsr[b]));
                        for (int t = 0; t < 4; t++)
                            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s[t] + 16 * r)), dd, acc[r][t]);
                        if (wtype != IL_W_Q8_0) corr[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(dsr[nb + b]), corr[r]);
                    }
                }
                const __m512 scale = _mm512_set1_ps(cf);
                for (int r = 0; r < live; r++) { /* finish8's: (p0 + p1) + (p2 + p3) + c s_x cf, unfused */
#define ADD(a, b) _mm512_add_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                    const __m512 sum = ADD(ADD(ADD(acc[r][0], acc[r][1]), ADD(acc[r][2], acc[r][3])),
                                           _mm512_mul_round_ps(corr[r], scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#undef ADD
                    float out[16] __attribute__((aligned(64)));
                    _mm512_store_ps(out, sum);
                    for (int n = 0; n < 16; n++) {
                        const float bj = bias ? il_ld(bias, 16 * o + n, dtype) : 0.f;
                        il_st(y, (int64_t)(m0 + r) * ldy + 16 * o + n, out[n] + bj, ydtype);
                    }
                }
            }
        }
        _tile_release();
        free(bt), free(dv), free(cv);
    }
    free(xq), free(ds);
    return status;
}
