/* What every kernel file shares: bf16 and fp16 conversions, loads and stores by dtype, and (blocks.h,
 * regrouped.h, int8_blocks.h) the weight types. Everything is static inline: each file compiles it with
 * its own ISA's flags.
 */
#ifndef INFERLAB_COMMON_H
#define INFERLAB_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "inferlab.h"

/* For the small helpers of hot loops: their constant arguments (a weight type, a tile shape) must
 * fold away, which the compiler's own inlining heuristics do not always see. */
#define IL_INLINE static inline __attribute__((always_inline))

static inline float il_bf16_to_f32(uint16_t x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t il_f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float il_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        const float f = (float)man * 5.9604645e-8f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* il_f16_to_f32 of every fp16 value (generic/f16_table.c), for scales read in hot loops. */
extern float il_f16_table[65536];

static inline uint16_t il_f32_to_f16(float f) { /* round to nearest even, as numpy does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0)); /* inf, nan */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);                                  /* overflow */
    if (a < 0x38800000u) { /* subnormal half: round a * 2^24 to an integer, ties to even */
        float m;
        memcpy(&m, &a, sizeof m);
        return (uint16_t)(sign | (uint32_t)nearbyintf(m * 16777216.0f));
    }
    const uint32_t r = a + 0xfff + ((a >> 13) & 1);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float il_ld(const void *p, int64_t i, int dtype) {
    return dtype == IL_BF16 ? il_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void il_st(void *p, int64_t i, float f, int dtype) {
    if (dtype == IL_BF16)
        ((uint16_t *)p)[i] = il_f32_to_bf16(f);
    else
        ((float *)p)[i] = f;
}

/* Prefill attention's tasks are (chunk, KV head, part of the chunk's queries): with fewer chunks and
 * heads than two a thread (one long prompt: 3 KV heads on 2 threads left one idle a third of the time),
 * each chunk's queries are split in parts of about equal causal work, each part over the keys its last
 * query sees. The parts follow the thread count; a row's result must not. */
static inline int il_prefill_parts(const int num_chunks, const int num_kv_heads, const int num_threads) {
    const int tasks = num_chunks * num_kv_heads;
    const int parts = tasks > 0 ? (2 * num_threads + tasks - 1) / tasks : 1;
    return parts < 1 ? 1 : parts > 16 ? 16 : parts;
}

/* The first query row of part `part` of `parts` of a chunk of `count` rows over `ctx` keys (count for
 * part = parts): a multiple of `align` (the kernel's query tile) where the keys the rows before it see
 * add up to about part / parts of all the chunk's. */
static inline int il_prefill_part_row(const int count, const int ctx, const int part, const int parts,
                                      const int align) {
    if (part >= parts) return count;
    const double base = ctx - count, total = count * (base + (count + 1) / 2.0);
    int r = 0;
    while (r < count && r * (base + (r + 1) / 2.0) < total * part / parts) r += align;
    return r < count ? r : count;
}

/* e^x in fp32 (within 1.3 ulp of the exact value where e^x is a normal float, measured with gcc and
 * clang), inline and in plain arithmetic, so that every compiler vectorizes the loops that call it:
 * clang, which knows no vector expf by default, called libm's scalar one for each element of SiLU
 * and softmax, and gcc's libmvec calls were no faster. x is held to [-87.3, 88.3] (below, e^x is then
 * 1.2e-38, not 0; above, libm's inf made SiLU NaN for inputs from -88.7 to about -95 under
 * -ffast-math, whose division by 1 + inf multiplies by a refined reciprocal: 0 x inf):
 * x = (n + f) ln 2 with n = round(x / ln 2) as an integer, f's part taken off in two constants
 * (Cephes' split of ln 2, whose first half times n is exact), e^(f ln 2) by Cephes' degree-6
 * polynomial, 2^n as the float's exponent bits. The two-constant step must not be reassociated,
 * which -ffast-math allows: fused multiply-adds keep it (60 ulp off at x = 83 without), so a CPU
 * without them keeps libm's expf. */
static inline float il_expf(float x) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const int k = (int)(x * 1.44269504088896341f + 127.5f); /* 127 + round(x / ln 2), >= 1 */
    const float n = (float)(k - 127);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const uint32_t bits = (uint32_t)k << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
#else
    return expf(x < 88.3f ? x : 88.3f); /* past it, inf: -ffast-math's division by 1 + inf made SiLU NaN */
#endif
}

static inline int il_elem_size(int dtype) { return dtype == IL_BF16 ? 2 : 4; }

#include "blocks.h" /* the weight types, which use the conversions above */
#include "regrouped.h"
#include "int8_blocks.h"
#endif
