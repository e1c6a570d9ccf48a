"""Scheduling policies. A policy is a waiting-queue object plus a victim rule — nothing else.

Every policy orders requests by `key(req)`: the waiting request with the smallest key is
admitted next, and when KV blocks run out the running request with the largest key is
preempted. The scheduler loop never asks which policy it runs.
"""
from __future__ import annotations

import functools
import heapq
import importlib
import importlib.util
import itertools
import os
from collections.abc import Iterator

from inferlab.request import Request
from inferlab.sampling_params import SamplingParams


class RequestQueue:
    """Base class: a min-heap of waiting requests by `key`.

    Contract for subclasses: `key(req)` must not change while `req` waits (it is computed on
    push); `should_preempt(waiting, running)` says whether a waiting request may evict a running
    one to get in (by default never; the priority policy does for strictly lower priority).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, int, Request]] = []
        self._tie = itertools.count()

    def key(self, req: Request) -> tuple:
        raise NotImplementedError

    def push(self, req: Request) -> None:
        heapq.heappush(self._heap, (self.key(req), next(self._tie), req))

    def peek(self) -> Request:
        return self._heap[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[2] is not req]
        heapq.heapify(self._heap)

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=self.key)

    def should_preempt(self, waiting: Request, running: Request) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[2] for e in sorted(self._heap, key=lambda e: e[:2]))


class FCFSQueue(RequestQueue):
    """First come, first served; a preempted request goes back to its arrival-order place."""

    def key(self, req: Request) -> tuple:
        return (req.arrival_time, req.seq)


class PriorityQueue(RequestQueue):
    """Lower `priority` value first, then arrival; may preempt lower-priority running requests."""

    def key(self, req: Request) -> tuple:
        return (req.priority, req.arrival_time, req.seq)

    def should_preempt(self, waiting: Request, running: Request) -> bool:
        return waiting.priority < running.priority


class SJFQueue(RequestQueue):
    """Shortest remaining work first, with aging: every second of waiting counts as
    `aging_rate` tokens less work. Since now - arrival grows alike for all, the key reduces to
    work + aging_rate * arrival_time, which is fixed while a request waits, so a heap suffices
    and a long job's key is eventually smaller than that of any newly arriving short job."""

    def __init__(self, aging_rate: float = 20.0) -> None:
        super().__init__()
        self.aging_rate = aging_rate

    def key(self, req: Request) -> tuple:
        return (req.remaining_work + self.aging_rate * req.arrival_time, req.arrival_time, req.seq)


POLICIES = {"fcfs": FCFSQueue, "priority": PriorityQueue, "sjf": SJFQueue}


@functools.cache  # a file is executed once, not once per engine or replica
def resolve_policy(name: str) -> type[RequestQueue]:
    """A built-in policy name, or `module:Class` / `path/to/file.py:Class` naming a RequestQueue
    subclass of one's own, imported here so that trying a policy needs no edit to the package."""
    if name in POLICIES:
        return POLICIES[name]
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"unknown scheduling_policy {name!r}; choose one of {sorted(POLICIES)} "
                         f"or give module:Class or file.py:Class")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            if spec is None or spec.loader is None:
                raise ImportError(f"not a Python file: {where}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, attr)
    except Exception as e:  # noqa: BLE001 - the file is the user's: whatever it raises, one line
        raise ValueError(f"cannot load scheduling policy {name!r}: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, RequestQueue)):
        raise ValueError(f"scheduling policy {name!r} is not a subclass of inferlab.policy.RequestQueue")
    if cls.key is RequestQueue.key:
        raise ValueError(f"scheduling policy {name!r} defines no key(req), which orders its queue")
    # built and asked once here, so that a policy that cannot work fails at start, not mid-run
    try:
        queue = _build(cls)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"scheduling policy {name!r} cannot be built: {type(e).__name__}: {e}") from None
    try:
        queue.key(Request("policy-check", [1, 2, 3], SamplingParams(), 0.0))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"scheduling policy {name!r} fails on a new request: {type(e).__name__}: {e}") from None
    return cls


def _build(cls: type[RequestQueue], sjf_aging_rate: float = 20.0) -> RequestQueue:
    return cls(sjf_aging_rate) if issubclass(cls, SJFQueue) else cls()


def make_queue(name: str, sjf_aging_rate: float = 20.0) -> RequestQueue:
    return _build(resolve_policy(name), sjf_aging_rate)


def pick_victim(queue: RequestQueue, running: list[Request]) -> Request:
    """queue.victim(running), a policy's own failure named in one line (as a key() that fails on a new
    request is): raising, or naming a request that is not among those it was offered."""
    try:
        victim = queue.victim(running)
    except Exception as e:
        raise ValueError(f"the scheduling policy's victim() failed: {type(e).__name__}: {e}") from None
    if not any(r is victim for r in running):
        raise ValueError(f"the scheduling policy's victim() returned {victim!r}, not one of the running requests")
    return victim
