"""Where a replica fills a blob it does not hold: one upstream download for the fleet.

On a local miss the replica's ``Fill`` (which verifies the digest whatever the
source) is fed, in this order of preference:

1. from the bucket, when another replica stored the blob already;
2. from the upstream, by the replica that takes the fleet's lease ``fill:<digest>``
   (renewed while the fill runs); once verified, the file goes into the bucket
   (create-only) and the lease is released;
3. from the holder of the lease, streamed from its running fill (``peers.py``);
4. from the upstream without the lease when Redis cannot be asked, or when the holder
   is unreachable and its lease does not lapse in time (duplicates are allowed then,
   logged and counted).

A bucket that cannot be reached is no error: blobs are then filled into the hot tier
only, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from ..errors import Unavailable
from ..reference import Digest
from ..storage.base import Lease, StorageError, StorageUnavailable
from ..storage.s3 import StreamedUpload
from ..upstream.client import BlobResponse
from .peers import PeerMissing, Peers
from .shared import Shared

__all__ = ["Fleet", "FleetFill", "Source"]

log = logging.getLogger("mirror.replicas")

Source = Literal["bucket", "lease", "peer", "alone"]
BlobSource = Callable[[int], AbstractAsyncContextManager[BlobResponse]]

# A fill's lease lapses this long after its holder stops renewing it (killed, cut off):
# the time another replica waits before taking the fill over.
LEASE_TTL = 10.0
_RENEW_EVERY = 3.0
# Multipart uploads begun this long ago belong to fills killed mid-upload (a live one
# takes seconds): their parts are aborted, at start and then this often.
_STALE_UPLOAD = 3600.0
# Between a replica taking the lease and its fill being there to follow, a peer may
# be asked too early: it is asked again this often.
_RETRY_PEER = 0.05


@dataclass
class FleetFill:
    """How one local fill is fed, and what it owes the fleet once verified."""

    source: Source
    stream: BlobSource | None  # None: the upstream
    lease: Lease | None = None
    opened: AsyncExitStack = field(default_factory=AsyncExitStack, repr=False)  # a peer's answer

    @property
    def from_upstream(self) -> bool:
        """Filled from the upstream: put into the bucket once verified."""
        return self.source in ("lease", "alone")

    async def discard(self) -> None:
        """The fill did not start (another worker of this host fills it): let go."""
        await self.opened.aclose()
        if self.lease is not None:
            await self.lease.release()


class Fleet:
    """The fleet side of a replica's blob misses: bucket, lease, peers."""

    def __init__(self, shared: Shared, peers: Peers, *, lease_ttl: float = LEASE_TTL) -> None:
        self.shared = shared
        self.objects = shared.objects
        self.leases = shared.records
        self.peers = peers
        self.owner = shared.owner  # this replica's advertised address
        self.metrics = shared.metrics
        self.lease_ttl = lease_ttl
        self._alone_logged = False  # Redis down: logged once until it answers
        self._sweeper: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()  # uploads of passed-through blobs

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.gather(*self._finishing, return_exceptions=True)
        await self.peers.aclose()

    async def _sweep(self) -> None:
        """Abort what killed uploads left in the bucket (invisible, but kept and billed)."""
        while True:
            try:
                if swept := await self.objects.abort_stale_uploads(_STALE_UPLOAD):
                    log.info("aborted %d stale uploads in the bucket", swept)
            except StorageError as exc:
                log.info("could not sweep the bucket's stale uploads: %s", exc)
            await asyncio.sleep(_STALE_UPLOAD)

    # the bucket

    async def size(self, digest: Digest) -> int | None:
        """The blob's size in the bucket; None when absent or unreachable."""
        try:
            return await self.shared.in_bucket(lambda: self.objects.stat(digest))
        except StorageError:
            return None

    @asynccontextmanager
    async def _from_bucket(self, digest: Digest, start: int) -> AsyncIterator[BlobResponse]:
        try:
            async with self.objects.open(digest, start) as reader:
                if reader is None:
                    raise Unavailable(f"blob {digest} left the bucket; retry")
                self.shared.uses.touch(str(digest))  # eviction spares what is in use

                async def chunks() -> AsyncIterator[bytes]:
                    try:
                        async for data in reader.chunks():
                            # In use for as long as it is read, however long that is.
                            self.shared.uses.touch(str(digest))
                            yield data
                    except StorageError as exc:
                        raise Unavailable(f"bucket broke off blob {digest}: {exc}") from exc

                yield BlobResponse(reader.size - start, chunks())
        except StorageError as exc:
            self.shared.failed("bucket", exc)
            raise Unavailable(f"could not read blob {digest} from the bucket: {exc}") from exc

    def bucket_source(self, digest: Digest) -> BlobSource:
        return lambda start: self._from_bucket(digest, start)

    async def store(self, digest: Digest, path: Path, adopt: Callable[[], Awaitable[None]]) -> None:
        """Adopt a verified fill into the hot tier (``adopt``), then put it into the bucket.

        The hot tier first: a big layer takes seconds to upload, and meanwhile this
        replica's requests for it are hits (sent zero-copy), not followers of a fill
        that ended. The upload reads the file through a descriptor opened before the
        adoption renames it, so the hot tier may rename or evict it meanwhile. A
        failure to store costs the fleet a later fill, never this one (its readers
        have every byte already); a failure to adopt is raised once the upload ended.
        """
        try:
            file = open(path, "rb")  # held across the adoption, closed below
        except OSError as exc:
            log.error("could not put blob %s into the bucket: %s", digest, exc)
            self.metrics.unstored_fills.inc()
            await adopt()
            return
        with file:
            try:
                await adopt()
            except Exception:
                await self.put(digest, file)
                raise
            await self.put(digest, file)

    async def put(self, digest: Digest, file: BinaryIO) -> None:
        """Put a verified blob, open in ``file``, into the bucket; a failure is counted
        and logged, not raised."""
        # Linux names an open descriptor's file, whatever became of its own name.
        path = Path(f"/proc/self/fd/{file.fileno()}")
        try:
            size = os.fstat(file.fileno()).st_size
            await self.shared.in_bucket(lambda: self.objects.put_file(digest, path))
        except StorageError:
            self.metrics.unstored_fills.inc()
            return
        except OSError as exc:  # the file's fault, not the bucket's
            log.error("could not put blob %s into the bucket: %s", digest, exc)
            self.metrics.unstored_fills.inc()
            return
        await self.shared.stored(digest, size)  # eviction counts it

    # passing through, into the bucket too

    def passing_through(self, digest: Digest, source: BlobSource) -> BlobSource:
        """``source`` for a blob this replica passes through uncached (over the hot tier's
        ``max_blob_share``, or no room), also putting it into the bucket as it passes:
        the share bounds the hot tier, not the bucket, so the fleet's next pull of it is
        a bucket hit. One reader from the start, on one replica (the lease
        ``upload:<digest>``), uploads; the blob appears only if every byte verified."""
        return lambda start: self._teed(digest, source, start)

    @asynccontextmanager
    async def _teed(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[BlobResponse]:
        async with source(start) as response:
            upload = await self._upload(digest, response.size) if start == 0 else None
            if upload is None:
                yield response
                return
            stream, lease = upload
            hasher = hashlib.new(digest.algorithm)
            fed = False  # every byte, to the end, went into the upload

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal fed
                feeding = True
                async for data in response.chunks:
                    if feeding:
                        hasher.update(data)
                        feeding = await self._feed(stream, data)
                    yield data
                fed = feeding

            renewer = asyncio.ensure_future(self._renew(lease))
            try:
                yield BlobResponse(response.size, chunks())
            finally:
                renewer.cancel()
                whole = fed and hasher.hexdigest() == digest.hex
                # In the background: the reader has its bytes, and may be gone already.
                self._spawn(self._finish(digest, stream, lease, whole))

    async def _upload(
        self, digest: Digest, size: int | None
    ) -> tuple[StreamedUpload, Lease] | None:
        try:
            lease = await self.leases.acquire(f"upload:{digest}", self.owner, self.lease_ttl)
        except StorageUnavailable:
            return None  # without Redis every replica would upload it: none does
        if lease is None:
            return None  # another reader or replica is at it
        if await self.size(digest) is not None:
            await lease.release()
            return None
        return self.objects.streamed(digest, size), lease

    @staticmethod
    async def _feed(stream: StreamedUpload, data: bytes) -> bool:
        try:
            return await stream.write(data)
        except StorageError:
            return False

    async def _finish(
        self, digest: Digest, upload: StreamedUpload, lease: Lease, whole: bool
    ) -> None:
        try:
            if not whole:
                await upload.abort()
            elif await self.shared.in_bucket(upload.complete):
                await self.shared.stored(digest, upload.written)
        except StorageError:
            self.metrics.unstored_fills.inc()
            await upload.abort()  # if the breaker kept complete() from running at all
        finally:
            with contextlib.suppress(StorageError):
                await lease.release()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    # choosing the source

    async def plan(self, digest: Digest) -> FleetFill:
        """Where this replica's fill of ``digest`` comes from (it is in none of its tiers)."""
        if await self.size(digest) is not None:
            return FleetFill("bucket", self.bucket_source(digest))
        deadline = time.monotonic() + self.lease_ttl + 1
        name, unreachable = f"fill:{digest}", False
        while True:
            try:
                lease = await self.leases.acquire(name, self.owner, self.lease_ttl)
                holder = None if lease is not None else await self.leases.holder(name)
            except StorageUnavailable as exc:
                if not self._alone_logged:
                    log.warning("Redis is unreachable (%s): filling blobs uncoordinated", exc)
                    self._alone_logged = True
                return self._alone(digest)
            self._alone_logged = False
            if lease is not None:
                # Stored while we asked: the lease is not needed.
                if await self.size(digest) is not None:
                    await lease.release()
                    return FleetFill("bucket", self.bucket_source(digest))
                return FleetFill("lease", None, lease)
            if holder is not None:
                try:
                    return await self._from_peer(holder, digest)
                except PeerMissing:
                    pass
                except Unavailable as exc:
                    if not unreachable:
                        # Killed or cut off: its lease lapses soon, then one of us takes over.
                        log.warning("%s; waiting for its lease on %s to lapse", exc, digest)
                    unreachable = True
            if time.monotonic() > deadline:
                log.warning("the fill of %s by %s does not end; filling it here", digest, holder)
                return self._alone(digest)
            await asyncio.sleep(_RETRY_PEER * (4 if unreachable else 1))
            if await self.size(digest) is not None:  # the holder stored it meanwhile
                return FleetFill("bucket", self.bucket_source(digest))

    def _alone(self, digest: Digest) -> FleetFill:
        self.metrics.uncoordinated_fills.inc()
        return FleetFill("alone", None)

    async def _from_peer(self, holder: str, digest: Digest) -> FleetFill:
        """A fill streamed from the lease's holder, its answer already under way (so
        that a holder with nothing to stream, or out of reach, is known before the fill
        starts: ``PeerMissing``, ``Unavailable``)."""
        planned = FleetFill("peer", None)
        first = await planned.opened.enter_async_context(self.peers.open_blob(holder, digest))
        unused = [first]

        def stream(start: int) -> AbstractAsyncContextManager[BlobResponse]:
            if start == 0 and unused:
                return _given(unused.pop())
            return self.peers.open_blob(holder, digest, start)

        planned.stream = stream
        return planned

    # the lease while the fill runs

    @asynccontextmanager
    async def holding(self, planned: FleetFill) -> AsyncIterator[None]:
        """Keep the fill's lease while it runs; give it up after (the blob is stored by then)."""
        lease = planned.lease
        try:
            if lease is None:
                yield
                return
            renewer = asyncio.ensure_future(self._renew(lease))
            try:
                yield
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
                await lease.release()
        finally:
            await planned.opened.aclose()

    async def _renew(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(min(_RENEW_EVERY, self.lease_ttl / 3))
            if not await lease.renew():
                # Another replica may take the fill over; ours still serves its readers
                # and its bucket write is create-only.
                log.warning("lost the fleet's lease on %s", lease.name)
                return


@asynccontextmanager
async def _given(response: BlobResponse) -> AsyncIterator[BlobResponse]:
    yield response
