"""/metrics, /healthz, /readyz and the access log, scraped and parsed for real."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.logs import configure_logging
from mirror.manifest import OCI_MANIFEST
from mirror.metrics import Metrics
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, live_server, make_settings
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def cache(samples: Samples, kind: str, result: str) -> float:
    return value(samples, "mirror_cache_requests_total", kind=kind, result=result)


async def test_a_miss_then_a_hit_move_the_counters_exactly(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, body = fake.add_image("library/a", "1", [b"layer-bytes"])
    blob = fake.add_blob(b"x" * 1000)
    before = await scrape(client)
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    await client.get(f"/v2/library/a/blobs/{blob}")
    await fills_settled(client)
    after_miss = await scrape(client)
    assert cache(after_miss, "manifest", "miss") - cache(before, "manifest", "miss") == 1
    assert cache(after_miss, "blob", "miss") - cache(before, "blob", "miss") == 1
    assert value(after_miss, "mirror_sent_bytes_total", source="upstream") == len(body) + 1000
    assert (
        value(after_miss, "mirror_upstream_bytes_total", upstream="docker.io") == len(body) + 1000
    )
    assert (
        value(
            after_miss,
            "mirror_upstream_requests_total",
            upstream="docker.io",
            method="GET",
            status="200",
        )
        == 2
    )
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    await client.get(f"/v2/library/a/blobs/{blob}")
    after_hit = await scrape(client)
    assert cache(after_hit, "manifest", "hit") == 1
    assert cache(after_hit, "blob", "hit") == 1
    assert value(after_hit, "mirror_sent_bytes_total", source="cache") == len(body) + 1000
    assert value(after_hit, "mirror_upstream_bytes_total", upstream="docker.io") == len(body) + 1000
    assert (
        value(after_hit, "mirror_http_requests_total", route="manifest", method="GET", status="200")
        == 2
    )
    assert value(after_hit, "mirror_http_request_duration_seconds_count", route="blob") == 2
    assert value(after_hit, "mirror_cache_entries", kind="blob") == 1
    assert value(after_hit, "mirror_cache_entries", kind="manifest") == 1
    assert value(after_hit, "mirror_cache_entries", kind="tag") == 1
    assert value(after_hit, "mirror_cache_size_bytes") > 1000
    assert value(after_hit, "mirror_cache_max_size_bytes") == 50 * 1024**3


async def test_a_repository_named_like_a_route_is_counted_by_the_route_taken(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("myorg/manifests", "1", [b"layer"])
    blob = "sha256:" + hashlib.sha256(b"layer").hexdigest()
    assert (await client.get("/v2/myorg/manifests/manifests/1", headers=ACCEPT)).status_code == 200
    assert (await client.get(f"/v2/myorg/manifests/blobs/{blob}")).status_code == 200
    await client.get("/v2/myorg/manifests/tags/list")
    samples = await scrape(client)

    def requests(route: str) -> float:
        return value(samples, "mirror_http_request_duration_seconds_count", route=route)

    assert (requests("manifest"), requests("blob"), requests("tags")) == (1, 1, 1)


async def test_stale_and_negative_answers_are_counted(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    clock.now += 301
    fake.status = 503
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    fake.status = None
    await client.get("/v2/library/a/manifests/nope", headers=ACCEPT)
    await client.get("/v2/library/a/manifests/nope", headers=ACCEPT)
    samples = await scrape(client)
    assert cache(samples, "manifest", "stale") == 1
    assert cache(samples, "manifest", "negative_hit") == 1
    assert (
        value(
            samples,
            "mirror_upstream_requests_total",
            upstream="docker.io",
            method="HEAD",
            status="503",
        )
        == 1
    )


async def test_the_breaker_state_is_exposed(client: httpx.AsyncClient, fake: FakeRegistry) -> None:
    fake.down = True
    for _ in range(3):
        await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    samples = await scrape(client)
    assert value(samples, "mirror_upstream_breaker_open", upstream="docker.io") == 1
    assert (
        value(
            samples,
            "mirror_upstream_requests_total",
            upstream="docker.io",
            method="GET",
            status="error",
        )
        == 3
    )


async def test_coalesced_followers_and_fills_in_flight(
    live: live_server, fake: FakeRegistry
) -> None:
    digest = fake.add_blob(os.urandom(4 * 1024 * 1024))
    fake.hold_blobs = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        pulls = [asyncio.create_task(client.get(f"/v2/library/a/blobs/{digest}")) for _ in range(3)]
        await asyncio.wait_for(fake.halfway.wait(), timeout=10)
        while True:  # all three requests have joined the fill
            during = parse((await client.get("/metrics")).text)
            if cache(during, "blob", "miss") + cache(during, "blob", "coalesced") == 3:
                break
        assert value(during, "mirror_fills_in_flight") == 1
        fake.hold_blobs.set()
        await asyncio.gather(*pulls)
        while True:  # readers may finish just before the fill has adopted the blob
            after = parse((await client.get("/metrics")).text)
            if value(after, "mirror_fills_in_flight") == 0:
                break
    assert cache(after, "blob", "miss") == 1
    assert cache(after, "blob", "coalesced") == 2
    assert fake.count("GET", "blob") == 1


async def test_evictions_and_digest_mismatches_are_counted(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    settings = make_settings(tmp_path)
    small = replace(
        settings,
        cache=replace(settings.cache, max_size=2 * 1024 * 1024 + 512 * 1024, max_blob_share=1.0),
    )
    blobs = [fake.add_blob(os.urandom(1024 * 1024)) for _ in range(3)]
    bad = fake.add_blob(os.urandom(1000))
    fake.corrupt.add(bad)
    app = create_app(small, upstream_transport=httpx.MockTransport(fake))
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        for digest in blobs:
            await client.get(f"/v2/library/a/blobs/{digest}")
        with pytest.raises(httpx.HTTPError):
            await client.get(f"/v2/library/a/blobs/{bad}")
        await fills_settled(client)
        samples = await scrape(client)
    assert value(samples, "mirror_cache_evictions_total") == 1
    assert value(samples, "mirror_digest_mismatches_total", kind="blob") == 1
    assert value(samples, "mirror_cache_entries", kind="blob") == 2


async def test_rate_limit_gauges_follow_the_upstream_headers(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    fake.add_image("library/a", "2", [b"y"])
    fake.headers.update({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"})
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    samples = await scrape(client)
    assert value(samples, "mirror_upstream_ratelimit_limit", upstream="docker.io") == 100
    assert value(samples, "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 76
    fake.headers["ratelimit-remaining"] = "75;w=21600"
    await client.get("/v2/library/a/manifests/2", headers=ACCEPT)
    samples = await scrape(client)
    assert value(samples, "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 75


async def test_health_and_readiness(tmp_path: Path, fake: FakeRegistry) -> None:
    settings = make_settings(tmp_path)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        # Root ignores permission bits, so take the directory away instead.
        tmp = settings.cache.directory / "tmp"
        shutil.rmtree(tmp)
        tmp.write_text("not a directory")
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "not writable" in ready.text
        assert (await client.get("/healthz")).status_code == 200
        tmp.unlink()
        tmp.mkdir()
        assert (await client.get("/readyz")).status_code == 200
    assert fake.total == 0  # neither probe asks the upstream


async def test_access_log_has_one_line_per_request_with_cache_result(
    client: httpx.AsyncClient, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    with caplog.at_level(logging.INFO, logger="mirror.access"):
        await client.get("/v2/library/a/manifests/1?ns=docker.io", headers=ACCEPT)
        await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    lines = [r for r in caplog.records if r.name == "mirror.access"]
    assert len(lines) == 2
    first = lines[0].access  # type: ignore[attr-defined]
    assert first["method"] == "GET"
    assert first["path"] == "/v2/library/a/manifests/1?ns=docker.io"
    assert first["status"] == 200
    assert first["cache"] == "miss"
    assert first["upstream"] == "docker.io"
    assert first["bytes"] > 0
    assert "cache=hit" in lines[1].getMessage()


def test_json_log_format_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        logging.getLogger("mirror.access").info("line", extra={"access": {"status": 200}})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["status"] == 200
    assert entry["logger"] == "mirror.access"
    assert entry["message"] == "line"


def test_kept_label_children_count_every_call_into_one_series() -> None:
    metrics = Metrics(lambda: (0, {}, 0))
    requests = metrics.requests
    assert requests.labels("manifest", "GET", "200") is requests.labels("manifest", "GET", "200")
    for _ in range(3):
        requests.labels("manifest", "GET", "200").inc()
    requests.labels(route="manifest", method="GET", status="200").inc()  # the same series
    requests.labels("manifest", "GET", 200).inc()  # str()ed by prometheus-client, the same
    requests.labels("blob", "GET", "200").inc()
    metrics.request_seconds.labels("blob").observe(0.002)
    samples = parse(metrics.exposition().decode())
    labels = {"route": "manifest", "method": "GET", "status": "200"}
    assert value(samples, "mirror_http_requests_total", **labels) == 5
    assert value(samples, "mirror_http_requests_total", **{**labels, "route": "blob"}) == 1
    assert value(samples, "mirror_http_request_duration_seconds_count", route="blob") == 1
