"""What one scheduler step decided: the requests it runs and how many tokens each, the requests it
preempted, and the K/V copies preemption by swap needs before the step runs (vLLM keeps its
SchedulerOutput in a module of its own too, as the runner and the preemption modes read it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferlab.request import Request


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    preempted: list[Request] = field(default_factory=list)
    # K/V copies to do before this step runs, as (device block, host block): preemption by swap
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)
