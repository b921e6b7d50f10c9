"""Benchmark: mirror against distribution's proxy mode ("reference") and the upstream itself.

Run from the repository root (``bench/run`` does): ``python -m bench.harness [--quick]
[--only STEP] [--json PATH] [--upstream-rate RATE] [--upstream-latency-ms MS]``.  Everything
runs on 127.0.0.1 under one temporary directory that is removed at the end; the caches and the
direct cold pulls reach the upstream through a link with a bandwidth limit (bench/link.py);
see bench/README.md for what each step measures and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from tests.support import skopeo
from tests.support.images import (
    ALL_MANIFEST_TYPES,
    OCI_INDEX,
    ImageInfo,
    IndexInfo,
    write_image,
    write_index,
)
from tests.support.redis import RedisServer
from tests.support.registry import AccessLogEntry, UpstreamRegistry, parse_access_log
from tests.support.seaweed import SeaweedS3

from .link import format_rate, parse_rate
from .load import (
    PULL_TIMEOUT,
    PullRun,
    WrkRun,
    blob_throughput,
    check_pulled,
    concurrent_pulls,
    remove_pulls,
    run_wrk,
    run_wrk_mix,
)
from .procs import (
    CacheServer,
    CpuMeter,
    MirrorServer,
    ReferenceProxy,
    RssSampler,
    SharedStorage,
    UpstreamLink,
    foreign_load,
    get_ok,
    wait_quiet,
)
from .profile import py_spy, summarize
from .replicas import replica_figures, step_replicas
from .report import Against, Condition, Figure, render_table, write_json

MiB = 1024 * 1024
STEPS = ("link", "1", "2", "3", "4", "5", "6", "7", "8")
DEFAULT_STEPS = set(STEPS) - {"8"}  # step 8 starts 9 servers and takes minutes: on request
COLD_STEPS = {"1", "3", "6", "8"}  # the steps that pull through the link (which "link" checks)
STEP_NAMES = {
    "cold": "1",
    "warm": "2",
    "concurrent": "3",
    "manifests": "4",
    "blobs": "5",
    "rss": "6",
    "mixed": "7",
    "replicas": "8",
}
ACCEPT = ", ".join(ALL_MANIFEST_TYPES)
CONCURRENT_PULLS = 10
OTHERS_WARN = 0.10  # share of the machine's CPU used by other processes worth a warning
DEFAULT_UPSTREAM_RATE = "100MB/s"
LINK_TOLERANCE = 0.05  # the achieved rate of the link check must be this close to the set one


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run."""

    mode: str
    small_layers: tuple[int, ...]
    medium_layers: tuple[int, ...]
    large_layers: tuple[int, ...]
    wrk_seconds: float
    wrk_threads: int
    wrk_connections: int
    blob_rounds_single: int  #: sequential downloads of the big layer by the 1-stream client
    blob_streams: int
    blob_rounds_streams: int  #: sequential downloads by each of the parallel clients
    link_rounds_single: int  #: link check: sequential downloads of the big layer, 1 stream
    link_streams: int  #: link check: parallel downloads of the big layer (one each)
    mix_seconds: float  #: each wrk run of the mixed load
    mix_rounds: int  #: runs per load and cache, mirror and reference taking turns


FULL = Plan(
    mode="full",
    small_layers=(4 * 1024, 64 * 1024, 1 * MiB),
    medium_layers=(56 * MiB, 48 * MiB, 36 * MiB, 24 * MiB, 16 * MiB),  # 180 MiB
    large_layers=(512 * MiB,),
    wrk_seconds=10,
    wrk_threads=2,
    wrk_connections=16,
    blob_rounds_single=6,
    blob_streams=8,
    blob_rounds_streams=2,
    link_rounds_single=1,
    link_streams=4,
    mix_seconds=10,
    mix_rounds=3,  # the median of three: one fast or slow round of either side is not the figure
)
QUICK = dataclasses.replace(
    FULL,
    mode="quick",
    medium_layers=tuple(size // 10 for size in FULL.medium_layers),  # 18 MiB
    large_layers=(64 * MiB,),
    wrk_seconds=3,
    blob_rounds_single=2,
    blob_rounds_streams=1,
    link_rounds_single=3,
    mix_seconds=3,
    mix_rounds=1,
)


@dataclass(frozen=True)
class Images:
    small: ImageInfo
    medium: ImageInfo
    large: ImageInfo
    multi: IndexInfo

    def named(self) -> list[tuple[str, ImageInfo | IndexInfo]]:
        return [
            ("small", self.small),
            ("medium", self.medium),
            ("large", self.large),
            ("multi", self.multi),
        ]


@dataclass
class Endpoint:
    """Where a client pulls from: one of the two caches, or the upstream directly (through
    the upstream link for cold pulls, straight for warm GETs)."""

    name: str
    host: str
    server: CacheServer | None = None  # None for the upstream itself
    token: Callable[[str], str] | None = None  # repository -> bearer token (direct only)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def headers(self, repository: str) -> dict[str, str]:
        if self.token is None:
            return {}
        return {"Authorization": f"Bearer {self.token(repository)}"}


class UpstreamLog:
    """Exact accounting of what the upstream served, from its access log.

    A mark is a byte offset in the log.  Before a mark is taken and before the lines after
    it are read, the harness waits until the upstream process has moved no byte for a second
    (distribution's proxy goes on fetching blobs in the background after its client is
    served) and until the lines of answered requests are written (a probe request, left out).
    """

    def __init__(self, registry: UpstreamRegistry) -> None:
        self.registry = registry

    def settle(self) -> None:
        process = self.registry.process
        if process is None:
            raise RuntimeError("upstream is not running")
        wait_quiet(process.pid)
        self.registry.sync_log()

    def mark(self) -> int:
        os.sync()  # the previous measurement's writes are not flushed during this one
        self.settle()
        return self.registry.access_log_path.stat().st_size

    def since(self, mark: int) -> list[AccessLogEntry]:
        self.settle()
        with open(self.registry.access_log_path, "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
        return [e for e in parse_access_log(text) if not e.is_probe]


def blob_bytes(entries: Sequence[AccessLogEntry]) -> int:
    return sum(e.size for e in entries if e.is_blob_get and e.status in (200, 206))


def breakdown(entries: Sequence[AccessLogEntry]) -> dict[str, int]:
    counts = Counter(f"{e.method} {e.kind} {e.status}" for e in entries)
    return dict(sorted(counts.items()))


def _figures(plan: Plan, rate: float) -> list[Figure]:
    ref: Against = "reference"
    direct: Against = "direct"
    medium = f"{sum(plan.medium_layers) / MiB:.0f} MiB"
    large = f"{sum(plan.large_layers) / MiB:.0f} MiB"
    link = (Condition("==", rate / 1e6, tolerance=LINK_TOLERANCE),) if rate > 0 else ()
    return [
        Figure("link", "link_1_stream", f"upstream link: blob GET {large}, 1 stream", "MB/s", 1,
               targets=link, applies_direct=True, subject="direct"),
        Figure("link", "link_streams", f"upstream link: blob GET {large}, "
               f"{plan.link_streams} streams", "MB/s", 1,
               targets=link, applies_direct=True, subject="direct"),
        Figure("1", "cold_pull_seconds", f"cold pull {medium} (skopeo)", "s", 2,
               targets=(Condition("<=", 0.6, ref), Condition("<=", 1.2, direct)),
               applies_direct=True),
        Figure("1", "cold_pull_upstream_ratio", "  upstream bytes ÷ image size", "×", 3,
               targets=(Condition("==", 1.0),), applies_direct=True),
        Figure("2", "warm_pull_seconds", f"warm pull {medium} (skopeo)", "s", 2),
        Figure("2", "warm_pull_upstream_requests", "  upstream requests", "req", 0),
        Figure("3", "concurrent_cold_seconds", f"10 concurrent cold pulls {large}", "s", 2,
               targets=(Condition("<=", 0.5, ref),), applies_direct=True),
        Figure("3", "concurrent_cold_upstream_ratio", "  upstream bytes ÷ image size", "×", 3,
               targets=(Condition("<=", 1.05),), applies_direct=True),
        # What bounds the step on a machine the clients share: their CPU and the server's.
        Figure("3", "concurrent_cold_client_cpu", "  CPU of the 10 skopeo clients", "s", 1,
               applies_direct=True),
        Figure("3", "concurrent_cold_server_cpu", "  CPU of the cache (direct: upstream)", "s", 1,
               applies_direct=True),
        Figure("4", "manifest_tag_rps", "warm manifest GET by tag", "req/s", 0,
               targets=(Condition(">=", 10, ref),), applies_direct=True),
        Figure("4", "manifest_tag_p50", "  p50 latency", "ms", 2, applies_direct=True),
        Figure("4", "manifest_tag_p99", "  p99 latency", "ms", 2, applies_direct=True),
        Figure("4", "manifest_tag_upstream", "  upstream requests per request", "req", 3,
               targets=(Condition("==", 0, decimals=0),)),
        Figure("4", "manifest_digest_rps", "warm manifest GET by digest", "req/s", 0,
               targets=(Condition(">=", 2, ref),), applies_direct=True),
        Figure("4", "manifest_digest_p50", "  p50 latency", "ms", 2, applies_direct=True),
        Figure("4", "manifest_digest_p99", "  p99 latency", "ms", 2, applies_direct=True),
        Figure("4", "manifest_digest_upstream", "  upstream requests per request", "req", 3),
        Figure("5", "blob_1_stream", f"warm blob GET {large}, 1 stream", "MB/s", 0,
               targets=(Condition(">=", 1.5, ref), Condition(">=", 0.8, direct)),
               applies_direct=True),
        Figure("5", "blob_8_streams", f"warm blob GET {large}, 8 streams", "MB/s", 0,
               targets=(Condition(">=", 1.5, ref), Condition(">=", 0.8, direct)),
               applies_direct=True),
        Figure("6", "peak_rss", "peak RSS during step 3", "MiB", 1,
               targets=(Condition("<=", 150),)),
        *(figure for load in MIXED_LOADS for figure in _mixed_figures(load)),
        *replica_figures(plan),
    ]  # fmt: skip


@dataclass(frozen=True)
class MixedLoad:
    """One wrk run of step 7: ``connections`` going round the warm mix."""

    key: str
    connections: int
    accept: str  #: "full": the 4 manifest types; "single": only the manifest's own type

    @property
    def label(self) -> str:
        accept = "Accept: 4 types" if self.accept == "full" else "Accept: 1 type"
        return f"warm mix, {self.connections} connections, {accept}"


MIXED_LOADS = (
    MixedLoad("mix_100_full", 100, "full"),
    MixedLoad("mix_100_single", 100, "single"),
    MixedLoad("mix_1000_full", 1000, "full"),
)


def _mixed_figures(load: MixedLoad) -> list[Figure]:
    ref: Against = "reference"
    base = load.connections == 100
    p99 = (Condition("<=", 50),) if base else ()  # 1,000: ≤ 10× the 100 figure, set in step 7
    k = load.key
    return [
        Figure("7", f"{k}_rps", load.label, "req/s", 0,
               targets=(Condition(">=", 10, ref),) if base else ()),
        Figure("7", f"{k}_p50", "  p50 latency", "ms", 1),
        Figure("7", f"{k}_p90", "  p90 latency", "ms", 1),
        Figure("7", f"{k}_p99", "  p99 latency", "ms", 1, targets=p99),
        Figure("7", f"{k}_max", "  max latency", "ms", 0,
               targets=(Condition("<=", 250),) if base else ()),
        Figure("7", f"{k}_errors", "  errors (socket, timeout, non-2xx)", "req", 0,
               targets=(Condition("==", 0, decimals=0),)),
        Figure("7", f"{k}_upstream", "  upstream requests", "req", 0,
               targets=(Condition("==", 0, decimals=0),)),
    ]  # fmt: skip


@dataclass
class Bench:
    plan: Plan
    work: Path
    steps: set[str]
    rate: float  #: the upstream link's bandwidth in bytes/s, 0 for none
    latency_ms: float  #: the upstream link's delay per connection setup
    profile: Path | None = None  #: where step 7 writes py-spy profiles of the mirror
    storage: str = "disk"  #: "s3": the mirror runs as a replica on SeaweedFS and Redis
    mirror_tree: Path | None = None  #: another source tree's mirror package (A/B runs)
    mirror_only: bool = False  #: measure the mirror alone (A/B runs of two builds)
    workers: int = 1  #: the mirror's uvicorn worker processes
    figures: dict[str, Figure] = field(init=False)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # set up in run()
    upstream: UpstreamRegistry = field(init=False)
    log: UpstreamLog = field(init=False)
    images: Images = field(init=False)
    mirror: MirrorServer = field(init=False)
    reference: ReferenceProxy = field(init=False)
    endpoints: dict[str, Endpoint] = field(init=False)
    link: UpstreamLink | None = None  #: None when neither a rate nor a latency is set
    upstream_log_offset: int = 0
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.figures = {f.key: f for f in _figures(self.plan, self.rate)}

    @property
    def pulls(self) -> Path:
        return self.work / "pulls"

    # ------------------------------------------------------------------ bookkeeping
    def set(self, key: str, endpoint: str, value: float, **notes: Any) -> None:
        figure = self.figures[key]
        setattr(figure, endpoint, value)
        if notes:
            figure.notes[endpoint] = notes

    def detail(self, step: str, endpoint: str, **values: Any) -> None:
        self.details.setdefault(step, {}).setdefault(endpoint, {}).update(values)

    @contextmanager
    def attempt(self, step: str, endpoint: str) -> Iterator[None]:
        """Record a failure of one measurement and go on with the next one."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            message = f"{type(exc).__name__}: {exc}"
            self.errors.append(
                {
                    "step": step,
                    "endpoint": endpoint,
                    "error": message,
                    "traceback": traceback.format_exc(),
                }
            )
            print(f"  !! step {step} {endpoint} failed: {message[:2000]}", flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)

    # ------------------------------------------------------------------ setup
    def direct_token(self, repository: str) -> str:
        cached = self._tokens.get(repository)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        server = self.upstream.token_server
        assert server is not None
        response = httpx.get(
            server.realm,
            params={"service": self.upstream.service, "scope": f"repository:{repository}:pull"},
            timeout=30,
            trust_env=False,
        )
        response.raise_for_status()
        body = response.json()
        token = str(body["token"])
        self._tokens[repository] = (token, time.monotonic() + float(body["expires_in"]) / 2)
        return token

    def seed(self) -> None:
        layouts = self.work / "layouts"
        started = time.monotonic()
        plan = self.plan
        images = Images(
            small=write_image(layouts / "small", "1", plan.small_layers, seed=701),
            medium=write_image(layouts / "medium", "1", plan.medium_layers, seed=702),
            large=write_image(layouts / "large", "1", plan.large_layers, seed=703),
            multi=write_index(layouts / "multi", "1", seed=704),
        )
        written = time.monotonic()
        for name, image in images.named():
            digest = self.upstream.push_image(image, f"bench/{name}:1")
            if digest != image.manifest_digest:
                raise RuntimeError(
                    f"pushed bench/{name}:1 as {digest}, not {image.manifest_digest}"
                )
        shutil.rmtree(layouts)
        self.images = images
        self.details["setup"] = {
            "write_seconds": round(written - started, 2),
            "push_seconds": round(time.monotonic() - written, 2),
            "images": {
                f"bench/{name}:1": {
                    "digest": image.manifest_digest,
                    "bytes": image.total_size,
                    "blobs": len(image.blob_sizes),
                }
                for name, image in images.named()
            },
        }

    def start(self, stack: ExitStack) -> None:
        self.say(f"work directory {self.work}")
        self.upstream = stack.enter_context(
            UpstreamRegistry(auth="token", workdir=self.work / "upstream")
        )
        self.log = UpstreamLog(self.upstream)
        self.say(f"upstream {self.upstream.url} (token auth); writing and pushing images …")
        self.seed()
        self.upstream_log_offset = self.upstream.app_log_path.stat().st_size
        setup = self.details["setup"]
        self.say(
            f"  images written in {setup['write_seconds']} s, pushed in {setup['push_seconds']} s"
        )
        # Both caches and the direct cold pulls reach the upstream through the link.
        upstream_host = self.upstream.host
        if self.rate > 0 or self.latency_ms > 0:
            self.link = UpstreamLink(
                self.work / "link", self.upstream.host, self.rate, self.latency_ms
            )
            stack.enter_context(self.link)
            upstream_host = self.link.host
            self.say(
                f"upstream link {self.link.url} -> {self.upstream.host}: "
                f"{format_rate(self.rate)}, {self.latency_ms:g} ms per connection setup"
            )
        else:
            self.say("no upstream link: caches and direct pulls reach the upstream on loopback")
        # The reference exits at start when the upstream is down: it comes second.
        self.reference = ReferenceProxy(self.work / "reference", f"http://{upstream_host}")
        stack.enter_context(self.reference)
        shared = self.shared_storage(stack) if self.storage == "s3" else None
        self.mirror = MirrorServer(
            self.work / "mirror",
            f"http://{upstream_host}",
            _mirror_executable(),
            shared,
            tree=self.mirror_tree,
            workers=self.workers,
        )
        stack.enter_context(self.mirror)
        self.endpoints = {
            "mirror": Endpoint("mirror", self.mirror.host, self.mirror),
            "reference": Endpoint("reference", self.reference.host, self.reference),
            "direct": Endpoint("direct", self.upstream.host, token=self.direct_token),
            "direct via link": Endpoint("direct", upstream_host, token=self.direct_token),
        }
        self.say(
            f"mirror {self.mirror.url} ({self.workers} worker{'s' if self.workers > 1 else ''}), "
            f"reference {self.reference.url}"
        )

    def shared_storage(self, stack: ExitStack) -> SharedStorage:
        """A SeaweedFS bucket and a redis-server for the mirror to use as a replica."""
        s3 = stack.enter_context(SeaweedS3(bucket="mirror-bench")).endpoint
        redis = stack.enter_context(RedisServer())
        self.say(f"mirror storage: bucket {s3.url}/{s3.bucket}, redis {redis.url}")
        return SharedStorage(
            s3.url,
            s3.bucket,
            {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "MIRROR_REDIS_URL": redis.url,
                "MIRROR_PEER_SECRET": secrets.token_hex(32),
            },
        )

    def server_pid(self, endpoint: Endpoint) -> int:
        """The process answering ``endpoint``: the cache, or the upstream registry."""
        if endpoint.server is not None:
            return endpoint.server.pid
        process = self.upstream.process
        if process is None:
            raise RuntimeError("upstream is not running")
        return process.pid

    def caches(self) -> list[Endpoint]:
        if self.mirror_only:
            return [self.endpoints["mirror"]]
        return [self.endpoints["mirror"], self.endpoints["reference"]]

    def all_endpoints(self) -> list[Endpoint]:
        """For warm GETs: direct is the upstream itself, on loopback (the ceiling)."""
        return [*self.caches(), *([] if self.mirror_only else [self.endpoints["direct"]])]

    def cold_endpoints(self) -> list[Endpoint]:
        """For cold pulls: direct goes through the upstream link, as the caches do."""
        direct = [] if self.mirror_only else [self.endpoints["direct via link"]]
        return [*self.caches(), *direct]

    def link_meter(self, stack: ExitStack) -> CpuMeter | None:
        """CPU of the link process during a measurement (None without a link)."""
        if self.link is None:
            return None
        return stack.enter_context(CpuMeter(self.link.pid))

    # ------------------------------------------------------------------ pulls
    def timeout(self, upstream_bytes: int) -> float:
        """How long a measurement that moves ``upstream_bytes`` over the link may take."""
        return PULL_TIMEOUT + (2 * upstream_bytes / self.rate if self.rate > 0 else 0)

    def pull(self, endpoint: Endpoint, repo_tag: str, image: ImageInfo, count: int) -> PullRun:
        """``count`` simultaneous skopeo pulls through ``endpoint``, checked and removed."""
        self.pulls.mkdir(parents=True, exist_ok=True)
        try:
            # the reference downloads up to count + 1 copies over the link
            timeout = self.timeout((count + 1) * image.total_size)
            run = concurrent_pulls(endpoint.host, repo_tag, self.pulls, count, timeout=timeout)
            wrong = [d for d in run.digests if d != image.manifest_digest]
            if wrong:
                raise AssertionError(f"pulled {wrong[0]}, expected {image.manifest_digest}")
            check_pulled(self.pulls, count, image.blob_sizes)
            return run
        finally:
            remove_pulls(self.pulls, count)

    def sanity(self) -> None:
        """Small and multi-arch images pull correctly through both caches (digests match)."""
        for endpoint in self.caches():
            with self.attempt("sanity", endpoint.name):
                out = self.pulls / f"sanity-{endpoint.name}"
                try:
                    digest = skopeo.copy_to_dir(
                        f"docker://{endpoint.host}/bench/small:1", out / "s"
                    )
                    if digest != self.images.small.manifest_digest:
                        raise AssertionError(f"bench/small:1 came as {digest}")
                    digest = skopeo.copy_to_dir(
                        f"docker://{endpoint.host}/bench/multi:1", out / "m", all_platforms=True
                    )
                    skopeo.verify_dir(out / "m", require_children=True)
                    if digest != self.images.multi.index_digest:
                        raise AssertionError(f"bench/multi:1 came as {digest}")
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                self.detail("sanity", endpoint.name, ok=True)
                self.say(f"  sanity {endpoint.name}: small and multi-arch pulls verified")

    # ------------------------------------------------------------------ steps
    def step_link(self) -> None:
        """The rate the link achieves: direct GETs of the big layer through it, with curl."""
        link = self.link
        if link is None:
            self.say("link: none (--upstream-rate 0, no latency): upstream on loopback")
            return
        plan = self.plan
        layer = self.images.large.layers[0]
        repository = "bench/large"
        endpoint = self.endpoints["direct via link"]
        self.say(
            f"link: direct blob GETs of the {layer.size / MiB:.0f} MiB layer through the link "
            f"({format_rate(self.rate)}, curl to /dev/null): 1 stream × "
            f"{plan.link_rounds_single}, {plan.link_streams} streams × 1"
        )
        with self.attempt("link", "direct"):
            url = f"{endpoint.url}/v2/{repository}/blobs/{layer.digest}"
            headers = endpoint.headers(repository)
            timeout = self.timeout(max(plan.link_rounds_single, plan.link_streams) * layer.size)
            mark = self.log.mark()
            with CpuMeter(link.pid) as cpu_one:
                one = blob_throughput(
                    url,
                    headers,
                    layer.size,
                    streams=1,
                    rounds=plan.link_rounds_single,
                    timeout=timeout,
                )
            with CpuMeter(link.pid) as cpu_many:
                many = blob_throughput(
                    url, headers, layer.size, streams=plan.link_streams, rounds=1, timeout=timeout
                )
            self.watch(cpu_one, "link check, 1 stream")
            self.watch(cpu_many, f"link check, {plan.link_streams} streams")
            entries = self.log.since(mark)
            self.set("link_1_stream", "direct", one.mb_per_second)
            self.set("link_streams", "direct", many.mb_per_second)
            self.detail(
                "link",
                "direct",
                one_stream={**dataclasses.asdict(one), "link": cpu_one.as_dict()},
                many_streams={**dataclasses.asdict(many), "link": cpu_many.as_dict()},
                upstream_blob_bytes=blob_bytes(entries),
                upstream_requests=breakdown(entries),
            )
            self.say(
                f"  1 stream {one.mb_per_second:7.1f} MB/s (link CPU "
                f"{cpu_one.seconds / one.wall_seconds:.0%})   {plan.link_streams} streams "
                f"{many.mb_per_second:7.1f} MB/s (link CPU "
                f"{cpu_many.seconds / many.wall_seconds:.0%})"
            )
            for run in (one, many):
                if self.rate > 0 and abs(run.mb_per_second * 1e6 / self.rate - 1) > LINK_TOLERANCE:
                    self.say(
                        f"  !! the link achieved {run.mb_per_second:.1f} MB/s with {run.streams} "
                        f"stream(s), not {format_rate(self.rate)}: cold-pull times are off"
                    )

    def step_cold_pull(self) -> None:
        image = self.images.medium
        self.say(f"step 1: cold pull of bench/medium:1 ({image.total_size / MiB:.0f} MiB)")
        for endpoint in self.cold_endpoints():
            with self.attempt("1", endpoint.name):
                if endpoint.server is not None:
                    endpoint.server.cold()
                mark = self.log.mark()
                with ExitStack() as stack:
                    cpu = stack.enter_context(CpuMeter(self.server_pid(endpoint)))
                    link_cpu = self.link_meter(stack)
                    run = self.pull(endpoint, "bench/medium:1", image, 1)
                self.watch(cpu, f"step 1 {endpoint.name}")
                entries = self.log.since(mark)
                sent = blob_bytes(entries)
                ratio = sent / image.total_size
                self.set("cold_pull_seconds", endpoint.name, run.wall_seconds)
                self.set("cold_pull_upstream_ratio", endpoint.name, ratio)
                self.detail(
                    "1",
                    endpoint.name,
                    seconds=run.wall_seconds,
                    upstream_blob_bytes=sent,
                    image_bytes=image.total_size,
                    upstream_requests=breakdown(entries),
                    server=cpu.as_dict(),
                    link_cpu_seconds=round(link_cpu.seconds, 2) if link_cpu else None,
                )
                if endpoint.server is not None:
                    endpoint.server.warm.add("medium")
                self.say(
                    f"  {endpoint.name:9}  {run.wall_seconds:7.2f} s   upstream ×{ratio:.3f}"
                    f" ({len(entries)} requests)"
                )

    def step_warm_pull(self) -> None:
        image = self.images.medium
        self.say("step 2: warm pull of bench/medium:1")
        for endpoint in self.caches():
            with self.attempt("2", endpoint.name):
                server = endpoint.server
                assert server is not None
                if "medium" not in server.warm:
                    self.pull(endpoint, "bench/medium:1", image, 1)
                    server.warm.add("medium")
                mark = self.log.mark()
                run = self.pull(endpoint, "bench/medium:1", image, 1)
                entries = self.log.since(mark)
                self.set("warm_pull_seconds", endpoint.name, run.wall_seconds)
                self.set("warm_pull_upstream_requests", endpoint.name, len(entries))
                self.detail(
                    "2",
                    endpoint.name,
                    seconds=run.wall_seconds,
                    upstream_blob_bytes=blob_bytes(entries),
                    upstream_requests=breakdown(entries),
                )
                self.say(
                    f"  {endpoint.name:9}  {run.wall_seconds:7.2f} s   "
                    f"{len(entries)} upstream requests"
                )

    def step_concurrent(self) -> None:
        image = self.images.large
        self.say(
            f"step 3 (+6): {CONCURRENT_PULLS} concurrent cold pulls of bench/large:1 "
            f"({image.total_size / MiB:.0f} MiB)"
        )
        for endpoint in self.cold_endpoints():
            with self.attempt("3", endpoint.name):
                server = endpoint.server
                if server is not None:
                    server.cold()
                mark = self.log.mark()
                with ExitStack() as stack:
                    sampler = (
                        stack.enter_context(RssSampler(server.pid)) if server is not None else None
                    )
                    cpu = stack.enter_context(CpuMeter(self.server_pid(endpoint)))
                    link_cpu = self.link_meter(stack)
                    run = self.pull(endpoint, "bench/large:1", image, CONCURRENT_PULLS)
                self.watch(cpu, f"step 3 {endpoint.name}")
                entries = self.log.since(mark)
                sent = blob_bytes(entries)
                ratio = sent / image.total_size
                self.set("concurrent_cold_seconds", endpoint.name, run.wall_seconds)
                self.set("concurrent_cold_upstream_ratio", endpoint.name, ratio)
                self.set("concurrent_cold_client_cpu", endpoint.name, run.client_cpu_seconds)
                self.set("concurrent_cold_server_cpu", endpoint.name, cpu.seconds)
                self.detail(
                    "3",
                    endpoint.name,
                    wall_seconds=run.wall_seconds,
                    pull_seconds=[round(s, 3) for s in run.seconds],
                    client_cpu_seconds=run.client_cpu_seconds,
                    client_system_seconds=run.client_system_seconds,
                    upstream_blob_bytes=sent,
                    image_bytes=image.total_size,
                    upstream_requests=breakdown(entries),
                    server=cpu.as_dict(),
                    link_cpu_seconds=round(link_cpu.seconds, 2) if link_cpu else None,
                    upstream_mb_per_second=round(sent / run.wall_seconds / 1e6, 1),
                )
                rss = ""
                if server is not None and sampler is not None:
                    server.warm.add("large")
                    self.set("peak_rss", endpoint.name, sampler.peak / MiB)
                    self.detail(
                        "6",
                        endpoint.name,
                        peak_rss_bytes=sampler.peak,
                        rss_at_start_bytes=sampler.first,
                        samples=sampler.samples,
                    )
                    rss = f"   peak RSS {sampler.peak / MiB:.1f} MiB"
                self.say(
                    f"  {endpoint.name:9}  {run.wall_seconds:7.2f} s   upstream ×{ratio:.3f}"
                    # bytes over the whole pull, not the fill's own rate
                    f" ({sent / run.wall_seconds / 1e6:.0f} MB per wall s){rss}"
                    f"   server CPU {cpu.seconds:.1f} s, clients {run.client_cpu_seconds:.1f} s"
                    f" ({run.client_system_seconds:.1f} s system)"
                    + (f", link CPU {link_cpu.seconds:.1f} s" if link_cpu else "")
                    + f", machine {cpu.machine_busy:.0%} busy"
                )

    def step_manifests(self) -> None:
        plan = self.plan
        repository = "bench/medium"
        digest = self.images.medium.manifest_digest
        self.say(
            f"step 4: warm manifest GETs of {repository} (wrk -t{plan.wrk_threads} "
            f"-c{plan.wrk_connections} -d{plan.wrk_seconds:g}s, Accept: the 4 manifest types)"
        )
        for kind, reference in (("tag", "1"), ("digest", digest)):
            for endpoint in self.all_endpoints():
                with self.attempt("4", f"{endpoint.name} by {kind}"):
                    url = f"{endpoint.url}/v2/{repository}/manifests/{reference}"
                    headers = {"Accept": ACCEPT, **endpoint.headers(repository)}
                    for _ in range(2):  # the first may be a miss; the second is warm
                        answer = get_ok(url, headers)
                        if answer.headers.get("docker-content-digest") != digest:
                            raise AssertionError(f"{url} answered digest {answer.headers}")
                    # one unmeasured second: connections open, caches and pools warm
                    run_wrk(
                        url,
                        headers,
                        threads=plan.wrk_threads,
                        connections=plan.wrk_connections,
                        seconds=1,
                        workdir=self.work,
                    )
                    mark = self.log.mark()
                    with CpuMeter(self.server_pid(endpoint)) as cpu:
                        run = run_wrk(
                            url,
                            headers,
                            threads=plan.wrk_threads,
                            connections=plan.wrk_connections,
                            seconds=plan.wrk_seconds,
                            workdir=self.work,
                        )
                    self.watch(cpu, f"step 4 {endpoint.name} by {kind}")
                    entries = self.log.since(mark)
                    per_request = len(entries) / run.requests if run.requests else 0.0
                    errors = {k: v for k, v in run.errors.items() if v}
                    self.set(f"manifest_{kind}_rps", endpoint.name, run.requests_per_second)
                    self.set(f"manifest_{kind}_p50", endpoint.name, run.p50_ms)
                    self.set(f"manifest_{kind}_p99", endpoint.name, run.p99_ms)
                    if endpoint.server is not None:
                        self.set(f"manifest_{kind}_upstream", endpoint.name, per_request)
                    self.detail(
                        "4",
                        f"{endpoint.name} by {kind}",
                        wrk=dataclasses.asdict(run),
                        upstream_requests=breakdown(entries),
                        server=cpu.as_dict(),
                    )
                    if errors:
                        self.figures[f"manifest_{kind}_rps"].notes[endpoint.name] = {
                            "wrk_errors": errors
                        }
                    self.say(
                        f"  {kind:6} {endpoint.name:9}  {run.requests_per_second:9.0f} req/s  "
                        f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                        f"upstream {len(entries)} requests"
                        + (f"  ERRORS {errors}" if errors else "")
                    )

    def step_blobs(self) -> None:
        plan = self.plan
        layer = self.images.large.layers[0]
        repository = "bench/large"
        self.say(
            f"step 5: warm blob GETs of the {layer.size / MiB:.0f} MiB layer (curl to /dev/null): "
            f"1 stream × {plan.blob_rounds_single} downloads, {plan.blob_streams} streams × "
            f"{plan.blob_rounds_streams}"
        )
        for endpoint in self.all_endpoints():
            with self.attempt("5", endpoint.name):
                url = f"{endpoint.url}/v2/{repository}/blobs/{layer.digest}"
                headers = endpoint.headers(repository)
                server = endpoint.server
                if server is not None and "large" not in server.warm:
                    blob_throughput(url, headers, layer.size, streams=1, rounds=1)
                    server.warm.add("large")
                    # Warm means done with it: a replica is still putting the layer into
                    # its bucket for seconds after serving it (SeaweedFS on these cores).
                    wait_quiet(server.pid)
                mark = self.log.mark()
                with CpuMeter(self.server_pid(endpoint)) as cpu_one:
                    one = blob_throughput(
                        url, headers, layer.size, streams=1, rounds=plan.blob_rounds_single
                    )
                with CpuMeter(self.server_pid(endpoint)) as cpu_many:
                    many = blob_throughput(
                        url,
                        headers,
                        layer.size,
                        streams=plan.blob_streams,
                        rounds=plan.blob_rounds_streams,
                    )
                self.watch(cpu_one, f"step 5 {endpoint.name} 1 stream")
                self.watch(cpu_many, f"step 5 {endpoint.name} {plan.blob_streams} streams")
                entries = self.log.since(mark)
                self.set("blob_1_stream", endpoint.name, one.mb_per_second)
                self.set("blob_8_streams", endpoint.name, many.mb_per_second)
                self.detail(
                    "5",
                    endpoint.name,
                    one_stream={**dataclasses.asdict(one), "server": cpu_one.as_dict()},
                    many_streams={**dataclasses.asdict(many), "server": cpu_many.as_dict()},
                    upstream_requests=breakdown(entries),
                )
                self.say(
                    f"  {endpoint.name:9}  1 stream {one.mb_per_second:5.0f} MB/s "
                    f"(server CPU {cpu_one.seconds / one.wall_seconds:.0%})   "
                    f"{plan.blob_streams} streams {many.mb_per_second:5.0f} MB/s "
                    f"(server CPU {cpu_many.seconds / many.wall_seconds:.0%})   "
                    f"upstream {len(entries)} requests"
                )

    def mixed_requests(self, accept: str) -> list[tuple[str, dict[str, str]]]:
        """The warm mix: every image's manifest by tag and by digest, and its config blob.

        ``accept`` "full" sends the 4 manifest types on every manifest GET; "single" only
        the type of the manifest asked for (what a client that knows it sends)."""
        requests: list[tuple[str, dict[str, str]]] = []
        for name, image in self.images.named():
            media_type = image.manifest_media_type if isinstance(image, ImageInfo) else OCI_INDEX
            headers = {"Accept": ACCEPT if accept == "full" else media_type}
            for reference in ("1", image.manifest_digest):
                requests.append((f"/v2/bench/{name}/manifests/{reference}", headers))
            configs = [image] if isinstance(image, ImageInfo) else list(image.images)
            for config in configs:
                requests.append((f"/v2/bench/{name}/blobs/{config.config_digest}", {}))
        return requests

    def step_mixed(self) -> None:
        plan = self.plan
        self.say(
            f"step 7: warm mixed load (manifests by tag and digest, config blobs), wrk "
            f"-t{plan.wrk_threads} -d{plan.mix_seconds:g}s, {plan.mix_rounds} round(s) each, "
            "mirror and reference in turn"
        )
        runs: dict[tuple[str, str], list[tuple[WrkRun, int]]] = {}
        for load in MIXED_LOADS:
            requests = self.mixed_requests(load.accept)
            for endpoint in self.caches():
                with self.attempt("7", f"{endpoint.name} warm-up"):
                    for path, headers in requests:
                        for _ in range(2):  # the first may be a miss; the second is warm
                            get_ok(endpoint.url + path, headers)
            for round_number in range(plan.mix_rounds):
                for endpoint in self.caches():
                    with self.attempt("7", f"{endpoint.name} {load.key}"):
                        if round_number == 0:  # connections open, pools warm; unmeasured
                            run_wrk_mix(
                                endpoint.url,
                                requests,
                                threads=plan.wrk_threads,
                                connections=load.connections,
                                seconds=1,
                                workdir=self.work,
                            )
                        # a cache still answering the last run's abandoned requests (the
                        # reference at 1,000 connections) would load this one
                        for cache in self.caches():
                            wait_quiet(self.server_pid(cache))
                        mark = self.log.mark()
                        with CpuMeter(self.server_pid(endpoint)) as cpu:
                            run = run_wrk_mix(
                                endpoint.url,
                                requests,
                                threads=plan.wrk_threads,
                                connections=load.connections,
                                seconds=plan.mix_seconds,
                                workdir=self.work,
                            )
                        self.watch(cpu, f"step 7 {endpoint.name} {load.key}")
                        entries = self.log.since(mark)
                        # only this cache's requests count (the mirror names itself)
                        upstream = sum(
                            e.user_agent.startswith("mirror/") == (endpoint.name == "mirror")
                            for e in entries
                        )
                        runs.setdefault((load.key, endpoint.name), []).append((run, upstream))
                        self.details.setdefault("7", {}).setdefault(
                            f"{endpoint.name} {load.key}", []
                        ).append(
                            {
                                "wrk": dataclasses.asdict(run),
                                "upstream_requests": upstream,
                                "upstream_by_agent": dict(Counter(e.user_agent for e in entries)),
                                # few when warm: each of the mirror's, to tell what it was
                                "mirror_upstream": [
                                    f"{e.time} {e.method} {e.uri} {e.status}"
                                    for e in entries
                                    if e.user_agent.startswith("mirror/")
                                ][:20],
                                "server": cpu.as_dict(),
                            }
                        )
                        errors = sum(run.errors.values())
                        self.say(
                            f"  {load.key:15} {endpoint.name:9} {run.requests_per_second:7.0f} "
                            f"req/s  p50 {run.p50_ms:7.1f}  p90 {run.p90_ms:7.1f}  p99 "
                            f"{run.p99_ms:7.1f}  max {run.max_ms:7.0f} ms  errors {errors}  "
                            f"upstream {upstream}  server CPU {cpu.seconds:.1f} s"
                        )
        for (key, name), measured in runs.items():
            # the median run by requests/s stands for the load; every run is in the JSON
            run, upstream = sorted(measured, key=lambda m: m[0].requests_per_second)[
                len(measured) // 2
            ]
            self.set(f"{key}_rps", name, run.requests_per_second)
            for figure in ("p50", "p90", "p99", "max"):
                self.set(f"{key}_{figure}", name, getattr(run, f"{figure}_ms"))
            self.set(f"{key}_errors", name, sum(sum(m[0].errors.values()) for m in measured))
            self.set(f"{key}_upstream", name, sum(m[1] for m in measured))
        if self.profile is not None:
            self.profile_mixed()
        base = self.figures["mix_100_full_p99"].mirror
        if base is not None:
            self.figures["mix_1000_full_p99"].targets = (Condition("<=", 10 * base),)

    def profile_mixed(self) -> None:
        """One more (unmeasured) run of each load on the mirror, sampled by py-spy."""
        assert self.profile is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        for load in MIXED_LOADS:
            with self.attempt("7", f"mirror {load.key} profile"):
                out = self.profile / f"{load.key}.txt"
                with py_spy(self.mirror.pid, out):
                    run_wrk_mix(
                        self.mirror.url,
                        self.mixed_requests(load.accept),
                        threads=self.plan.wrk_threads,
                        connections=load.connections,
                        seconds=max(self.plan.mix_seconds, 10),
                        workdir=self.work,
                    )
                samples, functions = summarize(out)
                self.say(
                    f"  profile of the mirror, {load.key} ({out}, {samples} samples): "
                    "inclusive / self"
                )
                for name, inclusive, own in functions:
                    self.say(f"    {inclusive:6.1%} {own:6.1%}  {name[:110]}")

    def check_idle(self, when: str) -> None:
        """Record (and warn about) CPU used by processes that are not the benchmark's."""
        os.sync()  # writeback of earlier steps is not another process's load
        load = foreign_load()
        self.details.setdefault("other_processes", {})[when] = dataclasses.asdict(load)
        share = load.others_share
        if share > OTHERS_WARN:
            top = str(load.busiest[0]["command"]) if load.busiest else "?"
            self.warnings.append(f"before {when}: other processes used {share:.0%} CPU")
            self.say(
                f"  !! machine not idle before {when}: other processes use {share:.0%} of the "
                f"CPU (busiest: {top[:100]}); figures will be noisy"
            )

    def watch(self, cpu: CpuMeter, what: str) -> None:
        """Warn when other processes took a share of the machine during a measurement."""
        share = cpu.others.others_share
        if share > OTHERS_WARN:
            top = str(cpu.others.busiest[0]["command"]) if cpu.others.busiest else "?"
            self.warnings.append(f"during {what}: other processes used {share:.0%} CPU ({top})")
            self.say(f"  !! other processes used {share:.0%} of the CPU during {what}: {top}")

    def run_steps(self) -> None:
        self.check_idle("sanity")
        self.sanity()
        timings: dict[str, float] = {}
        for number, function in (
            ("link", self.step_link),
            ("1", self.step_cold_pull),
            ("2", self.step_warm_pull),
            ("3", self.step_concurrent),
            ("4", self.step_manifests),
            ("5", self.step_blobs),
            ("7", self.step_mixed),
            ("8", lambda: step_replicas(self, _mirror_executable())),
        ):
            wanted = (
                number in self.steps
                or (number == "3" and "6" in self.steps)
                or (number == "link" and bool(self.steps & COLD_STEPS))
            )
            if not wanted:
                continue
            self.check_idle("link check" if number == "link" else f"step {number}")
            started = time.monotonic()
            function()
            timings[number] = round(time.monotonic() - started, 1)
        self.details["step_seconds"] = timings

    # ------------------------------------------------------------------ logs
    def scan_logs(self) -> dict[str, Any]:
        """Warning and error lines each process logged (the upstream's from after seeding),
        grouped by message with a count and one example line."""
        go_levels = re.compile(r"level=(warn|warning|error|fatal|panic)\b|^panic:")
        sources = {
            "mirror": (
                self.mirror.log_path,
                0,
                re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback"),
            ),
            "reference": (self.reference.log_path, 0, go_levels),
            "upstream": (self.upstream.app_log_path, self.upstream_log_offset, go_levels),
        }
        found: dict[str, Any] = {}
        for name, (path, offset, pattern) in sources.items():
            try:
                with open(path, "rb") as log:
                    log.seek(offset)
                    lines = log.read().decode(errors="replace").splitlines()
            except FileNotFoundError:
                lines = []
            groups: dict[str, list[Any]] = {}
            for line in lines:
                if pattern.search(line):
                    group = groups.setdefault(_message(line), [0, line])
                    group[0] += 1
            found[name] = {
                "count": sum(count for count, _ in groups.values()),
                "groups": [
                    {"count": count, "message": message, "example": example[:2000]}
                    for message, (count, example) in sorted(
                        groups.items(), key=lambda item: -int(item[1][0])
                    )
                ],
            }
        return found


_GO_MESSAGE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_GO_ERROR = re.compile(r'err\.message="((?:[^"\\]|\\.)*)"')
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+Z?\s*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _message(line: str) -> str:
    """A log line without what varies between repeats (time, ids, digests)."""
    match = _GO_MESSAGE.search(line)
    if match:
        text = match.group(1)
        error = _GO_ERROR.search(line)
        if error:
            text += f" ({error.group(1)})"
    else:
        text = _TIMESTAMP.sub("", line.strip())
    return _DIGEST.sub("sha256:…", text)[:300]


def _mirror_executable() -> Path:
    candidate = Path(sys.executable).parent / "mirror"
    if candidate.exists():
        return candidate
    found = shutil.which("mirror")
    if found is None:
        raise RuntimeError("no `mirror` executable: run scripts/install first")
    return Path(found)


def _versions(tree: Path | None = None) -> dict[str, str]:
    import subprocess

    git = ["git", "-C", str(tree)] if tree is not None else ["git"]

    versions: dict[str, str] = {}
    for name, argv in (
        ("docker-registry", ["docker-registry", "--version"]),
        ("skopeo", ["skopeo", "--version"]),
        ("wrk", ["wrk", "--version"]),
        ("curl", ["curl", "--version"]),
        ("mirror_commit", [*git, "rev-parse", "--short", "HEAD"]),
    ):
        try:
            result = subprocess.run(argv, capture_output=True, timeout=10, check=False)
            text = (result.stdout or result.stderr).decode(errors="replace").strip()
            versions[name] = text.splitlines()[0] if text else ""
        except OSError as exc:
            versions[name] = f"unavailable: {exc}"
    try:  # the mirror measured is the work tree's, committed or not
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "mirror", "pyproject.toml"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        versions["mirror_uncommitted"] = " ".join(status.stdout.decode().split()) or "none"
    except OSError as exc:
        versions["mirror_uncommitted"] = f"unavailable: {exc}"
    return versions


def _parse_steps(values: Sequence[str] | None) -> set[str]:
    if not values:
        return set(DEFAULT_STEPS)
    steps: set[str] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            step = STEP_NAMES.get(item, item)
            if step not in STEPS:
                known = ", ".join([*STEPS, *STEP_NAMES])
                raise SystemExit(f"bench: unknown step {item!r} (known: {known})")
            steps.add(step)
    return steps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small images and short runs (a sanity run)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="STEP",
        help="run only this step: link, 1-8 or cold, warm, concurrent, manifests, blobs, rss, "
        "mixed, replicas (repeatable or comma separated; 6 runs 3, where RSS is sampled; 1, 3, "
        "6 and 8 run the link check too; 8 is not part of the default run)",
    )
    parser.add_argument(
        "--upstream-rate",
        type=_rate_arg,
        default=DEFAULT_UPSTREAM_RATE,
        metavar="RATE",
        help="bandwidth of the link between the caches (and direct cold pulls) and the "
        "upstream, shared by all connections, e.g. 100MB/s, 50MiB/s, 1Gbit/s; 0: no link, "
        f"loopback speed (default: {DEFAULT_UPSTREAM_RATE})",
    )
    parser.add_argument(
        "--upstream-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay the link adds to each connection setup to the upstream (default: 0)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="step 7: also sample the mirror with py-spy under each load, into DIR",
    )
    parser.add_argument(
        "--storage",
        choices=("disk", "s3"),
        default="disk",
        help="s3: the mirror runs as a replica (its disk a hot tier in front of a SeaweedFS "
        "bucket, records in Redis), cold starts on a fresh key prefix (default: disk)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="the mirror's worker processes (server.workers; default: 1)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other processes to leave the CPU idle "
        f"(under {OTHERS_WARN:.0%}% for 5 s in a row)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench/results/latest.json"),
        help="where to write the results (default: bench/results/latest.json)",
    )
    parser.add_argument(
        "--mirror-tree",
        type=Path,
        metavar="DIR",
        help="run the mirror package of this source tree (e.g. a worktree of an older "
        "commit, for A/B runs) with this checkout's venv and harness",
    )
    parser.add_argument(
        "--mirror-only",
        action="store_true",
        help="measure the mirror alone, not the reference nor direct (A/B runs)",
    )
    return parser


def _rate_arg(text: str) -> float:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _wait_idle(limit: float) -> None:
    deadline = time.monotonic() + limit
    quiet = 0
    while quiet < 5:
        load = foreign_load()
        quiet = quiet + 1 if load.others_share < OTHERS_WARN else 0
        if quiet == 0 and time.monotonic() > deadline:
            print(f"bench: machine still busy after {limit:.0f} s; starting anyway", flush=True)
            return
        if quiet == 0:
            top = str(load.busiest[0]["command"])[:100] if load.busiest else "?"
            print(f"bench: waiting for an idle machine ({load.others_share:.0%}: {top})")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    steps = _parse_steps(args.only)
    plan = QUICK if args.quick else FULL
    if args.upstream_latency_ms < 0:
        raise SystemExit("bench: --upstream-latency-ms must not be negative")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.wait_idle > 0:
        _wait_idle(args.wait_idle)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    bench = Bench(
        plan=plan,
        work=work,
        steps=steps,
        rate=args.upstream_rate,
        latency_ms=args.upstream_latency_ms,
        profile=args.profile,
        storage=args.storage,
        mirror_tree=args.mirror_tree,
        mirror_only=args.mirror_only,
        workers=args.workers,
    )
    interrupted = False
    logs: dict[str, Any] = {}
    link: dict[str, Any] | None = None  # the link's own counters, written when it stops
    try:
        try:
            with ExitStack() as stack:
                bench.start(stack)
                bench.run_steps()
        except KeyboardInterrupt:
            interrupted = True
            print("\nbench: interrupted; everything started was stopped", file=sys.stderr)
        finally:
            if hasattr(bench, "mirror"):
                logs = bench.scan_logs()
            link = bench.link.summary() if bench.link is not None else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    runtime = time.monotonic() - began
    figures = list(bench.figures.values())
    print()
    versions = _versions(args.mirror_tree)
    tree = versions["mirror_commit"]
    if versions["mirror_uncommitted"] != "none":
        tree += f" + uncommitted ({versions['mirror_uncommitted']})"
    print(
        f"mirror benchmark ({plan.mode} mode), {runtime:.0f} s, mirror at {tree}, "
        f"{bench.workers} worker(s), storage {bench.storage}"
    )
    if bench.link is not None:
        print(
            f"upstream link: {format_rate(bench.rate)} shared, "
            f"{bench.latency_ms:g} ms per connection setup (cold pulls, direct included)"
        )
    else:
        print("upstream link: none, the upstream is on loopback (--upstream-rate 0)")
    print(render_table(figures))
    for name, found in logs.items():
        if found["count"]:
            print(f"\n{name} log: {found['count']} warning/error lines:")
            for group in found["groups"][:10]:
                print(f"  {group['count']:6} × {group['message'][:200]}")
    if bench.warnings:
        print("\nWARNING: the machine was not idle, these figures are unreliable:")
        for warning in bench.warnings:
            print(f"  {warning}")
    if bench.errors:
        print(f"\n{len(bench.errors)} measurement(s) failed:")
        for error in bench.errors:
            print(f"  step {error['step']} {error['endpoint']}: {error['error'][:500]}")
    document = {
        "mode": plan.mode,
        "steps": sorted(steps),
        "runtime_seconds": round(runtime, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": dataclasses.asdict(plan),
        "mirror_workers": bench.workers,
        "mirror_storage": bench.storage,
        "upstream_link": {
            "rate_bytes_per_second": bench.rate,
            "latency_ms": bench.latency_ms,
            "summary": link,
        },
        "versions": versions,
        "figures": [f.as_dict() for f in figures if f.measured],
        "details": bench.details,
        "logs": logs,
        "errors": bench.errors,
        "warnings": bench.warnings,
    }
    write_json(args.json, document)
    print(f"\nresults written to {args.json}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
