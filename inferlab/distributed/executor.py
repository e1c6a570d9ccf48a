"""The driver's side of tensor parallelism: rank 0, in the engine's process.

`TensorParallelExecutor(config, device)` starts the other ranks and loads shard 0 while they load
theirs; `start(num_blocks, ...)` gives every rank its share of the KV pool; then the engine calls
it as it calls a ModelRunner: `execute(scheduled)` broadcasts the batch, runs shard 0 and samples
from the logits gathered here; `shutdown()` stops the workers (also run when the executor is
garbage-collected or the process exits, so no worker outlives it).

A step that fails on any rank (a worker died, a kernel raised) leaves the ranks out of step with
one another, so it is fatal: an `EngineDeadError` naming the rank, the workers stopped. A worker
of this host that dies is noticed within a second even where gloo misses it (`group.watch`), a rank
on another host once its heartbeats stop for BEAT_GRACE (a lost machine, a stopped process). A Ctrl-C
on the main thread waits for the running step to end, so an interrupted answer (`inferlab chat`)
leaves the group in step; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from inferlab.config import EngineConfig
from inferlab.distributed import step
from inferlab.distributed.group import EngineDeadError, TensorParallelGroup, building
from inferlab.distributed.launch import (
    BEAT_EVERY,
    Pulses,
    RankFailed,
    Rendezvous,
    check_reports,
    check_workers,
    wait_phase,
)
from inferlab.distributed.worker import rank_device, rank_threads
from inferlab.model.loader import load_model
from inferlab.request import Request
from inferlab.runner import ModelRunner, StepBatch
from inferlab.sampler import SampleResult

log = logging.getLogger("inferlab")


def stop_ranks(group: TensorParallelGroup, procs: dict[int, subprocess.Popen], state: dict) -> None:
    """Tell the workers to stop while the group is in step, else (a failed step) end this host's
    at once; either way none is left running."""
    if state["in_step"]:
        try:
            step.send(group, None)
        except Exception:  # noqa: BLE001 - a rank is gone: its connection is closed
            state["in_step"] = False
    if not state["in_step"]:
        for p in procs.values():
            p.terminate()
    state["in_step"] = False
    deadline = time.monotonic() + 5
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    group.close()


@contextmanager
def steps_finish_first() -> Iterator[None]:
    """Hold a Ctrl-C (on the main thread) until the step ends: a step cut short on rank 0 would
    leave the others waiting in a collective. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(sig, frame) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(sig)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        rdzv = Rendezvous.of(config)
        if rdzv.rank != 0:
            raise ValueError(f"this process is tensor-parallel rank {rdzv.rank}, not the driver: run it with "
                             f"inferlab.distributed.worker.run_node(config) (the `inferlab` command does)")
        self.size = rdzv.size
        self.group = TensorParallelGroup(0, rdzv.size)
        self.store = rdzv.store()
        self.procs = rdzv.start_workers(self.store.port)
        self.state = {"in_step": False}
        self._stop = weakref.finalize(self, stop_ranks, self.group, self.procs, self.state)
        self.dead: str | None = None
        self.steps = 0
        self.others = list(range(1, rdzv.size))
        self.pulses = Pulses(self.store, self.others)
        try:
            self.device = rank_device(str(device), 0)
            rank_threads(config.num_threads, self.device, len(rdzv.ranks))
            self.store.set("settings", json.dumps({"model": config.model, "dtype": config.dtype,
                                                   "quantization": config.quantization,
                                                   "int8_activations": config.int8_activations,
                                                   "hf_overrides": config.hf_overrides,
                                                   "device": device.type, "num_threads": config.num_threads}))
            log.info("tensor parallel: %d ranks (%s), driver at %s:%d", rdzv.size,
                     "this host" if len(rdzv.ranks) == rdzv.size else f"{len(rdzv.ranks)} on this host", rdzv.addr,
                     self.store.port)
            with building(self.group):
                self.model, self.tokenizer = load_model(config.model, config.dtype, self.device, config.quantization,
                                                        config.int8_activations, config.hf_overrides)
            wait_phase(self.store, "loaded", self.others, self.check_workers)
        except BaseException as e:
            self.abort(e)
            raise

    def check_workers(self) -> None:
        """Raise RankFailed for a worker of this host that exited, or any rank gone silent."""
        check_workers(self.procs)
        self.pulses.check()

    def abort(self, error: BaseException) -> None:
        """Start-up failed: tell workers elsewhere, stop this host's."""
        try:
            self.store.set("abort", f"{type(error).__name__}: {error}")
        except Exception:  # noqa: BLE001
            pass
        self._stop()

    def start(self, num_blocks: int, block_size: int, eos_ids: set[int], native: bool = True,
              prefault: bool = False) -> TensorParallelExecutor:
        """Every rank's runner over its share of a pool of `num_blocks` blocks; returns self. Decode
        steps run op by op: a tape of the forward pass cannot hold its collectives."""
        try:
            self.store.set("pool", json.dumps({"num_blocks": num_blocks, "block_size": block_size, "native": native,
                                               "prefault": prefault}))
            self.runner = ModelRunner(self.model, num_blocks, block_size, eos_ids, native, fused=False,
                                      tp_size=self.size, prefault=prefault)
            wait_phase(self.store, "ready", self.others, self.check_workers)
            self.group.connect(self.store, self.device)
            self.group.watch = self.check_workers  # a worker that dies mid-collective ends the wait
        except BaseException as e:
            self.abort(e)
            raise
        self.state["in_step"] = True
        self.native, self.native_refusal, self.tape = self.runner.native, self.runner.native_refusal, None
        return self

    def execute(self, scheduled: list[tuple[Request, int]]) -> dict[str, list[SampleResult]]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        batch = StepBatch.of(scheduled, self.runner.block_size)
        with steps_finish_first():  # (a held Ctrl-C is raised as this block ends, the step complete)
            try:
                step.send(self.group, batch)
                logits = self.runner.run(batch)
            except BaseException as e:
                self._fail(self.culprit(e))
                if not isinstance(e, Exception):
                    raise
                raise EngineDeadError(self.dead) from e
        self.steps += 1
        return self.runner.sample(scheduled, batch, logits)

    def check_health(self) -> None:
        """Between steps (an idle server): raise EngineDeadError if a worker of this host has exited
        or a rank's heartbeats have stopped, so the engine fails now, not at the next request."""
        if self.dead is None:
            try:
                self.check_workers()
            except RankFailed as e:
                self._fail(str(e))
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def _fail(self, why: str) -> None:
        """The engine is dead: remember why (every later step raises it) and stop the workers."""
        self.dead = why
        log.error("%s; stopping the workers", why)
        self.state["in_step"] = False
        self._stop()

    def culprit(self, error: BaseException) -> str:
        """Which rank broke the step: one that reported its error, or a worker of this host that
        exited (given a moment to show), or one whose heartbeats stopped over that moment (a rank
        on another host killed: gloo's error names only its address), else this rank's own error."""
        if isinstance(error, RankFailed):  # the watch's finding
            return str(error)
        failed = f"a tensor-parallel step failed on rank 0: {type(error).__name__}: {error}"
        if not isinstance(error, Exception):  # a Ctrl-C or exit: nothing to look for
            return failed
        start = time.monotonic()
        while time.monotonic() < start + 2:
            try:
                check_reports(self.store, "step", self.others)
                check_workers(self.procs)
                self.pulses.silent()
            except (RankFailed, ValueError) as e:
                return str(e)
            except Exception:  # noqa: BLE001 - the store is unreachable: nothing more to learn
                return failed
            time.sleep(0.05)
        try:  # looked for the whole moment, in which a live rank beats 4 times
            self.pulses.check(grace=3 * BEAT_EVERY)
        except RankFailed as e:
            return f"{e}; {failed}"
        return failed

    def comm_stats(self) -> dict:
        """Rank 0's time in collectives so far, and per step."""
        s = self.group.stats
        return {"tensor_parallel_size": self.size, "steps": self.steps, **s.as_dict(),
                "all_reduce_ms_per_step": round(1e3 * s.all_reduce_s / max(self.steps, 1), 3)}

    def shutdown(self) -> None:
        if self._stop.alive and self.steps:
            log.info("tensor parallel: %s", self.comm_stats())
        self._stop()
        self.dead = self.dead or "the engine was shut down"
        self.store = None  # closes the rendezvous port
