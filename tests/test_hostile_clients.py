"""Hostile clients: half-sent and oversized request heads, more misses than
descriptors, against the server as ``mirror serve`` runs it."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.web.app import create_app
from mirror.web.server import uvicorn_options
from tests.conftest import make_settings
from tests.fakes import FakeRegistry
from tests.support.descriptors import open_descriptors
from tests.support.hostile import HandlerServer, served
from tests.support.mirror import MirrorProcess

pytestmark = pytest.mark.anyio


async def test_half_sent_heads_are_closed_and_others_are_served(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings = replace(settings, server=replace(settings.server, header_timeout=0.5))
    app = create_app(settings)
    async with served(app, **uvicorn_options(settings.server)) as mirror:
        async with httpx.AsyncClient(base_url=mirror.url) as client:
            assert (await client.get("/healthz")).status_code == 200
            before = open_descriptors()
            slow = [await asyncio.open_connection("127.0.0.1", mirror.port) for _ in range(300)]
            for _, writer in slow:
                writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Slow: ")
            for _, writer in slow:
                await writer.drain()
            assert (await client.get("/healthz")).status_code == 200  # served meanwhile
            for reader, writer in slow:
                # The server hung up on it: a clean close, or a reset when the close
                # found the head's bytes still unread in the socket.
                try:
                    assert await reader.read() == b""
                except ConnectionResetError:
                    pass
                writer.close()
                await writer.wait_closed()
            assert (await client.get("/healthz")).status_code == 200
            assert open_descriptors() <= before
    await app.state.cache.aclose()
    app.state.cache.store.close()


async def test_oversized_heads_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    app = create_app(settings)
    async with served(app, **uvicorn_options(settings.server)) as mirror:
        async with httpx.AsyncClient(base_url=mirror.url) as client:
            try:
                huge = await client.get("/v2/", headers={"X-Big": "x" * (1024 * 1024)})
            except httpx.TransportError:
                pass  # refused while still sending: the connection is reset
            else:
                assert huge.status_code == 400
        async with httpx.AsyncClient(base_url=mirror.url) as client:
            many = {f"X-H{i}": "1" for i in range(150)}
            refused = await client.get("/v2/", headers=many)
            assert refused.status_code == 431
            assert refused.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            labels = {"route": "base", "method": "GET", "status": "431"}
            registry = app.state.cache.metrics.registry  # counted like any answer
            assert registry.get_sample_value("mirror_http_requests_total", labels) == 1
            assert (await client.get("/v2/")).status_code == 200
    await app.state.cache.aclose()
    app.state.cache.store.close()


async def test_many_misses_under_a_low_descriptor_limit(tmp_path: Path, fake: FakeRegistry) -> None:
    blobs = [fake.add_blob(os.urandom(64 * 1024)) for _ in range(400)]
    async with HandlerServer(fake) as upstream:
        mirror = MirrorProcess(
            [{"name": "docker.io", "url": upstream.url, "retries": 0}], workdir=tmp_path
        )
        # A soft limit of 1024 as distributions set it; the server raises it.
        mirror.wrapper = ("prlimit", "--nofile=1024:4096", "--")
        with mirror:
            assert mirror.process is not None
            limits = Path(f"/proc/{mirror.process.pid}/limits").read_text()
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert line.split()[3:5] == ["4096", "4096"]
            limits_ = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=mirror.url, limits=limits_, timeout=120) as c:
                answers = await asyncio.gather(*(c.get(f"/v2/library/a/blobs/{d}") for d in blobs))
            assert [a.status_code for a in answers] == [200] * 400
            assert all(a.content == fake.blobs[d] for a, d in zip(answers, blobs, strict=True))
