"""What replicas share: the bucket (blobs and manifests) and Redis (records, leases,
uses), built once from ``[storage]``, and how this replica fares with each.

Neither is needed to serve: a replica whose bucket fails serves its hot tier and
passes misses through from the upstream, unstored; one whose Redis fails uses its
own records. Each outage is logged once, counted, and shown by ``/readyz``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import anyio

from ..breaker import CircuitBreaker
from ..config import StorageSettings
from ..metrics import Metrics
from ..reference import Digest
from ..storage.base import StorageError, StorageUnavailable
from .uses import BucketUses

if TYPE_CHECKING:
    from ..storage.redis import RedisRecords
    from ..storage.s3 import S3Objects

__all__ = ["Health", "Shared"]

log = logging.getLogger("mirror.replicas")

Health = Literal["ok", "down"]
Part = Literal["bucket", "redis"]
# A readiness probe waits no longer for each part.
_PROBE_SECONDS = 2.0
# How long a bucket that failed is left alone before one call tries it again.
_BUCKET_RETRY_SECONDS = 5.0
T = TypeVar("T")


@dataclass
class Shared:
    """The bucket and Redis, and this replica's name among the others."""

    settings: StorageSettings
    objects: S3Objects
    records: RedisRecords
    metrics: Metrics
    owner: str  # how the other replicas reach this one (or tell it apart)
    now: Callable[[], float] = time.time  # the wall clock uses and eviction go by
    uses: BucketUses = field(init=False)
    _down: set[Part] = field(default_factory=set, init=False)
    # A bucket that does not answer costs each call seconds of connection retries:
    # after a failure it is left alone for a moment, then one call probes it.
    _bucket_breaker: CircuitBreaker = field(
        default_factory=lambda: CircuitBreaker(1, _BUCKET_RETRY_SECONDS), init=False
    )

    def __post_init__(self) -> None:
        self.uses = BucketUses(self.records.touch_many, now=self.now)

    @classmethod
    def from_settings(
        cls, settings: StorageSettings, metrics: Metrics, now: Callable[[], float] = time.time
    ) -> Shared:
        assert settings.bucket is not None and settings.redis_url is not None  # config checks
        # Imported here: a mirror on its own disk has no use for the S3 and Redis clients
        # (210 modules, a second of start-up, and objects every full collection walks).
        from ..storage.redis import RedisRecords, RedisSettings
        from ..storage.s3 import S3Objects, S3Settings

        objects = S3Objects(
            S3Settings(
                bucket=settings.bucket,
                endpoint=settings.endpoint,
                region=settings.region,
                prefix=settings.prefix,
                access_key=settings.access_key,
                secret_key=settings.secret_key,
            )
        )
        # Caches sharing one Redis keep apart by their bucket and prefix.
        prefix = f"mirror:{settings.bucket}/{settings.prefix}:"
        records = RedisRecords(RedisSettings(settings.redis_url, prefix=prefix), now=now)
        owner = settings.advertise_url or f"{socket.gethostname()}:{os.getpid()}"
        return cls(settings, objects, records, metrics, owner, now)

    async def start(self) -> None:
        await self.objects.start()
        self.uses.start()

    async def aclose(self) -> None:
        await self.uses.aclose()
        await self.objects.close()
        await self.records.aclose()

    # health

    def failed(self, part: Part, exc: StorageError) -> None:
        """``part`` failed: count it, and log the first failure of an outage."""
        self.metrics.shared_failures.labels(part).inc()
        # The Redis client logs its outages itself.
        if part == "bucket" and part not in self._down:
            self._down.add(part)
            log.warning("shared %s unavailable (%s); serving without it", part, exc)

    def answered(self, part: Part) -> None:
        if part in self._down:
            self._down.discard(part)
            log.warning("shared %s answers again", part)

    async def health(self) -> dict[str, Health]:
        """Whether the bucket and Redis answer now (a probe: not counted as a failure)."""
        bucket: Health = "down"
        with contextlib.suppress(StorageError), anyio.move_on_after(_PROBE_SECONDS):
            await self.objects.ping()
            bucket = "ok"
        redis: Health = "down"
        with anyio.move_on_after(_PROBE_SECONDS):
            redis = "ok" if await self.records.ping() else "down"
        return {"bucket": bucket, "redis": redis}

    async def in_bucket(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one bucket operation through the breaker, counting its failure
        (``StorageUnavailable`` at once while the bucket is left alone)."""
        probe = self._bucket_breaker.state == "half-open"
        if not self._bucket_breaker.allow():
            skipped = StorageUnavailable("the bucket failed a moment ago; not asked")
            self.metrics.shared_failures.labels("bucket").inc()
            raise skipped
        try:
            result = await operation()
        except StorageError as exc:
            if isinstance(exc, StorageUnavailable):
                self._bucket_breaker.failed()
            else:
                self._bucket_breaker.succeeded()  # it answered, with an error
            self.failed("bucket", exc)
            raise
        except BaseException:
            if probe:  # cancelled while probing: let a later call probe again
                self._bucket_breaker.failed()
            raise
        self._bucket_breaker.succeeded()
        self.answered("bucket")
        return result

    # manifests in the bucket

    async def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """A manifest from the bucket; None when it is not there or the bucket fails."""
        try:
            manifest = await self.in_bucket(lambda: self.objects.get_manifest(digest))
        except StorageError:
            return None
        if manifest is not None:
            self.uses.touch(str(digest))
        return manifest

    async def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        """Store a verified manifest in the bucket, for every replica (best effort)."""
        try:
            await self.in_bucket(lambda: self.objects.put_manifest(digest, media_type, body))
        except StorageError:
            return
        await self.stored(digest, len(body))

    async def stored(self, digest: Digest, size: int) -> None:
        """An object of ``size`` bytes is now in the bucket: eviction counts it."""
        try:
            await self.records.record_object(str(digest), size)
        except StorageError as exc:  # not counted: the cap is exceeded by that much
            self.failed("redis", exc)

    # blobs in the bucket

    async def redirect_url(self, digest: Digest) -> str | None:
        """A presigned URL of the blob in the bucket; None when it is not there (or the
        bucket fails: then the replica answers itself)."""
        try:
            if await self.in_bucket(lambda: self.objects.stat(digest)) is None:
                return None
            url = await self.objects.presign(digest, int(self.settings.redirect_ttl))
        except StorageError:
            return None
        self.uses.touch(str(digest))
        return url
