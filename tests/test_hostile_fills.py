"""Hostile load on fills: abandoned downloads, a route that never answers, more
misses than the upstream's download slots. Real sockets where pools matter."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings, parse
from mirror.service import PullThroughCache
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, live_server, make_settings
from tests.fakes import FakeRegistry
from tests.support.descriptors import open_descriptors
from tests.support.hostile import HandlerServer, SilentServer

pytestmark = pytest.mark.anyio


class StalledBlobs:
    """A FakeRegistry whose blob bodies send one piece, then stall until released."""

    def __init__(self, fake: FakeRegistry) -> None:
        self.fake = fake
        self.release = asyncio.Event()
        self.blob_gets = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        response = await self.fake(request)
        if request.method != "GET" or "/blobs/" not in request.url.path:
            return response
        self.blob_gets += 1
        return httpx.Response(200, headers=response.headers, content=self._stall(response))

    async def _stall(self, response: httpx.Response) -> AsyncIterator[bytes]:
        first = True
        async for chunk in response.aiter_raw():
            yield chunk
            if first:
                first = False
                await self.release.wait()


async def until(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(0.01)


async def test_abandoned_downloads_leave_the_upstream_to_everyone_else(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    fake.add_image("library/a", "1", [b"small"])
    blobs = [fake.add_blob(os.urandom(3 * 1024 * 1024)) for _ in range(12)]
    stalled = StalledBlobs(fake)
    async with HandlerServer(stalled) as upstream:
        settings = make_settings(
            tmp_path, url=upstream.url, max_fills=4, abandon_after=0.2, connect_timeout=2
        )
        app = create_app(settings)
        cache: PullThroughCache = app.state.cache
        async with live_server(app) as mirror, httpx.AsyncClient(base_url=mirror.url) as client:
            assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
            before = open_descriptors()

            async def hang_up_after_headers(digest: str) -> None:
                async with client.stream("GET", f"/v2/library/a/blobs/{digest}") as response:
                    assert response.status_code == 200

            gate = cache.gates["docker.io"]
            pulls = [asyncio.create_task(hang_up_after_headers(d)) for d in blobs]
            await until(lambda: stalled.blob_gets == 4 and gate.waiting == 8)
            # Every download slot is taken: manifests, HEADs and tags go on regardless.
            assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
            assert (await client.head(f"/v2/library/a/blobs/{blobs[0]}")).status_code == 200
            assert (await client.get("/v2/library/a/tags/list")).status_code == 200
            await asyncio.gather(*pulls)  # the clients read the headers and hang up
            # Nobody reads: each fill is dropped, and the queued ones get their turn.
            await until(lambda: stalled.blob_gets == 12)
            await fills_settled(client)
            assert cache.upstreams["docker.io"].breaker.state == "closed"
            assert list((tmp_path / "cache" / "tmp").iterdir()) == []
            stalled.release.set()
            response = await client.get(f"/v2/library/a/blobs/{blobs[0]}")
            assert response.status_code == 200
            assert response.content == fake.blobs[blobs[0]]
            await fills_settled(client)
        assert open_descriptors() <= before


def _healthy_and_silent(
    tmp_path: Path, healthy: str, silent: str, *, join_timeout: float
) -> Settings:
    """The default upstream answers; ``bad.example`` accepts connections and says nothing."""
    return parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [
                {"name": "docker.io", "url": healthy, "retries": 0, "join_timeout": join_timeout},
                {"name": "bad.example", "url": silent, "retries": 0},
            ],
        },
        environ={},
    )


async def test_a_route_that_never_answers_does_not_hold_a_healthy_one(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    async with SilentServer() as silent, HandlerServer(fake) as healthy:
        settings = _healthy_and_silent(tmp_path, healthy.url, silent.url, join_timeout=0.3)
        app = create_app(settings)
        async with app_client(app) as client:
            stuck = asyncio.create_task(client.get(f"/v2/bad.example/library/a/blobs/{digest}"))
            await until(lambda: silent.accepted == 1)
            response = await client.get(f"/v2/library/a/blobs/{digest}")
            assert response.status_code == 200
            assert response.content == data
            stuck.cancel()


async def test_a_joiner_whose_fill_failed_upstream_retries_through_its_own_route(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    async with SilentServer() as silent, HandlerServer(fake) as healthy:
        settings = _healthy_and_silent(tmp_path, healthy.url, silent.url, join_timeout=600)
        app = create_app(settings)
        cache: PullThroughCache = app.state.cache
        async with app_client(app) as client:
            first = asyncio.create_task(client.get(f"/v2/bad.example/library/a/blobs/{digest}"))
            await until(lambda: silent.accepted == 1)
            second = asyncio.create_task(client.get(f"/v2/library/a/blobs/{digest}"))
            fill = cache._fills[next(iter(cache._fills))]
            await until(lambda: fill.readers == 2)
            silent.hang_up()
            assert (await first).status_code == 503
            response = await second
            assert response.status_code == 200
            assert response.content == data
            await fills_settled(client)
            gets = fake.count("GET", "blob")
            again = await client.get(f"/v2/library/a/blobs/{digest}")
            assert again.content == data  # cached through the healthy route
            assert fake.count("GET", "blob") == gets


async def test_misses_past_the_download_slots_wait_then_get_429(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    blobs = [fake.add_blob(os.urandom(2 * 1024 * 1024)) for _ in range(3)]
    fake.hold_blobs = asyncio.Event()
    settings = make_settings(tmp_path, max_fills=1, fill_queue=1)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    cache: PullThroughCache = app.state.cache
    async with app_client(app) as client:
        first = asyncio.create_task(client.get(f"/v2/library/a/blobs/{blobs[0]}"))
        await fake.halfway.wait()
        queued = asyncio.create_task(client.get(f"/v2/library/a/blobs/{blobs[1]}"))
        await until(lambda: cache.gates["docker.io"].waiting == 1)
        refused = await client.get(f"/v2/library/a/blobs/{blobs[2]}")
        assert refused.status_code == 429
        assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert refused.headers["Retry-After"] == "1"
        fake.hold_blobs.set()
        assert (await first).content == fake.blobs[blobs[0]]
        assert (await queued).content == fake.blobs[blobs[1]]
        assert fake.count("GET", "blob") == 2


async def test_a_pool_timeout_does_not_open_the_breaker(tmp_path: Path, clock: Clock) -> None:
    busy = True
    fake = FakeRegistry()
    fake.add_image("library/a", "1", [b"x"])

    async def upstream(request: httpx.Request) -> httpx.Response:
        if busy:
            raise httpx.PoolTimeout("no connection free", request=request)
        return await fake(request)

    settings = make_settings(tmp_path, breaker_failures=1)
    settings = replace(settings)
    app = create_app(settings, upstream_transport=httpx.MockTransport(upstream), now=clock)
    async with app_client(app) as client:
        for _ in range(3):
            assert (await client.get("/v2/library/a/manifests/1")).status_code == 503
        busy = False
        assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
