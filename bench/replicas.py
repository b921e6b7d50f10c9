"""Step 8 (``replicas``): 30 concurrent cold pulls of ``bench/large:1`` spread round-robin
over three caches that reach the upstream through the one link, in three setups:

- **replicas**: three ``mirror serve`` sharing a SeaweedFS bucket and a redis-server
  (``tests.support.replicas.start_replicas``): one upstream download for the fleet;
- **independent**: three single-node mirrors, each with its own disk cache;
- **distribution on S3**: three ``docker-registry`` proxies sharing one bucket through
  distribution's ``s3`` storage driver.

The clients are threads of this process (``http.client``), each GETting the manifest by
tag and then every blob, hashing what it reads instead of writing it (30 × 512 MiB would be
15 GiB of disk), and noting when the first byte of each blob came.  Every setup starts cold
(new processes, a new bucket prefix, a new Redis) and is stopped before the next one.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.images import ALL_MANIFEST_TYPES, ImageInfo
from tests.support.redis import RedisServer
from tests.support.replicas import start_replicas
from tests.support.seaweed import S3Endpoint, SeaweedS3

from .procs import MirrorServer, ReferenceProxy, io_chars
from .report import Condition, Figure

if TYPE_CHECKING:
    from .harness import Bench, Plan

__all__ = ["replica_figures", "step_replicas"]

MiB = 1024 * 1024
CACHES = 3
CLIENTS = 30
CHUNK = 1 * MiB
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|level=(error|fatal|panic)\b|^panic:")
FILL_STARTED = 1 * MiB  #: upstream I/O past the mark that says a layer is being sent
CLIENT_TIMEOUT = 300.0  #: seconds a socket read may wait (distribution refetches per client)
LABELS = {
    "replicas": "3 replicas (shared bucket + Redis)",
    "independent": "3 independent disk mirrors",
    "distribution": "3 distribution proxies on shared S3",
}


@dataclass
class ClientPull:
    """One client's pull: timings on ``time.monotonic()``, shared by every process here."""

    cache: int
    started: float = 0.0
    ended: float = 0.0
    first_byte: dict[str, float] = field(default_factory=dict)  #: digest → first body byte
    error: str | None = None


def _get(
    host: str, path: str, headers: dict[str, str]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A GET on a connection of its own (no setup here redirects); the caller reads the
    body and closes."""
    connection = http.client.HTTPConnection(host, timeout=CLIENT_TIMEOUT)
    connection.request("GET", path, headers=headers)
    return connection, connection.getresponse()


def pull_and_verify(
    host: str, repository: str, tag: str, image: ImageInfo, pull: ClientPull
) -> None:
    """The manifest by tag and every blob, each checked against its digest and size."""
    pull.started = time.monotonic()
    try:
        connection, response = _get(
            host, f"/v2/{repository}/manifests/{tag}", {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
        )
        try:
            body = response.read()
        finally:
            connection.close()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if response.status != 200 or digest != image.manifest_digest:
            raise AssertionError(f"manifest: {response.status}, {digest}")
        document = json.loads(body)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        for descriptor in [document["config"], *document["layers"]]:
            expected, size = descriptor["digest"], int(descriptor["size"])
            connection, response = _get(host, f"/v2/{repository}/blobs/{expected}", {})
            try:
                if response.status != 200:
                    raise AssertionError(f"blob {expected}: status {response.status}")
                hasher = hashlib.sha256()
                length = 0
                while count := response.readinto(view):
                    if length == 0:
                        pull.first_byte[expected] = time.monotonic()
                    hasher.update(view[:count])
                    length += count
            finally:
                connection.close()
            got = "sha256:" + hasher.hexdigest()
            if got != expected or length != size:
                raise AssertionError(f"blob {expected}: {length} bytes hashing to {got}")
    except Exception as exc:  # noqa: BLE001 - counted as this client's error
        pull.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        pull.ended = time.monotonic()


class UpstreamStart:
    """When the upstream began sending a layer: the first moment its I/O (``rchar + wchar``,
    sendfile included) passed ``FILL_STARTED`` bytes beyond where it was at the start.  No
    cache can have a byte of the layer before then, so a delay measured from it is an upper
    bound of the delay after the fill's first byte."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.at: float | None = None
        self._stop = threading.Event()
        self._base = io_chars(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.at is None:
            if io_chars(self.pid) - self._base >= FILL_STARTED:
                self.at = time.monotonic()
            time.sleep(self.interval)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.at


class S3ReferenceProxy(ReferenceProxy):
    """distribution in proxy mode with its data in the shared bucket (``s3`` driver).

    2.8 forces path-style requests whenever ``regionendpoint`` is set (its
    ``forcepathstyle`` key came with 3.0); redirects to presigned URLs are off, so that the
    blob bytes go through the proxy as they do through the mirror."""

    def __init__(self, workdir: Path, upstream_url: str, s3: S3Endpoint, root: str) -> None:
        super().__init__(workdir, upstream_url)
        config = json.loads(self.config_path.read_text())
        config["storage"] = {
            "s3": {
                "accesskey": s3.access_key,
                "secretkey": s3.secret_key,
                "region": s3.region,
                "regionendpoint": s3.url,
                "bucket": s3.bucket,
                "secure": False,
                "v4auth": True,
                "rootdirectory": root,
            },
            "redirect": {"disable": True},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def environment(self) -> dict[str, str]:
        # The AWS SDK reads AWS_* too (an AWS_CA_BUNDLE makes 2.8 panic at start with a plain
        # HTTP endpoint); the credentials are in the config.
        return {k: v for k, v in super().environment().items() if not k.startswith("AWS_")}


def replica_figures(plan: Plan) -> list[Figure]:
    large = f"{sum(plan.large_layers) / MiB:.0f} MiB"
    return [
        Figure("8", "replicas_seconds", f"{CLIENTS} cold pulls {large} over 3 (mirror: replicas; "
               "ref: distribution on S3)", "s", 2),
        Figure("8", "replicas_upstream_ratio", "  upstream bytes ÷ image size", "×", 3,
               targets=(Condition("<=", 1.05),)),
        Figure("8", "replicas_first_byte_delay", "  latest first layer byte after upstream's",
               "s", 2, targets=(Condition("<=", 2),)),
        Figure("8", "replicas_verified", f"  clients verified (of {CLIENTS})", "", 0,
               targets=(Condition("==", CLIENTS, decimals=0),)),
        Figure("8", "independent_seconds", f"  3 independent mirrors (mirror column): {CLIENTS} "
               "cold pulls", "s", 2),
        Figure("8", "independent_upstream_ratio", "    upstream bytes ÷ image size", "×", 3),
        Figure("8", "independent_first_byte_delay", "    latest first layer byte after upstream's",
               "s", 2),
        Figure("8", "independent_verified", f"    clients verified (of {CLIENTS})", "", 0),
    ]  # fmt: skip


def _log_errors(logs: list[Callable[[], str]]) -> dict[str, Any]:
    """Error lines the caches logged (Python's and Go's), counted, with a few examples."""
    lines = [line for log in logs for line in log().splitlines() if ERROR_LINE.search(line)]
    return {"count": len(lines), "examples": [line[:500] for line in lines[:3]]}


def _measure(bench: Bench, name: str, hosts: list[str], logs: list[Callable[[], str]]) -> None:
    image = bench.images.large
    layer = image.layer_digests[-1]
    pulls = [ClientPull(index % len(hosts)) for index in range(CLIENTS)]
    load_before = os.getloadavg()
    mark = bench.log.mark()
    upstream = bench.upstream.process
    assert upstream is not None
    start = UpstreamStart(upstream.pid)
    with ThreadPoolExecutor(CLIENTS) as pool:
        for pull in pulls:
            pool.submit(pull_and_verify, hosts[pull.cache], "bench/large", "1", image, pull)
    upstream_start = start.stop()
    load_after = os.getloadavg()
    sent = sum(e.size for e in bench.log.since(mark) if e.is_blob_get and e.status in (200, 206))
    wall = max(p.ended for p in pulls) - min(p.started for p in pulls)
    ratio = sent / image.total_size
    verified = sum(1 for p in pulls if p.error is None)
    firsts = [p.first_byte[layer] for p in pulls if layer in p.first_byte]
    delay = max(firsts) - upstream_start if firsts and upstream_start is not None else None
    spread = max(firsts) - min(firsts) if firsts else None
    errors = [p.error for p in pulls if p.error]
    by_cache = {
        index: round(max(p.first_byte[layer] for p in mine) - upstream_start, 3)
        for index in range(len(hosts))
        if upstream_start is not None
        and (mine := [p for p in pulls if p.cache == index and layer in p.first_byte])
    }
    log_errors = _log_errors(logs)
    bench.detail(
        "8",
        name,
        log_errors=log_errors,
        setup=LABELS[name],
        wall_seconds=round(wall, 2),
        upstream_blob_bytes=sent,
        image_bytes=image.total_size,
        upstream_ratio=round(ratio, 4),
        verified=verified,
        errors=errors,
        latest_first_layer_byte_after_upstream_s=None if delay is None else round(delay, 3),
        first_layer_byte_spread_s=None if spread is None else round(spread, 3),
        first_layer_byte_after_start_s=sorted(round(t - min(p.started for p in pulls), 3)
                                              for t in firsts),
        latest_first_layer_byte_after_upstream_by_cache_s=by_cache,
        pull_seconds=[round(p.ended - p.started, 2) for p in pulls],
        load_average_before=[round(v, 2) for v in load_before],
        load_average_after=[round(v, 2) for v in load_after],
    )  # fmt: skip
    column = "reference" if name == "distribution" else "mirror"
    key = "independent" if name == "independent" else "replicas"
    bench.set(f"{key}_seconds", column, wall)
    bench.set(f"{key}_upstream_ratio", column, ratio)
    bench.set(f"{key}_verified", column, verified)
    if delay is not None:
        bench.set(f"{key}_first_byte_delay", column, delay)
    bench.say(
        f"  {LABELS[name]:38} {wall:7.2f} s   upstream ×{ratio:.3f}   verified {verified}/"
        f"{CLIENTS}   latest first layer byte "
        + ("n/a" if delay is None else f"{delay:.2f} s after the upstream's")
        + ("" if spread is None else f" ({spread:.2f} s after the first client's)")
        + f"   load {load_before[0]:.1f} → {load_after[0]:.1f}"
    )
    for error in sorted(set(errors))[:5]:
        bench.say(f"    !! {errors.count(error)} × {error}")
    if log_errors["count"]:
        bench.say(f"    !! {log_errors['count']} error lines in the caches' logs, first: "
                  f"{log_errors['examples'][0][:300]}")  # fmt: skip


def step_replicas(bench: Bench, mirror_executable: Path) -> None:
    image = bench.images.large
    upstream_url = bench.link.url if bench.link is not None else bench.upstream.url
    bench.say(
        f"step 8: {CLIENTS} concurrent cold pulls of bench/large:1 ({image.total_size / MiB:.0f}"
        f" MiB), round-robin over {CACHES} caches"
    )
    work = bench.work / "replicas"
    with SeaweedS3(bucket="bench") as seaweed:
        s3 = seaweed.endpoint
        with bench.attempt("8", "replicas"), RedisServer() as redis:
            replicas = start_replicas(CACHES, upstream_url, s3, redis.url, work / "replicas")
            try:
                _measure(bench, "replicas", [r.host for r in replicas], [r.log for r in replicas])
            finally:
                for replica in replicas:
                    replica.close()
        with bench.attempt("8", "independent"), ExitStack() as servers:
            mirrors = [
                MirrorServer(work / f"independent-{i}", upstream_url, mirror_executable)
                for i in range(CACHES)
            ]
            for mirror in mirrors:
                servers.enter_context(mirror)
            _measure(bench, "independent", [m.host for m in mirrors], [m.log_text for m in mirrors])
        with bench.attempt("8", "distribution"), ExitStack() as servers:
            root = f"/distribution-{secrets.token_hex(4)}"
            proxies = [
                S3ReferenceProxy(work / f"distribution-{i}", upstream_url, s3, root)
                for i in range(CACHES)
            ]
            for proxy in proxies:
                servers.enter_context(proxy)
            _measure(
                bench, "distribution", [p.host for p in proxies], [p.log_text for p in proxies]
            )
