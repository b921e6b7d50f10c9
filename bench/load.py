"""Load generators: concurrent skopeo pulls, wrk on manifests, curl on blobs.

Every client is a child process the harness waits for; whatever is still running when a
wait is interrupted (Ctrl-C, an error) is killed before the exception goes on.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import skopeo

__all__ = [
    "BlobRun",
    "PullRun",
    "WrkRun",
    "blob_throughput",
    "check_pulled",
    "concurrent_pulls",
    "remove_pulls",
    "run_wrk",
    "run_wrk_mix",
]

PULL_TIMEOUT = 600.0


@contextlib.contextmanager
def _reaped(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Kill and reap every process of the list still running when the block is left."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


def _pinned(argv: list[str], cpus: str | None) -> list[str]:
    """``argv`` run on the CPUs listed (``taskset -c``), or anywhere when None."""
    return argv if cpus is None else ["taskset", "-c", cpus, *argv]


# ---------------------------------------------------------------------------------- skopeo


@dataclass(frozen=True)
class PullRun:
    wall_seconds: float  #: first skopeo started → last skopeo exited
    seconds: tuple[float, ...]  #: each pull's own duration
    digests: tuple[str, ...]  #: manifest digest each pull wrote
    #: CPU seconds (user + system) the skopeo processes used: on 2 cores, ten clients
    #: checking and writing 512 MiB each can be what bounds the wall time
    client_cpu_seconds: float = 0.0
    #: the system part, which is what grows when a cache keeps ten clients busy on two
    #: cores (see bench/README.md)
    client_system_seconds: float = 0.0


def concurrent_pulls(
    host: str, repo_tag: str, out_root: Path, count: int, *, timeout: float = PULL_TIMEOUT
) -> PullRun:
    """``count`` simultaneous ``skopeo copy docker://HOST/REPO_TAG dir:OUT_i`` (anonymous).

    skopeo checks every blob against its digest while copying; a failed pull raises
    :class:`~tests.support.skopeo.SkopeoError` with its stderr.  The output directories are
    left in ``out_root`` for the caller to check and remove.
    """
    with tempfile.TemporaryDirectory(prefix="skopeo-iso-", dir=out_root) as iso:
        conf = Path(iso) / "registries.conf"
        conf.write_text("")  # no mirrors, no aliases: nothing redirected anywhere
        authfile = Path(iso) / "auth.json"
        authfile.write_text("{}")
        argvs: list[list[str]] = []
        for i in range(count):
            out = out_root / f"pull-{i}"
            out.mkdir(parents=True, exist_ok=True)
            argvs.append(
                [
                    skopeo.SKOPEO,
                    "--insecure-policy",
                    "--registries-conf",
                    str(conf),
                    "copy",
                    "--retry-times",
                    "0",
                    "--digestfile",
                    str(Path(iso) / f"digest-{i}"),
                    "--src-tls-verify=false",
                    "--src-authfile",
                    str(authfile),
                    f"docker://{host}/{repo_tag}",
                    f"dir:{out}",
                ]
            )
        processes: list[subprocess.Popen[bytes]] = []
        ended: dict[int, float] = {}
        with _reaped(processes):
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.monotonic()
            for argv in argvs:
                processes.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                )
            deadline = start + timeout
            while len(ended) < count:
                for i, process in enumerate(processes):
                    if i not in ended and process.poll() is not None:
                        ended[i] = time.monotonic()
                if time.monotonic() > deadline:
                    raise skopeo.SkopeoError(
                        f"skopeo pulls of {repo_tag} from {host} timed out", argvs[0], None, ""
                    )
                time.sleep(0.005)
            wall = max(ended.values()) - start
            reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
            client_system = reaped.ru_stime - children.ru_stime
            client_cpu = reaped.ru_utime - children.ru_utime + client_system
            for i, process in enumerate(processes):
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                if process.stderr:
                    process.stderr.close()
                if process.returncode != 0:
                    raise skopeo.SkopeoError(
                        f"skopeo pull {i} of {repo_tag} from {host} exited with "
                        f"{process.returncode}:\n{stderr[-4000:]}",
                        argvs[i],
                        process.returncode,
                        stderr,
                    )
        digests = tuple((Path(iso) / f"digest-{i}").read_text().strip() for i in range(count))
    return PullRun(
        wall_seconds=wall,
        seconds=tuple(ended[i] - start for i in range(count)),
        digests=digests,
        client_cpu_seconds=round(client_cpu, 2),
        client_system_seconds=round(client_system, 2),
    )


def check_pulled(out_root: Path, count: int, blob_sizes: Mapping[str, int]) -> None:
    """Every ``pull-i`` directory holds every blob at its expected size (skopeo has already
    checked the digests while copying)."""
    for i in range(count):
        present = skopeo.dir_blobs(out_root / f"pull-{i}")
        for digest, size in blob_sizes.items():
            if present.get(digest) != size:
                raise AssertionError(
                    f"pull {i}: blob {digest} has {present.get(digest)} bytes, expected {size}"
                )


def remove_pulls(out_root: Path, count: int) -> None:
    for i in range(count):
        shutil.rmtree(out_root / f"pull-{i}", ignore_errors=True)


# ---------------------------------------------------------------------------------- wrk

_WRK_SCRIPT = """
wrk.method = "GET"
{headers}
{requests}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-WRK {{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, " ..
    "\\"connect_errors\\": %d, \\"read_errors\\": %d, \\"write_errors\\": %d, " ..
    "\\"status_errors\\": %d, \\"timeouts\\": %d, \\"p50_us\\": %d, \\"p90_us\\": %d, " ..
    "\\"p99_us\\": %d, \\"max_us\\": %d}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkRun:
    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]  #: connect/read/write errors, timeouts, non-2xx/3xx answers
    bytes: int


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str,
    headers: Mapping[str, str],
    *,
    threads: int,
    connections: int,
    seconds: float,
    workdir: Path,
) -> WrkRun:
    """``wrk -tT -cC -dDs --latency -s SCRIPT URL``; the script sets the headers and prints
    the summary as JSON (``done`` callback), which is parsed instead of wrk's text."""
    header_lines = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()
    )
    return _wrk(url, header_lines, threads, connections, seconds, workdir)


# Each thread formats its requests once and goes round them from a random start, so the
# connections do not ask for the same thing in step and the client spends little per request.
_WRK_MIX = """
local mix = {{
{entries}
}}
local formatted = {{}}
local position = 0
init = function(args)
  for _, entry in ipairs(mix) do
    table.insert(formatted, wrk.format("GET", entry[1], entry[2]))
  end
  position = math.random(#formatted)
end
request = function()
  position = position % #formatted + 1
  return formatted[position]
end
"""


def run_wrk_mix(
    url: str,
    requests: Sequence[tuple[str, Mapping[str, str]]],
    *,
    threads: int,
    connections: int,
    seconds: float,
    workdir: Path,
    cpus: str | None = None,
) -> WrkRun:
    """wrk going round a list of ``(path, headers)`` GETs on the server at ``url``, each
    connection from its own thread's position; the summary as :func:`run_wrk` reads it."""
    entries = ",\n".join(
        f"  {{{_lua_string(path)}, {{"
        + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        + "}}"
        for path, headers in requests
    )
    script = _WRK_MIX.format(entries=entries)
    return _wrk(url, "", threads, connections, seconds, workdir, requests=script, cpus=cpus)


def _wrk(
    url: str,
    header_lines: str,
    threads: int,
    connections: int,
    seconds: float,
    workdir: Path,
    *,
    requests: str = "",
    cpus: str | None = None,
) -> WrkRun:
    script = workdir / "bench-wrk.lua"
    script.write_text(_WRK_SCRIPT.format(headers=header_lines, requests=requests))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    argv = _pinned(argv, cpus)
    result = subprocess.run(
        argv, capture_output=True, timeout=seconds + 60, stdin=subprocess.DEVNULL, check=False
    )
    out = result.stdout.decode(errors="replace")
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH-WRK ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({result.returncode}): {out[-2000:]}{result.stderr.decode()[-2000:]}"
        )
    data = json.loads(line.removeprefix("BENCH-WRK "))
    duration = data["duration_us"] / 1e6
    return WrkRun(
        requests=data["requests"],
        seconds=duration,
        requests_per_second=data["requests"] / duration if duration else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors={
            k: int(data[k])
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        },
        bytes=data["bytes"],
    )


# ---------------------------------------------------------------------------------- curl


@dataclass(frozen=True)
class BlobRun:
    streams: int
    rounds: int
    bytes: int  #: body bytes received over all downloads
    wall_seconds: float

    @property
    def mb_per_second(self) -> float:
        """Aggregate throughput in MB/s (10^6 bytes per second)."""
        return self.bytes / self.wall_seconds / 1e6


def blob_throughput(
    url: str,
    headers: Mapping[str, str],
    size: int,
    *,
    streams: int,
    rounds: int,
    timeout: float = PULL_TIMEOUT,
    cpus: str | None = None,
) -> BlobRun:
    """``streams`` curl processes in parallel, each downloading the blob ``rounds`` times in a
    row to /dev/null; every download must be a 200 of exactly ``size`` bytes."""
    argv = ["curl", "--silent", "--show-error", "--fail", "--noproxy", "*"]
    argv += ["--max-time", str(int(timeout)), "--write-out", "%{http_code} %{size_download}\\n"]
    for key, value in headers.items():
        argv += ["--header", f"{key}: {value}"]
    # one curl, `rounds` URLs: the downloads of a stream reuse its connection
    for _ in range(rounds):
        argv += ["--output", "/dev/null", url]
    processes: list[subprocess.Popen[bytes]] = []
    with _reaped(processes):
        start = time.monotonic()
        for _ in range(streams):
            processes.append(
                subprocess.Popen(
                    _pinned(argv, cpus),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        outputs = [process.communicate(timeout=timeout) for process in processes]
        wall = time.monotonic() - start
    total = 0
    for process, (out, err) in zip(processes, outputs, strict=True):
        lines = out.decode().split()
        if process.returncode != 0 or len(lines) != 2 * rounds:
            raise RuntimeError(f"curl {url} failed ({process.returncode}): {err.decode()[-500:]}")
        for status, received in zip(lines[0::2], lines[1::2], strict=True):
            if status != "200" or int(received) != size:
                raise RuntimeError(f"curl {url}: HTTP {status}, {received} of {size} bytes")
            total += int(received)
    return BlobRun(streams=streams, rounds=rounds, bytes=total, wall_seconds=wall)
