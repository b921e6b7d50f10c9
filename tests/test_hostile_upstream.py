"""Hostile upstreams: slow revalidations, endless or huge bodies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings
from mirror.reference import parse_digest
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, make_settings
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio

ZERO = "sha256:" + "0" * 64


async def test_a_slow_revalidation_serves_stale_in_time_and_sends_one_head(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    digest, _ = fake.add_image("library/a", "1", [b"layer"])
    release = asyncio.Event()
    heads = 0

    async def slow_heads(request: httpx.Request) -> httpx.Response:
        nonlocal heads
        if request.method == "HEAD" and "/manifests/" in request.url.path:
            heads += 1
            await release.wait()
        return await fake(request)

    settings = make_settings(tmp_path, revalidate_timeout=1)
    app = create_app(settings, upstream_transport=httpx.MockTransport(slow_heads), now=clock)
    async with app_client(app) as client:
        assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
        clock.now += 3600  # past the tag's TTL
        answers = await asyncio.gather(
            *(client.get("/v2/library/a/manifests/1") for _ in range(50))
        )
        assert {a.status_code for a in answers} == {200}
        assert {a.headers["Docker-Content-Digest"] for a in answers} == {digest}
        assert all(a.headers["Warning"].startswith("110 ") for a in answers)
        assert heads == 1
        release.set()  # the revalidation under way finishes; this one joins it
        fresh = await client.get("/v2/library/a/manifests/1")
        assert fresh.status_code == 200
        assert "Warning" not in fresh.headers
        assert heads == 1
        again = await client.get("/v2/library/a/manifests/1")
        assert "Warning" not in again.headers  # the tag record was renewed
        assert heads == 1


async def endless(piece: bytes) -> AsyncIterator[bytes]:
    while True:
        yield piece
        await asyncio.sleep(0)


@pytest.mark.parametrize("path", ["/v2/library/a/tags/list", f"/v2/library/a/referrers/{ZERO}"])
async def test_an_endless_list_body_is_cut_off(settings: Settings, clock: Clock, path: str) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless(b'{"tags": ["' + b"x" * 65536))

    app = create_app(settings, upstream_transport=httpx.MockTransport(upstream), now=clock)
    async with app_client(app) as client:
        response = await client.get(path)
        # Cut off at the cap rather than read to the end (the referrers module calls
        # an oversized list invalid, the tag list an upstream failure).
        assert response.status_code in (400, 503)


async def test_concurrent_tag_lists_share_one_download(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> None:
    for tag in ("1", "2"):
        fake.add_image("library/a", tag, [tag.encode()])
    release, called = asyncio.Event(), asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        called.set()
        await release.wait()
        return await fake(request)

    app = create_app(settings, upstream_transport=httpx.MockTransport(held), now=clock)
    async with app_client(app) as client:
        lists = [asyncio.create_task(client.get("/v2/library/a/tags/list")) for _ in range(20)]
        await called.wait()
        for _ in range(200):  # no I/O before the single flight: the others reach it
            await asyncio.sleep(0)
        release.set()
        answers = await asyncio.gather(*lists)
        assert {tuple(a.json()["tags"]) for a in answers} == {("1", "2")}
        assert fake.count("GET", "tags") == 1


async def test_a_tag_list_is_cached_under_max_size(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = make_settings(tmp_path)
    settings = replace(settings, cache=replace(settings.cache, max_size=1024 * 1024))
    for i in range(12_000):
        fake.tags[("library/big", f"tag-{i:05d}-{'x' * 100}")] = "sha256:" + "0" * 64
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        response = await client.get("/v2/library/big/tags/list?n=5")
        assert response.status_code == 200
        volume, _, cap = app.state.cache.store.facts()
        assert volume <= cap


async def test_a_blob_larger_than_its_share_of_the_cache_passes_through(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = make_settings(tmp_path)
    cache = replace(settings.cache, max_size=4 * 1024 * 1024, max_blob_share=0.25)
    settings = replace(settings, cache=cache)
    small = fake.add_blob(os.urandom(100_000))
    big_data = os.urandom(2 * 1024 * 1024)
    big = fake.add_blob(big_data)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        await client.get(f"/v2/library/a/blobs/{small}")
        await fills_settled(client)
        for _ in range(2):
            response = await client.get(f"/v2/library/a/blobs/{big}")
            assert response.status_code == 200
            assert response.content == big_data
            await fills_settled(client)
        assert not app.state.cache.store.has_blob(parse_digest(big))
        before = fake.count("GET", "blob")
        assert (await client.get(f"/v2/library/a/blobs/{small}")).status_code == 200
        assert fake.count("GET", "blob") == before  # the small one survived
