/* The kernels' entry points, included once per ISA by inferlab.h (no include guard on purpose).
 *
 * Conventions the Python bindings rely on: `rows` is the number of token rows of the step and
 * `table_stride` the width of its block tables (a tape replays both with each step's values);
 * `num_threads` is filled in by the bindings; a `const` pointer is only read, any other is written.
 * Every entry point takes any shape within the limits in inferlab.h. Those returning int return 0,
 * or 2 when out of memory (1 is kept for "this build cannot run it": only prefill_attention).
 */

/* y[rows, N] = x[rows, K] W^T (+ bias[N]), x and bias in `dtype`, y in `ydtype` (`dtype`, or fp32:
 * a bf16 model's logits, unrounded), row strides ldx and ldy, W as stored: N rows of K weights of
 * type `wtype`. With act = IL_ACT_FLOAT the weights are dequantized in registers, never rounded (but
 * the t16 types, which stand for the bf16 weights they round to: regrouped.h), and the products
 * summed in fp32: the result is the dequantized matrix's product. With act =
 * IL_ACT_INT8 and an integer block type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS and the
 * K-quants: every block type; Q2_K's minimum per 16 weights times the sum of its 16 int8 inputs), each
 * 32 inputs of a row are quantized to int8 first (as llama.cpp's Q8_0 does) and blocks are
 * multiplied in integers: faster, and the inputs' rounding moves the result a little; other types ignore it. */
int IL(linear)(const void *x, int64_t ldx, const void *w, int wtype, const void *bias, void *y, int64_t ldy, int rows,
               int K, int N, int dtype, int ydtype, int act, int num_threads);

/* Which products the regrouped (x16) types' AVX-512 kernel multiplies with: 0 bf16 pairs (vdpbf16ps),
 * 1 fp32 FMAs of the same exact weights (faster where a vdpbf16ps issues at a quarter of the FMA rate:
 * Intel's cores); mode -1 only asks. Returns the mode now; builds without that kernel return -1, and
 * avx512f (no bf16 instructions) always 1. fp32 inputs take FMAs in either mode. Set once at start
 * (kernels/__init__.py) and by tests; each mode gives every row count the same sums. */
int IL(x16_products)(int mode, int num_threads);

/* This CPU's vendor ("GenuineIntel"), a newline, and the features the dispatcher reads, named as
 * Linux's /proc/cpuinfo names them, each followed by a space ("avx fma f16c avx2 ..."): read by CPUID,
 * and counted only where the OS saves their registers (XGETBV). Written into out[size] with a
 * terminating 0; returns the length, or -1 where size is too small. Only `generic` implements it. */
int IL(cpu_features)(void *out, int size, int num_threads);

/* out[rows, K] (dtype) = the rows ids[rows] of W, dequantized: an embedding lookup. */
void IL(get_rows)(void *out, const void *w, int wtype, const int64_t *ids, int rows, int K, int dtype,
                  int num_threads);

/* fp32 out[n, K] = W's n rows dequantized / W's n rows = the fp32 rows x, quantized (Q8_0, Q4_0,
 * Q4_1 and the float types; returns 1 for a type it cannot write). */
void IL(dequantize)(float *out, const void *w, int wtype, int64_t n, int K, int num_threads);
int IL(quantize)(void *w, int wtype, const float *x, int64_t n, int K, int num_threads);

/* x: [rows, groups, dim], rows x_stride elements apart, groups dense. out (dense, same shape) =
 * norm(x) * weight per dim-vector. With a residual ([rows, dim], groups = 1): residual += x, then
 * out = norm(residual) * weight (the sum is kept for the next layer). out and weight in `dtype`, x
 * in `xdtype`, residual in `rdtype`: the residual stream stays fp32 in a bf16 model. */
void IL(rms_norm)(void *out, const void *x, int64_t x_stride, void *residual, const void *weight, int rows, int groups,
                  int dim, float eps, int dtype, int xdtype, int rdtype, int num_threads);

/* gate_up: [rows, 2 * dim] (gate, then up) -> out [rows, dim] = silu(gate) * up. */
void IL(silu_and_mul)(void *out, const void *gate_up, int rows, int dim, int dtype, int num_threads);

/* In place on x: [rows, heads, head_dim], rows x_stride elements apart: rotate-half RoPE (HF's
 * convention) with fp32 cos, sin: [rows, head_dim / 2]. */
void IL(rope)(void *x, int64_t x_stride, const float *cos, const float *sin, int rows, int heads, int head_dim,
              int dtype, int num_threads);

/* Row t of k and of v (rows k_stride and v_stride elements apart) go to slot slots[t] of k_cache
 * and v_cache, whose slots hold row_elems elements of elem_size bytes. */
void IL(write_kv)(void *k_cache, void *v_cache, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
                  const int64_t *slots, int rows, int row_elems, int elem_size, int num_threads);

/* out[i] = the first index of the largest of the cols values of row i of x (n rows, dtype). */
void IL(argmax)(int64_t *out, const void *x, int64_t n, int64_t cols, int dtype, int num_threads);

/* Attention of `rows` query rows against the paged cache. q: [T, num_heads, head_dim], rows q_stride
 * elements apart; out: [T, num_heads, head_dim] dense; caches: [blocks, block_size, num_kv_heads,
 * head_dim]. Task r: query row row_ids[r] sees the first lens[r] keys of the sequence whose block
 * table is block_tables + seqs[r] * table_stride. */
int IL(paged_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                        const int64_t *row_ids, const int32_t *seqs, const int32_t *lens, int rows,
                        const int32_t *block_tables, int table_stride, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, float scale, int dtype, int num_threads);

/* Causal attention of whole prefill chunks, as matrix products. Chunk c: queries at rows row0[c] ..
 * row0[c] + count[c] - 1 of q, the last count[c] of its ctx[c] keys (already in the pool), block
 * table block_tables + seq[c] * table_stride. Returns 1 where this ISA has no such kernel for the
 * shape (the caller then uses PyTorch's SDPA); with num_chunks = 0 it only answers that. */
int IL(prefill_attention)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                          const int64_t *row0, const int32_t *count, const int32_t *ctx, const int32_t *seq,
                          int num_chunks, const int32_t *block_tables, int table_stride, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, float scale, int dtype, int num_threads);

/* Replays a tape (generic/tape.c): n_ops entries of IL_TAPE_WIDTH int64s each (op code, function,
 * then a (kind, value) pair per argument), with the step's rows, table stride, input pointers and
 * scratch arena. Where seconds is not NULL, each op's wall time is added to seconds[i] (a profile).
 * Returns the first nonzero status. */
int IL(tape_run)(const int64_t *ops, int n_ops, const int64_t *inputs, char *arena, int rows, int table_stride,
                 double *seconds, int num_threads);
