"""Warm hits are answered from memory: no read of the SQLite index per request, whatever
the client's ``Accept`` and for cached blobs, and the uses still count for eviction."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable

import httpx
import pytest

from mirror.config import Settings
from mirror.manifest import DOCKER_MANIFEST, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from mirror.reference import parse_digest
from mirror.storage.disk import Store
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


def count_index_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key the store reads from its SQLite index from now on."""
    reads: list[str] = []
    index = store._index
    original: Callable[..., object] = index.get

    def get(key: str, *args: object, **kwargs: object) -> object:
        reads.append(key)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(index, "get", get)
    return reads


async def test_every_accept_variant_of_a_known_tag_is_answered_from_memory(
    settings: Settings, fake: FakeRegistry, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, body = fake.add_image("library/a", "1", [b"x"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        full = {"Accept": ", ".join(MANIFEST_TYPES)}
        assert (await client.get("/v2/library/a/manifests/1", headers=full)).status_code == 200
        reads = count_index_reads(app.state.cache.store, monkeypatch)
        before = fake.total
        variants = [
            OCI_MANIFEST,
            f"{DOCKER_MANIFEST}, {OCI_MANIFEST}",
            ", ".join(reversed(MANIFEST_TYPES)),
            f"{OCI_MANIFEST}, {OCI_INDEX}",
        ]
        for _ in range(3):
            for accept in variants:
                response = await client.get("/v2/library/a/manifests/1", headers={"Accept": accept})
                assert response.status_code == 200
                assert response.headers["Docker-Content-Digest"] == digest
                assert response.content == body
    assert reads == []
    assert fake.total == before


async def test_a_burst_after_a_tag_record_left_memory_reads_the_records_once(
    settings: Settings, fake: FakeRegistry, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        full = {"Accept": ", ".join(MANIFEST_TYPES)}
        assert (await client.get("/v2/library/a/manifests/1", headers=full)).status_code == 200
        clock.now += 2  # past the moment a record in memory is trusted, within tag_ttl
        records = app.state.cache.records
        reads: list[tuple[object, ...]] = []
        original = records.get_tag

        async def get_tag(*args: object) -> object:
            reads.append(args)  # each one a hop to a thread (disk) or a round trip (Redis)
            return await original(*args)

        monkeypatch.setattr(records, "get_tag", get_tag)
        burst = [client.get("/v2/library/a/manifests/1", headers=full) for _ in range(20)]
        responses = await asyncio.gather(*burst)
    assert {r.status_code for r in responses} == {200}
    assert len(reads) == 1


async def test_a_tag_of_a_type_the_client_refuses_still_is_not_served(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        full = {"Accept": ", ".join(MANIFEST_TYPES)}
        assert (await client.get("/v2/library/a/manifests/1", headers=full)).status_code == 200
        response = await client.get("/v2/library/a/manifests/1", headers={"Accept": OCI_INDEX})
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_cached_blob_hits_read_no_index(
    settings: Settings, fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300 * 1024)
    digest = fake.add_blob(data)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        await client.get(f"/v2/library/a/blobs/{digest}")
        await fills_settled(client)
        reads = count_index_reads(app.state.cache.store, monkeypatch)
        for _ in range(3):
            response = await client.get(f"/v2/library/a/blobs/{digest}")
            assert response.status_code == 200
            assert response.content == data
            head = await client.head(f"/v2/library/a/blobs/{digest}")
            assert head.headers["Content-Length"] == str(len(data))
            part = await client.get(
                f"/v2/library/a/blobs/{digest}", headers={"Range": "bytes=100-199"}
            )
            assert part.status_code == 206
            assert part.content == data[100:200]
    assert reads == []
    assert fake.count("GET", "blob") == 1


async def test_a_blob_whose_file_went_is_asked_of_the_index_and_fetched_again(
    settings: Settings, fake: FakeRegistry
) -> None:
    data = os.urandom(1024)
    digest = fake.add_blob(data)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        await client.get(f"/v2/library/a/blobs/{digest}")
        await fills_settled(client)
        # Another worker evicts it: the index row and the file go, this process's map stays.
        other = Store(settings.cache.directory, settings.cache.max_size)
        try:
            assert other._index.delete(f"blob:{digest}")
        finally:
            other.close()
        response = await client.get(f"/v2/library/a/blobs/{digest}")
        await fills_settled(client)
        again = await client.get(f"/v2/library/a/blobs/{digest}")
    assert hashlib.sha256(response.content).hexdigest() == digest.split(":")[1]
    assert again.content == data
    assert fake.count("GET", "blob") == 2


async def test_uses_served_from_memory_reach_the_index(
    settings: Settings, fake: FakeRegistry
) -> None:
    digest = fake.add_blob(os.urandom(1024))
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        await client.get(f"/v2/library/a/blobs/{digest}")
        await fills_settled(client)
        store = app.state.cache.store
        key = f"blob:{digest}"
        (stored,) = store._index._sql(
            "SELECT access_time FROM Cache WHERE key = ?", (key,)
        ).fetchone()
        assert (await client.get(f"/v2/library/a/blobs/{digest}")).status_code == 200
        store._access_times.flush()
        (used,) = store._index._sql(
            "SELECT access_time FROM Cache WHERE key = ?", (key,)
        ).fetchone()
    assert used > stored


async def test_a_tag_record_due_for_a_look_answers_while_one_read_runs_behind(
    settings: Settings, fake: FakeRegistry, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the second a tag record in memory is trusted for, it still answers while the
    tag is fresh: no request waits for the records. One read behind them learns what
    another worker recorded meanwhile; a record gone from the records goes from memory."""
    first, _ = fake.add_image("library/a", "1", [b"x"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    path, full = "/v2/library/a/manifests/1", {"Accept": ", ".join(MANIFEST_TYPES)}
    async with app_client(app) as client:
        assert (await client.get(path, headers=full)).headers["Docker-Content-Digest"] == first
        # Another worker learns the tag moved, and records it in the shared index.
        second, body = fake.add_image("library/a", "1", [b"y"])
        other = Store(settings.cache.directory, settings.cache.max_size, now=clock)
        try:
            other.put_manifest(parse_digest(second), OCI_MANIFEST, body)
            other.put_tag("docker.io", "library/a", "1", MANIFEST_TYPES, parse_digest(second),
                          OCI_MANIFEST)  # fmt: skip
        finally:
            other.close()
        cache = app.state.cache
        records, released, reads = cache.records, asyncio.Event(), []
        original = records.get_tag

        async def held_get_tag(*args: object) -> object:
            reads.append(args)
            await released.wait()
            return await original(*args)

        monkeypatch.setattr(records, "get_tag", held_get_tag)
        clock.now += 2
        burst = [client.get(path, headers=full) for _ in range(10)]
        answers = await asyncio.wait_for(asyncio.gather(*burst), 60)  # none waits for the read
        assert {a.headers["Docker-Content-Digest"] for a in answers} == {first}
        assert len(reads) == 1
        released.set()
        await cache.drain()
        assert (await client.get(path, headers=full)).headers["Docker-Content-Digest"] == second

        # The record leaves the index (another worker's eviction): the next look drops it.
        other = Store(settings.cache.directory, settings.cache.max_size, now=clock)
        try:
            assert other._index.delete(f"tag:docker.io/library/a:1|{','.join(MANIFEST_TYPES)}")
        finally:
            other.close()
        clock.now += 2
        before = fake.count("GET", "manifest")
        assert (await client.get(path, headers=full)).status_code == 200  # from memory
        await cache.drain()
        assert (await client.get(path, headers=full)).headers["Docker-Content-Digest"] == second
    assert fake.count("GET", "manifest") == before + 1  # asked upstream again, once


async def test_no_index_is_mapped_into_memory_by_the_threads_that_read_it(
    settings: Settings, fake: FakeRegistry
) -> None:
    # A memory map per connection, one connection per thread, counts the same file pages
    # in RSS again for each: a worker read as 370 MiB after hits on a 100,000-entry cache.
    images = [fake.add_image(f"library/r{n}", "1", [os.urandom(512)]) for n in range(8)]
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        for _ in range(2):
            answers = await asyncio.gather(
                *(client.get(f"/v2/library/r{n}/manifests/1") for n in range(8)),
                *(client.get(f"/v2/library/r{n}/manifests/{d}") for n, (d, _) in enumerate(images)),
            )
            assert all(answer.status_code == 200 for answer in answers)
            await fills_settled(client)
        with open("/proc/self/maps") as maps:
            # (the WAL's index, "-shm", is shared memory by design: 32 KiB)
            mapped = [
                line
                for line in maps
                if str(settings.cache.directory) in line and line.rstrip().endswith("cache.db")
            ]
    assert mapped == []
