"""Two workers of a real ``mirror serve`` sharing fills: whichever worker fills a blob,
a response that ends cleanly carries exactly the blob's bytes, and a follower never
takes the moments between lock, temp file, rename and index commit for a failure."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeRegistry
from tests.support.mirror import MirrorProcess, run_cli, write_config
from tests.support.ports import free_port, wait_http_ok
from tests.support.quirky import QuirkyUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream() -> Iterator[QuirkyUpstream]:
    with QuirkyUpstream(FakeRegistry()) as quirky:
        yield quirky


def _mirror(upstream: QuirkyUpstream, **cache: Any) -> MirrorProcess:
    entry = {"name": "docker.io", "url": upstream.url, "retries": 0}
    return MirrorProcess([entry], workers=2, **cache)


def _pull(url: str) -> tuple[str, str]:
    """("ok", digest) for a body that ended cleanly, ("aborted", "") for a broken one,
    or ("status N", message) for an error answer."""
    hasher = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=60) as response:
            if response.status_code != 200:
                return f"status {response.status_code}", response.read().decode()[:200]
            for chunk in response.iter_bytes():
                hasher.update(chunk)
    except httpx.HTTPError:
        return "aborted", ""
    return "ok", "sha256:" + hasher.hexdigest()


def test_followers_in_either_worker_never_end_cleanly_on_a_failed_fills_bytes(
    upstream: QuirkyUpstream,
) -> None:
    """The upstream sends no Content-Length and breaks off the first fills at 40%, while
    requests keep arriving: some follow a fill that fails, in the other worker, while a
    new fill of the same blob starts."""
    digest = upstream.registry.add_blob(os.urandom(8 * 1024 * 1024))
    upstream.no_length, upstream.break_blobs, upstream.piece_delay = True, 3, 0.004
    with _mirror(upstream) as mirror:
        url = f"{mirror.url}/v2/library/x/blobs/{digest}"
        start = time.monotonic()

        def arrive(i: int) -> tuple[str, str]:
            time.sleep(max(start + i * 0.02 - time.monotonic(), 0))  # a steady stream
            return _pull(url)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(arrive, range(200)))
    wrong = [r for r in results if r[0] == "ok" and r[1] != digest]
    assert wrong == [], f"{len(wrong)} clean responses with wrong bytes: {Counter(results)}"
    assert any(r == ("ok", digest) for r in results), Counter(results)


def test_no_spurious_503_when_many_requests_race_for_each_digest_across_workers(
    upstream: QuirkyUpstream,
) -> None:
    blobs = [upstream.registry.add_blob(os.urandom(32 * 1024)) for _ in range(40)]
    with _mirror(upstream) as mirror:
        urls = [f"{mirror.url}/v2/library/x/blobs/{d}" for d in blobs for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(_pull, urls))
    expected = [("ok", d) for d in blobs for _ in range(8)]
    failures = Counter(r for r, e in zip(results, expected, strict=True) if r != e)
    assert not failures, failures


def _gauge(mirror: MirrorProcess, name: str) -> float:
    text = httpx.get(f"{mirror.url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    return sum(values)


def test_a_killed_workers_live_gauges_are_dropped(upstream: QuirkyUpstream) -> None:
    digest = upstream.registry.add_blob(os.urandom(4 * 1024 * 1024))
    upstream.piece_delay = 0.05  # a fill of some seconds
    with _mirror(upstream) as mirror:
        url = f"{mirror.url}/v2/library/x/blobs/{digest}"
        with httpx.stream("GET", url, timeout=30) as response:
            next(response.iter_bytes())
            assert _gauge(mirror, "mirror_fills_in_flight") == 1
            workers = set(mirror.pids()[1:])
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
        # uvicorn's supervisor starts new workers; wait until both answer.
        deadline = time.monotonic() + 60
        while len(set(mirror.pids()[1:]) - workers) < 2:
            assert time.monotonic() < deadline, "workers were not restarted"
            time.sleep(0.05)
        wait_http_ok(f"{mirror.url}/v2/")
        assert _gauge(mirror, "mirror_fills_in_flight") == 0


@pytest.mark.parametrize("cpus", ["one", "all"])
def test_workers_auto_starts_one_per_cpu_the_server_may_run_on(
    upstream: QuirkyUpstream, cpus: str
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    pinned = allowed[:1] if cpus == "one" else allowed
    entry = {"name": "docker.io", "url": upstream.url}
    mirror = MirrorProcess([entry], extra_args=("--workers", "auto"))
    mirror.wrapper = ("taskset", "-c", ",".join(map(str, pinned)))
    with mirror:
        # One worker is the process itself; more are its children.
        assert (len(mirror.spawned_workers()) or 1) == len(pinned)
        assert httpx.get(f"{mirror.url}/v2/").status_code == 200


def _sockets_on(pid: int, port: int) -> Counter[str]:
    """The TCP sockets a process holds on ``port``, by state ("LISTEN", "ESTABLISHED")."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "0A": "LISTEN"}
    found: Counter[str] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[9] in inodes:
                found[states.get(fields[3], fields[3])] += 1
    return found


def test_a_burst_of_connections_is_spread_over_the_workers(upstream: QuirkyUpstream) -> None:
    """Each worker listens on a socket of its own too: on one shared socket alone the
    worker that woke first took every connection waiting."""
    with _mirror(upstream) as mirror:
        workers = mirror.spawned_workers()
        assert len(workers) == 2
        deadline = time.monotonic() + 30
        # Each on its own socket and on the one they share.
        while not all(_sockets_on(pid, mirror.port)["LISTEN"] == 2 for pid in workers):
            assert time.monotonic() < deadline, "a worker did not listen"
            time.sleep(0.05)
        # All connected before any request: they wait to be accepted together.
        clients = [socket.create_connection(("127.0.0.1", mirror.port)) for _ in range(200)]
        try:
            for client in clients:
                client.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
            for client in clients:
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
            held = [_sockets_on(pid, mirror.port)["ESTABLISHED"] for pid in workers]
        finally:
            for client in clients:
                client.close()
    assert sum(held) == 200
    assert min(held) >= 50, held


def _base_requests(metrics_url: str) -> float:
    """``GET /v2/`` answers a mirror counted, as its ``/metrics`` says."""
    response = httpx.get(metrics_url)
    assert response.status_code == 200
    samples = [s for f in text_string_to_metric_families(response.text) for s in f.samples]
    wanted = {"route": "base", "method": "GET", "status": "200"}
    return sum(s.value for s in samples if s.name == "mirror_http_requests_total"
               and wanted.items() <= s.labels.items())  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_the_address_is_refused_and_disturbs_nothing(
    upstream: QuirkyUpstream, tmp_path: Path, workers: int
) -> None:
    """Started by mistake on the same address and cache: it stops before anything
    starts, and the running server's metrics (files, with two workers) carry on."""
    entry = {"name": "docker.io", "url": upstream.url}
    with MirrorProcess([entry], workers=workers, workdir=tmp_path / "first") as mirror:
        for _ in range(3):
            assert httpx.get(f"{mirror.url}/v2/").status_code == 200
        counted = _base_requests(f"{mirror.url}/metrics")
        assert counted >= 3
        config = tmp_path / "second.toml"
        write_config(config, port=mirror.port, cache_dir=mirror.cache_dir, upstreams=[entry],
                     workers=workers)  # fmt: skip
        second = run_cli("serve", "--config", str(config), timeout=30)
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{mirror.port}" in second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.get(f"{mirror.url}/v2/").status_code == 200
        assert _base_requests(f"{mirror.url}/metrics") >= counted + 1


def test_servers_sharing_a_cache_directory_keep_their_metrics_apart(
    upstream: QuirkyUpstream, tmp_path: Path
) -> None:
    """A new version started beside the old on another port, on the same cache: each
    counts what it answered; one whose metrics port is taken stops, naming it."""
    entry = {"name": "docker.io", "url": upstream.url}
    cache = tmp_path / "cache"
    metrics = {"metrics_address": f"127.0.0.1:{free_port()}"}
    scraped = f"http://{metrics['metrics_address']}/metrics"
    with MirrorProcess([entry], workers=2, cache_dir=cache, workdir=tmp_path / "a") as old:
        for _ in range(10):
            assert httpx.get(f"{old.url}/v2/").status_code == 200
        counted = _base_requests(f"{old.url}/metrics")
        assert counted >= 10
        new = MirrorProcess([entry], workers=2, cache_dir=cache, workdir=tmp_path / "b",
                            server=metrics)  # fmt: skip
        with new:
            assert httpx.get(f"{new.url}/v2/").status_code == 200
            answered = _base_requests(scraped)
            assert 1 <= answered < counted  # its own answers, not the old one's too
            config = tmp_path / "third.toml"
            write_config(config, port=free_port(), cache_dir=cache, upstreams=[entry], workers=2,
                         server=metrics)  # fmt: skip
            third = run_cli("serve", "--config", str(config), timeout=30)
            assert third.returncode == 2
            taken = f"server.metrics_address: cannot listen on {metrics['metrics_address']}"
            assert taken in third.stderr
            assert _base_requests(scraped) == answered
        assert _base_requests(f"{old.url}/metrics") == counted
    # Each start clears what stopped servers left, and nothing else.
    with MirrorProcess([entry], workers=2, cache_dir=cache, workdir=tmp_path / "c"):
        assert len([p for p in (cache / "metrics").iterdir() if p.is_dir()]) == 1
