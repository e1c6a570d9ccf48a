/* Causal attention of prefill chunks on AMX tiles, reading K/V from the paged pool.
 *
 * A prefill chunk of many query rows is a matrix product, not a scan: PyTorch's CPU SDPA reached
 * about 60 GFLOP/s on it here, while AMX multiplies bf16 tiles at well over a TFLOP/s. One task per
 * (sequence, KV head, part of its queries; one part unless that leaves threads idle): it packs that
 * head's keys and values once into the pair-interleaved layouts AMX takes as its right operand, then
 * for every 16-query tile and every query head of the group:
 *   S = Q K^T   (16 queries x 16 keys per tile product), stored as fp32;
 *   P = softmax(S * scale) row by row, causal, in fp32, rounded to bf16 (as flash attention does);
 *   O = P V     (16 queries x 16 value dims per tile product), divided by the row sums.
 * Two passes over the keys per tile (scores, then values), so no running rescale is needed; the
 * scores of one tile (16 x context fp32) stay in L2.
 *
 * Needs AMX-BF16, bf16 data, head_dim a multiple of 32 up to 128 and block_size a multiple of 16
 * (a 16-key tile then lies in one block); other shapes go to the lower ISAs' kernels.
 */
#include "amx.h"

#include <float.h>
#include <stdlib.h>

#include "../common.h"
#include "paged.h"

/* kp[t][c][r][k] (dwords) = dims (32c + 2r, +1) of key 16t + k: the B operand of Q K^T.
 * Keys past n repeat key n - 1 (their scores are masked). */
static void pack_keys(uint32_t *kp, const uint16_t *k_head, const int32_t *table, int n, int block_size,
                      int64_t token_stride, int D) {
    const int pairs = D / 2;
    for (int t = 0; t < (n + 15) / 16; t++) {
        const uint16_t *first = key_row(k_head, table, 16 * t, block_size, token_stride);
        const int last = n - 1 - 16 * t;  /* keys of this tile that exist: 0 .. last */
        int idx[16];
        for (int k = 0; k < 16; k++) idx[k] = (int)((k < last ? k : last) * token_stride / 2);
        const __m512i offsets = _mm512_loadu_si512(idx);
        for (int p = 0; p < pairs; p++)  /* pair p = 16c + r */
            _mm512_storeu_si512(kp + ((int64_t)t * pairs + p) * 16,
                                _mm512_i32gather_epi32(offsets, (const int *)first + p, 4));
    }
}

/* vp[c32][s][r][16] (dwords): for 32 keys c32 and value-dim tile s (dims 16s .. 16s + 15), row r holds
 * keys (32 c32 + 2r, +1) interleaved, as AMX's B operand of P V. `_mm512_unpack*_epi16` pair two keys'
 * words within 128-bit lanes, so each 32-dim piece is first permuted so that the lo (unpacklo) and hi
 * (unpackhi) halves come out as dims 0-15 and 16-31 in order: P V then stores O in natural order. */
static void pack_values(uint32_t *vp, const uint16_t *v_head, const int32_t *table, int n, int block_size,
                        int64_t token_stride, int D) {
    const int tiles = D / 16;
    /* word 8L + i of the permuted piece: dim 4L + i (i < 4), else dim 16 + 4L + i - 4 */
    const __m512i order = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8,
                                           23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    for (int c32 = 0; c32 < (n + 31) / 32; c32++)
        for (int r = 0; r < 16; r++) {
            const int k0 = 32 * c32 + 2 * r, a = k0 < n ? k0 : n - 1, b = k0 + 1 < n ? k0 + 1 : n - 1;
            const uint16_t *va = key_row(v_head, table, a, block_size, token_stride);
            const uint16_t *vb = key_row(v_head, table, b, block_size, token_stride);
            for (int c = 0; c < D / 32; c++) {
                const __m512i x = _mm512_permutexvar_epi16(order, _mm512_loadu_si512(va + 32 * c));
                const __m512i y = _mm512_permutexvar_epi16(order, _mm512_loadu_si512(vb + 32 * c));
                uint32_t *dst = vp + (((int64_t)c32 * tiles + 2 * c) * 16 + r) * 16;
                _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(x, y));
                _mm512_storeu_si512(dst + 256, _mm512_unpackhi_epi16(x, y));
            }
        }
}

/* 2^x for x <= 0: 2^n p(f), n = round(x), f = x - n in [-1/2, 1/2], p a degree-5 fit of 2^f evaluated
 * in Estrin's order (three multiply-adds deep, not six: the row's loop waits on the chain; 7% off the
 * kernel against e^x's degree 6 in Horner's order); within 2.6e-7 of 2^x (3 ulp), far below the bf16
 * rounding of the weights it makes. The scores come in times log2(e), folded into the scale, so no
 * multiply by 1 / ln 2 either. Inline, so a softmax row never leaves the registers (a call to libmvec's
 * expf stored and reloaded every 16 scores). */
static inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n), f2 = _mm512_mul_ps(f, f);
    const __m512 a = _mm512_fmadd_ps(f, _mm512_set1_ps(0.6931469440460205f), _mm512_set1_ps(1.0000001192092896f));
    const __m512 b = _mm512_fmadd_ps(f, _mm512_set1_ps(0.055507127195596695f), _mm512_set1_ps(0.24022120237350464f));
    const __m512 c = _mm512_fmadd_ps(f, _mm512_set1_ps(0.0013276641257107258f), _mm512_set1_ps(0.009675543755292892f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(f2, _mm512_fmadd_ps(f2, c, b), a), n);
}

/* Row i of s (fp32 scores, `width` of them) -> bf16 weights in p (zero past key `limit`), returns
 * their fp32 sum. */
static inline float softmax_row(const float *s, uint16_t *p, int limit, int width, float scale) {
    /* four running maxima: one would wait out max's latency every 16 scores (4 of ~13 cycles) */
    __m512 mx = _mm512_set1_ps(-FLT_MAX), m1 = mx, m2 = mx, m3 = mx;
    int k = 0;
    for (; k + 64 <= limit; k += 64) {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + k));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + k + 16));
        m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + k + 32));
        m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + k + 48));
    }
    for (; k < limit; k += 16) {
        const __mmask16 live = limit - k >= 16 ? 0xffff : (__mmask16)((1u << (limit - k)) - 1);
        mx = _mm512_mask_max_ps(mx, live, mx, _mm512_maskz_loadu_ps(live, s + k));
    }
    mx = _mm512_max_ps(_mm512_max_ps(mx, m1), _mm512_max_ps(m2, m3));
    const float scale2 = scale * 1.44269504089f; /* e^(x scale) = 2^(x scale log2 e) */
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale2), sc = _mm512_set1_ps(scale2);
    __m512 sum = _mm512_setzero_ps(), sum1 = sum;
    k = 0;
    for (; k + 32 <= limit; k += 32) { /* whole: no masks, and one conversion rounds 32 weights */
        const __m512 w0 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + k), sc, m));
        const __m512 w1 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + k + 16), sc, m));
        sum = _mm512_add_ps(sum, w0);
        sum1 = _mm512_add_ps(sum1, w1);
        _mm512_storeu_si512(p + k, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
    }
    sum = _mm512_add_ps(sum, sum1);
    for (; k < width; k += 16) {
        const int left = limit - k;
        const __mmask16 live = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        const __m512 w = _mm512_maskz_mov_ps(live, exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + k), sc, m)));
        sum = _mm512_add_ps(sum, w);
        _mm256_storeu_si256((__m256i *)(p + k), (__m256i)_mm512_cvtneps_pbh(w));
    }
    return _mm512_reduce_add_ps(sum);
}

static void attend_chunk(const uint16_t *q, int64_t q_stride, uint16_t *out, int64_t row0, int nq, int n,
                         int kv_head, int group, int num_heads, int D, float scale, const uint32_t *kp,
                         const uint32_t *vp, float *s, uint16_t *p, int stride) {
    const int nc = D / 32, tiles = D / 16;
    uint16_t qt[16 * 128] __attribute__((aligned(64)));
    float o[16 * 128] __attribute__((aligned(64))), rsum[16];
    for (int i0 = 0; i0 < nq; i0 += 16) {
        const int rows = nq - i0 < 16 ? nq - i0 : 16;
        const int last_key = n - nq + i0 + rows - 1;  /* the last query of the tile sees keys 0..last_key */
        const int key_tiles = last_key / 16 + 1, key_chunks = last_key / 32 + 1;
        for (int g = 0; g < group; g++) {
            const int j = kv_head * group + g;
            memset(qt, 0, sizeof(uint16_t) * 16 * D);
            for (int i = 0; i < rows; i++)
                memcpy(qt + i * D, q + (row0 + i0 + i) * q_stride + (int64_t)j * D, sizeof(uint16_t) * D);
            _tile_loadd(4, qt, D * 2);  /* Q in tiles 4 .. 3 + nc (tile numbers must be constants) */
            if (nc > 1) _tile_loadd(5, qt + 32, D * 2);
            if (nc > 2) _tile_loadd(6, qt + 64, D * 2);
            if (nc > 3) _tile_loadd(7, qt + 96, D * 2);
            for (int t = 0; t < key_tiles; t++) {  /* S = Q K^T, one 16 x 16 tile at a time */
                _tile_zero(0);
                const uint32_t *b = kp + (int64_t)t * (D / 2) * 16;
                _tile_loadd(1, b, 64);
                _tile_dpbf16ps(0, 4, 1);
                if (nc > 1) {
                    _tile_loadd(2, b + 256, 64);
                    _tile_dpbf16ps(0, 5, 2);
                }
                if (nc > 2) {
                    _tile_loadd(3, b + 512, 64);
                    _tile_dpbf16ps(0, 6, 3);
                }
                if (nc > 3) {
                    _tile_loadd(1, b + 768, 64);
                    _tile_dpbf16ps(0, 7, 1);
                }
                _tile_stored(0, s + 16 * t, stride * 4);
            }
            for (int i = 0; i < 16; i++)  /* rows past the chunk get zero weights (never stored) */
                rsum[i] = i < rows ? softmax_row(s + (int64_t)i * stride, p + (int64_t)i * stride, n - nq + i0 + i + 1,
                                                 32 * key_chunks, scale)
                                   : (memset(p + (int64_t)i * stride, 0, sizeof(uint16_t) * 32 * key_chunks), 0.f);
            for (int s0 = 0; s0 < tiles; s0 += 4) {  /* O = P V, four 16-slot tiles at a time */
                const int nt = tiles - s0 < 4 ? tiles - s0 : 4;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int c32 = 0; c32 < key_chunks; c32++) {
                    const uint32_t *b = vp + ((int64_t)c32 * tiles + s0) * 256;
                    _tile_loadd(4, p + 32 * c32, stride * 2);
                    _tile_loadd(5, b, 64);
                    _tile_dpbf16ps(0, 4, 5);
                    if (nt > 1) {
                        _tile_loadd(6, b + 256, 64);
                        _tile_dpbf16ps(1, 4, 6);
                    }
                    if (nt > 2) {
                        _tile_loadd(7, b + 512, 64);
                        _tile_dpbf16ps(2, 4, 7);
                    }
                    if (nt > 3) {
                        _tile_loadd(5, b + 768, 64);
                        _tile_dpbf16ps(3, 4, 5);
                    }
                }
                _tile_stored(0, o + 16 * s0, D * 4);
                if (nt > 1) _tile_stored(1, o + 16 * (s0 + 1), D * 4);
                if (nt > 2) _tile_stored(2, o + 16 * (s0 + 2), D * 4);
                if (nt > 3) _tile_stored(3, o + 16 * (s0 + 3), D * 4);
            }
            for (int i = 0; i < rows; i++) {
                uint16_t *dst = out + ((row0 + i0 + i) * num_heads + j) * D;
                const __m512 inv = _mm512_set1_ps(1.f / rsum[i]);  /* > 0: every query sees at least itself */
                for (int d = 0; d < D; d += 16)
                    _mm256_storeu_si256((__m256i *)(dst + d),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + i * D + d), inv)));
            }
        }
    }
}
int IL(prefill_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          const int64_t *row0, const int32_t *count, const int32_t *ctx, const int32_t *seq,
                          int num_chunks, const int32_t *block_tables, int table_stride, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, int dtype, int num_threads) {
    const int D = head_dim, group = num_heads / num_kv_heads;
    if (dtype != IL_BF16 || D % 32 || D > 128 || block_size % 16 || num_heads % num_kv_heads || !amx_ready())
        return prefill_attention_avx512(q, q_stride, k_cache, v_cache, out, row0, count, ctx, seq, num_chunks,
                                        block_tables, table_stride, num_heads, num_kv_heads, head_dim, block_size,
                                        scale, dtype, num_threads);
    if (num_chunks == 0) return 0;
    int max_ctx = 1, failed = 0;
    for (int c = 0; c < num_chunks; c++) max_ctx = ctx[c] > max_ctx ? ctx[c] : max_ctx;
    const int width = (max_ctx + 31) / 32 * 32;
    /* s's and p's rows one or two lines past a multiple of 4 KB apart: at 4 KB multiples (1,024 keys
     * and up) a tile's 16 rows all fell in one L1 set, and each tile store and load missed */
    const int stride = width + 32;
    const int64_t token_stride = (int64_t)num_kv_heads * D;
    const int parts = il_prefill_parts(num_chunks, num_kv_heads, num_threads); /* common.h says why */
#pragma omp parallel num_threads(num_threads)
    {
        amx_configure();
        uint32_t *kp = aligned_alloc(64, sizeof(uint32_t) * (size_t)width * D / 2);
        uint32_t *vp = aligned_alloc(64, sizeof(uint32_t) * (size_t)width * D / 2);
        float *s = aligned_alloc(64, sizeof(float) * 16 * (size_t)stride);
        uint16_t *p = aligned_alloc(64, sizeof(uint16_t) * 16 * (size_t)stride);
        if (!kp || !vp || !s || !p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < num_chunks * num_kv_heads * parts; task++) {
            const int c = task / (num_kv_heads * parts), h = task / parts % num_kv_heads, part = task % parts;
            const int first = il_prefill_part_row(count[c], ctx[c], part, parts, 16);
            const int last = il_prefill_part_row(count[c], ctx[c], part + 1, parts, 16);
            if (!kp || !vp || !s || !p || first == last) continue;
            const int32_t *table = block_tables + (int64_t)seq[c] * table_stride;
            const int keys = ctx[c] - count[c] + last; /* what the part's last query sees */
            pack_keys(kp, (const uint16_t *)k_cache + (int64_t)h * D, table, keys, block_size, token_stride, D);
            pack_values(vp, (const uint16_t *)v_cache + (int64_t)h * D, table, keys, block_size, token_stride, D);
            attend_chunk(q, q_stride, out, row0[c] + first, last - first, keys, h, group, num_heads, D, scale, kp, vp,
                         s, p, stride);
        }
        free(kp), free(vp), free(s), free(p);
        _tile_release();
    }
    return failed ? 2 : 0;
}
