"""A GGUF file's metadata and tensor table, read with `struct` from one read-only memory map of it.

The format (ggml's docs/gguf.md): magic "GGUF", a version (2 or 3), the tensor and key-value counts;
then each key-value (a string key, a type, a value: a scalar, a string, or an array of either);
then each tensor's name, dimensions (the row length first), type and offset; then, from the next
multiple of `general.alignment` (32), the tensors' data. The gguf package reads the same, but makes
a numpy view of every value: 3 s for SmolLM2's 49,152 tokens and merges, ~10 s for a Qwen
vocabulary. Strings are read here as bytes (~0.1 s). Tensor data stays in the file: each tensor is
a numpy view of the map, rows as stored (a block type's as bytes), copied by whoever keeps it."""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass

import numpy as np

from inferlab.model.layers import quant

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
FLOATS = {quant.F32.code: np.float32, quant.F16.code: np.float16}  # the rest are viewed as bytes


class CutShort(Exception):
    """The file ends before what its header describes."""


@dataclass
class Tensor:
    name: str
    dims: tuple[int, ...]  # ggml's order: the row length first
    type_code: int  # ggml's type number
    data: np.ndarray | None  # [..., rows, row] (a block type's rows as bytes); None: a type not in quant's table


class GGUFFile:
    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        if self.take(4) != b"GGUF":
            raise ValueError("it does not start with GGUF's magic bytes")
        version = self.scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not one this reader knows (2 and 3)")
        n_tensors, n_fields = self.scalar(10), self.scalar(10)
        self.fields = {}
        for _ in range(n_fields):
            key = self.string()
            self.fields[key] = self.value(self.scalar(4))
        table = []
        for _ in range(n_tensors):
            name = self.string()
            dims = tuple(self.scalar(10) for _ in range(self.scalar(4)))
            table.append((name, dims, self.scalar(4), self.scalar(10)))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1:
            raise ValueError(f"general.alignment is {align!r}, not a positive integer")
        start = -(-self.pos // align) * align
        self.tensors = [Tensor(name, dims, code, self.tensor(start + offset, dims, code))
                        for name, dims, code, offset in table]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise CutShort
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, kind: int):
        fmt = SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"a metadata value has type {kind}, which GGUF does not define")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(kind)
        item, n = self.scalar(4), self.scalar(10)
        if item in SCALARS:  # numbers: one slice of the map
            dtype = np.dtype(SCALARS[item])
            return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
        return [self.value(item) for _ in range(n)]

    def tensor(self, offset: int, dims: tuple[int, ...], code: int) -> np.ndarray | None:
        wtype = quant.BY_CODE.get(code)
        if wtype is None or not dims:
            return None
        row, outer = dims[0], tuple(reversed(dims[1:]))
        if code in FLOATS:
            dtype, width = np.dtype(FLOATS[code]), row
        else:
            if row % wtype.block:
                raise ValueError(f"a tensor's rows of {row} do not split into {wtype.name} blocks of {wtype.block}")
            dtype, width = np.dtype(np.uint8), row // wtype.block * wtype.nbytes
        size = math.prod(outer) * width * dtype.itemsize
        if offset + size > len(self.buf):
            raise CutShort
        return np.frombuffer(self.buf, dtype, count=size // dtype.itemsize, offset=offset).reshape(*outer, width)
