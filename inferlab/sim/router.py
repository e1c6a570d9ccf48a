"""Routers for a simulated fleet: which replica a new request goes to. A router is one method,
`choose(trace_request, replicas) -> index`; `ROUTERS` names the built-in ones."""
from __future__ import annotations

import itertools

from inferlab.sim.replica import Replica
from inferlab.sim.trace import TraceRequest


class RoundRobin:
    """Each replica in turn, blind to load and content."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, t: TraceRequest, replicas: list[Replica]) -> int:
        return next(self._next) % len(replicas)


class LeastLoaded:
    """The replica with the fewest unfinished requests (the lowest index on ties)."""

    def choose(self, t: TraceRequest, replicas: list[Replica]) -> int:
        return min(range(len(replicas)), key=lambda k: replicas[k].load)


class PrefixAware(LeastLoaded):
    """Requests sharing a prefix go where the first of them went, so the prefix stays cached on
    one replica instead of being prefilled on all; a new prefix, or none, goes to the least
    loaded replica. Stickiness is bounded: a replica with over `slack` times the mean load
    gives the prefix up to the least loaded one."""

    def __init__(self, slack: float = 2.0) -> None:
        self.home: dict[int, int] = {}
        self.slack = slack

    def choose(self, t: TraceRequest, replicas: list[Replica]) -> int:
        if t.prefix_id is None:
            return super().choose(t, replicas)
        home = self.home.get(t.prefix_id)
        mean = sum(r.load for r in replicas) / len(replicas)
        if home is None or replicas[home].load > self.slack * (mean + 1):
            home = self.home[t.prefix_id] = super().choose(t, replicas)
        return home


ROUTERS = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "prefix_aware": PrefixAware}


def make_router(name: str) -> RoundRobin | LeastLoaded:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name]()
