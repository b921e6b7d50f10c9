"""The bucket's least-recently-used eviction, end to end: real ``mirror serve`` replicas
filling a SeaweedFS bucket from a real upstream, redis-server keeping the uses, and the
fleet's evictor (``BucketEvictor``, the class every replica runs) driven from the test so
that its cap and its spare window are the test's to choose.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mirror.config import load
from mirror.metrics import Metrics
from mirror.reference import parse_digest
from mirror.replicas.eviction import BucketEvictor
from mirror.replicas.shared import Shared
from tests.support import skopeo
from tests.support.images import ImageInfo, write_image
from tests.support.mirror import MirrorProcess, run_cli
from tests.support.redis import RedisServer
from tests.support.registry import UpstreamRegistry
from tests.support.replicas import Link, metric, start_replicas
from tests.support.seaweed import S3Endpoint

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@dataclass
class Images:
    registry: UpstreamRegistry
    old: ImageInfo  # library/old:1, pulled first: the least recently used
    new: ImageInfo  # library/new:1, pulled after it


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    layouts = tmp_path_factory.mktemp("bucket-layouts")
    with UpstreamRegistry(auth="none") as registry:
        old = write_image(layouts / "old", "1", [3 * MiB, 2 * MiB], seed=21)
        registry.push_image(old, "library/old:1")
        new = write_image(layouts / "new", "1", [200_000, 8 * MiB], seed=22)
        registry.push_image(new, "library/new:1")
        yield Images(registry, old, new)


@asynccontextmanager
async def fleet_shared(replica: MirrorProcess) -> AsyncIterator[Shared]:
    """The bucket and Redis as that replica's config reaches them (what its evictor uses)."""
    settings = load(replica.config_path, {**os.environ, **replica.env})
    shared = Shared.from_settings(settings.storage, Metrics(lambda: (0, {}, 0)))
    await shared.start()
    try:
        yield shared
    finally:
        await shared.aclose()


async def _in_bucket(shared: Shared, *digests: str) -> list[str | None]:
    """The sha256 of each blob's object in the bucket, or None where there is none."""
    found: list[str | None] = []
    for digest in digests:
        hasher = hashlib.sha256()
        async with shared.objects.open(parse_digest(digest)) as reader:
            if reader is None:
                found.append(None)
                continue
            async for data in reader.chunks():
                hasher.update(data)
        found.append("sha256:" + hasher.hexdigest())
    return found


def _sizes(image: ImageInfo) -> int:
    return image.config_size + sum(layer.size for layer in image.layers) + image.manifest_size


def _pull(replica: MirrorProcess, name: str, out: Path) -> str:
    return skopeo.copy_to_dir(replica.ref(name), out, timeout=120)


class _SlowReader:
    """A blob GET on a thread, its bytes counted as they come."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received = 0
        self.hasher = hashlib.sha256()

    def __call__(self) -> str:
        with httpx.stream("GET", self.url, timeout=120) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                self.hasher.update(chunk)
                self.received += len(chunk)
        return "sha256:" + self.hasher.hexdigest()


def test_bucket_eviction_drops_the_least_recently_used_blobs_spares_a_read_and_refills(
    images: Images, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    registry = images.registry
    prefix = f"evict-{os.urandom(4).hex()}/"
    a, b = start_replicas(2, registry.url, seaweed, own_redis.url, tmp_path / "ab", prefix=prefix)
    # A third replica reaches the bucket through a 1 MB/s link: its reads from the
    # bucket last, so that an eviction round can run in the middle of one.
    slow_link = Link(int(seaweed.url.rpartition(":")[2]), "1MB/s").start()
    slow_s3 = S3Endpoint(slow_link.url, seaweed.bucket)
    (c,) = start_replicas(1, registry.url, slow_s3, own_redis.url, tmp_path / "c", prefix=prefix)
    replicas = [a, b, c]
    try:
        # Into the bucket: old, then new (each blob once from the upstream).
        assert _pull(a, "library/old:1", tmp_path / "old") == images.old.manifest_digest
        assert _pull(a, "library/new:1", tmp_path / "new") == images.new.manifest_digest
        a.wait_fills_settled()
        old_blobs, new_blobs = images.old.blob_digests, images.new.blob_digests

        async def evict_the_old() -> None:
            async with fleet_shared(a) as shared:
                await shared.uses.flush()
                total = await shared.records.total_size()
                assert total == _sizes(images.old) + _sizes(images.new)
                # Room for all but the old image: it is what was used least recently.
                cap = total - _sizes(images.old)
                assert await BucketEvictor(shared, cap, spare=0).evict() == 4
                assert await shared.records.total_size() == cap
                assert await _in_bucket(shared, *old_blobs) == [None] * len(old_blobs)
                assert await _in_bucket(shared, *new_blobs) == new_blobs

        asyncio.run(evict_the_old())

        # A later pull of the evicted image, on a replica that never held it: from the
        # upstream again (once), verified, and back in the bucket whole.
        mark = registry.mark()
        assert _pull(b, "library/old:1", tmp_path / "again") == images.old.manifest_digest
        gets = Counter(e.reference for e in registry.blob_gets(mark) if e.status == 200)
        assert gets == Counter(old_blobs)
        b.wait_fills_settled()

        async def refilled() -> list[str | None]:
            async with fleet_shared(a) as shared:
                return await _in_bucket(shared, *old_blobs)

        assert asyncio.run(refilled()) == old_blobs

        # C reads new's big layer from the bucket for a client (its hot tier lacks it).
        # Once the read has gone on for longer than the spare window, a round evicting
        # everything it may must leave that layer alone: it is in use.
        layer = images.new.layer_digests[1]
        size = images.new.layers[1].size
        spare = 3.0
        reader = _SlowReader(f"{c.url}/v2/library/new/blobs/{layer}")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = pool.submit(reader)
            # At 1 MB/s, past 5 MB the read started more than `spare` seconds ago.
            while reader.received < 5_000_000:
                assert not read.done(), read.result()

            async def evict_all_but_the_read() -> None:
                async with fleet_shared(a) as shared:
                    assert await BucketEvictor(shared, 0, spare=spare).evict() > 0
                    assert await _in_bucket(shared, layer) == [layer]

            asyncio.run(evict_all_but_the_read())
            assert reader.received < size, "the read ended before the round: no test"
            assert read.result() == layer
    finally:
        for replica in replicas:
            replica.close()
        slow_link.stop()


def test_warm_with_a_replicas_config_fills_the_bucket_for_every_replica(
    images: Images, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    registry = images.registry
    (a,) = start_replicas(1, registry.url, seaweed, own_redis.url, tmp_path / "a")
    try:
        # Run as an operator would, from elsewhere: the replica's config, another cache.
        env = {**a.env, "MIRROR_CACHE_DIRECTORY": str(tmp_path / "warm-cache")}
        mark = registry.mark()
        warmed = run_cli("warm", "--config", str(a.config_path), "library/new:1", env=env)
        assert warmed.returncode == 0, warmed.stderr
        blobs = images.new.blob_digests
        assert Counter(e.reference for e in registry.blob_gets(mark)) == Counter(blobs)

        async def in_bucket() -> list[str | None]:
            async with fleet_shared(a) as shared:
                return await _in_bucket(shared, *blobs)

        assert asyncio.run(in_bucket()) == blobs
        # Warming again finds it all there: nothing is fetched.
        mark = registry.mark()
        again = run_cli("warm", "--config", str(a.config_path), "library/new:1", env=env)
        assert again.returncode == 0, again.stderr
        assert "0 B fetched" in again.stdout, again.stdout
        # The replica serves it from the bucket and the shared records: no upstream.
        assert _pull(a, "library/new:1", tmp_path / "pull") == images.new.manifest_digest
        assert registry.blob_gets(mark) == []
        assert metric(a, "mirror_fleet_fills_total", source="bucket") == len(blobs)
        # Pinned from the shell with the replica's config, listed by the replica.
        pinned = run_cli("pin", "--config", str(a.config_path), "library/new:1", env=env)
        assert pinned.returncode == 0, pinned.stderr
        listed = run_cli("pin", "--url", a.url, "--json")
        assert listed.returncode == 0, listed.stderr
        pins = json.loads(listed.stdout)["pins"]
        assert [(p["repository"], p["digest"]) for p in pins] == [
            ("library/new", images.new.manifest_digest)
        ]
    finally:
        a.close()


def test_import_with_a_replicas_config_shares_the_images_with_every_replica(
    images: Images, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    registry = images.registry
    (a,) = start_replicas(1, registry.url, seaweed, own_redis.url, tmp_path / "a")
    try:
        # An image the upstream does not have: only the import can bring it.
        layout = write_image(tmp_path / "layout", "1", [100_000, 6 * MiB], seed=23)
        env = {**a.env, "MIRROR_CACHE_DIRECTORY": str(tmp_path / "import-cache")}
        imported = run_cli(
            "import",
            "--config",
            str(a.config_path),
            "--repository",
            "library/imported",
            str(layout.layout_dir),
            env=env,
        )
        assert imported.returncode == 0, imported.stderr
        assert "Traceback" not in imported.stderr, imported.stderr
        mark = registry.mark()
        pulled = _pull(a, "library/imported:1", tmp_path / "pull")
        assert pulled == layout.manifest_digest
        assert registry.blob_gets(mark) == []
        assert metric(a, "mirror_fleet_fills_total", source="bucket") == len(layout.blob_digests)
    finally:
        a.close()
