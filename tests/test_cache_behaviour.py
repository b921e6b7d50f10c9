"""The cache properties users count on, shown by counting upstream calls."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.manifest import OCI_MANIFEST
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, live_server, make_settings
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}


async def test_concurrent_misses_cause_one_upstream_fetch_and_stream_before_it_ends(
    live: live_server, fake: FakeRegistry
) -> None:
    data = os.urandom(64 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.hold_blobs = asyncio.Event()
    first_bytes = [asyncio.Event() for _ in range(16)]

    async def pull(client: httpx.AsyncClient, index: int) -> str:
        hasher = hashlib.sha256()
        async with client.stream("GET", f"/v2/library/a/blobs/{digest}") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                hasher.update(chunk)
                first_bytes[index].set()
        return "sha256:" + hasher.hexdigest()

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=60) as client:
        pulls = [asyncio.create_task(pull(client, i)) for i in range(16)]
        # Every client has bytes while the upstream body cannot have ended: the fake
        # holds it halfway until the event below is set.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_bytes)), timeout=30)
        assert fake.count("GET", "blob") == 1
        fake.hold_blobs.set()
        digests = await asyncio.wait_for(asyncio.gather(*pulls), timeout=60)
    assert digests == [digest] * 16
    assert fake.count("GET", "blob") == 1


async def test_first_client_hanging_up_does_not_abort_the_fill(
    live: live_server, fake: FakeRegistry
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.hold_blobs = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        async with client.stream("GET", f"/v2/library/a/blobs/{digest}") as response:
            async for _ in response.aiter_bytes():
                break  # hang up after the first bytes
        fake.hold_blobs.set()
        response = await client.get(f"/v2/library/a/blobs/{digest}")
    assert hashlib.sha256(response.content).hexdigest() == digest.split(":")[1]
    assert fake.count("GET", "blob") == 1


async def test_failed_fill_reaches_every_waiter_and_is_retried_next_time(
    live: live_server, fake: FakeRegistry
) -> None:
    digest = fake.add_blob(os.urandom(1024 * 1024))
    fake.corrupt.add(digest)
    fake.hold_blobs = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        pulls = [asyncio.create_task(client.get(f"/v2/library/a/blobs/{digest}")) for _ in range(4)]
        while True:  # every request has joined the one fill
            text = (await client.get("/metrics")).text
            if 'result="coalesced"} 3.0' in text:
                break
        fake.hold_blobs.set()
        results = await asyncio.gather(*pulls, return_exceptions=True)
        assert all(isinstance(r, httpx.HTTPError) for r in results)
        fake.corrupt.clear()
        response = await client.get(f"/v2/library/a/blobs/{digest}")
    assert response.status_code == 200
    assert fake.count("GET", "blob") == 2


async def test_tag_within_ttl_costs_nothing_and_after_it_one_head(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    before = fake.total
    for _ in range(100):
        response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
        assert response.status_code == 200
    assert fake.total == before  # within the TTL: not one upstream request
    clock.now += 301
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 200
    assert fake.count("HEAD", "manifest") == 1
    assert fake.count("GET", "manifest") == 1  # unchanged digest: no second GET
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert fake.count("HEAD", "manifest") == 1  # revalidation restarted the TTL


async def test_a_moved_tag_is_fetched_again_after_the_ttl(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("library/a", "1", [b"old"])
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    new_digest, new_body = fake.add_image("library/a", "1", [b"new"])
    clock.now += 301
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.headers["Docker-Content-Digest"] == new_digest
    assert response.content == new_body
    assert fake.count("HEAD", "manifest") == 1
    assert fake.count("GET", "manifest") == 2


async def test_stale_record_served_with_warning_when_upstream_fails(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    digest, body = fake.add_image("library/a", "1", [b"x"])
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    clock.now += 301
    for status in (503, 429):
        fake.status = status
        response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
        assert response.status_code == 200
        assert response.content == body
        assert response.headers["Warning"].startswith("110 ")
    fake.status = None
    fake.down = True
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 200
    assert "Warning" in response.headers


async def test_breaker_opens_after_repeated_failures_and_probes_after_cooldown(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    clock.now += 301
    fake.down = True
    for _ in range(3):  # breaker_failures = 3
        assert (await client.get("/v2/library/a/manifests/1", headers=ACCEPT)).status_code == 200
    attempts = fake.count("HEAD", "refused")
    assert attempts == 3
    for _ in range(20):
        response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
        assert response.status_code == 200
        assert "Warning" in response.headers
    uncached = await client.get("/v2/library/b/manifests/1", headers=ACCEPT)
    assert uncached.status_code == 503
    assert uncached.headers["Retry-After"] == "30"  # breaker_cooldown = 30 s, all of it left
    clock.now += 20.5
    uncached = await client.get("/v2/library/b/manifests/1", headers=ACCEPT)
    assert (uncached.status_code, uncached.headers["Retry-After"]) == (503, "10")
    assert fake.count("HEAD", "refused") + fake.count("GET", "refused") == attempts
    clock.now += 10.5
    fake.down = False
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert "Warning" not in response.headers
    assert fake.count("HEAD", "manifest") == 1


async def test_unknown_tag_is_asked_again_only_after_negative_ttl(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    for _ in range(5):
        response = await client.get("/v2/library/a/manifests/nope", headers=ACCEPT)
        assert response.status_code == 404
    assert fake.count("GET", "manifest") == 1


async def test_offline_never_contacts_upstream(tmp_path: Path, fake: FakeRegistry) -> None:
    digest, body = fake.add_image("library/a", "1", [b"x"])
    online = create_app(make_settings(tmp_path), upstream_transport=httpx.MockTransport(fake))
    async with app_client(online) as client:
        await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    settings = make_settings(tmp_path)
    offline_settings = replace(settings, cache=replace(settings.cache, offline=True))
    before = fake.total
    offline = create_app(offline_settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(offline) as client:
        hit = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
        assert hit.content == body
        miss = await client.get("/v2/library/other/manifests/1", headers=ACCEPT)
        assert miss.status_code == 404
        assert "offline" in miss.json()["errors"][0]["message"]
        blob = await client.get("/v2/library/a/blobs/sha256:" + "2" * 64)
        assert blob.status_code == 404
    assert fake.total == before


async def test_eviction_under_a_small_cap_keeps_the_most_recently_used(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    settings = make_settings(tmp_path)
    cache = replace(settings.cache, max_size=3 * 1024 * 1024 + 512 * 1024, max_blob_share=0.5)
    small = replace(settings, cache=cache)
    blobs = [fake.add_blob(os.urandom(1024 * 1024)) for _ in range(4)]
    app = create_app(small, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        for digest in blobs[:3]:
            await client.get(f"/v2/library/a/blobs/{digest}")
            await fills_settled(client)
        await client.get(f"/v2/library/a/blobs/{blobs[0]}")  # keep the first one warm
        await client.get(f"/v2/library/a/blobs/{blobs[3]}")  # over the cap: evict the LRU
        await fills_settled(client)
        before = fake.count("GET", "blob")
        await client.get(f"/v2/library/a/blobs/{blobs[0]}")
        await client.get(f"/v2/library/a/blobs/{blobs[3]}")
        assert fake.count("GET", "blob") == before  # both still cached
        response = await client.get(f"/v2/library/a/blobs/{blobs[1]}")  # evicted: fetched again
        assert response.status_code == 200
        assert fake.count("GET", "blob") == before + 1


async def test_tag_list_is_served_stale_when_the_upstream_fails(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    for tag in ("1", "2"):
        fake.add_image("library/a", tag, [tag.encode()])
    first = await client.get("/v2/library/a/tags/list")
    assert first.json()["tags"] == ["1", "2"]
    fake.status = 503
    stale = await client.get("/v2/library/a/tags/list")
    assert stale.status_code == 200
    assert stale.json()["tags"] == ["1", "2"]
    never = await client.get("/v2/library/b/tags/list")
    assert never.status_code == 503


async def test_a_blob_evicted_while_it_is_read_is_still_read_whole(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    settings = make_settings(tmp_path)
    small = replace(
        settings, cache=replace(settings.cache, max_size=6 * 1024 * 1024, max_blob_share=1.0)
    )
    first = os.urandom(4 * 1024 * 1024)
    digest = fake.add_blob(first)
    other = fake.add_blob(os.urandom(4 * 1024 * 1024))
    app = create_app(small, upstream_transport=httpx.MockTransport(fake))
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        await client.get(f"/v2/library/a/blobs/{digest}")
        await fills_settled(client)
        hasher = hashlib.sha256()
        async with client.stream("GET", f"/v2/library/a/blobs/{digest}") as reading:
            pieces = reading.aiter_bytes()
            hasher.update(await anext(pieces))
            # Another blob pushes this one out of the cache while it is being read.
            await client.get(f"/v2/library/a/blobs/{other}")
            await fills_settled(client)
            evicted = await client.get("/metrics")
            assert "mirror_cache_evictions_total 1.0" in evicted.text
            async for piece in pieces:
                hasher.update(piece)
        assert "sha256:" + hasher.hexdigest() == digest
        fetched = fake.count("GET", "blob")
        await client.get(f"/v2/library/a/blobs/{digest}")
        assert fake.count("GET", "blob") == fetched + 1  # it really was the one evicted
