/* What the AVX-512 kernels share: widening bf16, finishing 16 dot products at once. */
#ifndef INFERLAB_AVX512_LANES_H
#define INFERLAB_AVX512_LANES_H
#include <immintrin.h>
#include <stdint.h>

/* 16 bf16 values from p, widened to fp32 (exact: the bits move to the high half). */
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The bf16 instructions the regrouped kernel (x16.c) uses, and their stand-ins where it is compiled
 * without AVX512-BF16 (avx512f/: AVX-512 CPUs without it, which only run its fp32 products): the
 * same roundings in integers (nearest even; NaNs and denormals aside, which the values never are). */
static inline __m256i bf16_round16(__m512 v) { /* 16 fp32 -> 16 bf16 */
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_castps_si512(v), odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
#endif
}

/* acc + the products of a's and b's bf16 pairs, odd then even (vdpbf16ps; exact products, so FMAs). */
static inline __m512 bf16_dot(__m512 acc, __m512bh a, __m512bh b) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, a, b);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512((__m512i)a, hi)),
                          _mm512_castsi512_ps(_mm512_and_si512((__m512i)b, hi)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32((__m512i)a, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32((__m512i)b, 16)), acc);
#endif
}

/* Lane t of the result = the sum of v[t]'s 16 lanes: 16 dot products finished with 45 shuffles
 * and adds, where 16 separate horizontal sums would take about 130. */
static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 s2[8], s4[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) */
        s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: (a, b, c, d), each a quarter of its sum */
        const __m512d x = _mm512_castps_pd(s2[2 * i]), y = _mm512_castps_pd(s2[2 * i + 1]);
        s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[0], s4[1], 0x88), _mm512_shuffle_f32x4(s4[0], s4[1], 0xdd));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2], s4[3], 0x88), _mm512_shuffle_f32x4(s4[2], s4[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}
#endif
