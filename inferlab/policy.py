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
import inspect
import itertools
import os
import sys
from collections.abc import Iterator

from inferlab.request import Request
from inferlab.sampling_params import SamplingParams


class RequestQueue:
    """Base class: a min-heap of waiting requests by `key`.

    Contract for subclasses: `key(req)` must not change while `req` waits (it is computed on
    push). It also orders the running batch each step (the smallest key gets the token budget
    first) and, through `victim`, picks whom to preempt, so it is called on running requests,
    whose output grows. `should_preempt(waiting, running)` says whether a waiting request may
    evict a running one to get in (by default never; the priority policy does for strictly lower
    priority). A subclass's `__init__` calls `super().__init__()`; one taking `aging_rate` gets
    the engine's `sjf_aging_rate`.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, int, Request]] = []
        self._tie = itertools.count()
        # id(request) -> the tie number of its live entry. A removed request's entry stays in the heap,
        # dead, until it surfaces: removing one of N was an O(N) rebuild, so a client that went away
        # from 16,000 queued choices held every step for seconds (O(N^2)).
        self._live: dict[int, int] = {}

    def key(self, req: Request) -> tuple:
        raise NotImplementedError

    def push(self, req: Request) -> None:
        heap, entry = self._heap, (self.key(req), next(self._tie), req)
        try:
            heapq.heappush(heap, entry)
        except Exception:  # a key that does not compare with the others': the heap as it was, then the error
            # (a sift cut short leaves the new entry in, or a parent twice with the entry gone)
            self._heap = list({id(e): e for e in self._heap if e is not entry}.values())
            heapq.heapify(self._heap)
            raise
        self._live[id(req)] = entry[1]

    def _alive(self, entry: tuple[tuple, int, Request]) -> bool:
        return self._live.get(id(entry[2])) == entry[1]

    def _surface(self) -> None:
        """Drop the dead entries from the top of the heap."""
        heap = self._heap
        while heap and not self._alive(heap[0]):
            heapq.heappop(heap)

    def peek(self) -> Request:
        self._surface()
        return self._heap[0][2]

    def pop(self) -> Request:
        self._surface()
        req = heapq.heappop(self._heap)[2]
        del self._live[id(req)]
        return req

    def remove(self, req: Request) -> None:
        if self._live.pop(id(req), None) is not None and len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._alive(e)]  # mostly dead: compact
            heapq.heapify(self._heap)

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=self.key)

    def should_preempt(self, waiting: Request, running: Request) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        return (e[2] for e in sorted(filter(self._alive, self._heap), key=lambda e: e[:2]))


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


def resolve_policy(name: str) -> type[RequestQueue]:
    """A built-in policy name, or `module:Class` / `path/to/file.py:Class` naming a RequestQueue
    subclass of one's own, imported here so that trying a policy needs no edit to the package. A
    file is executed once (not once per engine or replica) until it changes: an edited policy is
    read again."""
    if name in POLICIES:
        return POLICIES[name]
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"unknown scheduling_policy {name!r}; choose one of {sorted(POLICIES)} "
                         f"or give module:Class or file.py:Class")
    try:
        changed = os.stat(where).st_mtime_ns if where.endswith(".py") else None
    except OSError:
        changed = None  # the load below names what is wrong with the path
    return _resolve(name, where, attr, changed)


@functools.cache
def _resolve(name: str, where: str, attr: str, changed: int | None) -> type[RequestQueue]:
    try:
        if where.endswith(".py"):
            stem = os.path.basename(where)[:-3]
            spec = importlib.util.spec_from_file_location(f"inferlab_policy_{stem}", where)
            if spec is None or spec.loader is None:
                raise ImportError(f"not a Python file: {where}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # where a @dataclass in it looks its module up
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, attr)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the file is the user's: whatever it raises, one line
        raise ValueError(f"cannot load scheduling policy {name!r}: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, RequestQueue)):
        raise ValueError(f"scheduling policy {name!r} is not a subclass of inferlab.policy.RequestQueue")
    if cls.key is RequestQueue.key:
        raise ValueError(f"scheduling policy {name!r} defines no key(req), which orders its queue")
    # built and used once here, so that a policy that cannot work fails at start, not mid-run
    try:
        queue = _build(cls)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"scheduling policy {name!r} cannot be built: {type(e).__name__}: {e}") from None
    req = Request("policy-check", [1, 2, 3], SamplingParams(), 0.0)
    try:
        queue.key(req)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"scheduling policy {name!r} fails on a new request: {type(e).__name__}: {e}") from None
    try:
        queue.push(req)
        if len(queue) != 1 or queue.peek() is not req or queue.pop() is not req or len(queue) != 0:
            raise ValueError("a request pushed is not the one peek() and pop() give back")
    except Exception as e:  # noqa: BLE001 - e.g. an __init__ that skipped super().__init__()
        raise ValueError(f"scheduling policy {name!r} cannot queue a request: {type(e).__name__}: {e}") from None
    return cls


def _build(cls: type[RequestQueue], sjf_aging_rate: float = 20.0) -> RequestQueue:
    """cls(), given the engine's aging rate where its __init__ takes `aging_rate` (as sjf's does)."""
    takes_rate = "aging_rate" in inspect.signature(cls.__init__).parameters
    return cls(aging_rate=sjf_aging_rate) if takes_rate else cls()


def make_queue(name: str, sjf_aging_rate: float = 20.0) -> RequestQueue:
    return _build(resolve_policy(name), sjf_aging_rate)


def policy_failed(method: str, e: Exception) -> ValueError:
    """A policy's own method failing mid-run, as one line (as one that fails at start is)."""
    return ValueError(f"the scheduling policy's {method}() failed: {type(e).__name__}: {e}")


def by_key(queue: RequestQueue, running: list[Request]) -> list[Request]:
    """`running` in the policy's order (who gets the step's token budget first)."""
    try:
        return sorted(running, key=queue.key)
    except Exception as e:
        raise policy_failed("key", e) from None


def requeue(queue: RequestQueue, req: Request) -> None:
    """A preempted request back in the queue."""
    try:
        queue.push(req)
    except Exception as e:
        raise policy_failed("key", e) from None


def head_of(queue: RequestQueue) -> Request:
    """queue.peek(), which a policy may override: its failure, or anything but a request, in one line."""
    try:
        head = queue.peek()
    except Exception as e:
        raise policy_failed("peek", e) from None
    if not isinstance(head, Request):
        raise ValueError(f"the scheduling policy's peek() returned {head!r:.60}, not a waiting request")
    return head


def take(queue: RequestQueue, head: Request) -> None:
    """queue.pop() of the `head` that peek() gave: another request out would be lost to the scheduler."""
    try:
        popped = queue.pop()
    except Exception as e:
        raise policy_failed("pop", e) from None
    if popped is not head:
        name = f"request {popped.request_id!r}" if isinstance(popped, Request) else f"{popped!r:.60}"
        raise ValueError(f"the scheduling policy's pop() returned {name}, not {head.request_id!r}, which its "
                         "peek() gave")


def pick_victim(queue: RequestQueue, running: list[Request]) -> Request:
    """queue.victim(running), a policy's own failure named in one line (as a key() that fails on a new
    request is): raising, or naming a request that is not among those it was offered."""
    try:
        victim = queue.victim(running)
    except Exception as e:
        raise policy_failed("victim", e) from None
    if not any(r is victim for r in running):
        raise ValueError(f"the scheduling policy's victim() returned {victim!r}, not one of the running requests")
    return victim


def may_preempt(queue: RequestQueue, waiting: Request, running: Request) -> bool:
    """queue.should_preempt(waiting, running), its failure named in one line as victim()'s is."""
    try:
        return bool(queue.should_preempt(waiting, running))
    except Exception as e:
        raise policy_failed("should_preempt", e) from None
