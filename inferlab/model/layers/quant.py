"""Weight types: how a matrix's weights are stored. One table, as ggml keeps one (`type_traits`):
each type has its ggml number (GGUF's, and the kernels' IL_W_* code), its block of weights and the
bytes a block takes. Float types hold a torch float tensor [N, K]; block types hold a uint8 tensor
[N, K / block * bytes], each row its blocks in order, exactly as a GGUF file stores them.

The PyTorch-side definitions (`dequantize`, `quantize`) are the `gguf` package's numpy code, the
reference implementation llama.cpp's formats ship with; the kernels' C versions are tested against
them, and used at load time where they are faster.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferlab import kernels


@dataclass(frozen=True)
class WeightType:
    name: str
    code: int  # ggml's type number
    block: int  # weights per block
    nbytes: int  # bytes per block
    dtype: torch.dtype | None = None  # the torch dtype of a float type
    quantizable: bool = False  # `quantize` can write it from fp32 (the rest are only read)
    base: WeightType | None = None  # a regrouped type: the GGUF type whose blocks it holds (regroup.py)
    native: bool = True  # the kernels know it (inferlab.h's IL_W_*); False: only gguf's numpy code reads it

    def row_bytes(self, k: int) -> int:
        if k % self.block:  # a kernel would read or write past a row's last whole block
            raise ValueError(f"rows of {k} weights do not split into {self.name} blocks of {self.block}")
        return k // self.block * self.nbytes

    def __repr__(self) -> str:
        return self.name


F32 = WeightType("f32", 0, 1, 4, torch.float32)
F16 = WeightType("f16", 1, 1, 2, torch.float16)
BF16 = WeightType("bf16", 30, 1, 2, torch.bfloat16)
Q8_0 = WeightType("q8_0", 8, 32, 34, quantizable=True)
Q4_0 = WeightType("q4_0", 2, 32, 18, quantizable=True)
Q4_1 = WeightType("q4_1", 3, 32, 20, quantizable=True)
Q5_0 = WeightType("q5_0", 6, 32, 22)
Q5_1 = WeightType("q5_1", 7, 32, 24)
Q4_K = WeightType("q4_K", 12, 256, 144)
Q5_K = WeightType("q5_K", 13, 256, 176)
Q6_K = WeightType("q6_K", 14, 256, 210)
Q2_K = WeightType("q2_K", 10, 256, 84)
Q3_K = WeightType("q3_K", 11, 256, 110)
IQ4_NL = WeightType("iq4_nl", 20, 32, 18)
IQ4_XS = WeightType("iq4_xs", 23, 256, 136)
TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS)
# Types the int8-activation path multiplies in integers (the kernels' il_int8_type)
INT8_TYPES = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K)
# GGUF types no kernel here reads (llama.cpp's 1-3 bit i-quants, the ternary and FP4 ones): the gguf
# package dequantizes them, so a file that has some still loads, those tensors converted to the
# model's dtype at load (`keep.target_type`), as `quantization="none"` converts every type
DEQUANTIZED_AT_LOAD = tuple(WeightType(name, code, block, nbytes, native=False) for name, code, block, nbytes in (
    ("iq2_xxs", 16, 256, 66), ("iq2_xs", 17, 256, 74), ("iq3_xxs", 18, 256, 98), ("iq1_s", 19, 256, 50),
    ("iq3_s", 21, 256, 110), ("iq2_s", 22, 256, 82), ("iq1_m", 29, 256, 56), ("tq1_0", 34, 256, 54),
    ("tq2_0", 35, 256, 66), ("mxfp4", 39, 32, 17), ("nvfp4", 40, 64, 36)))
# Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL and K-quant blocks regrouped 16 rows at a time for the AVX512-BF16 kernel
# (kernels/avx512/x16.c): made at load, never in a file; the same bytes per row, so a tensor keeps its
# [N, row bytes] shape
Q4_0X16 = WeightType("q4_0x16", 66, 32, 18, base=Q4_0)
Q4_1X16 = WeightType("q4_1x16", 67, 32, 20, base=Q4_1)
Q8_0X16 = WeightType("q8_0x16", 72, 32, 34, base=Q8_0)
IQ4_NLX16 = WeightType("iq4_nlx16", 84, 32, 18, base=IQ4_NL)  # Q4_0X16's layout: a 2-byte scale, 16 bytes of nibbles
Q4_KX16 = WeightType("q4_Kx16", 76, 256, 144, base=Q4_K)
Q5_0X16 = WeightType("q5_0x16", 70, 32, 22, base=Q5_0)  # Q4_0X16's, the fifth bits' plane after the scales
Q5_1X16 = WeightType("q5_1x16", 71, 32, 24, base=Q5_1)
Q5_KX16 = WeightType("q5_Kx16", 77, 256, 176, base=Q5_K)  # Q4_KX16's, each sub-block's fifth bits first
Q6_KX16 = WeightType("q6_Kx16", 78, 256, 210, base=Q6_K)
Q3_KX16 = WeightType("q3_Kx16", 75, 256, 110, base=Q3_K)  # 2-bit words and third-bit masks
Q2_KX16 = WeightType("q2_Kx16", 74, 256, 84, base=Q2_K)  # 2-bit words
IQ4_XSX16 = WeightType("iq4_xsx16", 87, 256, 136, base=IQ4_XS)
# A bf16 model's matrices in the same pair rows (no scales), for the AVX512-BF16 builds without AMX: there
# the kernel of the blocks runs them at every row count, one order of sums (`keep.target_type`)
BF16X16 = WeightType("bf16x16", 79, 32, 64, base=BF16)
REGROUPED = {Q4_0: Q4_0X16, Q4_1: Q4_1X16, Q5_0: Q5_0X16, Q5_1: Q5_1X16, Q8_0: Q8_0X16, IQ4_NL: IQ4_NLX16,
             Q4_K: Q4_KX16, Q5_K: Q5_KX16, Q6_K: Q6_KX16, Q3_K: Q3_KX16, Q2_K: Q2_KX16,
             IQ4_XS: IQ4_XSX16}
# Every GGUF block type here (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants, IQ4) regrouped 16 rows at a time
# for the AMX tiles (kernels/amx/linear.c), where they are decoded to the bf16 weights a load-time
# dequantization makes: the same products from 0.16-0.53 of the bytes (Q4: a quarter, Q8_0: a half).
# Made at load on AMX CPUs (tiles.repack); the same bytes per row
Q4_0T16 = WeightType("q4_0t16", 94, 32, 18, base=Q4_0)
Q4_1T16 = WeightType("q4_1t16", 95, 32, 20, base=Q4_1)
Q8_0T16 = WeightType("q8_0t16", 93, 32, 34, base=Q8_0)
Q5_0T16 = WeightType("q5_0t16", 90, 32, 22, base=Q5_0)  # the fifth bits' words after the scales
Q5_1T16 = WeightType("q5_1t16", 91, 32, 24, base=Q5_1)
Q4_KT16 = WeightType("q4_Kt16", 92, 256, 144, base=Q4_K)  # per 256 inputs: d, dmin, scales, 8 sub-blocks
Q5_KT16 = WeightType("q5_Kt16", 97, 256, 176, base=Q5_K)  # Q4_KT16's, each sub-block's fifth bits first
Q6_KT16 = WeightType("q6_Kt16", 96, 256, 210, base=Q6_K)  # per 256 inputs: d, scales, 8 sub-blocks of bits
IQ4_NLT16 = WeightType("iq4_nlt16", 98, 32, 18, base=IQ4_NL)  # Q4_0T16's layout through IQ4_NL's table
IQ4_XST16 = WeightType("iq4_xst16", 99, 256, 136, base=IQ4_XS)  # d, scales_h, scales_l, 8 sub-blocks of words
Q3_KT16 = WeightType("q3_Kt16", 100, 256, 110, base=Q3_K)  # d, scales, 8 sub-blocks of third bits and 2-bit words
Q2_KT16 = WeightType("q2_Kt16", 101, 256, 84, base=Q2_K)  # d, dmin, scales, 8 sub-blocks of 2-bit words
TILED = {Q4_0: Q4_0T16, Q4_1: Q4_1T16, Q5_0: Q5_0T16, Q5_1: Q5_1T16, Q8_0: Q8_0T16, Q2_K: Q2_KT16, Q3_K: Q3_KT16,
         Q4_K: Q4_KT16, Q5_K: Q5_KT16, Q6_K: Q6_KT16, IQ4_NL: IQ4_NLT16, IQ4_XS: IQ4_XST16}
GROUP_ROWS = 16
BY_CODE = {t.code: t for t in (*TYPES, *DEQUANTIZED_AT_LOAD, *REGROUPED.values(), BF16X16, *TILED.values())}
BY_NAME = {t.name.lower(): t for t in (*TYPES, *DEQUANTIZED_AT_LOAD)}
BY_DTYPE = {t.dtype: t for t in TYPES if t.dtype is not None}
_disagree = [f"{t.name} is {t.code} here and {kernels.C.get(f'IL_W_{t.name.upper()}', 'missing')} in inferlab.h"
             for t in BY_CODE.values() if t.native and kernels.C.get(f"IL_W_{t.name.upper()}") != t.code]
if _disagree:  # not an assert: python -O would drop it, and the kernels would read other blocks than these
    raise ImportError(f"the weight types and inferlab.h's IL_W_* disagree: {'; '.join(_disagree)}")


def weight_type(data: torch.Tensor, wtype: WeightType | None = None) -> WeightType:
    """A tensor's type: given for block types, implied by the dtype for float ones."""
    if wtype is not None:
        return wtype
    if data.dtype not in BY_DTYPE:
        raise ValueError(f"a weight of dtype {data.dtype} needs its block type")
    return BY_DTYPE[data.dtype]


def dequantize(data: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """fp32 [N, K] from stored rows (the reference: gguf's numpy dequantizer); a TILED type's are the bf16
    weights it stands for."""
    if wtype.dtype is not None:
        return data.float()
    if wtype in TILED.values():
        from inferlab.model.layers import tiles
        return dequantize(tiles.unrepack(data, wtype), wtype.base).bfloat16().float()
    if wtype.base is not None:  # its GGUF rows, unrepacked here: not by calling this function again, whose
        # wrappers (a test caches results by the tensor's address) would see a temporary tensor
        from inferlab.model.layers.regroup import unrepack
        data, wtype = unrepack(data, wtype), wtype.base
        if wtype.dtype is not None:  # BF16X16's
            return data.float()
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize
    if data.shape[0] == 0:  # gguf's numpy code cannot reshape no blocks
        return torch.empty(0, data.shape[1] // wtype.nbytes * wtype.block)
    try:
        rows = gguf_dequantize(data.contiguous().numpy(), GGMLQuantizationType(wtype.code))
    except NotImplementedError:  # a type newer than the installed gguf package
        from importlib.metadata import version
        raise ValueError(f"the installed gguf package ({version('gguf')}) cannot dequantize {wtype.name}; "
                         "a newer one may: pip install -U gguf") from None
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def quantize(x: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """Stored rows of `wtype` from float [N, K] (K a multiple of the block): the native kernel where
    it runs (byte for byte what gguf's quantizer writes, tested), else gguf's numpy code."""
    if wtype.dtype is not None:
        return x.to(wtype.dtype)
    if not wtype.quantizable:
        raise ValueError(f"cannot quantize to {wtype.name}: only {', '.join(t.name for t in TYPES if t.quantizable)}")
    n, k = x.shape
    if k % wtype.block:
        raise ValueError(f"rows of {k} weights do not split into {wtype.name} blocks of {wtype.block}")
    x = x.detach().float().contiguous().cpu()
    native = kernels.native()
    if native is not None:
        out = torch.empty(n, wtype.row_bytes(k), dtype=torch.uint8)
        native.quantize(out, wtype.code, x, n, k)
        return out
    from gguf import GGMLQuantizationType
    from gguf import quantize as gguf_quantize
    return torch.from_numpy(gguf_quantize(x.numpy(), GGMLQuantizationType(wtype.code)))


# byte offsets of each block's fp16 scale fields
_SCALES = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_K": [0, 2], "q5_K": [0, 2],
           "q6_K": [208], "q2_K": [80, 82], "q3_K": [108], "iq4_nl": [0], "iq4_xs": [0]}


def random_stored(wtype: WeightType, n: int, k: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """n rows of k random weights stored as `wtype`, for tests and benchmarks: Gaussians quantized
    where `quantize` writes the type, else random block bytes whose fp16 scales lie in
    [scale / 5, scale] in size, either sign (as llama.cpp writes them: a block's scale takes the sign
    of its largest weight in IQ4_NL and Q6_K, for one), where every bit pattern of the rest is a valid
    weight."""
    g = torch.Generator().manual_seed(seed)
    wtype.row_bytes(k)  # k in whole blocks, or a clear error (rows were cut to the last whole block)
    if not (wtype.dtype is not None or wtype.quantizable or wtype.name in _SCALES):
        raise ValueError(f"random_stored cannot write {wtype.name} (types: {', '.join(_SCALES)}, and the float ones)")
    if wtype.dtype is not None or wtype.quantizable:
        return quantize(torch.randn(n, k, generator=g) * scale * 20, wtype)
    blocks = k // wtype.block
    data = torch.randint(0, 256, (n, blocks, wtype.nbytes), generator=g, dtype=torch.uint8)
    for off in _SCALES[wtype.name]:
        sign = torch.randint(0, 2, (n, blocks, 1), generator=g) * 2 - 1
        fp16 = ((torch.rand(n, blocks, 1, generator=g) * 0.8 * scale + 0.2 * scale) * sign).half()
        data[:, :, off:off + 2] = fp16.view(torch.uint8)
    return data.view(n, -1)


def describe_weights(model: torch.nn.Module) -> str:
    """What the model's weights are kept as, e.g. 'q4_1 66.4 MiB (210), q8_0 29.9 MiB (1), f32 0.1 MiB (61)'."""
    from inferlab.model.layers.linear import Embedding, Linear
    sizes: dict[str, list[float]] = {}
    seen = set()
    for module in model.modules():
        params = [(name, p) for name, p in module.named_parameters(recurse=False)]
        for name, p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            layer = isinstance(module, (Linear, Embedding))
            wtype = module.wtype if name == "weight" and layer else None
            for part, ptype, _, _ in getattr(module, "parts", []):
                if part == name:
                    wtype = ptype
            key = weight_type(p.data, wtype).name
            entry = sizes.setdefault(key, [0.0, 0])
            entry[0] += p.numel() * p.element_size() / 2**20
            entry[1] += 1
    return ", ".join(f"{k} {mib:.1f} MiB ({n})" for k, (mib, n) in sorted(sizes.items(), key=lambda kv: -kv[1][0]))
