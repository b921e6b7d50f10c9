"""Readers of a fill never get a clean end on bytes that are not the blob's.

"Another worker" is played by the test itself, through the same store, lock and temp
file that a second ``mirror serve`` worker uses, so that each interleaving happens
exactly, between two awaits of the worker under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings
from mirror.reference import parse_digest
from mirror.storage.disk import Store
from mirror.storage.locks import FileLock
from mirror.web.app import create_app
from tests.conftest import live_server
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio

DATA = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class OtherWorker:
    """A fill as another worker runs it: lock, temp file, rename into the cache, unlock."""

    def __init__(self, settings: Settings, digest: str, max_size: int | None = None) -> None:
        cap = max_size if max_size is not None else settings.cache.max_size
        self.store = Store(settings.cache.directory, cap)
        self.digest = parse_digest(digest)
        self.lock = FileLock(self.store.lock_path(self.digest))
        self.temp: Path = self.store.temp_path(self.digest)

    def start(self, data: bytes, size: int | None = None) -> None:
        assert self.lock.try_acquire()
        self.lock.write_note(str(size) if size is not None else "")
        self.temp.write_bytes(data)

    def fail(self) -> None:
        self.temp.unlink()
        self.lock.release(remove=True)

    def finish(self, data: bytes) -> None:
        self.temp.write_bytes(data)
        self.store.adopt_blob(self.temp, self.digest)
        self.lock.release(remove=True)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
async def server(settings: Settings, fake: FakeRegistry) -> AsyncIterator[live_server]:
    # The other worker fills it for library/x, which holds it upstream: its followers
    # there are confirmed with a HEAD (mirror/holdings.py) before they follow.
    fake.add_blob(DATA)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with live_server(app) as live:
        yield live
    app.state.cache.store.close()


async def _body(response: httpx.Response) -> bytes | None:
    """The whole body, or None when the connection was aborted."""
    try:
        return await response.aread()
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("announced", [None, len(DATA)])
async def test_a_follower_of_a_failed_fill_ends_with_the_next_fills_bytes(
    server: live_server, settings: Settings, announced: int | None
) -> None:
    digest = DIGEST
    other = OtherWorker(settings, digest)
    other.start(DATA[: len(DATA) * 4 // 10], announced)
    url = f"{server.url}/v2/library/x/blobs/{digest}"
    async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", url) as response:
        assert response.status_code == 200
        await asyncio.sleep(0.05)  # let the follower read what is there
        other.fail()  # its file is unlinked; a new fill starts before anyone looks
        second = OtherWorker(settings, digest)
        second.start(b"")
        second.finish(DATA)
        body = await _body(response)
    other.close()
    second.close()
    assert body == DATA  # the follower carried on from the verified file


async def test_a_follower_of_a_failed_fill_is_aborted_when_nothing_replaces_it(
    server: live_server, settings: Settings
) -> None:
    digest = DIGEST
    other = OtherWorker(settings, digest)
    other.start(DATA[:1000])
    url = f"{server.url}/v2/library/x/blobs/{digest}"
    async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", url) as response:
        other.fail()
        assert await _body(response) is None
    other.close()


async def test_a_follower_of_a_fill_that_did_not_fit_the_cap_gets_it_whole(
    server: live_server, settings: Settings
) -> None:
    digest = DIGEST
    other = OtherWorker(settings, digest, max_size=1024)  # adopted, then evicted at once
    other.start(DATA[:1000], len(DATA))
    url = f"{server.url}/v2/library/x/blobs/{digest}"
    async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", url) as response:
        other.finish(DATA)
        assert not other.store.has_blob(other.digest)
        assert await _body(response) == DATA
    other.close()


async def test_a_range_of_another_workers_fill_waits_for_the_verified_blob(
    server: live_server, settings: Settings
) -> None:
    digest = DIGEST
    wrong = bytes(reversed(DATA))  # what a bad upstream sent the other worker
    other = OtherWorker(settings, digest)
    other.start(wrong, len(DATA))
    url = f"{server.url}/v2/library/x/blobs/{digest}"
    headers = {"Range": "bytes=0-99"}
    async with httpx.AsyncClient(timeout=30) as http:
        request = asyncio.create_task(http.get(url, headers=headers))
        await asyncio.sleep(0.05)
        assert not request.done()  # no unverified byte is served
        other.fail()
        second = OtherWorker(settings, digest)
        second.start(b"", len(DATA))
        second.finish(DATA)
        response = await request
    other.close()
    second.close()
    assert response.status_code == 206
    assert response.content == DATA[:100]
