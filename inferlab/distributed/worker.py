"""A worker rank: join the group, load this rank's shard of the model and of the KV pool as the
driver's settings say, then run every step the driver broadcasts until it says stop.

Started by the driver for the other ranks on its host (`python -m inferlab.distributed`),
by `run_node` for the ranks of another host (the engine command with --node-rank > 0, or rank > 0
of a launcher such as torchrun). A worker that fails reports its error through the store, where
the driver reads it and names the rank; one whose driver has gone exits quietly. Every worker
beats a heartbeat in the driver's store (`Heartbeat`); a rank on another host than the driver's
also takes the store's silence for BEAT_GRACE as the driver gone (its host lost), since no
connection may ever close to say so. (The driver's own workers die with it, and are left waiting
while it is stopped: a debugger, Ctrl-Z.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import torch
import torch.distributed as dist

from inferlab.config import EngineConfig
from inferlab.distributed import step
from inferlab.distributed.group import TensorParallelGroup, building
from inferlab.distributed.launch import DriverGone, Heartbeat, Rendezvous, die_with_parent, report, wait_for
from inferlab.logger import setup_logging
from inferlab.malloc import keep_freed_memory
from inferlab.model.loader import load_model
from inferlab.runner import ModelRunner
from inferlab.threads import fixed_threads, usable_cpus

log = logging.getLogger("inferlab")


def rank_device(device: str, local_index: int) -> torch.device:
    """One GPU per rank on its host; every rank on CPU."""
    d = torch.device(device)
    return torch.device("cuda", local_index) if d.type == "cuda" and d.index is None else d


def rank_threads(num_threads: int | None, device: torch.device, local_size: int) -> None:
    """A fixed share of this host's cores: ranks meet at every all-reduce, so none may lag."""
    if device.type == "cpu":
        torch.set_num_threads(fixed_threads(num_threads) if num_threads else
                              max(1, usable_cpus() // local_size))


def run_rank(rank: int, size: int, store: dist.TCPStore, local_index: int, local_size: int, remote: bool) -> int:
    """This process as rank `rank` (> 0) until the driver stops it; the exit code. `remote`: on
    another host than the driver's, so its silence ends this rank."""
    group, phase, beat = TensorParallelGroup(rank, size), "loaded", None

    def check_driver() -> None:
        if store.check(["abort"]):
            raise DriverGone(store.get("abort").decode())

    try:
        beat = Heartbeat(store, rank)
        if remote:
            group.watch = beat.watch
        settings = json.loads(wait_for(store, ["settings"], check_driver)[0])
        device = rank_device(settings["device"], local_index)
        rank_threads(settings["num_threads"], device, local_size)
        if device.type == "cpu":
            keep_freed_memory()
        with building(group):
            model, _ = load_model(settings["model"], settings["dtype"], device, settings["quantization"],
                                  settings["int8_activations"], settings["hf_overrides"])
        report(store, phase, rank)
        phase = "ready"
        pool = json.loads(wait_for(store, ["pool"], check_driver)[0])
        runner = ModelRunner(model, pool["num_blocks"], pool["block_size"], set(), native=pool["native"], fused=False,
                             tp_size=size, prefault=pool["prefault"])
        report(store, phase, rank)
        phase = "step"
        group.connect(store, device)
        log.info("ready on %s (rank %d of %d)", device, rank, size)
        while (batch := step.receive(group)) is not None:
            runner.run(batch)
        return 0
    except DriverGone as e:
        log.info("rank %d: the driver stopped (%s)", rank, e)
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the driver, which names this rank
        try:
            report(store, phase, rank, e)
        except Exception:  # noqa: BLE001 - the store went with the driver
            log.info("rank %d: the driver is gone (%s); exiting", rank, e)
            return 0
        log.error("rank %d failed: %s: %s", rank, type(e).__name__, e)
        return 1
    finally:
        if beat is not None:
            beat.stop()
        # release the gloo group now, while the interpreter runs: one still alive at exit is torn
        # down among the C++ static destructors, where it sometimes aborts the process
        group.close()


def is_worker_node(config: EngineConfig) -> bool:
    """Whether this process runs ranks for a driver elsewhere (node_rank > 0, or a launcher's RANK > 0)."""
    return config.tensor_parallel_size > 1 and Rendezvous.of(config).rank != 0


def run_node(config: EngineConfig) -> int:
    """This host's ranks where the driver runs elsewhere: start the others as children and run
    the first in this process, until the driver stops them. Returns the exit code. (The engine
    settings are the driver's: only the rendezvous fields of `config` are read here.)"""
    rdzv = Rendezvous.of(config)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends this host's ranks at once (the driver reports it)
    name_rank(rdzv.rank)
    log.info("ranks %s of %d: joining the driver at %s:%d", rdzv.ranks, rdzv.size, rdzv.addr, rdzv.port)
    store = rdzv.store()
    procs = rdzv.start_workers(rdzv.port)
    try:
        local, local_size = os.environ.get("LOCAL_RANK", 0), os.environ.get("LOCAL_WORLD_SIZE", len(rdzv.ranks))
        return run_rank(rdzv.rank, rdzv.size, store, int(local), int(local_size), remote=True)
    finally:
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                p.kill()


def name_rank(rank: int) -> None:
    """Prefix this process's log lines with its rank (they share the driver's terminal)."""
    for handler in setup_logging().handlers:
        handler.setFormatter(logging.Formatter(f"%(levelname)s %(name)s rank {rank}: %(message)s"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one tensor-parallel worker rank (started by the driver)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--local-index", type=int, default=0, help="this rank's place among its host's ranks")
    p.add_argument("--local-size", type=int, default=1, help="ranks on this host")
    p.add_argument("--parent", type=int, default=None, help="the starting process, whose end ends this one")
    p.add_argument("--remote", action="store_true", help="on another host than the driver's")
    a = p.parse_args(argv)
    if a.parent is not None:
        die_with_parent(a.parent)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the driver stops us; a stray Ctrl-C needs no traceback
    name_rank(a.rank)
    store = Rendezvous(a.master_addr, a.master_port, a.size, [a.rank]).store()
    return run_rank(a.rank, a.size, store, a.local_index, a.local_size, a.remote)


if __name__ == "__main__":
    sys.exit(main())
