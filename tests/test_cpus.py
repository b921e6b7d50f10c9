"""workers = "auto": the CPUs this process may use, within its cgroup's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import ConfigError, parse
from mirror.cpus import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _cgroups(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    own_cgroup = tmp_path / "proc-self-cgroup"
    own_cgroup.write_text(own)
    return root, own_cgroup


def test_a_v2_quota_of_one_and_a_half_cpus_allows_two_workers(tmp_path: Path) -> None:
    root, own = _cgroups(
        tmp_path,
        "0::/kubepods/pod1/app\n",
        {"kubepods/pod1/app/cpu.max": "150000 100000\n", "kubepods/pod1/cpu.max": "max 100000\n"},
    )
    assert usable_cpus(root, own) == min(AFFINITY, 2)


def test_the_tightest_quota_above_the_process_counts(tmp_path: Path) -> None:
    root, own = _cgroups(
        tmp_path,
        "0::/kubepods/pod1/app\n",
        {"kubepods/pod1/app/cpu.max": "max 100000\n", "kubepods/cpu.max": "50000 100000\n"},
    )
    assert usable_cpus(root, own) == 1


def test_in_a_container_the_cgroup_named_may_be_the_root_itself(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc names the host's path, /sys/fs/cgroup is ours.
    root, own = _cgroups(
        tmp_path, "0::/system.slice/docker-abc.scope\n", {"cpu.max": "100000 100000"}
    )
    assert usable_cpus(root, own) == 1


def test_a_v1_quota_counts_too(tmp_path: Path) -> None:
    root, own = _cgroups(
        tmp_path,
        "12:memory:/docker/abc\nnot a cgroup line\n4:cpu,cpuacct:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert usable_cpus(root, own) == min(AFFINITY, 3)


@pytest.mark.parametrize("files", [{}, {"cpu.max": "max 100000"}, {"cpu.max": "garbage"}])
def test_no_quota_or_none_readable_leaves_the_affinity(
    tmp_path: Path, files: dict[str, str]
) -> None:
    root, own = _cgroups(tmp_path, "0::/\n", files)
    assert usable_cpus(root, own) == AFFINITY
    assert usable_cpus(root, tmp_path / "no-such-file") == AFFINITY


def test_workers_auto_in_the_file_or_the_environment() -> None:
    upstreams = [{"name": "docker.io", "url": "https://registry-1.docker.io"}]
    expected = usable_cpus()
    assert parse({"server": {"workers": "auto"}, "upstreams": upstreams}, {}).server.workers == (
        expected
    )
    environ = {"MIRROR_SERVER_WORKERS": "auto"}
    assert parse({"upstreams": upstreams}, environ).server.workers == expected
    with pytest.raises(ConfigError, match='"auto"'):
        parse({"server": {"workers": "all"}, "upstreams": upstreams}, {})
