"""Recording a decode step's forward pass for the tape (`tape.py`): a `Recorder` stands in for the
kernels and appends each call instead of running it, while `_ViewsOnly` refuses any torch function that
computes (a tape cannot replay it)."""
from __future__ import annotations

import functools
import inspect
import struct

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from inferlab import kernels
from inferlab.model.layers import AttentionMetadata, NativeRows

C = kernels.C
ALLOCATIONS = {"empty", "empty_like", "new_empty"}


class NotRecordable(RuntimeError):
    pass


def _writes_in_place(func, args: tuple, kwargs: dict) -> bool:
    """`out=` or `inplace=True`: the result lands in memory an input has, unseen by the check below."""
    if kwargs.get("out") is not None:
        return True
    try:
        signature = _signature(func)
    except TypeError:  # unhashable: not cached
        signature = None
    try:  # F.relu(x, True) too
        return signature.bind(*args, **kwargs).arguments.get("inplace") is True if signature else \
            kwargs.get("inplace") is True
    except TypeError:
        return kwargs.get("inplace") is True


@functools.lru_cache(maxsize=1024)
def _signature(func) -> inspect.Signature | None:
    """Cached: read anew for each of a forward's ~7,500 torch calls, it was two thirds of a recording."""
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature
        return None


class _ViewsOnly(TorchFunctionMode):
    """Lets through torch functions that compute nothing: views, allocations, metadata."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        in_place = (name.endswith("_") and not name.startswith("__")) or name == "__setitem__"
        if in_place or _writes_in_place(func, args, kwargs):
            raise NotRecordable(f"the forward pass calls torch's {name}, which a tape cannot replay")
        out = func(*args, **kwargs)
        if name not in ALLOCATIONS:
            inputs = tree_flatten((args, kwargs))[0]
            seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    raise NotRecordable(f"the forward pass computes with torch's {name}, which a tape cannot replay")
        return out


class Recorder:
    """Stands in for `kernels.Kernels` while the forward pass records: `call` appends, runs nothing."""

    def __init__(self, target: kernels.Kernels, rows: int, inputs: list[torch.Tensor], persistent: set[int]) -> None:
        self.target, self.isa, self.rows = target, target.isa, rows
        self.inputs = {t.untyped_storage().data_ptr(): i for i, t in enumerate(inputs)}
        self.persistent = persistent
        self.ops: list[tuple[int, int, list[tuple]]] = []
        self.temps: dict[int, list] = {}  # storage address -> [bytes, first op, last op, storage]

    def __getattr__(self, name: str):
        if name not in kernels.prototypes():
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, name: str, *args) -> int:
        code = kernels.tape_ops().get(name)
        if code is None:
            raise NotRecordable(f"the kernel {name} takes more arguments than a tape entry holds "
                                f"(IL_TAPE_MAX_ARGS, {C['IL_TAPE_MAX_ARGS']})")
        kernels.check_args(name, args)  # zip below would drop an argument too many
        params = kernels.prototypes()[name][1]
        encoded = [self._encode(ctype, pname, a) for (ctype, pname), a in zip(params, args)]
        self.ops.append((code, self.target.address(name), [*encoded, (C["IL_ARG_THREADS"], 0)]))
        return 0

    def _encode(self, ctype: str, pname: str, a) -> tuple:
        if pname == "rows":
            if a != self.rows:
                raise NotRecordable(f"an op runs on {a} rows of a {self.rows}-row step")
            return C["IL_ARG_ROWS"], 0
        if pname == "table_stride":
            return C["IL_ARG_TABLE_STRIDE"], 0
        if a is None:
            return C["IL_ARG_CONST"], 0
        if isinstance(a, float):
            return C["IL_ARG_CONST"], struct.unpack("<I", struct.pack("<f", a))[0]
        if not isinstance(a, torch.Tensor):
            return C["IL_ARG_CONST"], int(a)
        storage = a.untyped_storage()
        base = storage.data_ptr()
        offset = a.data_ptr() - base
        if base in self.inputs:
            return C["IL_ARG_INPUT"], self.inputs[base] | offset << 16
        if base in self.persistent:
            return C["IL_ARG_PTR"], a.data_ptr()
        op = len(self.ops)
        if base not in self.temps:
            if ctype.startswith("const"):
                raise NotRecordable("an op reads memory that no recorded op wrote")
            self.temps[base] = [storage.nbytes(), op, op, storage]
        self.temps[base][2] = op
        return "temp", base, offset


def record_forward(model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], target: kernels.Kernels, rows: int,
         persistent: set[int]) -> tuple[Recorder, torch.Tensor]:
    """The forward pass of a `rows`-row decode step run with a Recorder for the kernels."""
    half = model.args.head_dim // 2
    inputs = [torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, half), torch.zeros(rows, half),
              torch.zeros(rows, dtype=torch.int64), torch.arange(rows), torch.arange(rows, dtype=torch.int32),
              torch.ones(rows, dtype=torch.int32), torch.zeros(rows, 1, dtype=torch.int32)]
    ids, cos, sin, slots, row_ids, seqs, lens, tables = inputs
    meta = AttentionMetadata(slots, [], native=NativeRows(row_ids, seqs, lens, tables))
    recorder = Recorder(target, rows, inputs, persistent)
    kernels.set_recorder(recorder)
    try:
        with torch.inference_mode(), _ViewsOnly():
            return recorder, model.hidden_states(ids, cos, sin, kv_caches, meta)
    finally:
        kernels.set_recorder(None)


def shape_free(ops: list[tuple[int, int, list[tuple]]]) -> list[tuple]:
    """The ops as a row count leaves them: calls, constants, fixed and input pointers (not temporaries'
    places, which scale with the rows)."""
    return [(code, fn, [a[0] if a[0] == "temp" else a for a in args]) for code, fn, args in ops]
