"""The type each weight is kept in at load (the `quantization` modes: `target_type`) and the conversion
to it (`convert`): as stored, the model's dtype, quantized, or regrouped for the kernels of this CPU.
"""
from __future__ import annotations

import torch

from inferlab import kernels
from inferlab.model.layers import quant, regroup, tiles
from inferlab.model.layers.quant import WeightType

QUANTIZATIONS = ("auto", "none", "q8_0", "q4_0", "q4_1")  # see target_type


def quantization_mode(name: object, what: str = "quantization") -> str:
    """The mode `name` stands for, in any case (llama.cpp's users write the types Q8_0), or a ValueError."""
    mode = name.lower() if isinstance(name, str) else name
    if mode not in QUANTIZATIONS:
        raise ValueError(f"{what} must be one of {QUANTIZATIONS}, got {name!r}")
    return mode
# ISAs with bf16 matrix units (AVX512-BF16 dot products, AMX tiles): a bf16 model's dense weights run
# there faster than any in-register dequantization of blocks, so `auto` gives them bf16 weights
BF16_MATRIX_ISAS = ("avx512", "amx")
# ISAs whose kernels multiply the regrouped (x16) blocks (avx512/x16.c; on AMX CPUs too, the tiles
# taking bf16 models' blocks as t16), and the activations they take there: bf16 (pair products, or fp32
# FMAs of them widened: `kernels.x16_products`) and fp32, always by fp32 FMAs: AVX-512 CPUs without
# bf16 instructions (avx512f, avx512vnni) have only those activations, the others when a model runs in fp32
X16_DTYPES = {isa: (torch.float32, torch.bfloat16) for isa in ("avx512f", "avx512vnni", "avx512", "amx")}
# ISAs where a bf16 model's bf16 weights are regrouped into that kernel's pair rows (quant.BF16X16), so
# that one kernel sums them at every row count: the AVX-512 builds without AMX (whose tiles take bf16)
PAIR_ROW_ISAS = ("avx512", "avx512f", "avx512vnni")


def target_type(stored: WeightType, k: int, mode: str, dtype: torch.dtype, isa: str | None,
                vocab: bool = False, int8: bool = False, rows: int | None = None) -> WeightType:
    """The type a weight is kept in. `isa`: the native kernels' ISA, None where they do not run.
    `auto`: as stored (GGUF blocks, a checkpoint's float type); without native kernels, or for a type
    they do not read (`quant.DEQUANTIZED_AT_LOAD`), the model's dtype. In a bf16 model on CPUs with
    bf16 matrix units, what those units multiply fastest:
      - f32 and f16 weights: bf16, as vLLM's dtype makes them (a prefill multiplied them as bf16
        anyway; kept, an fp32 checkpoint decoded in 2.2x bf16's time, with 2.6x its TTFT);
      - block types: bf16 too, unless `int8` activations are asked for and the type has them (they
        multiply blocks), or the CPU has no AMX and the type is in `quant.REGROUPED` (the AVX512-BF16
        kernel of the regrouped blocks is the faster there); on AMX the `quant.TILED` types keep those
        bf16 weights as blocks regrouped for the tiles, which decode them. An embedding that is not
        also the LM head keeps its blocks: lookups read any type.
    fp32 activations on AVX-512 CPUs (those without bf16 instructions, avx512f and avx512vnni, have no
    other; on the others a model run in fp32): the `quant.REGROUPED` types regrouped (x16, multiplied
    by fp32 FMAs), other types as stored.
    `none`: the model's dtype. A block type: quantized to it (the vocabulary matrix to q8_0, as
    llama.cpp keeps output tensors at higher precision) where rows split into its blocks, and
    regrouped as `auto` keeps a file's blocks (AMX with bf16 activations: t16; else on AVX-512: x16).
    Regrouping needs `rows` (a matrix's rows: a linear layer's outputs, or a vocabulary also used as
    the LM head; None for an embedding alone) to be a multiple of 16.
    In every mode, bf16 weights with bf16 activations on the AVX-512 builds without AMX are kept as
    `quant.BF16X16`: the regrouped blocks' kernel then runs them at every row count, so a row's bits do
    not depend on its batch (a prefill's rows went to other kernels, which sum in other orders)."""
    as_dtype = quant.BY_DTYPE[dtype]
    pairs = isa in PAIR_ROW_ISAS and dtype == torch.bfloat16 and rows is not None and rows % quant.GROUP_ROWS == 0 \
        and k % quant.BF16X16.block == 0
    bf16_units = dtype == torch.bfloat16 and isa in BF16_MATRIX_ISAS
    regroup = dtype in X16_DTYPES.get(isa, ()) and not int8 and rows is not None and rows % quant.GROUP_ROWS == 0
    tiles = regroup and isa == "amx" and dtype == torch.bfloat16  # the tiles take bf16 inputs
    if mode == "none" or (mode == "auto" and (isa is None or not stored.native)):
        kept = as_dtype  # a float type: of the layouts below, only the pair rows take it
    elif mode == "auto":
        lookups_only = vocab and rows is None and stored.dtype is None  # an embedding alone: nothing multiplies it
        blocks_win = lookups_only or (int8 and stored in quant.INT8_TYPES) or \
            (regroup and not tiles and stored in quant.REGROUPED)
        kept = quant.BF16 if bf16_units and not blocks_win else stored
        if kept == quant.BF16 and tiles and stored in quant.TILED:
            kept = stored  # the tiles decode its blocks to those bf16 weights, from a quarter of the bytes
    else:
        wanted = quant.Q8_0 if vocab else quant.BY_NAME[mode]
        kept = wanted if k % wanted.block == 0 else as_dtype
    if tiles and kept in quant.TILED:  # explicit modes too (x16 there ran batches 3.5x slower)
        return quant.TILED[kept]
    if pairs and kept == quant.BF16:
        return quant.BF16X16
    return quant.REGROUPED[kept] if regroup and kept in quant.REGROUPED else kept


def convert(data: torch.Tensor, src: WeightType, dst: WeightType) -> torch.Tensor:
    """Rows stored as `src` in type `dst`: copied, regrouped, or dequantized to fp32 and quantized."""
    if src == dst:
        return data.contiguous()
    if dst.base is not None:  # regrouped: the same blocks, moved (quantizing first where src is not dst.base)
        pack = tiles.repack if dst in quant.TILED.values() else regroup.repack
        return pack(data if src == dst.base else convert(data, src, dst.base), dst.base)
    native = kernels.native()
    if src.dtype is not None:
        values = data.float()
    elif native is not None and src.native:  # the kernels': gguf's numpy one takes seconds for a whole model
        values = torch.empty(data.shape[0], data.shape[1] // src.nbytes * src.block)
        native.dequantize(values, data.contiguous(), src.code, values.shape[0], values.shape[1])
    else:
        values = quant.dequantize(data, src)
    return quant.quantize(values, dst)
