"""One rank's handle on the tensor-parallel group: its rank and size, and the collectives the
parallel layers and the step loop call, each timed.

Two process groups over one rendezvous store: `pg` carries the model's collectives on its device
(gloo on CPU, NCCL on CUDA); `cpu_pg` (gloo) carries the per-step messages, which live in host
memory. On CPU they are the same group. A group of size 1 is the single process: every
collective returns its input, so a model built without tensor parallelism runs the same layers
at no cost.

Parallel layers take the group current while the model is built (`building(group)`), not a
process-wide setting, so one process can hold models of different sizes side by side (the
driver's rank 0 next to single-process engines, as in the tests).
"""
from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STEP_TIMEOUT = timedelta(minutes=10)  # a collective inside a step: the slowest rank's step, at worst
IDLE_TIMEOUT = timedelta(days=365)  # a worker waiting for the next step (an idle server): no limit
WATCH_EVERY = timedelta(seconds=1)  # how often a collective that waits runs the group's `watch`


class EngineDeadError(RuntimeError):
    """A rank failed (died, or raised inside a step): the group cannot run another step. vLLM's name."""


@dataclass
class CommStats:
    """Time this rank spent in each kind of collective (waiting for slower ranks included)."""

    all_reduce_s: float = 0.0
    all_reduces: int = 0
    all_reduce_bytes: int = 0
    gather_s: float = 0.0
    broadcast_s: float = 0.0

    def as_dict(self) -> dict:
        return {"all_reduce_s": round(self.all_reduce_s, 4), "all_reduces": self.all_reduces,
                "all_reduce_bytes": self.all_reduce_bytes, "gather_s": round(self.gather_s, 4),
                "broadcast_s": round(self.broadcast_s, 4)}


class TensorParallelGroup:
    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size
        self.pg = None  # the model's collectives, on its device
        self.cpu_pg = None  # the step messages, in host memory
        self.stats = CommStats()
        # called every WATCH_EVERY while a collective waits; raises to give up on it (the driver:
        # when a worker of its host has died). Gloo alone can miss a death: a send in flight when
        # its peer dies is never failed, so the wait would run out its whole timeout.
        self.watch: Callable[[], None] | None = None
        self.abandoned = False  # a collective was given up on: it may still hold a gloo thread

    def split(self, count: int, what: str) -> int:
        """This rank's share of `count` (heads, features...), which must divide evenly."""
        if count % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide the model's {count} {what}")
        return count // self.size

    def connect(self, store: dist.Store, device: torch.device) -> None:
        """Join the other ranks (every rank calls this; it returns once all have)."""
        self.cpu_pg = dist.ProcessGroupGloo(dist.PrefixStore("tp/cpu", store), self.rank, self.size, STEP_TIMEOUT)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = STEP_TIMEOUT
            self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("tp/dev", store), self.rank, self.size, options)
        else:
            self.pg = self.cpu_pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place. On NCCL the time is the launch's, not the transfer's."""
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        self._wait(self.pg.allreduce([x]))
        self.stats.all_reduce_s += time.perf_counter() - t0
        self.stats.all_reduces += 1
        self.stats.all_reduce_bytes += x.numel() * x.element_size()
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` ([rows, n], equal shapes) side by side on rank 0: [rows, size * n]; None elsewhere."""
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        self._wait(self.pg.gather([parts] if parts else [], [x], opts))
        self.stats.gather_s += time.perf_counter() - t0
        return torch.cat(parts, dim=-1) if parts else None

    def broadcast(self, x: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Rank 0's host tensor `x` into every rank's `x` (same shape). `idle`: a worker waiting for
        work, which may wait as long as the driver has nothing to do."""
        t0 = time.perf_counter()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = IDLE_TIMEOUT if idle else STEP_TIMEOUT
        self._wait(self.cpu_pg.broadcast([x], opts))
        if not idle:
            self.stats.broadcast_s += time.perf_counter() - t0
        return x

    def _wait(self, work: dist.Work) -> None:
        if self.watch is None:
            work.wait()
            return
        while True:
            try:
                work.wait(WATCH_EVERY)
                return
            except RuntimeError:
                if work.is_completed():  # it failed (else: it is still waiting)
                    self._watch_a_failure()
                    raise
            try:
                self.watch()
            except BaseException:
                self.abandoned = True
                raise

    def _watch_a_failure(self) -> None:
        """A rank the watch finds dead says why a collective failed: gloo may see the dead peer's
        connection reset before its process is gone, so the watch gets a second to see it."""
        end = time.monotonic() + 1.0
        while True:
            self.watch()
            if time.monotonic() > end:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Release the connections. A group with an abandoned collective is kept alive instead, to
        the end of the process: its destructor joins the thread still stuck in gloo, which would
        hold up whoever drops it (an exiting server included) until that collective times out."""
        for pg in (self.pg, self.cpu_pg) if self.abandoned else ():
            if pg is not None:  # (on CPU both are one group: a second reference leaks nothing more)
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))
        self.pg = self.cpu_pg = None


SINGLE = TensorParallelGroup()
_building: TensorParallelGroup = SINGLE


def current_group() -> TensorParallelGroup:
    """The group a layer under construction belongs to (the single process outside `building`)."""
    return _building


@contextmanager
def building(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Layers constructed inside take `group` (load the model inside: its weight loaders slice)."""
    global _building
    previous, _building = _building, group
    try:
        yield group
    finally:
        _building = previous
