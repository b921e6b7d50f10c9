"""A claim to complete a blob's multipart upload that nobody alive holds (its writer was
killed, or could not remove it with the bucket down) must not hold a fill for the
claim's 60 s timeout: the writer gives up storing after ``claim_wait`` and the fill
ends, its client served, the blob left for a later fill to store.

Real SeaweedFS and redis-server; the replica is the real app in process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from mirror.reference import parse_digest
from mirror.storage.base import StorageError
from mirror.storage.s3 import S3Objects
from tests.conftest import Clock
from tests.fakes import FakeRegistry
from tests.support.redis import RedisServer
from tests.support.seaweed import S3Endpoint
from tests.test_replicas_records import cache_of, replica, replica_settings
from tests.test_storage_objects import MULTIPART, s3_settings

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
# A bound for the tests to fail by rather than hang: far below the claim's timeout.
GUARD = 30.0


async def _leave_a_claim(store: S3Objects, digest: str) -> None:
    """A claim as a writer killed mid-complete leaves it: fresh, and nobody's."""
    key = store.claim_key(parse_digest(digest))
    await store._s3.put_object(Bucket=store.settings.bucket, Key=key, Body=b"")


async def _open_uploads(store: S3Objects) -> int:
    return await store.abort_stale_uploads(older_than_seconds=10**9)  # counts none, aborts none


async def test_a_writer_gives_up_a_claim_nobody_releases_and_leaves_no_upload(
    seaweed: S3Endpoint, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(MULTIPART))
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    settings = s3_settings(seaweed, claim_timeout=3600.0, claim_wait=0.5)
    async with S3Objects(settings) as store:
        await _leave_a_claim(store, digest)
        with pytest.raises(StorageError, match="claim"):
            await asyncio.wait_for(store.put_file(parse_digest(digest), path), GUARD)
        assert await store.stat(parse_digest(digest)) is None
        assert await _open_uploads(store) == 0


async def test_a_fill_meeting_a_dead_writers_claim_ends_served_and_unstored(
    tmp_path: Path, seaweed: S3Endpoint, redis_server: RedisServer
) -> None:
    fake = FakeRegistry()
    layer = os.urandom(9 * MiB)  # past the 8 MiB part size: a multipart upload
    fake.add_image("library/app", "1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    prefix = f"test-{uuid.uuid4().hex}/"
    settings = replica_settings(tmp_path, "a", seaweed, redis_server.url, prefix)
    async with replica(settings, fake, Clock()) as a:
        cache = cache_of(a)
        assert cache.shared is not None
        await _leave_a_claim(cache.shared.objects, digest)
        response = await a.get(f"/v2/library/app/blobs/{digest}")
        assert response.status_code == 200
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest
        await asyncio.wait_for(cache.drain(), GUARD)  # the fill ended, and its store
        assert "\nmirror_unstored_fills_total 1.0" in (await a.get("/metrics")).text
        assert await cache.shared.objects.stat(parse_digest(digest)) is None
        assert await _open_uploads(cache.shared.objects) == 0
        # Served from the hot tier after.
        again = await a.get(f"/v2/library/app/blobs/{digest}")
        assert again.content == layer
