"""The records contract (``MetadataStore``), held against every implementation: the disk
cache's index and Redis (a real redis-server). Then what only the Redis records offer
replicas: holdings, leases, eviction bookkeeping, and how they behave when Redis goes away.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio

from mirror.reference import Digest
from mirror.storage.base import Lease, MetadataStore, StorageUnavailable
from mirror.storage.disk import Store
from mirror.storage.disk_records import DiskRecords
from mirror.storage.redis import RedisRecords, RedisSettings, redacted
from tests.support.redis import RedisServer

pytestmark = pytest.mark.anyio

A = Digest.of(b"a")
B = Digest.of(b"b")
C = Digest.of(b"c")
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DEADLINE = 30.0  # a bound on polling for what must happen, never a timing target


@pytest.fixture(params=["disk", "redis"])
async def records(
    request: pytest.FixtureRequest, tmp_path: Path, redis_settings: RedisSettings
) -> AsyncIterator[MetadataStore]:
    if request.param == "disk":
        store = Store(tmp_path / "cache", max_size=1 << 30)
        try:
            yield DiskRecords(store)
        finally:
            store.close()
    else:
        shared = RedisRecords(redis_settings)
        try:
            yield shared
        finally:
            await shared.aclose()


@pytest.fixture
async def shared(redis_settings: RedisSettings) -> AsyncIterator[RedisRecords]:
    records = RedisRecords(redis_settings)
    try:
        yield records
    finally:
        await records.aclose()


async def eventually_true(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll an async predicate until it holds (failing after DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


# the contract


async def test_tag_record_round_trip(records: MetadataStore) -> None:
    assert await records.get_tag("docker.io", "library/x", "1", (MANIFEST,)) is None
    before = time.time()
    await records.put_tag("docker.io", "library/x", "1", (MANIFEST,), A, MANIFEST)
    record = await records.get_tag("docker.io", "library/x", "1", (MANIFEST,))
    assert record is not None
    assert (record.digest, record.media_type) == (A, MANIFEST)
    assert before <= record.checked_at <= time.time()


async def test_tag_record_overwritten(records: MetadataStore) -> None:
    await records.put_tag("docker.io", "library/x", "1", (), A, MANIFEST)
    await records.put_tag("docker.io", "library/x", "1", (), B, INDEX)
    record = await records.get_tag("docker.io", "library/x", "1", ())
    assert record is not None and (record.digest, record.media_type) == (B, INDEX)


async def test_tag_records_are_distinct_by_accept_tag_repository_and_upstream(
    records: MetadataStore,
) -> None:
    keys = [
        ("docker.io", "library/x", "1", (MANIFEST,)),
        ("docker.io", "library/x", "1", (MANIFEST, INDEX)),
        ("docker.io", "library/x", "1", ()),
        ("docker.io", "library/x", "2", (MANIFEST,)),
        ("docker.io", "library/y", "1", (MANIFEST,)),
        ("ghcr.io", "library/x", "1", (MANIFEST,)),
    ]
    digests = [Digest.of(str(i).encode()) for i in range(len(keys))]
    for (upstream, repository, tag, accept), digest in zip(keys, digests, strict=True):
        await records.put_tag(upstream, repository, tag, accept, digest, MANIFEST)
    for (upstream, repository, tag, accept), digest in zip(keys, digests, strict=True):
        record = await records.get_tag(upstream, repository, tag, accept)
        assert record is not None and record.digest == digest


async def test_tag_list_round_trip(records: MetadataStore) -> None:
    assert await records.get_tag_list("docker.io", "library/x") is None
    await records.put_tag_list("docker.io", "library/x", ["1", "latest", "1.0-rc"])
    await records.put_tag_list("docker.io", "library/empty", [])
    assert await records.get_tag_list("docker.io", "library/x") == ["1", "latest", "1.0-rc"]
    assert await records.get_tag_list("docker.io", "library/empty") == []
    await records.put_tag_list("docker.io", "library/x", ["2"])
    assert await records.get_tag_list("docker.io", "library/x") == ["2"]
    assert await records.get_tag_list("ghcr.io", "library/x") is None


async def test_referrers_round_trip(records: MetadataStore) -> None:
    assert await records.get_referrers("docker.io", "library/x", A) is None
    body = b'{"manifests": []}\xff\x00'  # bytes as given, whatever they are
    before = time.time()
    await records.put_referrers("docker.io", "library/x", A, body)
    stored = await records.get_referrers("docker.io", "library/x", A)
    assert stored is not None
    assert stored[0] == body
    assert before <= stored[1] <= time.time()
    assert await records.get_referrers("docker.io", "library/x", B) is None
    assert await records.get_referrers("docker.io", "library/y", A) is None
    await records.put_referrers("docker.io", "library/x", A, b"{}")
    stored = await records.get_referrers("docker.io", "library/x", A)
    assert stored is not None and stored[0] == b"{}"


async def test_missing_is_remembered_for_its_ttl(records: MetadataStore) -> None:
    await records.put_missing("docker.io/library/x:gone", 0)
    assert not await records.is_missing("docker.io/library/x:gone")
    await records.put_missing("docker.io/library/x:short", 0.2)
    await records.put_missing("docker.io/library/x:long", 3600)
    assert await records.is_missing("docker.io/library/x:short")

    async def forgotten() -> bool:
        return not await records.is_missing("docker.io/library/x:short")

    await eventually_true(forgotten)
    assert await records.is_missing("docker.io/library/x:long")
    assert not await records.is_missing("docker.io/library/x:other")


async def test_catalog_is_sorted_and_paged(records: MetadataStore) -> None:
    names = ["z", "library/alpine/x", "a/b", "library/alpine-x", "library/alpine", "b"]
    for name in names + names[:2]:  # twice is once
        await records.add_repository(name)
    ordered = sorted(names)
    assert await records.repositories(None, 100) == ordered
    pages: list[str] = []
    after: str | None = None
    while page := await records.repositories(after, 2):
        assert len(page) <= 2
        pages += page
        after = page[-1]
    assert pages == ordered
    # after a name the catalog does not have: what sorts after it
    assert await records.repositories("library/alpine.", 2) == ["library/alpine/x", "z"]
    assert await records.repositories("z", 10) == []
    assert await records.repositories(None, 0) == []


# what only Redis offers: holdings


async def test_holdings(shared: RedisRecords) -> None:
    assert not await shared.holds("docker.io", "library/x", A)
    await shared.note_holding("docker.io", "library/x", A, B)
    assert await shared.holds("docker.io", "library/x", A)
    assert await shared.holds("docker.io", "library/x", B)
    assert not await shared.holds("docker.io", "library/y", A)
    assert not await shared.holds("ghcr.io", "library/x", A)
    assert not await shared.expanded("docker.io", "library/x", A)

    await shared.note_manifest("docker.io", "library/x", A, [B, C])
    assert await shared.expanded("docker.io", "library/x", A)
    assert await shared.holds("docker.io", "library/x", C)
    assert not await shared.expanded("docker.io", "library/x", C)
    await shared.note_holding("docker.io", "library/x", A)  # stays expanded
    assert await shared.expanded("docker.io", "library/x", A)


# leases


async def test_one_of_twenty_concurrent_acquirers_gets_the_lease(shared: RedisRecords) -> None:
    owners = [f"http://10.0.0.{i}:5000" for i in range(20)]
    leases = await asyncio.gather(*(shared.acquire("fill:x", owner, 30) for owner in owners))
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    lease: Lease = winners[0]
    assert await shared.holder("fill:x") == lease.owner
    assert await shared.acquire("fill:x", "late", 30) is None
    await lease.release()
    assert await shared.holder("fill:x") is None
    assert await shared.acquire("fill:x", "late", 30) is not None


async def test_renew_restores_the_full_ttl(
    shared: RedisRecords, redis_settings: RedisSettings
) -> None:
    lease = await shared.acquire("evictor", "me", 100)
    assert lease is not None
    async with redis.asyncio.Redis.from_url(redis_settings.url) as raw:
        key = f"{redis_settings.prefix}lease:evictor"
        await raw.pexpire(key, 50_000)
        assert await lease.renew()
        assert await raw.pttl(key) > 50_000


async def test_a_stale_holder_cannot_renew_or_release(shared: RedisRecords) -> None:
    stale = await shared.acquire("fill:x", "a", 0.1)
    assert stale is not None

    async def expired() -> bool:
        return await shared.holder("fill:x") is None

    await eventually_true(expired)
    assert not await stale.renew()  # lost: renewing does not take it back
    assert await shared.holder("fill:x") is None
    current = await shared.acquire("fill:x", "b", 30)
    assert current is not None
    assert not await stale.renew()
    await stale.release()
    assert await shared.holder("fill:x") == "b"
    assert await current.renew()


async def test_a_later_lease_of_the_same_owner_is_not_released_by_an_earlier_one(
    shared: RedisRecords,
) -> None:
    first = await shared.acquire("fill:x", "a", 30)
    assert first is not None
    await first.release()
    second = await shared.acquire("fill:x", "a", 30)
    assert second is not None
    await first.release()
    assert not await first.renew()
    assert await shared.holder("fill:x") == "a"
    assert await second.renew()


# eviction bookkeeping


async def test_object_totals_stay_exact_under_concurrency(shared: RedisRecords) -> None:
    await asyncio.gather(*(shared.record_object(f"blob:{i}", i + 1) for i in range(100)))
    assert await shared.total_size() == sum(range(1, 101))
    forgotten = await asyncio.gather(
        *(shared.record_object(f"blob:{i}", 1000) for i in range(50)),  # stored again
        *(shared.forget_object(f"blob:{i}") for i in range(50, 75)),
        *(shared.forget_object(f"blob:{i}") for i in range(50, 75)),  # twice: once counts
        shared.forget_object("blob:never"),
    )
    freed = [size for size in forgotten if size is not None]
    assert sorted(freed) == list(range(51, 76))
    expected = 50 * 1000 + sum(range(76, 101))
    assert await shared.total_size() == expected
    listed = await shared.least_recent(1000, time.time() + 60)
    assert len(listed) == 75
    assert sum(size for _, size in listed) == expected


async def test_least_recent_follows_uses_forward_only(shared: RedisRecords) -> None:
    assert await shared.total_size() == 0
    await shared.record_object("a", 1, used_at=10)
    await shared.record_object("b", 2, used_at=20)
    await shared.record_object("c", 3, used_at=30)
    # c: an older use from a slower replica changes nothing; ghost: not recorded, not added
    await shared.touch_many({"a": 40, "c": 5, "ghost": 50})
    await shared.touch_many({})
    assert await shared.least_recent(10, older_than=100) == [("b", 2), ("c", 3), ("a", 1)]
    assert await shared.least_recent(10, older_than=30) == [("b", 2)]
    assert await shared.least_recent(1, older_than=100) == [("b", 2)]
    assert await shared.least_recent(0, older_than=100) == []
    assert await shared.forget_object("ghost") is None
    assert await shared.total_size() == 6


async def test_an_object_used_since_it_was_picked_is_not_forgotten(shared: RedisRecords) -> None:
    await shared.record_object("x", 7, used_at=10)
    picked_at = 20.0
    await shared.touch_many({"x": 25})  # a replica reads it after the evictor looked
    assert await shared.forget_object("x", unless_used_since=picked_at) is None
    assert await shared.total_size() == 7
    assert await shared.forget_object("x", unless_used_since=30) == 7
    assert await shared.total_size() == 0
    await shared.touch_many({"x": 40})  # a late use does not bring it back
    assert await shared.least_recent(10, older_than=100) == []
    await shared.record_object("x", 7, used_at=1)  # nor leaves a trace on a new copy
    assert await shared.least_recent(10, older_than=30) == [("x", 7)]


# when Redis goes away


async def test_redis_stopped_is_unavailable_then_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.storage.redis")
    settings = RedisSettings(own_redis.url, prefix="outage:", retry_after=0.2)
    records = RedisRecords(settings)
    try:
        await records.put_tag("docker.io", "library/x", "1", (), A, MANIFEST)
        own_redis.stop()
        messages = []
        for _ in range(10):
            with pytest.raises(StorageUnavailable) as raised:
                await records.get_tag("docker.io", "library/x", "1", ())
            messages.append(str(raised.value))
        assert not await records.ping()
        # after a few failures Redis is skipped instead of asked again
        assert any("retrying shortly" in message for message in messages)
        outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(outages) == 1  # logged once, not per call

        own_redis.start()  # same address, empty data set
        await eventually_true(records.ping)
        assert await records.get_tag("docker.io", "library/x", "1", ()) is None
        await records.put_tag("docker.io", "library/x", "1", (), B, MANIFEST)
        record = await records.get_tag("docker.io", "library/x", "1", ())
        assert record is not None and record.digest == B
        lease = await records.acquire("evictor", "me", 30)  # scripts load again
        assert lease is not None and await lease.renew()
        assert [r for r in caplog.records if "answers again" in r.getMessage()]
    finally:
        await records.aclose()


async def test_a_redis_that_does_not_answer_times_out_as_unavailable() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        settings = RedisSettings(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        records = RedisRecords(settings)
        try:
            with pytest.raises(StorageUnavailable):
                await records.is_missing("x")
            with pytest.raises(StorageUnavailable):
                await records.acquire("fill:x", "me", 30)
        finally:
            await records.aclose()


async def test_the_password_in_the_url_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        records = RedisRecords(RedisSettings(f"redis://mirror:s3cret@127.0.0.1:{port}/2"))
        try:
            with pytest.raises(StorageUnavailable) as raised:
                await records.get_tag_list("docker.io", "library/x")
            assert not await records.ping()
        finally:
            await records.aclose()
    assert "s3cret" not in str(raised.value)
    assert "s3cret" not in caplog.text
    assert f"redis://127.0.0.1:{port}/2" in caplog.text


def test_redacted() -> None:
    assert redacted("redis://user:pw@host:6380/1") == "redis://host:6380/1"
    assert redacted("rediss://:pw@[::1]:6379/0?timeout=1") == "rediss://[::1]:6379/0"
    assert redacted("redis://host") == "redis://host"
