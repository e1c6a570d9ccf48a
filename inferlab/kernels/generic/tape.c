/* Replaying a tape: the ops of a decode step's forward pass, recorded once from the Python model
 * (`inferlab/tape.py`), called in order with this step's rows, inputs and scratch arena. The
 * functions are the ones the Python dispatcher picked (the best ISA), so a replay computes exactly
 * what the model's forward computes op by op; only the Python between the calls is gone.
 *
 * An entry is IL_TAPE_WIDTH int64s: the op code, the function, then a (kind, value) pair per
 * argument in the order of its prototype in api.h.
 */
#include <omp.h>

#include "../common.h"

typedef __typeof__(linear_generic) linear_fn;
typedef __typeof__(get_rows_generic) get_rows_fn;
typedef __typeof__(rms_norm_generic) rms_norm_fn;
typedef __typeof__(silu_and_mul_generic) silu_and_mul_fn;
typedef __typeof__(rope_generic) rope_fn;
typedef __typeof__(write_kv_generic) write_kv_fn;
typedef __typeof__(paged_attention_generic) paged_attention_fn;

typedef struct {
    const int64_t *inputs;
    char *arena;
    int rows, table_stride, num_threads;
} step;

static inline int64_t arg(const int64_t *e, int i, const step *s) {
    const int64_t v = e[3 + 2 * i];
    switch (e[2 + 2 * i]) {
        case IL_ARG_ARENA: return (int64_t)(s->arena + v);
        case IL_ARG_INPUT: return s->inputs[v & 0xffff] + (v >> 16);
        case IL_ARG_ROWS: return s->rows;
        case IL_ARG_TABLE_STRIDE: return s->table_stride;
        case IL_ARG_THREADS: return s->num_threads;
        default: return v; /* IL_ARG_CONST, IL_ARG_PTR */
    }
}

static inline float farg(const int64_t *e, int i, const step *s) {
    const uint32_t bits = (uint32_t)arg(e, i, s);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

int IL(tape_run)(const int64_t *ops, int n_ops, const int64_t *inputs, char *arena, int rows, int table_stride,
                 double *seconds, int num_threads) {
    const step s = {inputs, arena, rows, table_stride, num_threads};
    for (int i = 0; i < n_ops; i++) {
        const int64_t *e = ops + (int64_t)i * IL_TAPE_WIDTH;
        const void *fn = (const void *)e[1];
#define P(j) ((void *)arg(e, j, &s))
#define I(j) ((int)arg(e, j, &s))
#define L(j) arg(e, j, &s)
#define F(j) farg(e, j, &s)
        int status = 0;
        const double start = seconds ? omp_get_wtime() : 0;
        switch (e[0]) {
            case IL_OP_LINEAR:
                status = ((linear_fn *)fn)(P(0), L(1), P(2), I(3), P(4), P(5), L(6), I(7), I(8), I(9), I(10), I(11),
                                           I(12), I(13));
                break;
            case IL_OP_GET_ROWS: ((get_rows_fn *)fn)(P(0), P(1), I(2), P(3), I(4), I(5), I(6), I(7)); break;
            case IL_OP_RMS_NORM:
                ((rms_norm_fn *)fn)(P(0), P(1), L(2), P(3), P(4), I(5), I(6), I(7), F(8), I(9), I(10), I(11), I(12));
                break;
            case IL_OP_SILU_AND_MUL: ((silu_and_mul_fn *)fn)(P(0), P(1), I(2), I(3), I(4), I(5)); break;
            case IL_OP_ROPE: ((rope_fn *)fn)(P(0), L(1), P(2), P(3), I(4), I(5), I(6), I(7), I(8)); break;
            case IL_OP_WRITE_KV:
                ((write_kv_fn *)fn)(P(0), P(1), P(2), L(3), P(4), L(5), P(6), I(7), I(8), I(9), I(10));
                break;
            case IL_OP_PAGED_ATTENTION:
                status = ((paged_attention_fn *)fn)(P(0), L(1), P(2), P(3), P(4), P(5), P(6), P(7), I(8), P(9), I(10),
                                                    I(11), I(12), I(13), I(14), F(15), I(16), I(17));
                break;
            default: return 3; /* an op this library does not know: a tape from another version */
        }
#undef P
#undef I
#undef L
#undef F
        if (seconds) seconds[i] += omp_get_wtime() - start;
        if (status) return status;
    }
    return 0;
}
