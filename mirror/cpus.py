"""How many CPUs this process may keep busy: what ``workers = "auto"`` starts.

The CPUs it may run on (its affinity: ``taskset``, a cpuset), and no more than its
cgroup's CPU quota allows, rounded up: a container started with ``--cpus 2`` on a
64-core host sees 64 CPUs, and 64 workers there would share 2 CPUs' time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["usable_cpus"]

_CGROUPS = Path("/sys/fs/cgroup")
_OWN_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroups: Path = _CGROUPS, own_cgroup: Path = _OWN_CGROUP) -> int:
    cpus = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroups, own_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cpu_quota(cgroups: Path, own_cgroup: Path) -> float | None:
    """The smallest quota (in CPUs) of this process's cgroup and its ancestors, cgroup v2
    (``cpu.max``) or v1 (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None when
    there is none or it cannot be read."""
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: "0::/path"
            quotas += _along(cgroups, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            quotas += _along(cgroups / controllers, path, _v1_quota)
    return min(quotas, default=None)


def _along(root: Path, path: str, quota_of: Callable[[Path], float | None]) -> list[float]:
    """The quotas of ``root``/``path`` and of each directory above it up to ``root``. In a
    container the path named may not exist (the container's own cgroup is the root)."""
    found: list[float] = []
    directory = root / path.strip("/")
    while True:
        quota = quota_of(directory)
        if quota is not None:
            found.append(quota)
        if directory == root or root not in directory.parents:
            return found
        directory = directory.parent


def _v2_quota(directory: Path) -> float | None:
    try:
        limit, period = (directory / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        limit = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period
