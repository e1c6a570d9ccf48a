"""Routing policies: which target (a simulated replica, a live backend) a new request goes to.

One definition serves the simulator's fleet (`inferlab.sim`) and the live router (`inferlab
router`): a policy is one method, `choose(prefix, targets) -> index into targets`, where each
target has a `load` (requests it holds and has not finished) and `prefix` is the request's prefix
keys, first block first (a shared prompt's id in a simulated trace; the chain hashes of the
prompt's first blocks live). `targets` are the ones able to take a request now (the healthy
backends), so a policy never sees a dead one.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Protocol


class Target(Protocol):
    @property
    def load(self) -> int: ...


class RoutingPolicy(Protocol):
    def choose(self, prefix: Sequence[Hashable], targets: Sequence[Target]) -> int: ...


class RoundRobin:
    """Each target in turn, blind to load and content."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, prefix: Sequence[Hashable], targets: Sequence[Target]) -> int:
        return next(self._next) % len(targets)


class LeastLoaded:
    """The target with the fewest unfinished requests (the first one on ties)."""

    def choose(self, prefix: Sequence[Hashable], targets: Sequence[Target]) -> int:
        return min(range(len(targets)), key=lambda k: targets[k].load)


class PrefixAware(LeastLoaded):
    """Requests sharing a prefix go where the first of them went, so the prefix stays cached on
    one target instead of being prefilled on all; a new prefix, or none, goes to the least loaded
    target. The longest known prefix wins (a conversation's later turns follow its first).
    Stickiness is bounded: a target with over `slack` times the mean load of the others (plus one)
    gives the prefix up to the least loaded one, and so does a target no longer among `targets`.
    (Against the mean of all, two targets could never trip it: one holds at most twice it.)"""

    def __init__(self, slack: float = 2.0, max_keys: int = 100_000) -> None:
        self.home: OrderedDict[Hashable, Target] = OrderedDict()  # least recently routed first
        self.slack = slack
        self.max_keys = max_keys

    def choose(self, prefix: Sequence[Hashable], targets: Sequence[Target]) -> int:
        if not prefix:
            return super().choose(prefix, targets)
        home = next((self.home[k] for k in reversed(prefix) if k in self.home), None)
        index = next((i for i, t in enumerate(targets) if t is home), None)
        if index is None or len(targets) > 1 and targets[index].load > self.slack * (self._others(targets, index) + 1):
            index = super().choose(prefix, targets)
        for k in prefix:
            self.home[k] = targets[index]
            self.home.move_to_end(k)
        while len(self.home) > self.max_keys:
            self.home.popitem(last=False)
        return index

    @staticmethod
    def _others(targets: Sequence[Target], index: int) -> float:
        """The mean load of every target but `index`."""
        return (sum(t.load for t in targets) - targets[index].load) / (len(targets) - 1)


POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "prefix": PrefixAware,
            "prefix_aware": PrefixAware}  # the simulator's older name


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
