/* Replaying a tape: the ops of a decode step's forward pass, recorded once from the Python model
 * (`inferlab/tape.py`), called in order with this step's rows, inputs and scratch arena. The
 * functions are the ones the Python dispatcher picked (the best ISA), so a replay computes exactly
 * what the model's forward computes op by op; only the Python between the calls is gone.
 *
 * An entry is IL_TAPE_WIDTH int64s: the op code, the function, then a (kind, value) pair per
 * argument in the order of its prototype in api.h. The calls are generated from api.h (an op's code
 * is its place there: header.py's tape_ops), so every entry point is an op without code here.
 */
#include <omp.h>

#include "../common.h"
#include "tape_calls.h" /* written into the build from api.h by header.py's tape_calls */

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
            IL_TAPE_CALLS /* one case per entry point, from api.h (tape_calls.h) */
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
