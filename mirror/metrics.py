"""The Prometheus metrics an operator runs the mirror on.

Every metric lives on a ``CollectorRegistry`` owned by one ``Metrics`` object, so
tests can build many apps in one process. Under ``mirror serve`` with several
workers (or a metrics listener of its own) the environment carries
``PROMETHEUS_MULTIPROC_DIR`` and prometheus-client's multiprocess mode adds up
what every worker counted; figures that are facts about the shared disk
(cache size, entries) are read at scrape time instead of being counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "CacheFacts", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# (size in bytes, {kind: entries}, configured cap in bytes), read from the disk index.
CacheFacts = Callable[[], tuple[int, dict[str, int], int]]


class _KeptChildren(MetricWrapperBase):
    """A metric that keeps its children by the label values asked for: prometheus-client's
    ``labels()`` makes a tuple of strings and takes a lock on every call, 6-7% of a warm
    request's instructions for the four per request. The children are its own, so what
    is counted (and summed across workers) is the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: dict[tuple[object, ...], Self] = {}

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        child = self._kept.get(labelvalues)
        if child is None:
            child = self._kept[labelvalues] = super().labels(*labelvalues)
        return child


class Counter(_KeptChildren, prometheus_client.Counter):
    pass


class Gauge(_KeptChildren, prometheus_client.Gauge):
    pass


class Histogram(_KeptChildren, prometheus_client.Histogram):
    pass


class _CacheCollector(Collector):
    def __init__(self, facts: CacheFacts) -> None:
        self._facts = facts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        size, entries, cap = self._facts()
        yield GaugeMetricFamily("mirror_cache_size_bytes", "Bytes the cache holds on disk.", size)
        yield GaugeMetricFamily("mirror_cache_max_size_bytes", "The configured size cap.", cap)
        family = GaugeMetricFamily(
            "mirror_cache_entries", "Entries in the cache index by kind.", labels=["kind"]
        )
        for kind, count in sorted(entries.items()):
            family.add_metric([kind], count)
        yield family


class Metrics:
    def __init__(self, facts: CacheFacts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._facts = facts
        self._multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        r = self.registry
        self.requests = Counter(
            "mirror_http_requests_total",
            "Client requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mirror_http_request_duration_seconds",
            "Time to answer a client request, body included, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_results = Counter(
            "mirror_cache_requests_total",
            "Cache lookups by kind (manifest, blob, referrers) and result (hit, miss, revalidated, "
            "stale, coalesced, negative_hit).",
            ["kind", "result"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "mirror_sent_bytes_total",
            "Body bytes sent to clients by source: cache (saved upstream traffic) or upstream.",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests_total",
            "Requests to upstream registries by upstream, method and status "
            "(status 'error' when no answer came).",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "mirror_upstream_request_duration_seconds",
            "Time until an upstream answered a request's headers.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes_total",
            "Manifest and blob bytes fetched from upstreams.",
            ["upstream"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "The upstream's pull rate limit, as last reported (ratelimit-limit).",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window, as last reported.",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.breaker_open = Gauge(
            "mirror_upstream_breaker_open",
            "1 while an upstream is considered down (circuit breaker open) in some worker.",
            ["upstream"],
            multiprocess_mode="livemax",  # a dead worker's open breaker is no alert
            registry=r,
        )
        self.evictions = Counter(
            "mirror_cache_evictions_total",
            "Entries evicted to keep the cache under its size cap.",
            registry=r,
        )
        self.fills_in_flight = Gauge(
            "mirror_fills_in_flight",
            "Blob downloads from upstreams under way.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches_total",
            "Upstream content that did not match its digest (never cached), by kind.",
            ["kind"],
            registry=r,
        )
        self.auth_denials = Counter(
            "mirror_auth_denials_total",
            "Client requests refused by authentication or access rules, by reason "
            "(unauthenticated, bad_credentials, bad_token, throttled, forbidden).",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "mirror_rate_limited_total",
            "Client requests refused by a per-client budget (requests, upstream).",
            ["budget"],
            registry=r,
        )
        self.admin_actions = Counter(
            "mirror_admin_actions_total",
            "Admin actions by action (purge, pin, unpin, refresh, verify) and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.admin_freed_bytes = Counter(
            "mirror_admin_freed_bytes_total",
            "Bytes deleted from the cache by admin purges and verify.",
            registry=r,
        )
        # Replicas sharing a bucket and Redis ([storage] backend = "s3").
        self.fleet_fills = Counter(
            "mirror_fleet_fills_total",
            "Local blob fills of a replica by source: bucket, lease (this replica went "
            "upstream for the fleet), peer (streamed from the replica filling it), alone "
            "(upstream without coordination).",
            ["source"],
            registry=r,
        )
        self.uncoordinated_fills = Counter(
            "mirror_uncoordinated_fills_total",
            "Blob fills from the upstream without the fleet's lease (Redis unreachable, or "
            "the holder of the lease gone); other replicas may download the same blob.",
            registry=r,
        )
        self.unstored_fills = Counter(
            "mirror_unstored_fills_total",
            "Blobs filled from the upstream but not put into the bucket (unreachable).",
            registry=r,
        )
        self.shared_failures = Counter(
            "mirror_shared_storage_failures_total",
            "Calls to what replicas share that failed and were done without it, by part "
            "(bucket: served from the hot tier or upstream; redis: this replica's records).",
            ["part"],
            registry=r,
        )
        self.bucket_evictions = Counter(
            "mirror_bucket_evictions_total",
            "Objects deleted from the shared bucket to keep it under storage.max_size.",
            registry=r,
        )
        if self._multiprocess_dir is None:
            self.registry.register(_CacheCollector(facts))

    def worker_exiting(self) -> None:
        """Drop this worker's live gauges (in-flight fills, open breakers) from scrapes."""
        if self._multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self._multiprocess_dir)  # type: ignore[no-untyped-call]

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: every worker's counts, and the disk's facts."""
        if self._multiprocess_dir is None:
            return self.registry
        _forget_dead_workers(self._multiprocess_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self._multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(_CacheCollector(self._facts))
        return registry

    def exposition(self) -> bytes:
        return generate_latest(self.scrape_registry())


def _forget_dead_workers(directory: str) -> None:
    """A worker killed with -9 never says it exits: its live gauges (in-flight fills,
    an open breaker) would count forever. Drop those of every process that is gone."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie is dead, just not reaped
