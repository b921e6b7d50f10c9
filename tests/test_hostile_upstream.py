"""Hostile upstreams: slow revalidations, endless or huge bodies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from mirror.app import create_app
from tests.conftest import Clock, app_client, make_settings
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


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
