/* Every decoder layer of a decode step in one call: the same kernels, in the same order, on the
 * same kind of buffers as the per-op path (`DecoderLayer.forward`), so the result is bit-identical.
 *
 * Why: the per-op path crosses from Python into C ten times a layer. At a few rows per step the
 * kernels themselves are short, and Python's share of those 300 crossings (argument checks,
 * tensor allocation, ctypes) was a large part of the step. This file removes them and nothing
 * else: each kernel below still opens its own OpenMP region.
 *
 * Runs where every matmul of the layer has the AMX path of `linear_bf16` (1-64 rows, bf16); the
 * caller asks first with num_rows = 0, and keeps the per-op path otherwise (Qwen3's q/k norms too).
 */
#define _GNU_SOURCE /* syscall() in amx.h under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"

enum { BF16 = 1 };
enum { NORM1, QKV, QKV_BIAS, O_PROJ, NORM2, GATE_UP, DOWN, K_CACHE, V_CACHE, LAYER_PTRS };  /* one layer's row */
#define MAX_ROWS 64  /* linear.c's AMX_MAX_ROWS */

void rms_norm(void *out, const void *x, void *residual, const void *weight, int64_t rows, int dim, float eps,
              int dtype, int num_threads);
void silu_and_mul(void *out, const void *gate_up, int64_t rows, int dim, int dtype, int num_threads);
void add_bias(void *y, const void *bias, int64_t rows, int dim, int dtype);
void rope(void *x, int64_t row_stride, const float *cos, const float *sin, int64_t rows, int heads,
          int head_dim, int dtype, int num_threads);
void write_kv(void *k_cache, void *v_cache, const void *k, const void *v, int64_t src_stride,
              const int64_t *slots, int64_t rows, int row_elems, int elem_size, int num_threads);
int linear_bf16(const void *x, const void *w, void *y, int M, int K, int N, int num_threads);
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                    const int64_t *rows, const int32_t *seqs, const int32_t *lens, int num_rows,
                    const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads,
                    int head_dim, int block_size, float scale, int dtype, int num_threads);

static int supported(int hidden, int heads, int kv_heads, int head_dim, int inter) {
#if defined(HAVE_AMX)
    const int q = heads * head_dim, qkv = (heads + 2 * kv_heads) * head_dim;
    return amx_ready() && hidden % 32 == 0 && hidden <= 8192 && q % 32 == 0 && qkv % 16 == 0 && inter % 32 == 0 &&
           head_dim <= 256 && heads % kv_heads == 0 && heads / kv_heads <= 16;
#else
    (void)hidden, (void)heads, (void)kv_heads, (void)head_dim, (void)inter;
    return 0;
#endif
}

/* x: [T, hidden] bf16, the embeddings; on return the last layer's output, and residual ([T, hidden])
 * the residual stream before it, as `DecoderLayer.forward` returns them. layers: num_layers rows of
 * LAYER_PTRS addresses (QKV_BIAS may be 0). cos, sin: [T, head_dim / 2] fp32; slots: [T] int64;
 * rows/seqs/lens/block_tables as for `paged_attention`, covering all T rows.
 * Returns 0; 1 where this build, CPU or shape has no such path (nothing written); 2 out of memory. */
int decode_layers(void *x, void *residual, const int64_t *layers, int num_layers, const float *cos,
                  const float *sin, const int64_t *slots, const int64_t *rows, const int32_t *seqs,
                  const int32_t *lens, const int32_t *block_tables, int table_stride, int T, int hidden, int heads,
                  int kv_heads, int head_dim, int inter, int block_size, float eps, float scale, int num_threads) {
    if (!supported(hidden, heads, kv_heads, head_dim, inter) || T > MAX_ROWS) return 1;
    if (T == 0) return 0;
    const int q = heads * head_dim, qkv_dim = (heads + 2 * kv_heads) * head_dim;
    uint16_t *h = malloc(sizeof(uint16_t) * T * (size_t)(hidden + qkv_dim + q + hidden + 3 * inter));
    if (!h) return 2;
    uint16_t *qkv = h + (size_t)T * hidden, *attn = qkv + (size_t)T * qkv_dim, *o = attn + (size_t)T * q;
    uint16_t *gate_up = o + (size_t)T * hidden, *act = gate_up + (size_t)T * 2 * inter;
    int status = 0;
    memcpy(residual, x, sizeof(uint16_t) * T * (size_t)hidden);  /* layer 0 normalizes x; the stream starts at x */
    for (int l = 0; l < num_layers && !status; l++) {
        const int64_t *w = layers + (int64_t)l * LAYER_PTRS;
        rms_norm(h, l ? x : residual, l ? residual : NULL, (void *)w[NORM1], T, hidden, eps, BF16, num_threads);
        status |= linear_bf16(h, (void *)w[QKV], qkv, T, hidden, qkv_dim, num_threads);
        if (w[QKV_BIAS]) add_bias(qkv, (const void *)w[QKV_BIAS], T, qkv_dim, BF16);  /* Qwen2 */
        rope(qkv, qkv_dim, cos, sin, T, heads + kv_heads, head_dim, BF16, num_threads);  /* q and k: adjacent */
        write_kv((void *)w[K_CACHE], (void *)w[V_CACHE], qkv + q, qkv + q + kv_heads * head_dim, qkv_dim, slots, T,
                 kv_heads * head_dim, sizeof(uint16_t), num_threads);
        status |= paged_attention(qkv, qkv_dim, (void *)w[K_CACHE], (void *)w[V_CACHE], attn, rows, seqs, lens, T,
                                  block_tables, table_stride, heads, kv_heads, head_dim, block_size, scale, BF16,
                                  num_threads);
        status |= linear_bf16(attn, (void *)w[O_PROJ], o, T, q, hidden, num_threads);
        rms_norm(h, o, residual, (void *)w[NORM2], T, hidden, eps, BF16, num_threads);
        status |= linear_bf16(h, (void *)w[GATE_UP], gate_up, T, hidden, 2 * inter, num_threads);
        silu_and_mul(act, gate_up, T, inter, BF16, num_threads);
        status |= linear_bf16(act, (void *)w[DOWN], x, T, inter, hidden, num_threads);
    }
    free(h);
    return status ? 2 : 0;  /* shapes were checked above: a kernel failing here ran out of memory */
}
