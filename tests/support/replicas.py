"""Replicas of ``mirror serve`` sharing one cache, as an operator runs them: a SeaweedFS
bucket, a redis-server, N real processes (each with its own cache directory, port and
advertised address), an upstream registry behind a throttled link so that fills last.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from .mirror import MirrorProcess
from .ports import Service, ServiceNotReady, free_port, wait_http_ok
from .seaweed import S3Endpoint, SeaweedS3

__all__ = ["Link", "RestartableSeaweed", "metric", "start_replicas"]

_BENCH_LINK = Path(__file__).resolve().parents[2] / "bench" / "link.py"


class Link(Service):
    """A TCP proxy to ``target_port`` whose answers all share ``rate`` (bench's link model,
    in a process of its own so that its timing is nobody else's)."""

    def __init__(self, target_port: int, rate: str) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Link:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(_BENCH_LINK),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--target",
                f"127.0.0.1:{self.target_port}",
                "--rate",
                self.rate,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # ends when it listens, or when it dies
        if not line.startswith("LINK-READY"):
            raise ServiceNotReady(f"link did not start: {line}{self.process.stdout.read()}")
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.communicate(timeout=15)


class RestartableSeaweed(SeaweedS3):
    """A SeaweedFS that ``stop`` and ``start`` take down and bring back with the same
    ports and data: an outage of the store, not a new one."""

    _command: list[str] | None = None

    def start(self) -> S3Endpoint:
        if self._command is None:
            endpoint = super().start()
            assert self.process is not None
            # How it was started, to start it so again.
            cmdline = Path(f"/proc/{self.process.pid}/cmdline").read_bytes()
            self._command = [part.decode() for part in cmdline.split(b"\0") if part]
            return endpoint
        with open(self._stderr, "ab") as log:
            self.process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http_ok(f"{self.endpoint.url}/healthz", timeout=self.timeout, process=self.process)
        return self.endpoint

    def kill(self) -> None:
        """Down at once, as a crash or a cut cable (``stop`` lets it shut down cleanly)."""
        process, self.process = self.process, None
        if process is not None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_replicas(
    count: int,
    upstream_url: str,
    s3: S3Endpoint,
    redis_url: str,
    workdir: Path,
    *,
    prefix: str | None = None,
    **cache: Any,
) -> list[MirrorProcess]:
    """``count`` started replicas on one bucket prefix and one Redis."""
    prefix = prefix or f"fleet-{secrets.token_hex(4)}/"
    peer_secret = secrets.token_hex(32)
    storage = (
        "[storage]\n"
        'backend = "s3"\n'
        f'endpoint = "{s3.url}"\n'
        f'bucket = "{s3.bucket}"\n'
        f'region = "{s3.region}"\n'
        f'prefix = "{prefix}"\n'
    )
    replicas = []
    for index in range(count):
        replica = MirrorProcess(
            [{"name": "docker.io", "url": upstream_url, "retries": 0}],
            workdir=workdir / f"replica-{index}",
            extra_toml=storage,
            **cache,
        )
        replica.env.update(
            {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "MIRROR_REDIS_URL": redis_url,
                "MIRROR_PEER_SECRET": peer_secret,
                "MIRROR_STORAGE_ADVERTISE_URL": replica.url,
            }
        )
        replicas.append(replica)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        started = [pool.submit(replica.start) for replica in replicas]
    failed = [future.exception() for future in started if future.exception() is not None]
    if failed:
        for replica in replicas:
            replica.close()
        raise failed[0]  # type: ignore[misc]
    return replicas


def metric(replica: MirrorProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples on one replica whose labels include ``labels``."""
    text = httpx.get(f"{replica.url}/metrics", timeout=30).text
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[2])
    return total
