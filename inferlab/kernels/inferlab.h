/* The native kernels' constants and entry points, the one source of truth for both: Python
 * (`inferlab/kernels/__init__.py`) reads the #defines below and the prototypes in api.h to bind
 * the library, so the two cannot disagree.
 *
 * Each entry point exists once per instruction set that implements it. A source file is compiled
 * with IL_ISA set to its ISA (generic, avx2, avxvnni, avx512f, avx512vnni, avx512, amx) and defines
 * IL(name), which becomes name_<isa>: the definition is checked against the prototype in api.h. This
 * header declares the prototypes of every ISA, so a kernel can hand a shape it does not cover to a
 * lower ISA by name (linear_avx2, paged_attention_generic). `generic` implements every entry point;
 * Python picks, per entry point, the best one the CPU runs, or the one INFERLAB_ISA forces.
 */
#ifndef INFERLAB_H
#define INFERLAB_H
#include <stdint.h>

#define IL_MAX_ROWS 64      /* rows of the decode steps a tape replays */
#define IL_MAX_HEAD_DIM 256
#define IL_MAX_GROUP 16     /* query heads per KV head */
#define IL_MAX_HEADS 128

/* Activation dtypes (the model's dtype: hidden states, KV cache, norms' weights, biases). */
#define IL_F32 0
#define IL_BF16 1

/* Weight types: ggml's numbers, so a GGUF tensor's type is its code here. A row of K weights
 * takes K / block elements * bytes (see il_row_bytes in blocks.h). */
#define IL_W_F32 0
#define IL_W_F16 1
#define IL_W_Q4_0 2
#define IL_W_Q4_1 3
#define IL_W_Q5_0 6
#define IL_W_Q5_1 7
#define IL_W_Q8_0 8
#define IL_W_Q2_K 10
#define IL_W_Q3_K 11
#define IL_W_Q4_K 12
#define IL_W_Q5_K 13
#define IL_W_Q6_K 14
#define IL_W_IQ4_NL 20
#define IL_W_IQ4_XS 23
#define IL_W_BF16 30
/* Blocks regrouped 16 weight rows at a time for the AVX512-BF16 kernel (avx512/x16.c; their layout:
 * x16_blocks.h), made at load: not GGUF types, the same bytes per row. Other builds' linear returns 1
 * for them; get_rows and dequantize read them everywhere (regrouped.h). */
#define IL_W_Q4_0X16 66
#define IL_W_Q4_1X16 67
#define IL_W_Q8_0X16 72
#define IL_W_IQ4_NLX16 84 /* Q4_0X16's layout, its nibbles through IQ4_NL's table */
#define IL_W_Q4_KX16 76   /* per 256 inputs: the 16 rows' d, dmin, scales, then 8 sub-blocks as Q4_1X16's */
#define IL_W_Q5_0X16 70   /* Q4_0X16's with the fifth bits' plane between the scales and the nibbles */
#define IL_W_Q5_1X16 71   /* Q4_1X16's so */
#define IL_W_Q5_KX16 77   /* Q4_KX16's, each sub-block's fifth-bit masks before its words */
#define IL_W_Q6_KX16 78   /* per 256 inputs: the 16 rows' d and scales, then 8 sub-blocks of masks and words */
#define IL_W_Q2_KX16 74   /* per 256 inputs: the 16 rows' d, dmin and scales, then 8 sub-blocks of 2-bit words */
#define IL_W_Q3_KX16 75   /* per 256 inputs: the 16 rows' d and scales, then 8 sub-blocks of masks and 2-bit words */
#define IL_W_IQ4_XSX16 87 /* per 256 inputs: the 16 rows' d and scales, then 8 sub-blocks as IQ4_NLX16's values */
#define IL_W_BF16X16 79   /* bf16 weights, per 32 inputs the 16 rows' pair rows: no scales, 2 bytes a weight */
/* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, the K-quants and IQ4_NL / IQ4_XS blocks regrouped 16 rows at a
 * time for the AMX tiles' left operand (amx/linear.c; layout: regrouped.h), made at load on AMX CPUs;
 * other builds' linear returns 1 for them. */
#define IL_W_Q5_0T16 90
#define IL_W_Q5_1T16 91
#define IL_W_Q4_KT16 92
#define IL_W_Q8_0T16 93
#define IL_W_Q4_0T16 94
#define IL_W_Q4_1T16 95
#define IL_W_Q6_KT16 96
#define IL_W_Q5_KT16 97
#define IL_W_IQ4_NLT16 98 /* Q4_0T16's layout, its nibbles through IQ4_NL's table */
#define IL_W_IQ4_XST16 99
#define IL_W_Q3_KT16 100
#define IL_W_Q2_KT16 101

/* Activations of a linear layer: fp32 products of dequantized weights, or int8 inputs. */
#define IL_ACT_FLOAT 0
#define IL_ACT_INT8 1

/* Tape entries (generic/tape.c): an op code (header.py's tape_ops), its function, and its arguments */
#define IL_TAPE_MAX_ARGS 20
#define IL_TAPE_WIDTH (2 + 2 * IL_TAPE_MAX_ARGS)
/* Kinds of tape arguments */
#define IL_ARG_CONST 0    /* the value itself (a float as its bits) */
#define IL_ARG_PTR 1      /* an address that does not change (weights, the KV pool) */
#define IL_ARG_ARENA 2    /* an offset into the scratch arena */
#define IL_ARG_INPUT 3    /* input (value & 0xffff), plus (value >> 16) bytes */
#define IL_ARG_ROWS 4
#define IL_ARG_TABLE_STRIDE 5
#define IL_ARG_THREADS 6

#define IL_CAT_(a, b) a##_##b
#define IL_CAT(a, b) IL_CAT_(a, b)

#define IL(name) IL_CAT(name, generic)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, avx2)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, avxvnni)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, avx512f)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, avx512vnni)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, avx512)
#include "api.h"
#undef IL
#define IL(name) IL_CAT(name, amx)
#include "api.h"
#undef IL

#ifdef IL_ISA
#define IL(name) IL_CAT(name, IL_ISA)
#endif
#endif
