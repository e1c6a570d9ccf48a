/* Throughput of the few AVX-512 instructions the regrouped-block kernel (kernels/avx512/x16.c) is
 * made of, alone and in the pairs it issues them in: what bounds a one-row decode on this core.
 *
 *     cc -O2 -mavx512f -mavx512bw -mavx512bf16 benchmarks/instruction_speed.c -o /tmp/isp && /tmp/isp
 *
 * Each figure runs 12 independent chains whose registers start from different values and stay
 * live (an empty asm reads them), so the compiler can neither merge the chains nor drop the work.
 * One chain alone gives the latency. The core's clock is read off the fp32 FMA: its latency is 4
 * cycles on every AVX-512 core, and two issue a cycle where there are two FMA pipes.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define OPS 120000000L /* per figure: a few tenths of a second */

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define EACH(S) S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11)
#define LIVE(r) __asm__ volatile("" ::"v"(r##0), "v"(r##1), "v"(r##2), "v"(r##3), "v"(r##4), "v"(r##5), \
                                 "v"(r##6), "v"(r##7), "v"(r##8), "v"(r##9), "v"(r##10), "v"(r##11))
#define TIME(label, STEP, ...)                                                  \
    do {                                                                        \
        const double t0 = seconds();                                            \
        for (long i = 0; i < OPS / 12; i++) {                                   \
            EACH(STEP)                                                          \
            __VA_ARGS__;                                                        \
        }                                                                       \
        printf("%-38s %.3f ns\n", label, (seconds() - t0) / OPS * 1e9);         \
    } while (0)

int main(void) {
#define START(k) __m512 a##k = _mm512_set1_ps(1.0f + k); __m512i v##k = _mm512_set1_epi32(k);
    EACH(START)
    __m512 w = _mm512_set1_ps(0.999f), table = _mm512_set1_ps(0.5f);
    __m512bh wb = (__m512bh)_mm512_set1_epi32(0x3f803f80), xb = wb;
    __asm__ volatile("" : "+v"(w), "+v"(table), "+v"(wb), "+v"(xb)); /* unknown to the compiler */

#define FMA(k) a##k = _mm512_fmadd_ps(a##k, w, w);
#define DOT(k) a##k = _mm512_dpbf16_ps(a##k, wb, xb);
#define PERMW(k) v##k = _mm512_permutexvar_epi16(v##k, (__m512i)table);
#define PERMPS(k) v##k = (__m512i)_mm512_permutexvar_ps(v##k, table);
#define SHIFT(k) v##k = _mm512_srli_epi32(v##k, 1);
#define PERMW_DOT(k) v##k = _mm512_permutexvar_epi16(v##k, (__m512i)table); a##k = _mm512_dpbf16_ps(a##k, (__m512bh)v##k, xb);
#define SHIFT_PERMW_DOT(k) v##k = _mm512_permutexvar_epi16(_mm512_srli_epi16(v##k, 4), (__m512i)table); \
                           a##k = _mm512_dpbf16_ps(a##k, (__m512bh)v##k, xb);
#define SHIFT_TERNLOG_DOT(k) v##k = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v##k, 4), (__m512i)table, \
                                                             (__m512i)w, 0xEA); /* (v & table) | w */ \
                             a##k = _mm512_dpbf16_ps(a##k, (__m512bh)v##k, xb);
#define FP32_WAY(k) v##k = (__m512i)_mm512_permutexvar_ps(_mm512_srli_epi32(v##k, 4), table); \
                    a##k = _mm512_fmadd_ps(a##k, (__m512)v##k, w);
    TIME("vfmadd231ps, each", FMA, LIVE(a));
    TIME("vdpbf16ps, each", DOT, LIVE(a));
    TIME("vpermw, each", PERMW, LIVE(v));
    TIME("vpermps, each", PERMPS, LIVE(v));
    TIME("vpsrld, each", SHIFT, LIVE(v));
    TIME("vpermw + vdpbf16ps, a pair", PERMW_DOT, LIVE(a); LIVE(v));
    TIME("vpsrlw + vpermw + vdpbf16ps", SHIFT_PERMW_DOT, LIVE(a); LIVE(v));
    TIME("vpsrlw + vpternlogd + vdpbf16ps", SHIFT_TERNLOG_DOT, LIVE(a); LIVE(v));
    TIME("vpsrld + vpermps + vfmadd, a triple", FP32_WAY, LIVE(a); LIVE(v));

    const double t0 = seconds(); /* latencies: one chain */
    for (long i = 0; i < OPS / 4; i++) {
        a0 = _mm512_fmadd_ps(a0, w, w);
        __asm__ volatile("" ::"v"(a0));
    }
    const double fma = (seconds() - t0) / (OPS / 4) * 1e9;
    const double t1 = seconds();
    for (long i = 0; i < OPS / 4; i++) {
        a1 = _mm512_dpbf16_ps(a1, wb, xb);
        __asm__ volatile("" ::"v"(a1));
    }
    const double dot = (seconds() - t1) / (OPS / 4) * 1e9;
    printf("latency: vfmadd %.2f ns (so ~%.2f GHz), vdpbf16ps %.2f ns (%.1f cycles)\n", fma, 4 / fma, dot,
           dot / fma * 4);
    float keep = 0;
#define SUM(k) keep += _mm512_reduce_add_ps(a##k) + _mm512_reduce_add_epi32(v##k);
    EACH(SUM)
    return keep == 0.5f; /* never: the sums only keep the chains' results alive */
}
