"""Routers for a simulated fleet: the live router's policies (`inferlab.router.policy`), one
definition for both. A replica is a target (it has a `load`); a trace request's prefix is its
shared prompt's id, if any."""
from __future__ import annotations

from inferlab.router.policy import POLICIES, LeastLoaded, PrefixAware, RoundRobin, RoutingPolicy
from inferlab.sim.trace import TraceRequest

ROUTERS = POLICIES
__all__ = ["ROUTERS", "LeastLoaded", "PrefixAware", "RoundRobin", "make_router", "prefix_of"]


def make_router(name: str) -> RoutingPolicy:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name]()


def prefix_of(t: TraceRequest) -> tuple:
    return () if t.prefix_id is None else (t.prefix_id,)
