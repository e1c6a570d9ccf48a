/* The linear layer's int8-activation path on AVX2 (see `linear` in api.h): each 32 inputs of a row
 * quantized as llama.cpp's Q8_0 blocks, each 32-weight block taken as bytes (unsigned 4/5-bit values,
 * or Q8_0's signed ones), and every block product done in integers, in 128-bit halves:
 * _mm_maddubs_epi16 multiplies each half's 16 byte pairs into 8 int16 sums; for the 4/5-bit types
 * the two halves' sums still fit 16 bits and are added before one _mm_madd_epi16 widens them to 4
 * int32 (Q8_0's could overflow, so each half is widened); these are converted and scaled by
 * d_w * d_x into 4 fp32 lanes per output. A block's offset or minimum (w = d q + c) enters as one
 * scalar term, c * s_x, with s_x = d_x * (sum of the inputs' q): Q4_1 and Q5_1 store (d, m) side
 * by side, so (d, m) * (d_x, s_x) is one product; Q4_0 and Q5_0 sum d * s_x and scale the sum by
 * their c / d (-8, -16: exact). Half-width operations do more per instruction on CPUs whose
 * vector units are 128 bits wide inside, and as much on the others: the same block costs 9
 * instructions either way, where the 256-bit form needed a lane insert and a madd per half more.
 * Each output is computed the same way whatever the tile it falls in, as in the fp32 path. Compiled
 * for AVX-512 (avx512/int8.c), a tile puts four weight rows' 128-bit lanes side by side in one
 * 512-bit register, unpacked once for its one to four input rows (tilerx4_vnni,
 * avx512/int8_quads.h): the same lanes and operations, about half the instructions. Without
 * AVX-512, the tiles put two weight rows in the lanes of a 256-bit register the same way
 * (int8_pairs.h: tile1x4_pairs for one input row, tilerx2_pairs for two to four). Q2_K, whose
 * minimums per 16 weights take a second product, keeps tile8 at one row. With VNNI (that build, and avxvnni/int8.c's
 * AVX-VNNI one) a half's byte products are one dpbusd (dot32): the same lanes.
 */
#include <stdlib.h>

#include "gemm.h"
#include "halves.h"

#define I8_PANEL 24

/* Byte j of the result is 0x10 where bit j of h is set (the fifth bit of Q5 weight j). */
IL_INLINE __m128i fifth_bits16(uint32_t h) {
    const __m128i spread = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)h), _mm_set_epi64x(0x0101010101010101, 0));
    const __m128i bit = _mm_set1_epi64x((int64_t)0x8040201008040201ull);
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit), _mm_set1_epi8(0x10));
}

/* Whether a type's block bytes are signed weights with no offset (Q8_0's, IQ4_NL's looked up, Q6_K's
 * and Q3_K's less their offsets), so no c * s_x term. */
IL_INLINE int signed_weights(int wtype) {
    return wtype == IL_W_Q8_0 || wtype == IL_W_IQ4_NL || wtype == IL_W_IQ4_XS || il_k16_type(wtype);
}

/* Block b of a row: weights 0-15 and 16-31 as bytes (lo, hi), and (d, m) or (d, d) widened: the
 * scale and what multiplies s_x (m for Q4_1 and Q5_1; d, scaled at the end, for Q4_0 and Q5_0),
 * from ks (the row's k_scales) where given;
 * sc: each half's integer scale as 16-bit lanes (il_k16_type only), then Q2_K's minimums, whose
 * float scale -dmin is lane 1. */
IL_INLINE __m128 block_halves(int wtype, const uint8_t *row, int b, __m128i *lo, __m128i *hi, __m128i sc[4],
                              const float *ks) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    switch (wtype) {
        case IL_W_Q2_K: {
            int s[2], mn[2];
            float dmin;
            const float d = q2_K_halves(row, b, lo, hi, s, mn, &dmin);
            for (int h = 0; h < 2; h++) sc[h] = _mm_set1_epi16((int16_t)s[h]), sc[2 + h] = _mm_set1_epi16((int16_t)mn[h]);
            return _mm_setr_ps(d, -dmin, 0.f, 0.f);
        }
        case IL_W_Q6_K: case IL_W_Q3_K: {
            int s[2];
            const float d = k16_halves(wtype, row, b, lo, hi, s);
            sc[0] = _mm_set1_epi16((int16_t)s[0]), sc[1] = _mm_set1_epi16((int16_t)s[1]);
            return _mm_set_ss(d);
        }
        case IL_W_Q8_0: {
            const il_q8_0 *blk = (const il_q8_0 *)row + b;
            *lo = _mm_loadu_si128((const __m128i *)blk->qs), *hi = _mm_loadu_si128((const __m128i *)(blk->qs + 16));
            return _mm_cvtph_ps(_mm_cvtsi32_si128(blk->d));
        }
        case IL_W_IQ4_NL: case IL_W_IQ4_XS: /* the table's values: signed bytes, as Q8_0's */
            return _mm_set_ss(iq4_halves(wtype, row, b, lo, hi, ks));
        case IL_W_Q4_K: case IL_W_Q5_K: { /* a sub-block: as Q4_1 / Q5_1, its own (d, m) */
            float c;
            const float d = k4_halves(wtype, row, b, lo, hi, &c, ks);
            return _mm_setr_ps(d, c, 0.f, 0.f);
        }
        case IL_W_Q4_0: case IL_W_Q4_1: {
            const int one = wtype == IL_W_Q4_1;
            const il_q4_1 *b1 = (const il_q4_1 *)row + b;
            const il_q4_0 *b0 = (const il_q4_0 *)row + b;
            const __m128i v = _mm_loadu_si128((const __m128i *)(one ? b1->qs : b0->qs));
            *lo = _mm_and_si128(v, low4), *hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
            if (!one) return _mm_moveldup_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(b0->d)));
            uint32_t dm;
            memcpy(&dm, &b1->d, sizeof dm);
            return _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
        }
        default: { /* Q5_0, Q5_1 */
            const int one = wtype == IL_W_Q5_1;
            const il_q5_1 *b1 = (const il_q5_1 *)row + b;
            const il_q5_0 *b0 = (const il_q5_0 *)row + b;
            uint32_t h;
            memcpy(&h, one ? b1->qh : b0->qh, sizeof h);
            const __m128i v = _mm_loadu_si128((const __m128i *)(one ? b1->qs : b0->qs));
            *lo = _mm_or_si128(_mm_and_si128(v, low4), fifth_bits16(h & 0xFFFF));
            *hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), low4), fifth_bits16(h >> 16));
            if (!one) return _mm_moveldup_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(b0->d)));
            uint32_t dm;
            memcpy(&dm, &b1->d, sizeof dm);
            return _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
        }
    }
}

/* 4 int32 lanes whose sum is the integer dot product of a block's 32 weight bytes with 32 inputs
 * (il_k16_type: each half's products times its scale sc, |w| <= 32 keeping a pair's sum in 16 bits). */
IL_INLINE __m128i dot32(__m128i wl, __m128i wh, __m128i xl, __m128i xh, int wtype, const __m128i sc[2]) {
    const int signed_w = signed_weights(wtype);
    if (il_k16_type(wtype))
        return _mm_add_epi32(_mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(wl, wl), _mm_sign_epi8(xl, wl)), sc[0]),
                             _mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(wh, wh), _mm_sign_epi8(xh, wh)), sc[1]));
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__) /* one instruction a half sums 4 byte products per lane */
#ifdef __AVX512VNNI__
#define DPBUSD _mm_dpbusd_epi32
#else
#define DPBUSD _mm_dpbusd_avx_epi32
#endif
    if (signed_w)
        return DPBUSD(DPBUSD(_mm_setzero_si128(), _mm_sign_epi8(wl, wl), _mm_sign_epi8(xl, wl)), _mm_sign_epi8(wh, wh),
                      _mm_sign_epi8(xh, wh));
    return DPBUSD(DPBUSD(_mm_setzero_si128(), wl, xl), wh, xh);
#undef DPBUSD
#endif
    const __m128i ones = _mm_set1_epi16(1);
    if (signed_w) /* |w| * (x with w's sign): 2 * 127 * 127 a pair, so each half is widened alone */
        return _mm_add_epi32(_mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(wl, wl), _mm_sign_epi8(xl, wl)), ones),
                             _mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(wh, wh), _mm_sign_epi8(xh, wh)), ones));
    return _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(wl, xl), _mm_maddubs_epi16(wh, xh)), ones);
}

/* The end of a tile: out[j] lane i = the sum of acc[i][j]'s lanes plus the offsets' term corr[j]. */
IL_INLINE void finish8(__m128 acc[4][4], const __m128 corr[4], int wtype, const int R, const int C, __m128 out[4]) {
    /* c / (what corr summed): 1 for (d, m) pairs, Q4_0's -8 and Q5_0's -16 (exact scalings) */
    const float cf = wtype == IL_W_Q4_0 ? -8.f : wtype == IL_W_Q5_0 ? -16.f : 1.f;
    const __m128 zero = _mm_setzero_ps();
    for (int j = 0; j < C; j++) {
        const __m128 sums = _mm_hadd_ps(_mm_hadd_ps(acc[0][j], R > 1 ? acc[1][j] : zero),
                                        _mm_hadd_ps(R > 2 ? acc[2][j] : zero, R > 3 ? acc[3][j] : zero));
        out[j] = _mm_add_ps(sums, _mm_mul_ps(corr[j], _mm_set1_ps(cf)));
    }
}

/* out[j] lane i = row i of x against weight row j, for i < R and j < C (constants at each call);
 * x4 holds, per input block, the 4 rows' d_x then their s_x (lane i: row i). A weight row's scales
 * d * d_x and its c * s_x terms are then one vector product for all rows, and the c * s_x terms sum
 * in one vector, so 4 x 2 tiles keep their 8 accumulators and 2 sums in registers. */
IL_INLINE void tile8(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], int wtype, const int R,
                     const int C, __m128 out[4]) {
    __m128 acc[4][4], corr[4];
    for (int j = 0; j < C; j++) {
        corr[j] = _mm_setzero_ps();
        for (int i = 0; i < R; i++) acc[i][j] = _mm_setzero_ps();
    }
    const int nb = K / 32;
    const int bb = il_block_bytes(wtype);
    for (int b = 0; b < nb; b++) {
        const __m128 dx = _mm_loadu_ps(x4 + 8 * b), sx = _mm_loadu_ps(x4 + 8 * b + 4);
        for (int j = 0; j < C; j++) {
            _mm_prefetch((const char *)w[j] + (int64_t)b * bb + PREFETCH_BYTES, _MM_HINT_T0);
            __m128i wl, wh, sc[4];
            const __m128 dm = block_halves(wtype, w[j], b, &wl, &wh, sc, NULL);
            const __m128 scale = _mm_mul_ps(_mm_shuffle_ps(dm, dm, 0), dx); /* lane i: d * d_x of row i */
            const __m128 mscale = _mm_mul_ps(_mm_shuffle_ps(dm, dm, _MM_SHUFFLE(1, 1, 1, 1)), dx); /* Q2_K's -dmin * d_x */
            for (int i = 0; i < R; i++) {
                const int8_t *xb = xq + (int64_t)i * K + 32 * b;
                const __m128i xl = _mm_loadu_si128((const __m128i *)xb), xh = _mm_loadu_si128((const __m128i *)(xb + 16));
                acc[i][j] = _mm_fmadd_ps(_mm_cvtepi32_ps(dot32(wl, wh, xl, xh, wtype, sc)),
                                         _mm_permutevar_ps(scale, _mm_set1_epi32(i)), acc[i][j]);
                if (il_k16_min_type(wtype)) { /* each 16 inputs' sum times its minimum: dot32 with weights of 1 */
                    const __m128i one = _mm_set1_epi8(1);
                    acc[i][j] = _mm_fmadd_ps(_mm_cvtepi32_ps(dot32(one, one, xl, xh, wtype, sc + 2)),
                                             _mm_permutevar_ps(mscale, _mm_set1_epi32(i)), acc[i][j]);
                }
            }
            if (!signed_weights(wtype)) /* c * s_x of each row (dm's lane 1 is c, or d for Q4_0/Q5_0) */
                corr[j] = _mm_fmadd_ps(_mm_shuffle_ps(dm, dm, _MM_SHUFFLE(1, 1, 1, 1)), sx, corr[j]);
        }
    }
    finish8(acc, corr, wtype, R, C, out);
}

#ifdef __AVX512VNNI__
#include "../avx512/int8_quads.h"
#define TILE1X4(T) tilerx4_vnni(xq, x4, K, w, T, 1, out)
#define I8_FEW(T, R) tilerx4_vnni(xq, x4, K, w, T, R, out)
#define I8_TWO(T) I8_FEW(T, 2)
#define I8_COLS(T, R) 4 /* weight rows per tile */
#else
#include "int8_pairs.h"
#define TILE1X4(T) tile1x4_pairs(xq, x4, K, w, T, out)
#define I8_FEW(T, R) tilerx2_pairs(xq, x4, K, w, T, R, out)
#define I8_TWO(T) I8_FEW(T, 2)
#define I8_COLS(T, R) ((R) == 1 ? 4 : 2)
#endif
/* Q2_K at one row keeps tile8: its blocks' unpacking, row by row, bounds it there, and the lanes'
 * shuffles cost more than they save (the layers' matmuls 1.01x on AVX2, 1.15x on AVX-512) */
#define TILE1X4_TYPE(T) (!il_k16_min_type(T))
#define I8_ONE(T) (TILE1X4_TYPE(T) ? TILE1X4(T) : tile8(xq, x4, K, w, T, 1, 4, out))

/* One input row against four weight rows, or up to four rows against two (with VNNI, three or four
 * rows against four: I8_COLS); a tile past the last weight row repeats it (the extra outputs are not
 * stored). */
#define I8_CASE(T)                                                                                           \
    case T:                                                                                                \
        switch (R) {                                                                                       \
            case 1: I8_ONE(T); break;                                                            \
            case 2: I8_TWO(T); break;                                                            \
            case 3: I8_FEW(T, 3); break;                                                         \
            default: I8_FEW(T, 4);                                                               \
        }                                                                                                  \
        break
static void tile_int8(const int8_t *xq, const float *x4, int K, const uint8_t *const w[4], int wtype, int R,
                      __m128 out[4]) {
    switch (wtype) {
        I8_CASE(IL_W_Q8_0); I8_CASE(IL_W_Q4_0); I8_CASE(IL_W_Q4_1); I8_CASE(IL_W_Q5_0); I8_CASE(IL_W_IQ4_NL);
        I8_CASE(IL_W_IQ4_XS); I8_CASE(IL_W_Q4_K); I8_CASE(IL_W_Q5_K); I8_CASE(IL_W_Q6_K); I8_CASE(IL_W_Q3_K);
        I8_CASE(IL_W_Q2_K);
        default: I8_CASE(IL_W_Q5_1);
    }
}
#undef I8_CASE
#undef I8_ONE
#undef I8_FEW
#undef I8_TWO
#undef TILE1X4

int IL(linear_int8)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy,
                     int rows, int K, int N, int dtype, int ydtype, int num_threads) {
    const int nb = K / 32;
    const int64_t rb = il_row_bytes(wtype, K);
    int8_t *xq = malloc((size_t)rows * K);
    float *ds = malloc(2 * sizeof(float) * (size_t)rows * nb); /* per row: d_x then s_x, as the quantizer writes */
    float *x4 = calloc((size_t)(rows + 3) / 4 * nb * 8, sizeof(float)); /* [row / 4][block]: 4 d_x, 4 s_x */
    if (!xq || !ds || !x4) {
        free(xq), free(ds), free(x4);
        return 2;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < rows; m++) {
            float *d = ds + 2 * (int64_t)m * nb, *s = d + nb;
            il_quantize_row_q8((const char *)x + (int64_t)m * ldx * il_elem_size(dtype), dtype, K, xq + (int64_t)m * K,
                               d, s);
            for (int b = 0; b < nb; b++) {
                float *blk = x4 + ((int64_t)(m / 4) * nb + b) * 8 + m % 4;
                blk[0] = d[b], blk[4] = s[b];
            }
        }
        const int panels = (N + I8_PANEL - 1) / I8_PANEL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const int n0 = p * I8_PANEL, n1 = n0 + I8_PANEL < N ? n0 + I8_PANEL : N;
            for (int m = 0; m < rows; m += 4) {
                const int R = rows - m < 4 ? rows - m : 4, cols = I8_COLS(wtype, R);
                for (int n = n0; n < n1; n += cols) {
                    const uint8_t *wr[4];
                    for (int j = 0; j < 4; j++) wr[j] = (const uint8_t *)w + (n + j < n1 ? n + j : n1 - 1) * rb;
                    __m128 out[4];
                    tile_int8(xq + (int64_t)m * K, x4 + (int64_t)m * nb * 2, K, wr, wtype, R, out);
                    const int C = n1 - n < cols ? n1 - n : cols;
                    for (int j = 0; j < C; j++) {
                        float v[4];
                        _mm_storeu_ps(v, out[j]);
                        const float bj = bias ? il_ld(bias, n + j, dtype) : 0.f;
                        for (int i = 0; i < R; i++) il_st(y, (int64_t)(m + i) * ldy + n + j, v[i] + bj, ydtype);
                    }
                }
            }
        }
    }
    free(xq), free(ds), free(x4);
    return 0;
}
#undef TILE1X4_TYPE
#undef I8_COLS
