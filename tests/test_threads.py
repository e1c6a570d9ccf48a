"""The thread governor: the model uses the cores other processes leave free."""
from __future__ import annotations

import logging
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


class Machine:
    """A fake clock and /proc/stat: each `load(cores)` lets 2 s pass with `cores` busy elsewhere."""

    def __init__(self) -> None:
        self.now, self.busy = 0.0, 0.0

    def load(self, cores: float) -> None:
        own = time.process_time()
        self.now += 2.0
        self.busy += 2.0 * cores + (time.process_time() - own)

    def governor(self, spare: int | None = None) -> ThreadGovernor:
        return ThreadGovernor(interval=2.0, clock=lambda: self.now, busy_cpu_seconds=lambda: self.busy, spare=spare)


def test_threads_follow_the_free_cores(four_threads):
    m = Machine()
    gov = m.governor()
    assert gov.max_threads == 4
    gov.update()  # before an interval has passed: nothing measured, nothing changed
    assert torch.get_num_threads() == 4
    m.load(1.0)
    gov.update()
    assert torch.get_num_threads() == 4  # one reading could be a spike
    m.load(1.0)
    gov.update()
    assert torch.get_num_threads() == 3  # a second one confirms: a core is taken
    m.load(3.5)
    gov.update()
    m.load(3.5)
    gov.update()
    assert torch.get_num_threads() == 1  # never fewer than one
    m.load(0.1)
    gov.update()
    assert torch.get_num_threads() == 4  # never more than it started with; freed cores are used at once


def test_cores_beyond_the_threads_are_others_to_keep_busy(four_threads):
    """4 threads on a 64-core host (a container's CPU quota): 60 cores kept busy elsewhere still
    leave 4 free. Counted as on a 4-core machine, they took every thread but one."""
    m = Machine()
    gov = m.governor(spare=60)
    for _ in range(3):
        m.load(60.0)
        gov.update()
        assert torch.get_num_threads() == 4
    m.load(61.0)
    gov.update()
    m.load(61.0)
    gov.update()
    assert torch.get_num_threads() == 3  # the 61st busy core is one of ours


def test_busy_time_is_read_for_this_process_cpus():
    import os

    from inferlab.threads import _busy_cpu_seconds
    cpus = sorted(os.sched_getaffinity(0))
    whole, ours = _busy_cpu_seconds(), _busy_cpu_seconds(frozenset(cpus))
    one = _busy_cpu_seconds(frozenset(cpus[:1]))
    assert whole is not None and ours is not None and one is not None
    assert 0 < one <= ours <= whole + 1  # (read a moment apart)
    assert _busy_cpu_seconds(frozenset({10**6})) is None  # no such CPU: no reading


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_client_under_a_core_keeps_both_threads(two_threads):
    """A benchmark client works in bursts, 0.4 to 0.8 of a core: yielding to it cost throughput,
    and flipping around a threshold logged a line every few seconds."""
    m = Machine()
    gov = m.governor()
    for cores in [0.4, 0.8, 0.7, 0.5, 0.8, 0.8, 0.6, 0.4, 0.85] * 3:
        m.load(cores)
        gov.update()
        assert torch.get_num_threads() == 2, cores
    assert gov.changes == 0


def test_a_busy_process_takes_a_core_until_it_leaves_half_of_it(two_threads):
    m = Machine()
    gov = m.governor()
    for cores, threads in [(1.0, 2), (1.0, 1), (0.7, 1), (0.6, 1), (0.4, 2)]:
        m.load(cores)
        gov.update()
        assert torch.get_num_threads() == threads, cores


def test_changes_are_logged_once_then_quietly(two_threads, caplog):
    m = Machine()
    gov = m.governor()
    with caplog.at_level(logging.DEBUG, logger="inferlab"):
        for _ in range(10):  # a process that comes and goes every few seconds
            for cores in (1.0, 1.0, 0.0):
                m.load(cores)
                gov.update()
    changes = [r for r in caplog.records if "threads (" in r.getMessage()]
    assert gov.changes == 20 and len(changes) == 20
    assert [r.levelno for r in changes].count(logging.INFO) == 1  # within LOG_EVERY_S of the first


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


def test_more_threads_than_cpus_are_capped_with_a_warning(make_tiny_engine, caplog):
    """999 on the 2-core VM made 2,000 threads wait for each other at every barrier."""
    import os
    before, cpus = torch.get_num_threads(), len(os.sched_getaffinity(0))
    try:
        with caplog.at_level(logging.WARNING, logger="inferlab"):
            make_tiny_engine(num_threads=999)
        assert torch.get_num_threads() == cpus
        assert f"999 threads asked for, more than the {cpus} CPUs this process may use: using {cpus}" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_threads_follow_a_cpu_quota(monkeypatch, four_threads, caplog):
    """A container allowed 1.2 CPUs' time on a 4-core host: one thread, not four spinning on a share."""
    import os

    from inferlab import threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: 2.5)
    assert threads.usable_cpus() == 3  # the nearest whole CPU: half of one left idle costs more
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: 9.0)
    assert threads.usable_cpus() == 4  # never more than the affinity mask
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: 1.2)
    assert threads.usable_cpus() == 1
    with caplog.at_level(logging.INFO, logger="inferlab"):
        assert threads.default_threads() == 1
    assert torch.get_num_threads() == 1
    assert "using 1 thread, not 4: a cgroup CPU quota allows 1.2 CPUs' time" in caplog.text
    assert threads.fixed_threads(3) == 1
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: 0.2)
    assert threads.usable_cpus() == 1  # never none
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: None)
    torch.set_num_threads(4)
    assert threads.default_threads() == 4 and torch.get_num_threads() == 4


def test_an_engine_without_num_threads_starts_within_the_quota(monkeypatch, make_tiny_engine):
    from inferlab import threads
    before = torch.get_num_threads()
    monkeypatch.setattr(threads.cgroup, "cpu_limit", lambda: 1.0)
    try:
        torch.set_num_threads(2)
        engine = make_tiny_engine()
        assert torch.get_num_threads() == 1 and engine.threads.max_threads == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cc,spin", [("gcc", "3000000"), ("clang -g", "1000"), ("ccache /usr/bin/clang", "1000"),
                                     ('clang "', "3000000")])
def test_idle_threads_spin_briefly_where_clang_builds_the_kernels(cc, spin, tmp_path):
    """PyTorch's threads (GNU OpenMP) spin a few ms after each op; beside kernels on clang's OpenMP
    runtime that took their cores (the `cpu` workload at 57% of a gcc build's). Set at import, from
    CC as the kernel build reads it (a malformed one is the build's to refuse); a user's own setting
    is kept."""
    import os
    import subprocess
    import sys
    fake = tmp_path / "clang"  # resolves by name where clang is not installed
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(CC=cc, PATH=f"{tmp_path}:{env.get('PATH', '')}")
    read = "import inferlab, os; print(os.environ['GOMP_SPINCOUNT'], os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [spin, "ACTIVE"]
    if spin == "1000":
        done = subprocess.run([sys.executable, "-c", read], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True,
                              text=True, check=True)
        assert done.stdout.split() == ["5", "None"]
