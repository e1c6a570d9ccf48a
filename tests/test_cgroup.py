"""Reading a container's CPU and memory limits from cgroup files (v1 and v2), and what the engine
does with them."""
from __future__ import annotations

import pytest

from inferlab import cgroup, kv_pool


def _cgroup(tmp_path, own: str, files: dict[str, str]) -> tuple[str, str]:
    """A /sys/fs/cgroup tree of `files` (path: content) and a /proc/self/cgroup reading `own`."""
    for path, text in files.items():
        (tmp_path / "fs" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / path).write_text(text)
    (tmp_path / "cgroup").write_text(own)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


def test_v2_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    root, own = _cgroup(tmp_path, "0::/kubepods/pod1/app\n", {
        "cpu.max": "max 100000\n", "kubepods/cpu.max": "800000 100000\n",
        "kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/app/cpu.max": "max 100000\n"})
    assert cgroup.cpu_limit(root, own) == 2.5
    root, own = _cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup.cpu_limit(root, own) is None  # "max": no quota


def test_v1_quota_under_the_controllers_name(tmp_path):
    root, own = _cgroup(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup.cpu_limit(root, own) == 1.5


def test_a_container_sees_its_own_cgroup_at_the_mounts_root(tmp_path):
    """Without a cgroup namespace /proc/self/cgroup names the host's path, which the container's
    mount does not have: the limit is read from the nearest folder that exists, its root."""
    root, own = _cgroup(tmp_path, "3:cpu:/docker/0123abcd\n", {
        "cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup.cpu_limit(root, own) == 0.5
    assert cgroup.cpu_limit(root, str(tmp_path / "missing")) is None  # no /proc: no limit


def test_memory_limit_and_what_it_leaves_free(tmp_path):
    gib = 1 << 30
    root, own = _cgroup(tmp_path, "0::/app\n", {
        "memory.max": "max\n", "app/memory.max": f"{2 * gib}\n", "app/memory.current": f"{gib}\n",
        "app/memory.stat": f"anon 100\ninactive_file {gib // 4}\nactive_file 7\n"})
    assert cgroup.memory_limit(root, own) == (2 * gib, gib + gib // 4)  # idle page cache counts as free
    root, own = _cgroup(tmp_path / "v1", "9:memory:/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"})
    assert cgroup.memory_limit(root, own) is None  # v1's "no limit"
    root, own = _cgroup(tmp_path / "v1b", "9:memory:/docker/x\n", {
        "memory/memory.limit_in_bytes": f"{gib}\n", "memory/memory.usage_in_bytes": f"{3 * gib}\n"})
    assert cgroup.memory_limit(root, own) == (gib, 0)  # never less than nothing


def test_a_containers_memory_limit_sizes_the_default_pool(monkeypatch):
    """In a 1.5 GiB cgroup, a pool sized from the host's 24 GiB (4 GiB, touched at start) had the
    OOM killer end `inferlab bench` without a word."""
    import torch
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (1536 << 20, 1 << 30))
    assert kv_pool.physical_memory() == 1536 << 20
    assert kv_pool.default_kv_cache_memory(torch.device("cpu")) == (1536 << 20) // 5
    assert kv_pool.available_memory() <= 1 << 30
    with pytest.raises(ValueError, match="cannot be taken at start: 1.00 GiB is available"):
        kv_pool.allocate_zeroed((2 << 30,), torch.uint8, torch.device("cpu"), prefault=True)


def test_kernel_compilers_stay_within_the_cpus_and_memory(monkeypatch):
    """One compiler takes up to 0.45 GB: two under a 768 MiB limit were killed, and the engine after them."""
    from inferlab import threads
    from inferlab.kernels import builder
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(cgroup, "memory_limit", lambda: None)
    assert builder.compilers() == 8
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (4 << 30, (3 << 30) + (1 << 29)))
    assert builder.compilers() == 7
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (1536 << 20, 1100 << 20))
    assert builder.compilers() == 2
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (768 << 20, 700 << 20))
    assert builder.compilers() == 1


def test_swap_space_must_fit_beside_the_kv_pool(monkeypatch, make_tiny_engine):
    """Under a 768 MiB limit the default 4 GiB of swap filled as requests were swapped out, and the
    OOM killer ended the process without a word."""
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (768 << 20, 700 << 20))
    with pytest.raises(ValueError, match=r"swap_space 4 GiB with the KV pool's .* GiB is more than the 0.8 GiB of "
                                         r"memory this process may use; lower swap_space"):
        make_tiny_engine(preemption_mode="swap")
    assert make_tiny_engine(preemption_mode="swap", swap_space=0.25).scheduler is not None
    assert make_tiny_engine(preemption_mode="recompute").scheduler is not None  # no swap pool to fill


def test_the_start_up_line_says_a_containers_limit_sized_the_pool(monkeypatch, make_tiny_engine, caplog):
    import logging
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (1 << 30, 900 << 20))
    with caplog.at_level(logging.INFO, logger="inferlab"):
        make_tiny_engine(num_kv_blocks=None)
    assert "sized from a container's 1.0 GiB memory limit" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inferlab"):
        make_tiny_engine(num_kv_blocks=None, kv_cache_memory=1 << 20)  # chosen: nothing to explain
    assert "KV cache:" in caplog.text and "memory limit" not in caplog.text
