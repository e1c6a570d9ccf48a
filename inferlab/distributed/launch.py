"""Where the ranks meet, which of them this process starts, and the start-up handshake.

torch.distributed's usual ways to launch:
- one host (the default): the driver starts ranks 1..N-1 as its own worker processes, meeting on a
  free loopback port;
- several hosts: the same command on each, with `--nnodes H --node-rank i --master-addr A
  --master-port P` (address and port may come from MASTER_ADDR / MASTER_PORT); host i runs N/H
  consecutive ranks, the first in the command's own process, and host 0's first is the driver;
- one process per rank started by a launcher (`torchrun`, or a scheduler that sets RANK,
  WORLD_SIZE, MASTER_ADDR and MASTER_PORT): each process is its rank and starts nothing.

The ranks meet on a TCPStore that the driver serves at the master address. It also carries the
handshake: the driver's engine config, then each rank's "loaded" and "ready" (or the error that
stopped it). Waits poll the store and the local workers' exit status, so a rank that fails or
dies while starting is an error that names it, never a hang. Every worker also beats a counter in
the store (`Heartbeat`), which is how the driver tells that a rank on another host is gone when
no connection says so (a lost machine, a stopped process), and how a worker tells its driver is.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from inferlab.config import EngineConfig
from inferlab.distributed.group import EngineDeadError

JOIN_TIMEOUT = 600.0  # seconds for every rank to join and load its shard (another host may start later)
BEAT_EVERY = 0.5  # seconds between a worker's heartbeats
BEAT_GRACE = 30.0  # seconds without a heartbeat (or an answer from the store) after which a peer is lost


class RankFailed(EngineDeadError):
    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"tensor-parallel rank {rank} {message}")
        self.rank = rank


class DriverGone(RuntimeError):
    """The driver stopped (or failed to start): a worker's cue to exit quietly."""


def _env_int(name: str, low: int, high: int) -> int:
    """An integer environment variable in [low, high], or a ValueError that names it (a bare int()
    said only "invalid literal", and a port past 65535 was a traceback from the store)."""
    value = os.environ[name]
    if not value.strip().isdigit() or not low <= int(value) <= high:
        raise ValueError(f"{name}={value!r}: an integer from {low} to {high}")
    return int(value)


@dataclass
class Rendezvous:
    addr: str
    port: int  # 0: any free port (the driver's store picks it; only on one host)
    size: int
    ranks: list[int]  # the ranks this host's command runs: the first in its own process, the rest as children

    @classmethod
    def of(cls, config: EngineConfig) -> Rendezvous:
        env, size, nnodes = os.environ, config.tensor_parallel_size, config.nnodes
        if "RANK" in env and "WORLD_SIZE" in env:  # a launcher started this rank
            if _env_int("WORLD_SIZE", 1, 1 << 20) != size:
                raise ValueError(f"WORLD_SIZE {env['WORLD_SIZE']} is not tensor_parallel_size {size}")
            if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
                raise ValueError("a rank started with RANK and WORLD_SIZE needs MASTER_ADDR and MASTER_PORT too")
            rank = _env_int("RANK", 0, size - 1)
            return cls(env["MASTER_ADDR"], _env_int("MASTER_PORT", 1, 65535), size, [rank])
        port = config.master_port or (_env_int("MASTER_PORT", 0, 65535) if "MASTER_PORT" in env else None)
        if port is None and nnodes > 1:
            raise ValueError("ranks on several nodes meet at --master-addr and --master-port "
                             "(or MASTER_ADDR and MASTER_PORT): give the port")
        per_node = size // nnodes
        first = config.node_rank * per_node
        return cls(config.master_addr or env.get("MASTER_ADDR") or "127.0.0.1", int(port or 0), size,
                   list(range(first, first + per_node)))

    @property
    def rank(self) -> int:
        return self.ranks[0]

    def store(self) -> dist.TCPStore:
        """The driver serves the store; the other ranks connect (retrying until it is up)."""
        return dist.TCPStore(self.addr, self.port, self.size, is_master=self.rank == 0, wait_for_workers=False,
                             timeout=timedelta(seconds=JOIN_TIMEOUT))

    def start_workers(self, port: int) -> dict[int, subprocess.Popen]:
        """This host's other ranks, as worker processes of this one, in their own session: a Ctrl-C
        at the terminal reaches only this process, which stops them."""
        procs = {}
        for index, rank in enumerate(self.ranks[1:], 1):
            cmd = [sys.executable, "-m", "inferlab.distributed", "--rank", str(rank), "--size", str(self.size),
                   "--master-addr", self.addr, "--master-port", str(port), "--local-index", str(index),
                   "--local-size", str(len(self.ranks)), "--parent", str(os.getpid())] + ["--remote"] * (self.rank != 0)
            procs[rank] = subprocess.Popen(cmd, start_new_session=True)
        return procs


class Heartbeat:
    """A worker's heartbeat: a thread that adds 1 to `beat/<rank>` in the driver's store every
    BEAT_EVERY, on a connection of its own (the main thread may sit in a collective for minutes),
    until `stop()`. A store that has not answered for BEAT_GRACE (the driver's host lost, its
    process stopped) or has closed is the worker's sign that its driver is gone (`watch`). (The
    store's own timeout does not cover a request whose answer never comes: the thread would wait
    on it for ever, so the time is kept here.)"""

    def __init__(self, store: dist.TCPStore, rank: int) -> None:
        self.key, self.answered, self.stopped = f"beat/{rank}", time.monotonic(), threading.Event()
        self.client = dist.TCPStore(store.host, store.port, is_master=False, timeout=timedelta(seconds=BEAT_GRACE))
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.client.add(self.key, 1)
                self.answered = time.monotonic()
                self.stopped.wait(BEAT_EVERY)
        except Exception:  # noqa: BLE001 - the store has closed: the driver is gone
            return

    def watch(self) -> None:
        """Raise DriverGone where the store has closed or not answered for BEAT_GRACE (a group's watch)."""
        if not self.thread.is_alive() or time.monotonic() - self.answered >= BEAT_GRACE:
            raise DriverGone("its store stopped answering")

    def stop(self) -> None:
        self.stopped.set()


class Pulses:
    """The driver's view of the workers' heartbeats. A rank counts from its first beat on (a host
    may join late: the join timeout covers that), and its silence is timed from the last look that
    saw its count move, so looking seldom never makes a live rank look lost."""

    def __init__(self, store: dist.Store, ranks: list[int]) -> None:
        self.store, self.seen = store, {r: (0, time.monotonic()) for r in ranks}

    def silent(self) -> dict[int, float]:
        """Seconds since each beating rank's count last moved, as far as the looks can tell."""
        now = time.monotonic()
        for rank, (count, _) in self.seen.items():
            latest = self.store.add(f"beat/{rank}", 0)
            if latest != count:
                self.seen[rank] = (latest, now)
        return {rank: now - since for rank, (count, since) in self.seen.items() if count}

    def check(self, grace: float | None = None) -> None:
        """Raise RankFailed for a rank silent for over `grace` seconds (default BEAT_GRACE)."""
        grace = BEAT_GRACE if grace is None else grace
        for rank, quiet in self.silent().items():
            if quiet > grace:
                raise RankFailed(rank, f"has sent no heartbeat for {quiet:.1f} s (its process died or "
                                       f"stopped, or its host is down or unreachable)")


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def check_workers(procs: dict[int, subprocess.Popen]) -> None:
    """Raise RankFailed for the first local worker that has exited."""
    for rank, p in procs.items():
        if p.poll() is not None:
            raise RankFailed(rank, f"(pid {p.pid}) {describe_exit(p.returncode)}")


def check_reports(store: dist.Store, phase: str, ranks: list[int]) -> None:
    """Raise the first error a rank has reported for `phase` (see `report`)."""
    wait_phase(store, phase, [r for r in ranks if store.check([f"{phase}/{r}"])], lambda: None)


def report(store: dist.Store, phase: str, rank: int, error: BaseException | None = None) -> None:
    """A rank's outcome of a start-up phase: {} or the error that stopped it."""
    value = {} if error is None else {"kind": type(error).__name__, "error": str(error),
                                      "value_error": isinstance(error, ValueError)}
    store.set(f"{phase}/{rank}", json.dumps(value))


def wait_for(store: dist.Store, keys: list[str], check: Callable[[], None], timeout: float = JOIN_TIMEOUT) -> list[str]:
    """The values of `keys` once all are set; `check` raises where waiting longer is pointless."""
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        check()
        if time.monotonic() > deadline:
            missing = [k for k in keys if not store.check([k])]
            raise EngineDeadError(f"tensor-parallel start-up: no {', '.join(missing)} after {timeout:.0f} s (is "
                                  f"every node's command running, with the same --master-addr/--master-port?)")
        time.sleep(0.05)
    return [store.get(k).decode() for k in keys]


def wait_phase(store: dist.Store, phase: str, ranks: list[int], check: Callable[[], None]) -> None:
    """Wait for every rank's report of `phase`; the first failure is raised as the rank's error
    (a ValueError where the rank's was one: a bad model or size is the user's to fix)."""
    for rank, value in zip(ranks, wait_for(store, [f"{phase}/{r}" for r in ranks], check)):
        failed = json.loads(value)
        if failed:
            if failed["value_error"]:
                raise ValueError(f"tensor-parallel rank {rank}: {failed['error']}")
            raise RankFailed(rank, f"failed: {failed['kind']}: {failed['error']}")


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel send this process SIGTERM when the driver's process ends, however
    it ends (SIGKILL included), so no worker outlives it. (The kernel tracks the thread that
    started the worker: the engine should be built on a thread that lives as long as it does.)"""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver was gone before we asked
        os._exit(1)
