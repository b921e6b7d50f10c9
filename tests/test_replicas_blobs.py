"""A replica's blobs and its bucket: what the hot tier holds is served from it.

Real components: SeaweedFS's S3 gateway (behind a gateway of the test's own that
counts every bucket request and can hold writes) and redis-server; the replica is
the real app served by uvicorn with the protocol ``mirror serve`` runs, in front of
a fake upstream.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mirror.reference import parse_digest
from mirror.storage.s3 import S3Objects
from mirror.web.app import create_app
from mirror.web.server import uvicorn_options
from tests.conftest import Clock, fills_settled, live_server
from tests.fakes import FakeRegistry, digest_of
from tests.support.hostile import served
from tests.support.redis import RedisServer
from tests.support.seaweed import S3Endpoint
from tests.test_replicas_records import cache_of, replica, replica_settings

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
_HOP_BY_HOP = {"connection", "transfer-encoding", "expect", "keep-alive"}


class BucketGateway:
    """An ASGI gateway to the real S3 server: every request forwarded as it came (the
    signature covers the ``Host`` it names), counted by method and path; writes (PUT,
    POST) wait while ``hold_writes`` is on; blob reads fail (503) while ``fail_reads``."""

    def __init__(self, target: str) -> None:
        self.requests: list[tuple[str, str]] = []
        self.fail_reads = False
        self.write_held = asyncio.Event()  # a write arrived while held
        self._writes = asyncio.Event()
        self._writes.set()
        self._target = httpx.AsyncClient(base_url=target, timeout=30)

    def hold_writes(self) -> None:
        self._writes.clear()

    def release_writes(self) -> None:
        self._writes.set()

    def count(self, method: str, path_end: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.endswith(path_end))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        self.requests.append((request.method, request.url.path))
        body = await request.body()
        if self.fail_reads and request.method == "GET" and "/blobs/" in request.url.path:
            await Response(b"<Error><Code>ServiceUnavailable</Code></Error>", 503)(
                scope, receive, send
            )
            return
        if request.method in ("PUT", "POST") and not self._writes.is_set():
            self.write_held.set()
            await self._writes.wait()
        raw = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        url = self._target.base_url.copy_with(raw_path=raw)
        headers = [(k, v) for k, v in request.headers.raw if k.decode() not in _HOP_BY_HOP]
        forwarded = self._target.build_request(request.method, url, headers=headers, content=body)
        answer = await self._target.send(forwarded, stream=True)
        try:
            content = b"".join([chunk async for chunk in answer.aiter_raw()])
        finally:
            await answer.aclose()
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
        await Response(content, answer.status_code, kept)(scope, receive, send)

    async def aclose(self) -> None:
        await self._target.aclose()


@asynccontextmanager
async def bucket_gateway(s3: S3Endpoint) -> AsyncIterator[tuple[BucketGateway, str]]:
    gateway = BucketGateway(s3.url)
    try:
        async with served(gateway) as server:
            try:
                yield gateway, server.url
            finally:
                gateway.release_writes()  # nothing left waiting when a test fails
    finally:
        await gateway.aclose()


class _AppLayer(NamedTuple):
    fake: FakeRegistry  # the upstream: library/app:1 with the layer
    layer: bytes  # 1 MiB
    digest: str
    url: str  # the layer's blob path
    clock: Clock  # set to the real time: the bucket's times are real ones
    prefix: str  # a bucket and Redis key prefix of the test's own


def _app_layer(seed: int) -> _AppLayer:
    fake = FakeRegistry()
    layer = random.Random(seed).randbytes(MiB)
    fake.add_image("library/app", "1", [layer])
    digest = digest_of(layer)
    clock = Clock()
    clock.now = time.time()
    url = f"/v2/library/app/blobs/{digest}"
    return _AppLayer(fake, layer, digest, url, clock, f"test-{uuid.uuid4().hex}/")


def _hits(metrics: str) -> float:
    line = 'mirror_cache_requests_total{kind="blob",result="hit"} '
    found = [row for row in metrics.splitlines() if row.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


async def test_a_fill_is_a_hot_tier_hit_while_it_is_put_into_the_bucket(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, sendfile_calls: list[int]
) -> None:
    """A big layer takes seconds to upload: the replica's next GETs meanwhile are hits
    of its hot tier, sent by the kernel, not followers of the fill that ended; and no
    GET, then or later, reads the blob back from the bucket."""
    fake, layer, digest, url, clock, prefix = _app_layer(14)
    async with bucket_gateway(seaweed) as (gateway, endpoint):
        settings = replica_settings(
            tmp_path, "a", seaweed, redis_server.url, prefix, endpoint=endpoint
        )
        app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
        async with (
            live_server(app, **uvicorn_options(settings.server)) as mirror,
            httpx.AsyncClient(base_url=mirror.url, timeout=30) as http,
        ):
            gateway.hold_writes()
            first = await http.get(url)  # a miss, filled from the upstream
            assert first.content == layer
            await gateway.write_held.wait()  # its upload waits at the bucket's door
            sent_before = len(sendfile_calls)
            second = await http.get(url)
            assert second.status_code == 200
            assert second.content == layer
            assert sum(sendfile_calls[sent_before:]) == len(layer)  # from the hot tier
            assert _hits((await http.get("/metrics")).text) == 1
            gateway.release_writes()
            await fills_settled(http)
            third = await http.get(url)
            assert third.content == layer
            assert _hits((await http.get("/metrics")).text) == 2
        key = f"{prefix}blobs/sha256/{digest.removeprefix('sha256:')}"
        assert gateway.count("PUT", key) == 1  # stored for the fleet, once
        assert gateway.count("GET", key) == 0  # never read back
    assert fake.count("GET", "blob") == 1


async def test_a_fill_planned_from_the_bucket_goes_upstream_when_the_bucket_fails_to_read(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer
) -> None:
    """The bucket held the blob when B planned its fill, then failed the read: B's
    client gets the blob from the upstream (not a 503), and it is still whole."""
    fake, layer, digest, url, clock, prefix = _app_layer(18)
    async with bucket_gateway(seaweed) as (gateway, endpoint):
        a_settings = replica_settings(tmp_path, "a", seaweed, redis_server.url, prefix)
        b_settings = replica_settings(
            tmp_path, "b", seaweed, redis_server.url, prefix, endpoint=endpoint
        )
        async with replica(a_settings, fake, clock) as a, replica(b_settings, fake, clock) as b:
            assert (await a.get(url)).content == layer
            await fills_settled(a)  # in the bucket by now
            fetched = fake.count("GET", "blob")
            gateway.fail_reads = True
            answer = await b.get(url)
            assert answer.status_code == 200
            assert answer.content == layer
            assert fake.count("GET", "blob") == fetched + 1
            assert gateway.count("GET", digest.removeprefix("sha256:")) >= 1  # it was tried


async def test_a_blob_too_large_for_a_hot_tier_is_passed_through_from_the_bucket(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer
) -> None:
    """Replica B keeps no blob over a quarter of its 1 MiB hot tier: a layer that A put
    into the bucket reaches B's clients from the bucket, not from the upstream again."""
    fake, layer, digest, url, clock, prefix = _app_layer(15)
    a_settings = replica_settings(tmp_path, "a", seaweed, redis_server.url, prefix)
    b_settings = replica_settings(tmp_path, "b", seaweed, redis_server.url, prefix)
    b_settings = replace(b_settings, cache=replace(b_settings.cache, max_size=MiB))
    async with replica(a_settings, fake, clock) as a, replica(b_settings, fake, clock) as b:
        assert (await a.get(url)).content == layer
        await fills_settled(a)  # in the bucket by now
        fetched = fake.count("GET", "blob")
        for _ in range(2):
            passed = await b.get(url)
            assert passed.status_code == 200
            assert passed.content == layer
        ranged = await b.get(url, headers={"Range": "bytes=1000-1999"})
        assert ranged.status_code == 206
        assert ranged.content == layer[1000:2000]
        assert fake.count("GET", "blob") == fetched  # none upstream
        assert not any((tmp_path / "b").rglob(digest.removeprefix("sha256:") + "*"))


async def _in_bucket(http: httpx.AsyncClient, digest: str) -> int | None:
    """The blob's size in the replica's bucket, once the uploads it runs have ended."""
    fleet = cache_of(http).fleet
    assert fleet is not None
    while fleet._finishing:
        await asyncio.gather(*fleet._finishing, return_exceptions=True)
    return await fleet.size(parse_digest(digest))


async def test_a_blob_too_large_for_every_hot_tier_reaches_the_bucket_as_it_passes(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer
) -> None:
    """No replica keeps the layer (over a quarter of each 1 MiB hot tier): the first
    to pass it through puts it into the bucket too (in parts, as it passes), and the
    fleet's next pulls are bucket hits. Content that does not verify is not stored."""
    fake = FakeRegistry()
    layer = random.Random(16).randbytes(9 * MiB + 12345)  # two parts
    bad = random.Random(17).randbytes(MiB)
    fake.add_image("library/app", "1", [layer, bad])
    digest, bad_digest = digest_of(layer), digest_of(bad)
    fake.corrupt.add(bad_digest)
    clock = Clock()
    clock.now = time.time()
    prefix = f"test-{uuid.uuid4().hex}/"
    a_settings = replica_settings(tmp_path, "a", seaweed, redis_server.url, prefix)
    a_settings = replace(a_settings, cache=replace(a_settings.cache, max_size=MiB))
    b_settings = replica_settings(tmp_path, "b", seaweed, redis_server.url, prefix)
    b_settings = replace(b_settings, cache=replace(b_settings.cache, max_size=MiB))
    async with replica(a_settings, fake, clock) as a, replica(b_settings, fake, clock) as b:
        assert (await a.get(f"/v2/library/app/blobs/{digest}")).content == layer
        assert await _in_bucket(a, digest) == len(layer)
        fetched = fake.count("GET", "blob")
        for http in (a, b):
            again = await http.get(f"/v2/library/app/blobs/{digest}")
            assert again.content == layer
        assert fake.count("GET", "blob") == fetched  # from the bucket

        await a.get(f"/v2/library/app/blobs/{bad_digest}")  # passed through as it came
        assert await _in_bucket(a, bad_digest) is None
    settings = seaweed.settings(prefix)
    async with S3Objects(settings) as objects:
        assert await objects.abort_stale_uploads(0) == 0  # no parts left behind
