"""Keeping the bucket under ``storage.max_size``: the least recently used objects
leave first, by uses on every replica (``uses.py`` writes them to Redis).

Every replica runs the loop; only the holder of the Redis lease ``evictor`` works in
a round, so replicas do not race to delete the same objects. An object used in the
last few minutes is spared whatever its rank: a client may be reading it (readers
bump its use when they start and while they read, and a presigned URL is a reader for
as long as it is good). Redis decides atomically, per object, that it was not used
since it was picked; only then is it deleted from the bucket. Without Redis there is
no order to evict by and nothing is deleted; without the bucket a round stops.
Pinned objects (``pins.py``) are never picked: their last use is +inf.

Redis's bookkeeping can miss objects (a Redis restarted empty, an upload whose
record failed): now and again the evictor lists the bucket and records what is not
recorded, by its upload time, so that nothing stays beyond the cap unseen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..errors import OCIError
from ..reference import parse_digest
from ..storage.base import Lease, StorageError
from .pins import FleetPins
from .shared import Shared

__all__ = ["BucketEvictor"]

log = logging.getLogger("mirror.replicas.eviction")

LEASE = "evictor"
_BATCH = 256  # objects picked per Redis call
# Objects used this recently are never deleted: a client may still be reading them.
SPARE_SECONDS = 300.0
# How often the bucket is listed to record what Redis does not know.
RESYNC_SECONDS = 3600.0


class BucketEvictor:
    """Deletes least recently used objects while the bucket holds more than ``max_size``."""

    def __init__(
        self,
        shared: Shared,
        max_size: int,
        *,
        interval: float = 10.0,
        spare: float = SPARE_SECONDS,
        now: Callable[[], float] | None = None,
    ) -> None:
        self._shared = shared
        self._max_size = max_size
        self._interval = interval
        # A presigned URL lets a client read for redirect_ttl without asking again.
        redirect = shared.settings.redirect_ttl if shared.settings.redirect else 0.0
        self._spare = max(spare, redirect)
        self._now = now or shared.now
        self._resynced_at: float | None = None

    async def run(self) -> None:
        """Evict now and then, for ever (a background task of each replica)."""
        while True:
            try:
                await self.evict()
            except StorageError as exc:
                log.info("bucket eviction skipped this round: %s", exc)
            await asyncio.sleep(self._interval)

    async def evict(self) -> int:
        """One round: returns how many objects were deleted (0 when another replica
        holds the lease, or nothing is over the cap)."""
        records = self._shared.records
        lease = await records.acquire(LEASE, self._shared.owner, max(30.0, 3 * self._interval))
        if lease is None:
            return 0
        try:
            now = self._now()
            if self._resynced_at is None or now - self._resynced_at >= RESYNC_SECONDS:
                await self.resync()
                self._resynced_at = now
            return await self._evict(lease)
        finally:
            await lease.release()

    async def resync(self) -> int:
        """Record every object in the bucket, by its upload time when it was not
        recorded (a recorded one keeps its size and later use); returns how many."""
        count = 0
        async for stored in self._shared.objects.iter_objects():
            await self._shared.records.record_object(
                str(stored.digest), stored.size, used_at=stored.modified
            )
            count += 1
        return count

    async def _evict(self, lease: Lease) -> int:
        records = self._shared.records
        total, deleted = await records.total_size(), 0
        if total > self._max_size:
            # What the pins reach now is out of reach of the rounds (a platform pulled
            # since its index was pinned included).
            await FleetPins(self._shared).rebuild()
        while total > self._max_size:
            cutoff = self._now() - self._spare
            picks = await records.least_recent(_BATCH, cutoff)
            if not picks:
                log.warning(
                    "bucket holds %d bytes, over its cap of %d, but all of it was used in the "
                    "last %.0f s or is pinned: nothing evicted",
                    total,
                    self._max_size,
                    self._spare,
                )
                break
            for key, size in picks:
                # Gone from the bookkeeping only if no replica used it since it was picked.
                if await records.forget_object(key, unless_used_since=cutoff) is None:
                    continue
                try:
                    await self._shared.objects.delete(parse_digest(key))
                except OCIError:
                    log.warning("forgot %r: not an object key of ours", key)
                except StorageError:
                    await records.record_object(key, size, used_at=cutoff)  # still there
                    raise
                deleted += 1
                self._shared.metrics.bucket_evictions.inc()
                total -= size
                if total <= self._max_size:
                    break
            if not await lease.renew():  # a long round: another replica may go on
                break
            total = await records.total_size()
        if deleted:
            log.info("evicted %d least recently used objects from the bucket", deleted)
        return deleted
