"""Pins on replicas: a pin made through any replica's admin API holds on every one, and
the bucket's eviction never deletes what a pin reaches; what would act on one replica's
hot tier only is refused, saying why.

Real SeaweedFS and redis-server; each replica is the real app in process.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from mirror.images import referenced_blobs
from mirror.reference import parse_digest
from mirror.replicas.eviction import BucketEvictor
from tests.conftest import Clock
from tests.fakes import FakeRegistry
from tests.support.redis import RedisServer
from tests.support.seaweed import S3Endpoint
from tests.test_replicas_records import ACCEPT, cache_of, replica, replica_settings

pytestmark = pytest.mark.anyio


async def test_a_pin_holds_on_every_replica_and_eviction_spares_it_until_unpinned(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer
) -> None:
    fake = FakeRegistry()
    kept, _ = fake.add_image("library/kept", "1", [b"kept" * 1000])
    other, _ = fake.add_image("library/other", "1", [b"other" * 1000])
    prefix = f"test-{uuid.uuid4().hex}/"
    clock = Clock()
    clock.now = time.time()
    a_settings = replica_settings(tmp_path, "a", seaweed, redis_server.url, prefix)
    b_settings = replica_settings(tmp_path, "b", seaweed, redis_server.url, prefix)
    async with replica(a_settings, fake, clock) as a, replica(b_settings, fake, clock) as b:
        for name, manifest in (("kept", kept), ("other", other)):
            assert (await a.get(f"/v2/library/{name}/manifests/1", headers=ACCEPT)).is_success
            for blob in _blobs(fake, manifest):
                got = await a.get(f"/v2/library/{name}/blobs/{blob}")
                assert got.content == fake.blobs[blob]
        await cache_of(a).drain()  # the fills are in the bucket

        # Not in the records or the bucket: nothing to pin.
        missing = await b.post("/admin/pins", json={"ref": "library/absent:1"})
        assert missing.status_code == 404, missing.text
        # Pinned through B (which never saw the image), listed by A.
        pinned = await b.post("/admin/pins", json={"ref": "library/kept:1"})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["digest"] == kept
        listed = (await a.get("/admin/pins")).json()["pins"]
        assert [(p["repository"], p["reference"], p["digest"]) for p in listed] == [
            ("library/kept", "1", kept)
        ]
        status = (await a.get("/admin/status")).json()
        assert status["pins"] == 1 and status["bucket"]["objects"] == 5  # one config for both

        shared = cache_of(a).shared
        assert shared is not None
        objects = shared.objects
        kept_blobs, other_blobs = _blobs(fake, kept), _blobs(fake, other)
        # A round that would empty the bucket leaves the pinned image whole (the
        # config it shares with the other image included).
        clock.now += 10  # everything was used before now
        assert await BucketEvictor(shared, 0, spare=0).evict() == 2
        for digest in kept_blobs:
            assert await objects.stat(parse_digest(digest)) is not None
        assert await objects.get_manifest(parse_digest(kept)) is not None
        for digest in set(other_blobs) - set(kept_blobs):
            assert await objects.stat(parse_digest(digest)) is None
        assert await objects.get_manifest(parse_digest(other)) is None

        # Unpinned through A: the next round may take it.
        assert (await a.delete("/admin/pins", params={"ref": "library/kept:1"})).is_success
        assert (await b.get("/admin/pins")).json()["pins"] == []
        clock.now += 10
        assert await BucketEvictor(shared, 0, spare=0).evict() == 3
        assert await objects.get_manifest(parse_digest(kept)) is None


def _blobs(fake: FakeRegistry, manifest: str) -> list[str]:
    return [str(blob.digest) for blob in referenced_blobs(fake.manifests[manifest][1])]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/repositories", None),
        ("GET", "/admin/tags?repository=library/x", None),
        ("GET", "/admin/blobs", None),
        ("GET", "/admin/image?ref=library/x:1", None),
        ("POST", "/admin/purge", {"kind": "age", "age": "1d"}),
        ("POST", "/admin/verify", {}),
        ("POST", "/admin/refresh", {"ref": "library/x:1"}),
    ],
)
async def test_what_knows_one_hot_tier_only_is_refused_on_replicas(
    tmp_path: Path,
    seaweed: S3Endpoint,
    redis_server: RedisServer,
    method: str,
    path: str,
    body: object,
) -> None:
    settings = replica_settings(
        tmp_path, "a", seaweed, redis_server.url, f"test-{uuid.uuid4().hex}/"
    )
    async with replica(settings, FakeRegistry(), Clock()) as a:
        answer = await a.request(method, path, json=body)
        assert answer.status_code == 405, answer.text
        message = answer.json()["errors"][0]["message"]
        assert "hot tier only" in message and "s3" in message
