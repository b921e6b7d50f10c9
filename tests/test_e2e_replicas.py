"""Three real ``mirror serve`` replicas sharing a SeaweedFS bucket and a redis-server, in
front of a real upstream (docker-registry) behind a throttled link: one upstream download
per blob for the whole fleet, streamed to every waiter on every replica, and no wrong or
partial content anywhere when a replica, Redis or the bucket goes away mid-pull."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mirror.reference import parse_digest
from mirror.replicas.peers import peer_authorization
from mirror.storage.s3 import S3Objects
from tests.support import skopeo
from tests.support.images import ImageInfo, write_image
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import UpstreamRegistry
from tests.support.replicas import Link, RestartableSeaweed, metric, start_replicas
from tests.support.seaweed import S3Endpoint

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@dataclass
class Upstream:
    registry: UpstreamRegistry
    image: ImageInfo  # library/fleet:1: a config and three layers, about 14 MiB
    big: ImageInfo  # library/big:1: one layer of 12 MiB, for the slow fills


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    layouts = tmp_path_factory.mktemp("fleet-layouts")
    with UpstreamRegistry(auth="none") as registry:
        image = write_image(layouts / "fleet", "1", [300_000, 4 * MiB, 10 * MiB], seed=14)
        registry.push_image(image, "library/fleet:1")
        big = write_image(layouts / "big", "1", [12 * MiB], seed=15)
        registry.push_image(big, "library/big:1")
        yield Upstream(registry, image, big)


def _fleet(
    upstream: Upstream, rate: str, s3: S3Endpoint, own_redis: RedisServer, workdir: Path
) -> tuple[Link, list[MirrorProcess]]:
    link = Link(upstream.registry.port, rate).start()
    try:
        replicas = start_replicas(3, link.url, s3, own_redis.url, workdir)
    except BaseException:
        link.stop()
        raise
    return link, replicas


def _close(link: Link, replicas: list[MirrorProcess]) -> None:
    for replica in replicas:
        replica.close()
    link.stop()


def _pull_image(replica: MirrorProcess, out: Path) -> str:
    return skopeo.copy_to_dir(replica.ref("library/fleet:1"), out, timeout=120)


def _blob_gets(registry: UpstreamRegistry, mark: int) -> Counter[str]:
    return Counter(e.reference or "" for e in registry.blob_gets(mark) if e.status == 200)


class _Reader:
    """A blob GET read on a thread: when its first bytes came, and how it ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.first = concurrent.futures.Future[float]()
        self.hasher = hashlib.sha256()
        self.received = 0

    def __call__(self) -> str:
        """ "ok" for a body that ended cleanly, "aborted" for one cut off, or the status."""
        try:
            with httpx.stream("GET", self.url, timeout=60) as response:
                if response.status_code != 200:
                    self.first.set_result(time.monotonic())
                    return f"status {response.status_code}"
                for chunk in response.iter_raw():
                    if not self.first.done():
                        self.first.set_result(time.monotonic())
                    self.hasher.update(chunk)
                    self.received += len(chunk)
        except httpx.HTTPError:
            if not self.first.done():
                self.first.set_result(time.monotonic())
            return "aborted"
        return "ok"

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def _bucket(s3: S3Endpoint, replica: MirrorProcess) -> S3Objects:
    prefix = replica.config_path.read_text().partition('prefix = "')[2].partition('"')[0]
    return S3Objects(s3.settings(prefix))


def _stored(s3: S3Endpoint, replica: MirrorProcess, *digests: str) -> list[str | None]:
    """The sha256 of each blob's object in the bucket, or None where there is none."""

    async def read(objects: S3Objects, digest: str) -> str | None:
        hasher = hashlib.sha256()
        async with objects.open(parse_digest(digest)) as reader:
            if reader is None:
                return None
            async for data in reader.chunks():
                hasher.update(data)
        return "sha256:" + hasher.hexdigest()

    async def read_all() -> list[str | None]:
        async with _bucket(s3, replica) as objects:
            return [await read(objects, digest) for digest in digests]

    return asyncio.run(read_all())


def test_concurrent_pulls_over_three_replicas_download_each_blob_once(
    upstream: Upstream, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    link, replicas = _fleet(upstream, "40MB/s", seaweed, own_redis, tmp_path)
    try:
        mark = upstream.registry.mark()
        pulls = 9
        with concurrent.futures.ThreadPoolExecutor(pulls) as pool:
            digests = list(
                pool.map(
                    lambda i: _pull_image(replicas[i % 3], tmp_path / f"pull-{i}"), range(pulls)
                )
            )
        assert digests == [upstream.image.manifest_digest] * pulls
        gets = _blob_gets(upstream.registry, mark)
        assert gets == Counter(upstream.image.blob_digests), gets
        image = upstream.image
        size = image.config_size + sum(layer.size for layer in image.layers)
        assert upstream.registry.blob_bytes_sent(mark) == size  # once, whole
        # Every blob went into the bucket, whole.
        for replica in replicas:
            replica.wait_fills_settled()
        blobs = upstream.image.blob_digests
        assert _stored(seaweed, replicas[0], *blobs) == blobs
        sources = {
            source: sum(metric(r, "mirror_fleet_fills_total", source=source) for r in replicas)
            for source in ("lease", "peer", "bucket", "alone")
        }
        assert sources["lease"] == len(upstream.image.blob_digests), sources
        assert sources["alone"] == 0, sources

        # A replica that never saw the image pulls it from the bucket, not upstream.
        mark = upstream.registry.mark()
        for replica in replicas:
            assert _pull_image(replica, tmp_path / "again") == upstream.image.manifest_digest
        assert _blob_gets(upstream.registry, mark) == Counter()
    finally:
        _close(link, replicas)


def test_a_replica_streams_a_blob_another_replica_is_filling(
    upstream: Upstream, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    """With a slow upstream, B's client gets its first bytes while A's fill still runs."""
    link, (a, b, _) = _fleet(upstream, "4MB/s", seaweed, own_redis, tmp_path)
    try:
        layer = upstream.big.layer_digests[0]
        path = f"/v2/library/big/blobs/{layer}"
        for replica in (a, b):  # the repository's manifest: its blobs are held there
            assert skopeo.inspect_raw(replica.ref("library/big:1"))
        mark = upstream.registry.mark()
        first, second = _Reader(a.url + path), _Reader(b.url + path)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ends = [pool.submit(first)]
            started = first.first.result(timeout=60)
            ends.append(pool.submit(second))
            arrived = second.first.result(timeout=60)
            a_filling = metric(a, "mirror_fills_in_flight")
            results = [end.result() for end in ends]
        assert results == ["ok", "ok"]
        assert first.digest == second.digest == layer
        assert a_filling == 1, "A's fill had ended before B's client got a byte"
        assert metric(b, "mirror_fleet_fills_total", source="peer") == 1
        assert _blob_gets(upstream.registry, mark) == Counter({layer: 1})
        print(f"B's first byte {arrived - started:.3f} s after A's")
        _check_the_peer_route_serves_replicas_only(b, layer, upstream)
    finally:
        _close(link, [a, b, _])


def _check_the_peer_route_serves_replicas_only(
    replica: MirrorProcess, held: str, upstream: Upstream
) -> None:
    secret = replica.env["MIRROR_PEER_SECRET"]
    route = f"{replica.url}/_mirror/blobs/"
    signed = peer_authorization(secret, parse_digest(held), time.time())
    other = upstream.big.config_digest  # not on this replica: never fetched for a peer
    refused = [
        httpx.get(route + held),
        httpx.get(route + held, headers={"Authorization": "Mirror-Peer 1.00"}),
        httpx.get(route + other, headers={"Authorization": signed}),
        httpx.get(
            route + held,
            headers={
                "Authorization": peer_authorization("x" * 64, parse_digest(held), time.time())
            },
        ),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    answer = httpx.get(route + held, headers={"Authorization": signed})
    assert answer.status_code == 200
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == held
    mark = upstream.registry.mark()
    signed_other = peer_authorization(secret, parse_digest(other), time.time())
    assert httpx.get(route + other, headers={"Authorization": signed_other}).status_code == 404
    assert _blob_gets(upstream.registry, mark) == Counter()


def test_killing_the_replica_that_fills_fails_its_waiters_cleanly_and_a_retry_succeeds(
    upstream: Upstream, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    link, (a, b, c) = _fleet(upstream, "2MB/s", seaweed, own_redis, tmp_path)
    try:
        layer = upstream.big.layer_digests[0]
        path = f"/v2/library/big/blobs/{layer}"
        for replica in (a, b, c):
            assert skopeo.inspect_raw(replica.ref("library/big:1"))
        at_a, at_b = _Reader(a.url + path), _Reader(b.url + path)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ends = [pool.submit(at_a)]
            at_a.first.result(timeout=60)
            ends.append(pool.submit(at_b))
            at_b.first.result(timeout=60)
            assert metric(b, "mirror_fleet_fills_total", source="peer") == 1
            a.stop(kill=True)
            results = [end.result() for end in ends]
        assert results == ["aborted", "aborted"], results
        assert at_b.received < upstream.big.layers[0].size
        # Nothing of it reached the bucket, and B cached nothing.
        assert _stored(seaweed, b, layer) == [None]
        # Retries (on B and C at once) succeed: one of them takes the fill over.
        retries = [_Reader(b.url + path), _Reader(c.url + path)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda r: r(), retries)) == ["ok", "ok"]
        assert [r.digest for r in retries] == [layer, layer]
        for replica in (b, c):
            replica.wait_fills_settled()
        assert _stored(seaweed, b, layer) == [layer]
    finally:
        _close(link, [a, b, c])


def _pull_on_each_with_a_fault_mid_fill(
    replicas: list[MirrorProcess], tmp_path: Path, fault: Callable[[], object]
) -> list[str]:
    """One pull on each replica at once, ``fault()`` once a fill runs; their digests."""
    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        pulls = [
            pool.submit(_pull_image, replica, tmp_path / f"pull-{i}")
            for i, replica in enumerate(replicas)
        ]
        while sum(metric(r, "mirror_fills_in_flight") for r in replicas) == 0:
            assert not any(p.done() for p in pulls), [p.result() for p in pulls]
        fault()
        return [p.result() for p in pulls]


def test_pulls_succeed_uncoordinated_when_redis_stops_mid_pull(
    upstream: Upstream, seaweed: S3Endpoint, own_redis: RedisServer, tmp_path: Path
) -> None:
    link, replicas = _fleet(upstream, "8MB/s", seaweed, own_redis, tmp_path)
    try:
        digests = _pull_on_each_with_a_fault_mid_fill(replicas, tmp_path, own_redis.stop)
        assert digests == [upstream.image.manifest_digest] * 3
        # With Redis still down, a miss is filled all the same, and counted.
        pulled = skopeo.copy_to_dir(replicas[1].ref("library/big:1"), tmp_path / "big")
        assert pulled == upstream.big.manifest_digest
        assert metric(replicas[1], "mirror_uncoordinated_fills_total") >= 1
    finally:
        _close(link, replicas)


def test_pulls_succeed_from_upstream_and_hot_tiers_when_the_bucket_stops_mid_pull(
    upstream: Upstream, own_redis: RedisServer, tmp_path: Path
) -> None:
    with RestartableSeaweed() as store:
        s3 = store.endpoint
        link, replicas = _fleet(upstream, "4MB/s", s3, own_redis, tmp_path)
        try:
            digests = _pull_on_each_with_a_fault_mid_fill(replicas, tmp_path, store.kill)
            assert digests == [upstream.image.manifest_digest] * 3
            # Down still: a miss is filled from the upstream into the hot tier only.
            pulled = skopeo.copy_to_dir(replicas[1].ref("library/big:1"), tmp_path / "big")
            assert pulled == upstream.big.manifest_digest
            assert metric(replicas[1], "mirror_unstored_fills_total") >= 1
            for replica in replicas:
                replica.wait_fills_settled()
            store.start()
            # Back: whatever the bucket holds of those blobs is whole.
            blobs = [*upstream.image.blob_digests, *upstream.big.blob_digests]
            for digest, stored in zip(blobs, _stored(s3, replicas[0], *blobs), strict=True):
                assert stored in (None, digest)
            # The hot tiers serve what they hold; the rest is filled again.
            mark = upstream.registry.mark()
            assert _pull_image(replicas[2], tmp_path / "again") == upstream.image.manifest_digest
            assert _blob_gets(upstream.registry, mark) == Counter()
        finally:
            _close(link, replicas)
