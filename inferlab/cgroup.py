"""What a container's cgroup lets this process use: CPUs' worth of time and bytes of memory.

Neither shows where PyTorch and the OS look: the affinity mask lists every core of the host and
/proc/meminfo its whole memory, while `docker run --cpus 1 --memory 2g` (or a Kubernetes limit)
allows a share of them. The limits are read from the process's own cgroup and every ancestor up to
the mount's root, cgroup v2 (`cpu.max`, `memory.max`) or v1 (`cpu.cfs_quota_us`,
`memory.limit_in_bytes`), and the tightest counts. In a container without a cgroup namespace,
/proc/self/cgroup names the host's path, which the container's mount lacks: the nearest folder that
exists, the mount's root, is the container's own cgroup.
"""
from __future__ import annotations

from pathlib import Path

ROOT, OWN = "/sys/fs/cgroup", "/proc/self/cgroup"
NO_LIMIT = 1 << 60  # v1 writes "no limit" as the largest page count it has (about 2**63)


def _folders(controller: str, root: str, own: str) -> list[tuple[Path, bool]]:
    """(folder, is v1) of this process's cgroup and its ancestors for `controller`, innermost first."""
    try:
        lines = Path(own).read_text().splitlines()
    except OSError:
        return []
    found: dict[Path, bool] = {}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v1 = controller in controllers.split(",")
        if controllers and not v1:
            continue
        # v1 mounts a controller under its group's name ("cpu,cpuacct"), often linked by its own
        for base in ([Path(root) / controllers, Path(root) / controller] if v1 else [Path(root)]):
            folder = base / path.strip("/")
            for d in [folder, *folder.parents]:
                if d.is_dir():
                    found.setdefault(d, v1)
                if d == base:
                    break
    return list(found.items())


def _number(path: Path) -> int | None:
    """The file's first word as an integer; None for "max", a missing file or anything else."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(path: Path, key: str) -> int:
    try:
        return next((int(line.split()[1]) for line in path.read_text().splitlines() if line.split()[:1] == [key]), 0)
    except (OSError, ValueError, IndexError):
        return 0


def cpu_limit(root: str = ROOT, own: str = OWN) -> float | None:
    """CPUs' worth of time a CPU quota allows (1.5: one and a half CPUs), or None where there is none."""
    limits = []
    for d, v1 in _folders("cpu", root, own):
        if v1:
            quota, period = _number(d / "cpu.cfs_quota_us"), _number(d / "cpu.cfs_period_us")
        else:
            try:
                words = (d / "cpu.max").read_text().split()
                quota, period = (None if words[0] == "max" else int(words[0])), int(words[1])
            except (OSError, ValueError, IndexError):
                continue
        if quota is not None and quota > 0 and period:
            limits.append(quota / period)
    return min(limits) if limits else None


def memory_limit(root: str = ROOT, own: str = OWN) -> tuple[int, int] | None:
    """(limit, free) in bytes under the tightest memory limits, or None where there is none. Free is
    a limit less what its cgroup uses, not counting file pages untouched lately (the kernel reclaims
    them before it kills anything), as `docker stats` counts."""
    limits, frees = [], []
    for d, v1 in _folders("memory", root, own):
        limit = _number(d / ("memory.limit_in_bytes" if v1 else "memory.max"))
        if limit is None or limit >= NO_LIMIT:
            continue
        used = _number(d / ("memory.usage_in_bytes" if v1 else "memory.current")) or 0
        limits.append(limit)
        frees.append(max(0, limit - used + _stat(d / "memory.stat", "total_inactive_file" if v1 else "inactive_file")))
    return (min(limits), min(frees)) if limits else None
