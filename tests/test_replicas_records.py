"""Replicas sharing records (Redis) and manifests (the bucket): one answer for a tag on
every replica, each going on alone when Redis or the bucket fails.

Real components: SeaweedFS's S3 gateway and redis-server; each replica is the real
app with its lifespan, in process, with its own cache directory (its hot tier), all
behind one fake upstream that counts what reaches it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings, parse
from mirror.manifest import OCI_MANIFEST
from mirror.reference import Digest, parse_digest
from mirror.replicas.eviction import BucketEvictor
from mirror.service import PullThroughCache
from mirror.web.app import create_app
from tests.conftest import Clock
from tests.fakes import TOKEN_REALM, FakeRegistry
from tests.support.redis import RedisServer
from tests.support.seaweed import S3Endpoint, SeaweedS3

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}
PEER_SECRET = "p" * 32


def replica_settings(
    tmp_path: Path,
    name: str,
    s3: S3Endpoint,
    redis_url: str,
    prefix: str,
    *,
    endpoint: str | None = None,
    **storage: object,
) -> Settings:
    upstream = {
        "name": "docker.io",
        "url": "http://upstream.fake",
        "retries": 0,
        "auth_realms": [TOKEN_REALM],
    }
    table = {
        "backend": "s3",
        "endpoint": endpoint or s3.url,
        "bucket": s3.bucket,
        "prefix": prefix,
        "advertise_url": f"http://{name}.replica",
        **storage,
    }
    environ = {
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "MIRROR_REDIS_URL": redis_url,
        "MIRROR_PEER_SECRET": PEER_SECRET,
    }
    raw = {"cache": {"directory": str(tmp_path / name)}, "upstreams": [upstream], "storage": table}
    return parse(raw, environ=environ)


@asynccontextmanager
async def replica(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    """One replica: the app with its lifespan (which starts its shared parts)."""
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://mirror") as http,
    ):
        yield http


def cache_of(http: httpx.AsyncClient) -> PullThroughCache:
    transport = http._transport
    assert isinstance(transport, httpx.ASGITransport)
    cache: PullThroughCache = transport.app.state.cache  # type: ignore[attr-defined]
    return cache


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex}/"


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, seaweed: S3Endpoint, redis_url: str, prefix: str, fake: FakeRegistry
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, Clock]]:
    clock = Clock()
    clock.now = time.time()  # the bucket's upload times are real ones
    a_settings = replica_settings(tmp_path, "a", seaweed, redis_url, prefix)
    b_settings = replica_settings(tmp_path, "b", seaweed, redis_url, prefix)
    async with replica(a_settings, fake, clock) as a, replica(b_settings, fake, clock) as b:
        yield a, b, clock


async def test_a_tag_cached_by_one_replica_is_answered_by_another_without_upstream(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    digest, body = fake.add_image("library/app", "1", [b"layer"])
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, b, _):
        first = await a.get("/v2/library/app/manifests/1", headers=ACCEPT)
        assert first.status_code == 200
        before = fake.total
        by_tag = await b.get("/v2/library/app/manifests/1", headers=ACCEPT)
        by_digest = await b.get(f"/v2/library/app/manifests/{digest}", headers=ACCEPT)
        assert fake.total == before  # B asked Redis and the bucket, not the upstream
        for response in (by_tag, by_digest):
            assert response.status_code == 200
            assert response.content == body
            assert response.headers["Docker-Content-Digest"] == digest
        catalog = await b.get("/v2/_catalog")
        assert catalog.json() == {"repositories": ["library/app"]}


async def test_a_remembered_404_is_shared(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, b, _):
        assert (await a.get("/v2/library/app/manifests/nope", headers=ACCEPT)).status_code == 404
        asked = fake.count("GET", "manifest")
        again = await b.get("/v2/library/app/manifests/nope", headers=ACCEPT)
        assert again.status_code == 404
        assert again.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert fake.count("GET", "manifest") == asked


async def test_a_moved_tag_is_seen_by_both_replicas_after_one_revalidation(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    fake.add_image("library/app", "1", [b"old"])
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, b, clock):
        await a.get("/v2/library/app/manifests/1", headers=ACCEPT)
        await b.get("/v2/library/app/manifests/1", headers=ACCEPT)
        moved, body = fake.add_image("library/app", "1", [b"new"])
        clock.now += 3600  # past the tag TTL: the next ask revalidates
        first = await a.get("/v2/library/app/manifests/1", headers=ACCEPT)
        assert first.headers["Docker-Content-Digest"] == moved
        asked = fake.total
        second = await b.get("/v2/library/app/manifests/1", headers=ACCEPT)
        assert second.headers["Docker-Content-Digest"] == moved
        assert second.content == body
        assert fake.total == asked  # A's revalidation holds for B


async def test_replicas_keep_serving_while_redis_is_down_then_share_again(
    tmp_path: Path, seaweed: S3Endpoint, prefix: str
) -> None:
    fake = FakeRegistry()
    digest, body = fake.add_image("library/app", "1", [b"layer"])
    with RedisServer() as redis:
        async with two_replicas(tmp_path, seaweed, redis.url, prefix, fake) as (a, b, clock):
            await a.get("/v2/library/app/manifests/1", headers=ACCEPT)
            redis.stop()
            clock.now += 2  # past the in-memory trust of a record: Redis is asked
            for http in (a, b):
                assert (
                    await http.get("/v2/library/app/manifests/1", headers=ACCEPT)
                ).content == body
                by_digest = await http.get(f"/v2/library/app/manifests/{digest}", headers=ACCEPT)
                assert by_digest.content == body
                ready = await http.get("/readyz")
                assert ready.status_code == 200
                assert ready.json() == {"cache": "ok", "bucket": "ok", "redis": "down"}
            metrics = (await b.get("/metrics")).text
            assert 'mirror_shared_storage_failures_total{part="redis"}' in metrics
            redis.start()  # empty, as after a restart without persistence
            for http in (a, b):  # each replica finds Redis again on its own
                while (await http.get("/readyz")).json()["redis"] != "ok":
                    await asyncio.sleep(0.05)
            clock.now += 2
            moved, _ = fake.add_image("library/app", "2", [b"two"])
            await a.get("/v2/library/app/manifests/2", headers=ACCEPT)
            asked = fake.total
            found = await b.get("/v2/library/app/manifests/2", headers=ACCEPT)
            assert found.headers["Docker-Content-Digest"] == moved
            assert fake.total == asked  # shared again


async def test_replicas_serve_manifests_from_their_hot_tiers_while_the_bucket_is_down(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    digest, body = fake.add_image("library/app", "1", [b"layer"])
    with SeaweedS3() as seaweed:
        async with two_replicas(tmp_path, seaweed.endpoint, redis_server.url, prefix, fake) as (
            a,
            b,
            clock,
        ):
            await a.get("/v2/library/app/manifests/1", headers=ACCEPT)
            seaweed.stop()
            clock.now += 2  # past the in-memory trust of a record: Redis is asked
            asked = fake.total
            # A: its hot tier; nothing upstream.
            for path in ("/v2/library/app/manifests/1", f"/v2/library/app/manifests/{digest}"):
                assert (await a.get(path, headers=ACCEPT)).content == body
            assert fake.total == asked
            # B knows the tag (Redis) but has no copy and cannot read the bucket: the
            # upstream answers, once; then B's hot tier does.
            assert (await b.get("/v2/library/app/manifests/1", headers=ACCEPT)).content == body
            asked = fake.total
            again = await b.get(f"/v2/library/app/manifests/{digest}", headers=ACCEPT)
            assert again.content == body
            assert fake.total == asked
            for http in (a, b):
                ready = await http.get("/readyz")
                assert ready.status_code == 200
                assert ready.json() == {"cache": "ok", "bucket": "down", "redis": "ok"}
            metrics = (await b.get("/metrics")).text
            assert 'mirror_shared_storage_failures_total{part="bucket"}' in metrics


async def test_eviction_keeps_the_bucket_under_its_cap_by_use_on_every_replica(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    images = [fake.add_image(f"library/app{i}", "1", [bytes([i])]) for i in range(3)]
    (old, old_body), (unused, _), (recent, recent_body) = images
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, b, clock):
        for i in range(3):
            await a.get(f"/v2/library/app{i}/manifests/1", headers=ACCEPT)
        clock.now += 1000
        # Used on B (read from the bucket into B's hot tier), then on B's hot tier.
        for _ in range(2):
            await b.get(f"/v2/library/app0/manifests/{old}", headers=ACCEPT)
        clock.now += 1000
        await b.get(f"/v2/library/app2/manifests/{recent}", headers=ACCEPT)
        shared_b = cache_of(b).shared
        assert shared_b is not None
        await shared_b.uses.flush()
        shared = cache_of(a).shared
        assert shared is not None
        cap = len(old_body) + len(recent_body)
        assert await shared.records.total_size() > cap
        assert await BucketEvictor(shared, cap).evict() == 1
        assert await shared.records.total_size() <= cap
        objects = shared.objects
        assert await objects.get_manifest(parse_digest(unused)) is None
        assert await objects.get_manifest(parse_digest(old)) is not None
        assert await objects.get_manifest(parse_digest(recent)) is not None
        # Another replica holds the lease: it does nothing meanwhile.
        lease = await shared.records.acquire("evictor", "elsewhere", 30)
        assert lease is not None
        assert await BucketEvictor(shared, 0).evict() == 0
        await lease.release()


async def test_eviction_spares_an_object_just_read_on_another_replica(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    images = [fake.add_image(f"library/app{i}", "1", [bytes([i])]) for i in range(2)]
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, b, clock):
        for i in range(2):
            await a.get(f"/v2/library/app{i}/manifests/1", headers=ACCEPT)
        shared_b = cache_of(b).shared
        assert shared_b is not None
        read = images[0][0]
        clock.now += 1000  # both old now; then a client reads one from the bucket through B
        assert (await b.get(f"/v2/library/app0/manifests/{read}", headers=ACCEPT)).is_success
        await shared_b.uses.flush()
        shared = cache_of(a).shared
        assert shared is not None
        assert await BucketEvictor(shared, 0).evict() == 1
        assert await shared.objects.get_manifest(parse_digest(read)) is not None
        assert await shared.objects.get_manifest(parse_digest(images[1][0])) is None


async def test_eviction_counts_objects_the_records_missed(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer, prefix: str
) -> None:
    fake = FakeRegistry()
    async with two_replicas(tmp_path, seaweed, redis_server.url, prefix, fake) as (a, _, clock):
        shared = cache_of(a).shared
        assert shared is not None
        body = b'{"schemaVersion": 2}'
        digest = Digest.of(body)
        # In the bucket, but not in Redis's bookkeeping (as after Redis restarted empty).
        await shared.objects.put_manifest(digest, OCI_MANIFEST, body)
        assert await shared.records.total_size() == 0
        clock.now += 1000
        assert await BucketEvictor(shared, 0).evict() == 1
        assert await shared.objects.get_manifest(digest) is None
