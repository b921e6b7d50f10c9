"""The two caches under test and the upstream link as processes, and what the harness reads
from /proc about them.

Both caches run as child processes on ``127.0.0.1:<free port>`` with their own storage under
the harness's work directory, logs appended to a file there.  ``cold()`` stops a cache, wipes
its storage and starts it again on the same port.  The upstream link (``bench/link.py``) runs
the same way, in front of the upstream registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.ports import LoopbackService, Service, free_port, wait_http_ok

__all__ = [
    "CacheServer",
    "CpuMeter",
    "ForeignLoad",
    "MirrorServer",
    "ReferenceProxy",
    "RssSampler",
    "UpstreamLink",
    "foreign_load",
    "get_ok",
    "io_chars",
    "tree_cpu_seconds",
    "tree_rss",
    "wait_quiet",
]

STOP_TIMEOUT = 10.0
LINK_SCRIPT = Path(__file__).with_name("link.py")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``STOP_TIMEOUT``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


class CacheServer(LoopbackService, Service):
    """A pull-through cache process the harness starts, stops and restarts cold."""

    #: short name used in tables and JSON ("mirror", "reference")
    name = "cache"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: images pulled through the current incarnation (cleared by ``cold``)
        self.warm: set[str] = set()

    # ------------------------------------------------------------------ to override
    @property
    def storage(self) -> Path:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    # ------------------------------------------------------------------ addresses
    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        self.storage.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== bench: start #{self.starts} at {time.ctime()} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
            )
        try:
            response = wait_http_ok(
                f"{self.url}/v2/",
                timeout=timeout,
                process=self.process,
                stderr_path=self.log_path,
                name=self.name,
            )
            if response.status_code != 200:
                raise RuntimeError(f"{self.name}: GET /v2/ answered {response.status_code}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _stop(process)

    def cold(self) -> None:
        """Stop, wipe the storage, start again: nothing cached, nothing in memory."""
        self.stop()
        shutil.rmtree(self.storage, ignore_errors=True)
        self.warm.clear()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class MirrorServer(CacheServer):
    """``mirror serve`` with a generated config: ``workers`` workers (one unless told), the
    upstream as ``docker.io``."""

    name = "mirror"

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        executable: Path,
        shared: SharedStorage | None = None,
        tree: Path | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__(workdir)
        self.workers = workers
        self.executable = executable.absolute()
        # Another source tree's ``mirror`` package (an older commit, for A/B), run with
        # this venv's libraries.
        self.tree = tree.resolve() if tree is not None else None
        self.config_path = workdir / "mirror.toml"
        self.upstream_url = upstream_url
        self.shared = shared
        self._write_config()

    def _write_config(self) -> None:
        config = (
            "[server]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"workers = {self.workers}\n"
            'log_level = "warning"\n'
            "[cache]\n"
            f"directory = {json.dumps(str(self.storage))}\n"
            'max_size = "20GiB"\n'
            "[[upstreams]]\n"
            'name = "docker.io"\n'
            f"url = {json.dumps(self.upstream_url)}\n"
            # A full run lasts ~9 minutes: with the default 5m, a tag record made in one
            # step can lapse in a later one, whose warm figure then counts the
            # revalidation as an upstream request (step 3's record, in step 7). Warm
            # steps measure a warm cache; revalidation is the tests' to check.
            'tag_ttl = "1h"\n'
        )
        if self.shared is not None:
            # A replica of one: a fresh key prefix per cold start, so that cold is cold
            # in the bucket and in Redis too.
            config += (
                "[storage]\n"
                'backend = "s3"\n'
                f"endpoint = {json.dumps(self.shared.endpoint)}\n"
                f"bucket = {json.dumps(self.shared.bucket)}\n"
                f"prefix = {json.dumps(f'bench-{secrets.token_hex(4)}/')}\n"
                f"advertise_url = {json.dumps(self.url)}\n"
            )
        self.config_path.write_text(config)

    def cold(self) -> None:
        if self.shared is not None:
            self.stop()
            self._write_config()
        super().cold()

    @property
    def storage(self) -> Path:
        return self.workdir / "mirror-cache"

    def argv(self) -> list[str]:
        if self.tree is not None:
            return [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)]
        return [str(self.executable), "serve", "--config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        # MIRROR_* variables would override the generated config.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        if self.tree is not None:
            environ["PYTHONPATH"] = str(self.tree)
        if self.shared is not None:
            environ.update(self.shared.environment)
        return environ


@dataclass(frozen=True)
class SharedStorage:
    """A bucket and a Redis for the mirror to run as a replica (``--storage s3``)."""

    endpoint: str
    bucket: str
    environment: dict[str, str]


class ReferenceProxy(CacheServer):
    """CNCF distribution (``docker-registry``) in proxy mode: the reference pull-through cache.

    It fetches its own anonymous tokens from the upstream's token server.  Its access log and
    info-level request log are off (the mirror logs no line per request either).  It exits at
    start when the upstream is down, so start it after the upstream.
    """

    name = "reference"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir)
        self.config_path = workdir / "reference.yml"
        config = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            "proxy": {"remoteurl": upstream_url},
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    @property
    def storage(self) -> Path:
        return self.workdir / "reference-storage"

    def argv(self) -> list[str]:
        return ["docker-registry", "serve", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


class UpstreamLink(LoopbackService, Service):
    """``bench/link.py`` in its own process: a TCP proxy on ``127.0.0.1:<free port>`` in
    front of ``target`` (the upstream registry) that shares ``rate`` bytes/s (0: no limit)
    among all the bytes going back to its clients and waits ``latency_ms`` before opening each
    connection to the target.  Ready when it has written ``LINK-READY`` to its log; at stop it
    writes its counters (``summary``)."""

    name = "link"

    def __init__(self, workdir: Path, target: str, rate: float, latency_ms: float) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.rate = rate
        self.latency_ms = latency_ms
        self.port = free_port()
        self.log_path = workdir / "link.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the upstream link is not running")
        return self.process.pid

    def start(self, timeout: float = 30) -> None:
        argv = [sys.executable, str(LINK_SCRIPT), "--listen", self.host, "--target", self.target]
        argv += ["--rate", repr(self.rate), "--latency-ms", repr(self.latency_ms)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while "LINK-READY" not in self.log_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the upstream link did not start:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _stop(process)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self) -> dict[str, Any] | None:
        """The counters it wrote when it stopped (bytes each way, connections, waits)."""
        for line in reversed(self.log_text().splitlines()):
            if line.startswith("LINK-SUMMARY "):
                found: dict[str, Any] = json.loads(line.removeprefix("LINK-SUMMARY "))
                return found
        return None


# ---------------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(root: int) -> int:
    """Resident set size in bytes of ``root`` and all its descendants (VmRSS summed)."""
    children = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_kib(pid)
        todo.extend(children.get(pid, ()))
    return total * 1024


class RssSampler:
    """Samples :func:`tree_rss` of a process every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.first = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            rss = tree_rss(self.pid)
            if self.samples == 0:
                self.first = rss
            self.samples += 1
            self.peak = max(self.peak, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its living descendants."""
    children = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _cpu_ticks(pid)
        todo.extend(children.get(pid, ()))
    return total / _TICKS


def _system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def _processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, CPU ticks used so far)."""
    found: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def _tree(root: int, processes: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    tree: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return text[:160] or f"[pid {pid}]"


@dataclass(frozen=True)
class ForeignLoad:
    others_share: float  #: share of all cores' time used by processes outside the tree
    busiest: list[dict[str, Any]]  #: the busiest of them: pid, share, command


class _OtherProcesses:
    """CPU used, from creation to :meth:`stop`, by user-space processes that are not this
    process or its descendants (kernel threads, e.g. writeback of our own files, are left
    out): another job on a shared machine."""

    def __init__(self) -> None:
        self._before = _processes()
        self._system = _system_ticks()

    def stop(self) -> ForeignLoad:
        after = _processes()
        elapsed = _system_ticks()[1] - self._system[1]
        me = os.getpid()
        mine = _tree(me, self._before) | _tree(me, after)
        used: dict[int, int] = {}
        for pid, (parent, ticks) in after.items():
            if pid in mine or pid == 2 or parent == 2:
                continue
            spent = ticks - self._before.get(pid, (parent, 0))[1]
            if spent > 0:
                used[pid] = spent
        busiest = sorted(used.items(), key=lambda item: -item[1])[:5]
        return ForeignLoad(
            others_share=round(sum(used.values()) / elapsed, 3) if elapsed else 0.0,
            busiest=[
                {"pid": pid, "share": round(ticks / elapsed, 3), "command": _command(pid)}
                for pid, ticks in busiest
            ],
        )


def foreign_load(seconds: float = 1.0) -> ForeignLoad:
    """How much of the machine other processes use over ``seconds`` (see ``CpuMeter``)."""
    others = _OtherProcesses()
    time.sleep(seconds)
    return others.stop()


class CpuMeter:
    """CPU seconds a process tree used, how busy the whole machine was, and how much of it
    went to processes that are not the benchmark's (another job on a shared machine)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = 0.0
        self.machine_busy = 0.0  #: fraction of all cores' time that was not idle
        self.others: ForeignLoad = ForeignLoad(0.0, [])
        self._start = 0.0
        self._system = (0, 0)
        self._others: _OtherProcesses | None = None

    def __enter__(self) -> CpuMeter:
        self._start = tree_cpu_seconds(self.pid)
        self._system = _system_ticks()
        self._others = _OtherProcesses()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = tree_cpu_seconds(self.pid) - self._start
        busy, total = _system_ticks()
        elapsed = total - self._system[1]
        if elapsed:
            self.machine_busy = (busy - self._system[0]) / elapsed
        if self._others is not None:
            self.others = self._others.stop()

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_seconds": round(self.seconds, 2),
            "machine_busy": round(self.machine_busy, 3),
            "others_share": self.others.others_share,
            "others_busiest": self.others.busiest[:2],
        }


def io_chars(pid: int) -> int:
    """Bytes a process moved through read/write/sendfile so far (rchar + wchar)."""
    total = 0
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            key, _, value = line.partition(":")
            if key in ("rchar", "wchar"):
                total += int(value)
    return total


def tree_io_chars(root: int) -> int:
    """:func:`io_chars` of ``root`` and its living descendants."""
    children = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):  # gone meanwhile
            total += io_chars(pid)
        todo.extend(children.get(pid, ()))
    return total


# What a quiet server still moves in a second: a uvicorn supervisor's health checks
# of its workers are a few bytes through pipes.
_CHATTER = 4096


def wait_quiet(pid: int, quiet_for: float = 1.0, timeout: float = 300.0) -> float:
    """Wait until ``pid`` and its descendants have moved (next to) no byte for
    ``quiet_for`` seconds; return the wait.

    Used on the upstream registry: distribution's proxy keeps fetching a blob in the
    background after its client is served, and those bytes count.
    """
    start = time.monotonic()
    deadline = start + timeout
    since = tree_io_chars(pid)
    still_since = time.monotonic()
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        current = tree_io_chars(pid)
        if current - since > _CHATTER * quiet_for:
            since, still_since = current, now
        elif now - still_since >= quiet_for:
            return now - start
        if now > deadline:
            raise TimeoutError(f"process {pid} still busy after {timeout:.0f}s")


def get_ok(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One GET that must answer 200 (used to warm caches up)."""
    response = httpx.get(url, headers=headers, timeout=120, trust_env=False)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return response
