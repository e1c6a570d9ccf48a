"""A decode step's forward pass as one native call, recorded from the Python model ("a tape", as
CUDA graphs or ggml's graphs are).

Op by op, a decode step of the embedded model crosses from Python into C about 300 times; at a few
rows each crossing costs about as much as the kernel it calls. So once, at start, the runner calls
the model's own forward (`hidden_states`) with a `Recorder` standing in for the kernels: every op
the layers would run is appended to a list (function address, arguments) instead of run. Replaying
that list in C (`generic/tape.c`) with a step's inputs calls the same kernels in the same order:
the result is bit-identical to the op-by-op path (tested), and the Python model stays the only
definition of the forward pass, so every layer built from `layers` gets the fast path for free.

Recording rules that keep a replay honest:
- a torch function that computes anything (not a view, an allocation or metadata) while recording
  raises `NotRecordable`: such a forward keeps the op-by-op path (the reason is logged);
- arguments are classified by where their memory lives: an input of the step (token ids, RoPE
  table, slots, attention rows, block tables: pointers supplied per replay), a weight or the KV pool
  (fixed addresses), or a temporary the forward allocated, which gets an offset in one scratch arena
  planned by liveness, so 30 layers' temporaries reuse one layer's worth of memory;
- the parameters named `rows` and `table_stride` in api.h take each step's values.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from inferlab import kernels
from inferlab.model.layers import AttentionMetadata
from inferlab.tape_record import NotRecordable, record_forward, shape_free

log = logging.getLogger("inferlab")
C = kernels.C


def plan_arena(temps: dict[int, list]) -> tuple[dict[int, int], int]:
    """Arena offsets for temporaries by liveness: one is placed in the smallest block whose last
    user came before its first use, else at the end. Returns (offset by storage address, size)."""
    blocks: list[list[int]] = []  # [offset, size, last op]
    offsets, end = {}, 0
    for base, (nbytes, first, last, _) in sorted(temps.items(), key=lambda kv: kv[1][1]):
        size = -(-nbytes // 64) * 64
        free = [b for b in blocks if b[2] < first and b[1] >= size]
        if free:
            block = min(free, key=lambda b: b[1])
            block[2] = last
        else:
            block = [end, size, last]
            blocks.append(block)
            end += size
        offsets[base] = block[0]
    return offsets, end


class DecodeTape:
    """The recorded forward pass of decode-like steps of up to `max_rows` rows (every row reading
    the cache through the row kernel); `__call__` replays it."""

    def __init__(self, model, ops: np.ndarray, arena: torch.Tensor, out: tuple[int, torch.Size], max_rows: int,
                 kernels_: kernels.Kernels) -> None:
        self.model, self.ops, self.arena, self.max_rows, self.kernels = model, ops, arena, max_rows, kernels_
        offset, shape = out
        self.out = arena[offset:].view(model.dtype)[:shape.numel()].view(shape)
        # The ops hold the weights' addresses. A parameter whose data is replaced (`p.data = ...`)
        # would leave them pointing at freed memory: the tape keeps the recorded tensors alive, and
        # `current()` tells the runner to record again.
        self.weights = [*model.parameters(), *model.buffers()]
        self.recorded = [t.detach() for t in self.weights]
        self.ptrs = [t.data_ptr() for t in self.weights]
        # A profile, off unless someone sets it: a zeroed float64 array of len(ops), to which each replay
        # adds every op's wall time (benchmarks/profile_step.py splits a step's time by kind of work).
        self.op_seconds: np.ndarray | None = None

    def current(self) -> bool:
        """Whether every parameter still has the memory the tape recorded (~10 us for 183 tensors)."""
        return [t.data_ptr() for t in self.weights] == self.ptrs

    @classmethod
    def record(cls, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], target: kernels.Kernels,
               max_rows: int) -> DecodeTape | None:
        """The tape of `model.hidden_states` for this pool and kernels, or None (logged) where the
        forward pass does something a replay cannot reproduce."""
        persistent = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        persistent |= {t.untyped_storage().data_ptr() for kv in kv_caches for t in kv}
        try:
            # Recorded at one row as well: a forward whose ops or constants change with the step's rows
            # (a branch on x.shape[0]) would replay the max_rows branch at every row count.
            one, _ = record_forward(model, kv_caches, target, 1, persistent)
            recorder, hidden = record_forward(model, kv_caches, target, max_rows, persistent)
            if shape_free(one.ops) != shape_free(recorder.ops):
                raise NotRecordable("the forward pass runs other ops, or other constants, at 1 row than at "
                                    f"{max_rows}: its ops depend on the step's rows")
        except NotRecordable as e:
            log.info("decode steps run op by op: %s", e)
            return None
        rows = max_rows
        base = hidden.untyped_storage().data_ptr()
        if base not in recorder.temps or not hidden.is_contiguous():
            log.info("decode steps run op by op: the forward pass returns memory no op wrote")
            return None
        offsets, size = plan_arena(recorder.temps)
        table = np.zeros((len(recorder.ops), C["IL_TAPE_WIDTH"]), dtype=np.int64)
        for i, (code, fn, args) in enumerate(recorder.ops):
            if len(args) > C["IL_TAPE_MAX_ARGS"]:
                raise ValueError(f"a tape op takes at most {C['IL_TAPE_MAX_ARGS']} arguments")
            table[i, :2] = code, fn
            for j, a in enumerate(args):
                table[i, 2 + 2 * j:4 + 2 * j] = (C["IL_ARG_ARENA"], offsets[a[1]] + a[2]) if a[0] == "temp" else a
        arena = torch.empty(max(size, 64), dtype=torch.uint8)
        out = (offsets[base] + hidden.data_ptr() - base, hidden.shape[1:])
        return cls(model, table, arena, (out[0], torch.Size([rows, *out[1]])), max_rows, target)

    def covers(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether a step is one the tape replays: every row through the row kernel, few enough rows."""
        native = meta.native
        return (native is not None and native.chunks is None and not meta.prefills and num_tokens <= self.max_rows
                and native.rows.numel() == num_tokens)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as `model.hidden_states` returns them; a
        view into the arena, valid until the next replay."""
        cos, sin = self.model.rotary_emb(positions)
        n = meta.native
        step = [input_ids, cos, sin, meta.slot_mapping, n.rows, n.seqs, n.lens, n.block_tables]
        ptrs = np.array([t.data_ptr() for t in step], dtype=np.int64)
        rows = input_ids.shape[0]
        status = self.kernels.functions["tape_run"](self.ops.ctypes.data, len(self.ops), ptrs.ctypes.data,
                                                    self.arena.data_ptr(), rows, n.block_tables.shape[1],
                                                    None if self.op_seconds is None else self.op_seconds.ctypes.data,
                                                    torch.get_num_threads())
        if status:
            raise MemoryError("a kernel of the decode tape ran out of memory") if status == 2 else \
                RuntimeError(f"the decode tape failed (status {status})")
        return self.out[:rows]
