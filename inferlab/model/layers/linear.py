"""Linear layers and the embedding, with their weights kept as stored (`quant.py`): a float matrix,
or rows of quantized blocks that the kernels dequantize in registers, never rounding a weight (but
the AMX tiles' t16 blocks, which stand for the bf16 weights they round to: `keep.target_type`).

A merged projection (q/k/v, gate/up: `out_features` a list of shard sizes) takes one checkpoint
tensor per shard through `weight_loader`. After loading, `process_weights_after_loading` (vLLM's
name) converts each shard to the type the quantization mode asks for and joins shards of one type
into one matrix; shards of different types (K-quant files mix them) stay separate parts, each one
kernel call writing its columns of the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferlab import kernels
from inferlab.model.layers import keep, quant
from inferlab.model.layers.quant import WeightType


def int8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x's rows as the int8-activation path sees them: per 32 values, scale = max|x| / 127 and
    q = round(x / scale), half away from zero (C's roundf); returns q * scale in fp32."""
    blocks = x.float().reshape(-1, 32)
    scale = blocks.abs().amax(1, keepdim=True) / 127
    v = blocks * torch.where(scale == 0, 0, 1 / scale)
    return (torch.sign(v) * torch.floor(v.abs() + 0.5) * scale).view(x.shape)


TILES = tuple(quant.TILED.values())


def _regrouped_runs(wtype: WeightType, x: torch.Tensor, isa: str) -> bool:
    """Whether the kernels multiply a regrouped type here: x16 where X16_DTYPES says, t16 on AMX."""
    if wtype in TILES:
        return isa == "amx" and x.dtype == torch.bfloat16
    return x.dtype in keep.X16_DTYPES.get(isa, ())


def tiles_to_bf16(weight: torch.Tensor, wtype: WeightType) -> torch.Tensor:
    """The bf16 weights a t16 matrix (quant.TILED) stands for: its values rounded once to bf16."""
    n, k = weight.shape[0], weight.shape[1] // wtype.nbytes * wtype.block
    out = torch.empty(n, k, dtype=torch.bfloat16)
    native = kernels.native()
    if native is None:
        return out.copy_(quant.dequantize(weight, wtype))
    native.get_rows(out, weight, wtype.code, torch.arange(n), n, k, kernels.DTYPE_CODES[torch.bfloat16])
    return out


def linear_ref(x: torch.Tensor, weight: torch.Tensor, wtype: WeightType, bias: torch.Tensor | None,
               int8: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if wtype in TILES:
        weight, wtype = tiles_to_bf16(weight, wtype), quant.BF16
    if int8 and wtype in quant.INT8_TYPES:
        x = int8_inputs(x).to(x.dtype)
    if out_dtype not in (None, x.dtype):  # wider out: the same products, summed and kept in out_dtype
        x, bias = x.to(out_dtype), None if bias is None else bias.to(out_dtype)
    if wtype.dtype is None and x.dtype != torch.float32:  # blocks: never a rounded weight, the sum rounded once
        return F.linear(x.float(), quant.dequantize(weight, wtype), None if bias is None else bias.float()).to(x.dtype)
    w = weight if weight.dtype == x.dtype else quant.dequantize(weight, wtype).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # a bias kept in another dtype: x's


def linear(x: torch.Tensor, weight: torch.Tensor, wtype: WeightType | None = None, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, int8: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, K] @ W^T (+ bias) -> [T, N], into `out` (which may be a column slice) if given, in
    `out_dtype` (default x's; fp32 keeps a bf16 model's logits unrounded). With `int8`, a 32-block
    integer weight type multiplies x's rows quantized to int8 per 32 (see api.h)."""
    wtype = quant.weight_type(weight, wtype)
    if weight.numel() * weight.element_size() != weight.shape[0] * wtype.row_bytes(x.shape[-1]):
        raise ValueError(f"x has {x.shape[-1]} features per row, which are not what the {wtype.name} weight's "
                         f"rows hold")  # a kernel would read past x's rows
    out_dtype = out.dtype if out is not None else out_dtype or x.dtype
    k = kernels.for_tensor(x)
    if k is not None and (x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous() or
                          (out is not None and out.stride(1) != 1) or out_dtype not in kernels.DTYPE_CODES or
                          (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())) or
                          (wtype.base is not None and not _regrouped_runs(wtype, x, k.isa))):
        k = None
    if k is None:
        y = linear_ref(x, weight, wtype, bias, int8, out_dtype)
        return y if out is None else out.copy_(y)
    n = weight.shape[0]
    if x.shape[0] > 1 and x.stride(0) != x.shape[1]:  # rows apart: AMX runs another kernel, summing otherwise
        x = x.contiguous()
    y = x.new_empty(x.shape[0], n, dtype=out_dtype) if out is None else out
    k.linear(x, x.shape[1], weight, wtype.code, bias, y, y.stride(0), x.shape[0], x.shape[1], n,
             kernels.DTYPE_CODES[x.dtype], kernels.DTYPE_CODES[out_dtype],
             kernels.C["IL_ACT_INT8" if int8 else "IL_ACT_FLOAT"])
    return y


class Linear(nn.Module):
    """y = x W^T (+ b) with W kept as stored (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False) -> None:
        super().__init__()
        sizes = [out_features] if isinstance(out_features, int) else list(out_features)
        self.in_features, self.out_features = in_features, sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.wtype: WeightType | None = None  # None: the float type of weight's dtype
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self.bias_loader
        self.parts: list[tuple[str, WeightType, int, int]] = []  # extra parts: (parameter, type, first row, end)
        self.int8 = False  # int8 activations for the weight types that have them (quant.INT8_TYPES)
        self.out_dtype: torch.dtype | None = None  # None: the input's
        self._loaded: dict[int, tuple[torch.Tensor, WeightType]] = {}

    def _rows(self, shard: int | None, data: torch.Tensor) -> tuple[int, int]:
        lo, hi = (0, self.out_features) if shard is None else (self.offsets[shard], self.offsets[shard + 1])
        if data.shape[0] != hi - lo:
            raise ValueError(f"shard {shard} has {data.shape[0]} rows, expected {hi - lo}")
        return lo, hi

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        self._rows(shard, data)
        self._loaded[0 if shard is None else shard] = (data, quant.weight_type(data, wtype))

    def bias_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                    wtype: WeightType | None = None) -> None:
        lo, hi = self._rows(shard, data)
        param.data[lo:hi].copy_(data)

    def process_weights_after_loading(self, mode: str, dtype: torch.dtype, isa: str | None, vocab: bool = False,
                                      int8: bool = False) -> None:
        """Convert the loaded shards to the kept types and join neighbours of one type."""
        self.int8 = int8
        if not self._loaded:
            return
        shards = [self._loaded[i] for i in sorted(self._loaded)]
        self._loaded = {}
        groups: list[tuple[WeightType, list[torch.Tensor]]] = []
        for data, stored in shards:
            kept = keep.target_type(stored, self.in_features, mode, dtype, isa, vocab, int8, rows=data.shape[0])
            data = keep.convert(data, stored, kept)
            if groups and groups[-1][0] == kept:
                groups[-1][1].append(data)
            else:
                groups.append((kept, [data]))
        self.parts, row = [], 0
        for i, (wtype, datas) in enumerate(groups):
            data = datas[0] if len(datas) == 1 else torch.cat(datas)
            name = "weight" if i == 0 else f"weight_{i}"
            setattr(self, name, nn.Parameter(data, requires_grad=False))
            if i == 0:
                self.wtype = wtype
            else:
                self.parts.append((name, wtype, row, row + data.shape[0]))
            row += data.shape[0]
        self.weight.weight_loader = self.weight_loader

    @property
    def int8_active(self) -> bool:
        """Whether int8 activations reach any of this layer's weights: asked for, and a type that has them."""
        return self.int8 and any(t in quant.INT8_TYPES for t in (self.wtype, *(part[1] for part in self.parts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return linear(x, self.weight, self.wtype, self.bias, int8=self.int8, out_dtype=self.out_dtype)
        y = x.new_empty(x.shape[0], self.out_features, dtype=self.out_dtype or x.dtype)
        first = self.parts[0][2]
        bias = self.bias
        linear(x, self.weight, self.wtype, None if bias is None else bias[:first], out=y[:, :first], int8=self.int8)
        for name, wtype, lo, hi in self.parts:
            linear(x, getattr(self, name), wtype, None if bias is None else bias[lo:hi], out=y[:, lo:hi],
                   int8=self.int8)
        return y


class Embedding(nn.Module):
    """Rows of a [vocab, dim] matrix kept as stored, dequantized on lookup into fp32: the start of the
    residual stream, which stays fp32 whatever the model's dtype (see `norm`). `dtype` is the model's."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.dim, self.dtype = dim, self.weight.dtype  # the model's (see model.default_dtype)
        self.weight.weight_loader = self.weight_loader
        self.wtype: WeightType | None = None
        self._loaded: tuple[torch.Tensor, WeightType] | None = None

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        self._loaded = (data, quant.weight_type(data, wtype))

    def process_weights_after_loading(self, mode: str, dtype: torch.dtype, isa: str | None, int8: bool = False,
                                      tied: bool = False) -> None:
        """`tied`: the matrix is also the LM head, kept as that linear layer would be (`int8`: whose
        inputs are quantized to int8); lookups read any type."""
        if self._loaded is None:
            return
        data, stored = self._loaded
        rows = data.shape[0] if tied else None
        self._loaded, self.wtype = None, keep.target_type(stored, self.dim, mode, dtype, isa, vocab=True,
                                                          int8=int8, rows=rows)
        self.weight = nn.Parameter(keep.convert(data, stored, self.wtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wtype = quant.weight_type(self.weight, self.wtype)
        out = torch.empty(ids.shape[0], self.dim, dtype=torch.float32, device=ids.device)
        k = kernels.for_tensor(out)
        if k is None or ids.dtype != torch.int64 or not ids.is_contiguous() or not self.weight.is_contiguous():
            if wtype.base is not None:  # regrouped: a row's weights are spread over its group
                return out.copy_(quant.dequantize(self.weight, wtype)[ids])
            rows = self.weight[ids]
            return out.copy_(rows if wtype.dtype is not None else quant.dequantize(rows, wtype))
        seen = ids.numpy()  # (numpy's min and max: torch's would be compute a decode tape cannot replay)
        if seen.size and not 0 <= seen.min() <= seen.max() < self.weight.shape[0]:  # the kernel would read past
            raise IndexError(f"token ids must be in [0, {self.weight.shape[0]}), got {seen.min()} to {seen.max()}")
        k.get_rows(out, self.weight, wtype.code, ids, ids.shape[0], self.dim, kernels.DTYPE_CODES[out.dtype])
        return out
