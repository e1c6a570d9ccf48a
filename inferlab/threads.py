"""How many CPU threads the model uses, adapted to what else runs on the machine.

OpenMP threads meet at a barrier at the end of every parallel region, hundreds of times a step.
When another busy process takes a core, one of our threads is descheduled and the others wait for
it at each barrier: on the 2-core development VM with one other busy process, decode took 71 ms a
token on 2 threads and 34 ms on 1 (quiet, 2 threads: 20 ms). Making idle threads sleep instead of
spin (OMP_WAIT_POLICY=PASSIVE) fixes the busy case but costs a wake-up per region: 61 ms a token
on the quiet machine. So the engine keeps OpenMP's default short spin and instead uses only the
cores other processes leave free: every couple of seconds it reads how busy the CPUs were
(`/proc/stat`) less its own CPU time. A fixed `num_threads` turns this off.

A core counts as taken only when others keep it at least YIELD_AT busy for two readings in a row,
and is used again once they leave it RECLAIM_AT free. A client on the same machine (a benchmark
parsing the streams it reads) works in bursts between the engine's steps and stays well under a
core (`inferlab bench serve` spent 4.2 s of CPU streaming 2,286 tokens: 2 ms a token), yet
yielding to one cost 14-19% of throughput (86-91 output tok/s where 2 threads kept 106), and a
threshold of 0.6 of a core, crossed and uncrossed every few seconds, flipped the thread count back
and forth. The count is logged when it first changes, then at most every LOG_EVERY_S.

A container's CPU quota (`docker run --cpus`, a Kubernetes CPU limit) is a ceiling the affinity
mask does not show: PyTorch starts a thread per physical core of the host, and threads beyond the
quota spin at each barrier until the kernel stops the process for the rest of its period. So the
engine starts with no more threads than the quota's nearest whole CPUs (`usable_cpus`): in a cgroup
allowed one CPU on the 2-core VM, one request's token took 12.3 ms instead of 16.0-16.5 and the
`cpu` workload ran 492-511 output tok/s instead of 425. The governor then reads only the CPUs the
process may run on, and counts as taken only what others keep busy beyond the cores its threads
leave them: 4 threads on a 64-core host still have 4 cores while others keep 60 busy.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import torch

from inferlab import cgroup

log = logging.getLogger("inferlab")

YIELD_AT = 0.9  # of a core kept busy by other processes, two readings running: one thread fewer
RECLAIM_AT = 0.5  # of a core left free again: the thread back
LOG_EVERY_S = 600.0


def _busy_cpu_seconds(cpus: frozenset[int] | None = None) -> float | None:
    """CPU seconds spent busy since boot by all processes, on `cpus` only where given (None where
    /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu")]
        rows = [r for r in rows if r[0][3:].isdigit() and int(r[0][3:]) in cpus] if cpus is not None else rows[:1]
        fields = [sum(int(r[i]) for r in rows) for i in range(1, 9)] if rows else None
    except (OSError, ValueError, IndexError):
        return None
    if fields is None:
        return None
    return (sum(fields) - fields[3] - fields[4]) / 100.0  # less idle and iowait; USER_HZ is 100 on Linux


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at most a cgroup CPU quota rounded to
    the nearest whole CPU, and at least one. OpenMP threads beyond a quota spin at every barrier on
    time it does not have, and the kernel stops the whole process until the next period; a fraction
    of a CPU left unused costs less, up to about half of one. On the 2-core VM (one request, ms a
    token, 1 thread against 2): quota 1.0 CPU, 12.3-12.4 against 16.0-16.5; 1.2, 11.6-12.8 against
    13.3-13.5; 1.3, level; 1.5, 12.2-12.6 against 9.5-10.2."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup.cpu_limit()
    return max(1, min(cpus, math.floor(limit + 0.5))) if limit is not None else cpus


def default_threads() -> int:
    """PyTorch's own thread count (its physical cores), lowered to `usable_cpus()` process-wide,
    with a line in the log where that lowers it."""
    n, cpus = torch.get_num_threads(), usable_cpus()
    if cpus < n:
        quota = cgroup.cpu_limit()
        why = f"a cgroup CPU quota allows {quota:g} CPUs' time" if quota is not None and quota < cpus + 0.5 else \
            f"this process may run on {cpus} CPUs"
        log.info("using %d thread%s, not %d: %s (num_threads to choose)", cpus, "" if cpus == 1 else "s", n, why)
        torch.set_num_threads(cpus)
    return min(n, cpus)


def fixed_threads(n: int) -> int:
    """A `num_threads` asked for, at most the CPUs this process may use (with a warning): threads
    beyond those wait for each other at every barrier (999 on the 2-core VM made 2,000 threads, and a
    60-token answer was not done after 2 minutes; 2 threads answered in 4 s)."""
    cpus = usable_cpus()
    if n > cpus:
        log.warning("%d threads asked for, more than the %d CPUs this process may use: using %d", n, cpus, cpus)
    return min(n, cpus)


class ThreadGovernor:
    """Call `update()` once per engine step; it looks at the machine every `interval` seconds and
    sets PyTorch's thread count (which the native kernels follow) to the cores left free, at
    least one and at most the count it started with."""

    def __init__(self, interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 busy_cpu_seconds: Callable[[], float | None] | None = None, spare: int | None = None) -> None:
        """`clock` and `busy_cpu_seconds` (of the CPUs this process may run on) are injectable for
        tests; both are the real machine's by default. `spare`: how many of those CPUs others may
        keep busy without taking a core from the threads (a container allowed 4 CPUs' time on a
        64-core host must not yield to the 60 others keep busy); by default those CPUs less the
        threads, 0 with an injected `busy_cpu_seconds`."""
        cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.busy_cpu_seconds = busy_cpu_seconds or (lambda: _busy_cpu_seconds(cpus))
        self.max_threads = torch.get_num_threads()
        self.spare = spare if spare is not None else \
            0 if busy_cpu_seconds or cpus is None else max(0, len(cpus) - self.max_threads)
        self.interval, self.clock = interval, clock
        self._last = (clock(), self.busy_cpu_seconds(), time.process_time())
        self._fewer = False  # the last reading already asked for fewer threads
        self.changes = 0
        self._logged_at: float | None = None

    def update(self) -> None:
        now = self.clock()
        last_time, last_busy, last_own = self._last
        if now - last_time < self.interval:
            return
        busy, own = self.busy_cpu_seconds(), time.process_time()
        self._last = (now, busy, own)
        if busy is None or last_busy is None or self.max_threads == 1:
            return
        others = max(0.0, (busy - last_busy) - (own - last_own)) / (now - last_time)  # cores' worth
        others = max(0.0, others - self.spare)  # what others keep busy on cores the threads could use
        current, n = torch.get_num_threads(), self.max_threads
        taken = math.floor(others + 1 - YIELD_AT)  # cores others keep (almost) fully busy
        fewer, more = max(1, n - taken), min(n, math.floor(n - others + 1 - RECLAIM_AT))
        want = current
        if fewer < current:
            want, self._fewer = (fewer if self._fewer else current), True  # a second reading confirms
        else:
            self._fewer = False
            if more > current:
                want = more
        log.debug("other processes keep %.2f cores busy (threads %d of %d)", others, current, n)
        if want != current:
            self.changes += 1
            quiet = self._logged_at is not None and now - self._logged_at < LOG_EVERY_S
            log.log(logging.DEBUG if quiet else logging.INFO, "other processes keep %.1f cores busy: using %d of "
                    "%d threads (%d changes so far)", others, want, n, self.changes)
            self._logged_at = self._logged_at if quiet else now
            torch.set_num_threads(want)
