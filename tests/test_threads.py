"""The thread governor: the model uses the cores other processes leave free."""
from __future__ import annotations

import time

import pytest
import torch

from inferlab.threads import ThreadGovernor


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_free_cores(four_threads):
    now, busy = [0.0], [0.0]

    def other_load(cores: float) -> None:  # 2 s pass with `cores` kept busy by other processes
        own = time.process_time()
        now[0] += 2.0
        busy[0] += 2.0 * cores + (time.process_time() - own)

    gov = ThreadGovernor(interval=2.0, clock=lambda: now[0], busy_cpu_seconds=lambda: busy[0])
    assert gov.max_threads == 4
    gov.update()  # before an interval has passed: nothing measured, nothing changed
    assert torch.get_num_threads() == 4
    other_load(1.0)
    gov.update()
    assert torch.get_num_threads() == 3
    other_load(3.5)
    gov.update()
    assert torch.get_num_threads() == 1  # never fewer than one
    other_load(0.1)
    gov.update()
    assert torch.get_num_threads() == 4  # never more than it started with


def test_no_proc_stat_changes_nothing(four_threads):
    now = [0.0]
    gov = ThreadGovernor(clock=lambda: now[0], busy_cpu_seconds=lambda: None)
    now[0] += 10
    gov.update()
    assert torch.get_num_threads() == 4


def test_fixed_num_threads_turns_it_off(make_tiny_engine):
    before = torch.get_num_threads()
    try:
        assert make_tiny_engine(num_threads=1).threads is None
        assert torch.get_num_threads() == 1
        assert make_tiny_engine().threads is not None
    finally:
        torch.set_num_threads(before)
