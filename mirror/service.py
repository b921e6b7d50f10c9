"""The pull-through policy: what is answered from disk, what goes upstream, and
what is served stale. This is the one module that decides.

- By digest (blobs, manifests): local first; a miss is fetched once, verified,
  stored and served while it streams.
- By tag: the local record while it is younger than the upstream's ``tag_ttl``;
  then a HEAD upstream (cheap, not rate-limited), and a GET only when the digest
  moved. When the upstream fails, the last known record is served, marked stale.
- Offline: never a byte from any upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import anyio
import httpx

from .config import Settings
from .errors import (
    BlobUnknown,
    DigestMismatch,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    OCIError,
    TooManyRequests,
    Unavailable,
)
from .fills.blobs import Blob, BlobSource, CachedBlob, FollowedBlob, PassedThroughBlob
from .fills.fill import DiskFull, Fill, report_disk_failure
from .fills.foreign import FOREIGN_POLL_SECONDS, ForeignBlob
from .fills.gate import FillGate
from .holdings import Holdings
from .manifest import MANIFEST_TYPES, OCI_INDEX
from .metrics import Metrics
from .reference import Digest, parse_repository, upstream_repository
from .referrers import ReferrersAnswer, ReferrersCache
from .replicas.blobs import Fleet, FleetFill
from .replicas.peers import Peers
from .replicas.records import ReplicaRecords
from .replicas.shared import Shared
from .singleflight import SingleFlight
from .storage.base import MetadataStore, RememberedTag, StorageError, TagRecord
from .storage.disk import Store
from .storage.disk_records import DiskRecords
from .storage.locks import FileLock, lock_is_held
from .upstream.client import BlobResponse, FetchedManifest, Upstream

__all__ = ["Manifest", "PullThroughCache"]

log = logging.getLogger("mirror.service")

T = TypeVar("T")
# Failures after which the last known answer is served instead of an error.
_STALE_ON = (Unavailable, TooManyRequests)


class _SlowRoute(Exception):
    """Another upstream's fill of the same digest has not started in time."""


@asynccontextmanager
async def _no_upstream(start: int) -> AsyncIterator[BlobResponse]:
    """A peer's answer never goes upstream: when the fill it follows cannot go on
    (a full disk), the answer is aborted and the peer fills the blob its own way."""
    raise Unavailable("this replica's fill cannot go on")
    yield  # an async generator, for asynccontextmanager


def _bucket_else(bucket: BlobSource, upstream: BlobSource) -> BlobSource:
    """The bucket's copy, or the upstream's when the bucket fails before its first byte:
    it held the blob when the fill was planned, then went down (a miss passes through
    from the upstream while the bucket is down, not a 503)."""

    @asynccontextmanager
    async def opened(start: int) -> AsyncIterator[BlobResponse]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                response = await stack.enter_async_context(bucket(start))
            except Unavailable as exc:
                log.warning("%s; from the upstream instead", exc)
                response = await stack.enter_async_context(upstream(start))
            yield response

    return opened


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest
    result: str  # hit, miss, revalidated, stale, coalesced


class PullThroughCache:
    """Answers pulls from the store, filling misses from the upstreams."""

    def __init__(
        self,
        store: Store,
        upstreams: list[Upstream],
        *,
        metrics: Metrics,
        offline: bool = False,
        now: Callable[[], float] = time.time,
        shared: Shared | None = None,
    ) -> None:
        self.store = store
        # Replicas: the bucket and Redis every replica shares; None on a single host.
        self.shared = shared
        self.records: MetadataStore = DiskRecords(store)
        self._recent_tag = store.memo_tag  # a tag record from memory, without I/O
        if shared is not None:
            replica = ReplicaRecords(shared, self.records, now=now)
            self.records, self._recent_tag = replica, replica.memo_tag
        self.metrics = metrics
        self.upstreams: Mapping[str, Upstream] = {u.name: u for u in upstreams}
        self.default_upstream = upstreams[0]
        self.offline = offline
        self._now = now
        self._manifests: SingleFlight[FetchedManifest] = SingleFlight()
        self._revalidations: SingleFlight[Manifest] = SingleFlight()
        self._tag_lists: SingleFlight[list[str]] = SingleFlight()
        # When a tag's record in memory expires, every request for it in flight misses
        # at once: one read of the shared records answers them all.
        self._tag_reads: SingleFlight[TagRecord | None] = SingleFlight()
        self._fills: dict[Digest, Fill] = {}
        self.gates = {
            u.name: FillGate(u.name, u.settings.max_fills, u.settings.fill_queue) for u in upstreams
        }
        # Blobs larger than this pass through uncached: adopting one would evict
        # much of the cache, or (past max_size) everything, itself included.
        self.max_cached_blob: int | None = None
        self._fill_for: dict[Digest, tuple[str, str]] = {}  # (upstream, repository)
        self._background: set[asyncio.Task[None]] = set()
        self._rereads: set[tuple[str, str, str, tuple[str, ...]]] = set()  # tag records
        # Called before a client's request goes upstream; may refuse it (the web
        # layer's per-client budget). The policy stays here, the budget there.
        self.before_upstream: Callable[[], None] = lambda: None
        self.referrers = ReferrersCache(
            self.records,
            metrics,
            self._referrers_tag,
            before_upstream=lambda: self.before_upstream(),
            offline=offline,
            now=now,
        )
        self.holdings = Holdings(
            store,
            offline=offline,
            before_upstream=lambda: self.before_upstream(),
            shared=shared.records if shared is not None else None,
        )
        # This replica's side of the fleet's blob fills (None on a single host).
        self.fleet: Fleet | None = None
        # Digests whose fill a request here is asking the fleet about: the others wait
        # for that fill rather than ask too (and find this very replica holding the lease).
        self._planning: dict[Digest, asyncio.Future[None]] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], float] | None = None,
    ) -> PullThroughCache:
        """The cache, its store and its upstreams as the settings describe them."""
        clock: dict[str, Callable[[], float]] = {"now": now} if now else {}
        store = Store(settings.cache.directory, settings.cache.max_size, **clock)
        metrics = Metrics(store.facts)
        upstreams = [Upstream(u, transport, metrics=metrics, **clock) for u in settings.upstreams]
        shared = None
        if settings.storage.shared:
            shared = Shared.from_settings(settings.storage, metrics, **clock)
        cache = cls(
            store,
            upstreams,
            metrics=metrics,
            offline=settings.cache.offline,
            shared=shared,
            **clock,
        )
        cache.max_cached_blob = int(settings.cache.max_size * settings.cache.max_blob_share)
        if shared is not None:
            assert settings.storage.peer_secret is not None  # config checks
            peers = Peers(settings.storage.peer_secret, now=now or time.time)
            cache.fleet = Fleet(shared, peers)
        return cache

    async def start(self) -> None:
        """Connect what needs an event loop (the bucket's client)."""
        if self.shared is not None:
            await self.shared.start()
        if self.fleet is not None:
            self.fleet.start()

    async def drain(self) -> None:
        """Wait for fills under way to be cached (readers may finish before that)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._manifests.aclose()
        await self._revalidations.aclose()
        await self._tag_reads.aclose()
        await self._tag_lists.aclose()
        await self.holdings.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        if self.fleet is not None:
            await self.fleet.aclose()
        if self.shared is not None:
            await self.shared.aclose()

    async def _disk(self, function: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(function, *args)

    # routing

    def route(self, name: str, namespace: str | None = None) -> tuple[Upstream, str]:
        """The upstream a request is for, and the repository name there.

        containerd's ``?ns=`` wins; then a first path component naming a configured
        upstream (``ghcr.io/org/img``); otherwise the default upstream. A host that
        is not configured is refused: the mirror is not an open proxy. Docker Hub's
        official images are named ``library/x`` whichever way the client spelt them,
        so that ``debian`` and ``library/debian`` share one cache entry.
        """
        parse_repository(name)
        first, _, rest = name.partition("/")
        if namespace:
            upstream = self.upstreams.get(namespace.lower())
            if upstream is None:
                raise NameUnknown(f"registry {namespace[:100]!r} is not an upstream of this mirror")
            if rest and first == upstream.name:
                name = rest  # the registry named twice, by ns and by prefix
        elif rest and "." in first:
            upstream = self.upstreams.get(first)
            if upstream is None:
                raise NameUnknown(f"registry {first!r} is not an upstream of this mirror")
            name = rest
        else:
            upstream = self.default_upstream
        return upstream, upstream_repository(
            name, official_prefix=upstream.settings.official_prefix
        )

    def catalog_name(self, upstream: Upstream, repository: str) -> str:
        if upstream is self.default_upstream:
            return repository
        return f"{upstream.name}/{repository}"

    def _offline_error(self, kind: type[OCIError], what: str) -> OCIError:
        return kind(f"{what} is not cached and the mirror is offline")

    # manifests

    async def get_manifest(
        self, upstream: Upstream, repository: str, reference: str | Digest, accept: tuple[str, ...]
    ) -> Manifest:
        if not accept:
            # Like distribution: a client that accepts none of the manifest types there
            # are gets MANIFEST_UNKNOWN, at no cost upstream.
            raise ManifestUnknown(
                f"manifest {reference}: the client accepts none of the manifest types",
                detail={"accepted": [], "supported": list(MANIFEST_TYPES)},
            )
        if isinstance(reference, Digest):
            manifest = await self._manifest_by_digest(upstream, repository, reference, accept)
        else:
            manifest = await self._manifest_by_tag(upstream, repository, reference, accept)
        await self.holdings.note_manifest(upstream.name, repository, manifest.digest, manifest.body)
        self.metrics.cache_results.labels("manifest", manifest.result).inc()
        if manifest.media_type not in accept:
            raise ManifestUnknown(
                f"manifest {reference} is {manifest.media_type}, which the client does not accept",
                detail={"mediaType": manifest.media_type, "accepted": list(accept)},
            )
        return manifest

    async def _manifest_by_digest(
        self, upstream: Upstream, repository: str, digest: Digest, accept: tuple[str, ...]
    ) -> Manifest:
        cached = await self._cached_manifest(digest)
        if cached is not None:
            await self.holdings.check(upstream, repository, digest, "manifest")
            return Manifest(cached[1], cached[0], digest, "hit")
        if self.offline:
            raise self._offline_error(ManifestUnknown, f"manifest {digest}")
        self.before_upstream()
        fetched, joined = await self._fetch_manifest(upstream, repository, digest, accept)
        return Manifest(fetched.body, fetched.media_type, digest, "coalesced" if joined else "miss")

    async def _manifest_by_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> Manifest:
        record = self._remembered_tag(upstream, repository, tag, accept)
        if record is None:
            record = await self._read_tag(upstream, repository, tag, accept)
        if record is None and accept != MANIFEST_TYPES:
            # What the tag is for a client that accepts everything holds for this one
            # too, when it accepts that type (warm and import record only that).
            general = await self._read_tag(upstream, repository, tag, MANIFEST_TYPES)
            if general is not None and general.media_type in accept:
                record = general
        cached = None
        if record is not None:
            cached = await self._cached_manifest(record.digest)
        if record is not None and cached is not None:
            media_type, body = cached
            age = self._now() - record.checked_at
            if self.offline or 0 <= age < upstream.settings.tag_ttl:
                return Manifest(body, media_type, record.digest, "hit")
        if self.offline:
            raise self._offline_error(ManifestUnknown, f"manifest {repository}:{tag}")
        missing_key = f"{upstream.name}/{repository}:{tag}|{','.join(accept)}"
        if await self.records.is_missing(missing_key):
            self.metrics.cache_results.labels("manifest", "negative_hit").inc()
            raise ManifestUnknown(f"manifest {repository}:{tag} is unknown upstream (remembered)")
        try:
            self.before_upstream()  # refused: like an upstream 429, stale if we have it
            if record is not None and cached is not None:
                return await self._revalidate(upstream, repository, tag, accept, record, cached)
            fetched, joined = await self._fetch_manifest(upstream, repository, tag, accept)
        except ManifestUnknown:
            await self.records.put_missing(missing_key, upstream.settings.negative_ttl)
            raise
        except _STALE_ON as exc:
            if record is None or cached is None:
                raise
            log.warning(
                "upstream %s failed (%s); serving stale %s:%s", upstream.name, exc, repository, tag
            )
            return Manifest(cached[1], cached[0], record.digest, "stale")
        return Manifest(
            fetched.body, fetched.media_type, fetched.digest, "coalesced" if joined else "miss"
        )

    async def _read_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        async def read() -> TagRecord | None:
            return await self.records.get_tag(upstream.name, repository, tag, accept)

        record, _ = await self._tag_reads.do((upstream.name, repository, tag, accept), read)
        return record

    def _remembered_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        """A tag record from memory that answers now, without I/O. One due for a look at
        the shared records is still answered while the tag is fresh, and one read in
        the background brings it up to date: requests that waited for that read were
        the tail at 100 connections (2-4% of manifest requests over 100 ms)."""
        memo = self._memo_tag(upstream, repository, tag, accept)
        if memo is None:
            return None
        (record, due), recorded_for = memo
        if due:
            if not 0 <= self._now() - record.checked_at < upstream.settings.tag_ttl:
                return None  # another process may have revalidated it: read, then decide
            self._reread_tag(upstream, repository, tag, recorded_for)
        return record

    def _reread_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> None:
        key = (upstream.name, repository, tag, accept)
        if key in self._rereads:
            return
        self._rereads.add(key)

        async def reread() -> None:
            try:
                await self._read_tag(upstream, repository, tag, accept)
            except StorageError as exc:  # the next request reads again, and says so
                log.debug("could not read the record of %s:%s again: %s", repository, tag, exc)
            finally:
                self._rereads.discard(key)

        task = asyncio.ensure_future(reread())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _memo_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> tuple[RememberedTag, tuple[str, ...]] | None:
        """The newest record in memory that answers this ``Accept``, and the ``Accept``
        it is recorded for: its own, or what the tag is for a client that accepts
        everything, when it is of an accepted type. Any variant of ``Accept`` (one type,
        another order) is then a hit without the index."""
        own = self._recent_tag(upstream.name, repository, tag, accept)
        if accept != MANIFEST_TYPES:
            general = self._recent_tag(upstream.name, repository, tag, MANIFEST_TYPES)
            if (
                general is not None
                and general.record.media_type in accept
                and (own is None or general.record.checked_at > own.record.checked_at)
            ):
                return general, MANIFEST_TYPES
        return None if own is None else (own, accept)

    async def _revalidate(
        self,
        upstream: Upstream,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        record: TagRecord,
        cached: tuple[str, bytes],
    ) -> Manifest:
        """Ask the upstream whether an expired tag moved: once for all who ask at the
        same time, and no longer than the upstream's ``revalidate_timeout``, past
        which the stale answer is served while the revalidation goes on."""
        media_type, body = cached
        # Another request may have revalidated the tag since this one read its record
        # (there were awaits in between): then there is nothing left to ask.
        memo = self._memo_tag(upstream, repository, tag, accept)
        latest = None if memo is None else memo[0].record
        if (
            latest is not None
            and latest.digest == record.digest
            and 0 <= self._now() - latest.checked_at < upstream.settings.tag_ttl
        ):
            return Manifest(body, media_type, record.digest, "hit")

        async def refresh() -> Manifest:
            head = await upstream.head_manifest(repository, tag, accept)
            if head.digest == record.digest:
                await self.records.put_tag(
                    upstream.name, repository, tag, accept, record.digest, media_type
                )
                return Manifest(body, media_type, record.digest, "revalidated")
            fetched, _ = await self._fetch_manifest(upstream, repository, tag, accept)
            return Manifest(fetched.body, fetched.media_type, fetched.digest, "miss")

        key = (upstream.name, repository, tag, accept)
        with anyio.move_on_after(upstream.settings.revalidate_timeout):
            manifest, joined = await self._revalidations.do(key, refresh)
            return replace(manifest, result="coalesced") if joined else manifest
        log.warning(
            "upstream %s is slow to revalidate %s:%s; serving it stale",
            upstream.name,
            repository,
            tag,
        )
        return Manifest(body, media_type, record.digest, "stale")

    async def _fetch_manifest(
        self, upstream: Upstream, repository: str, reference: str | Digest, accept: tuple[str, ...]
    ) -> tuple[FetchedManifest, bool]:
        async def fetch() -> FetchedManifest:
            try:
                fetched = await upstream.get_manifest(repository, reference, accept)
            except DigestMismatch:
                self.metrics.digest_mismatches.labels("manifest").inc()
                raise
            await self._remember_manifest(upstream, repository, reference, accept, fetched)
            return fetched

        key = (upstream.name, repository, str(reference), accept)
        return await self._manifests.do(key, fetch)

    async def _cached_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """A verified manifest from memory, this host's disk, or the shared bucket
        (copied to the disk then); None when none has it."""
        cached = self.store.memo_manifest(digest) or await self._disk(
            self.store.get_manifest, digest
        )
        if self.shared is None:
            return cached
        if cached is not None:
            self.shared.uses.touch(str(digest))  # a use of the bucket's copy too
            return cached
        manifest = await self.shared.get_manifest(digest)
        if manifest is not None:
            await self._keep_manifest(digest, *manifest)
        return manifest

    async def _keep_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        try:
            self._evicted(await self._disk(self.store.put_manifest, digest, media_type, body))
        except (OSError, sqlite3.Error) as exc:
            report_disk_failure(exc, f"manifest {digest}")  # served, not cached

    async def _remember_manifest(
        self,
        upstream: Upstream,
        repository: str,
        reference: str | Digest,
        accept: tuple[str, ...],
        fetched: FetchedManifest,
    ) -> None:
        await self._keep_manifest(fetched.digest, fetched.media_type, fetched.body)
        if self.shared is not None:
            await self.shared.put_manifest(fetched.digest, fetched.media_type, fetched.body)
        try:
            if not isinstance(reference, Digest):
                await self.records.put_tag(
                    upstream.name, repository, reference, accept, fetched.digest, fetched.media_type
                )
            await self.records.add_repository(self.catalog_name(upstream, repository))
        except StorageError as exc:
            log.error("could not record manifest %s: %s", fetched.digest, exc)  # served

    def _evicted(self, count: int) -> None:
        if count:
            self.metrics.evictions.inc(count)
            log.info("evicted %d least recently used entries to stay under max_size", count)

    # blobs

    async def get_blob(self, upstream: Upstream, repository: str, digest: Digest) -> Blob:
        """The blob's bytes: from disk, or streamed from the one fill of this digest."""
        blob = await self._get_blob(upstream, repository, digest)
        self.metrics.cache_results.labels("blob", blob.result).inc()
        if self.shared is not None and blob.result == "hit":
            self.shared.uses.touch(str(digest))  # a use of the bucket's copy too
        return blob

    async def _get_blob(
        self, upstream: Upstream, repository: str, digest: Digest, *, retry: bool = True
    ) -> Blob:
        handle = self.store.memo_open_blob(digest) or await self._disk(self.store.open_blob, digest)
        if handle is not None:
            try:
                await self.holdings.check(upstream, repository, digest, "blob")
            except BaseException:
                handle.close()
                raise
            return CachedBlob(handle)
        gate = self.gates[upstream.name]

        def source(start: int) -> AbstractAsyncContextManager[BlobResponse]:
            return upstream.open_blob(repository, digest, start)

        @asynccontextmanager
        async def gated(start: int) -> AsyncIterator[BlobResponse]:
            # A reader fetching for itself (full disk, too large, another route's
            # fill) takes a download slot too: the slots bound connections and fds.
            async with gate.slot(), source(start) as response:
                yield response

        # A replica puts what it passes through uncached into the bucket too.
        passing = gated if self.fleet is None else self.fleet.passing_through(digest, gated)

        async def again() -> Blob:
            return await self._get_blob(upstream, repository, digest, retry=False)

        own_route = again if retry else None
        fill = self._fills.get(digest)
        if fill is not None:
            if not self._may_follow(upstream, repository, digest):
                await self.holdings.check(upstream, repository, digest, "blob")
                return await self._get_blob(upstream, repository, digest, retry=retry)
            return await self._join(fill, "coalesced", passing, upstream, own_route)
        planning = self._planning.get(digest)
        if planning is not None:
            await asyncio.shield(planning)
            return await self._get_blob(upstream, repository, digest, retry=retry)
        if self.offline and self.fleet is None:
            raise self._offline_error(BlobUnknown, f"blob {digest}")
        if self.fleet is None:
            self.before_upstream()
        await gate.acquire()  # before any descriptor is opened for this fill
        fill = self._fills.get(digest)  # started while we waited in line
        if fill is not None or digest in self._planning:
            gate.release()
            return await self._get_blob(upstream, repository, digest, retry=retry)
        planned: FleetFill | None = None
        if self.fleet is not None:
            planning = self._planning[digest] = asyncio.get_running_loop().create_future()
        try:
            if self.fleet is not None:
                planned = await self._plan_fill(self.fleet, upstream, repository, digest)
            started = self._start_fill(upstream, repository, digest, source, gate, planned)
        except BaseException:
            if planned is not None:
                await planned.discard()
            gate.release()
            raise
        finally:
            if planning is not None:  # the fill is in self._fills by now, if it started
                del self._planning[digest]
                planning.set_result(None)
        if isinstance(started, Fill):
            # Too large for this replica's hot tier (or no room): passed through from
            # the bucket when the fill was to read it there, not fetched upstream again.
            bucket = planned.stream if planned is not None and planned.source == "bucket" else None
            return await self._join(started, "miss", bucket or passing, upstream, None)
        gate.release()
        if planned is not None:
            await planned.discard()
        if started == "cached":
            return await self._get_blob(upstream, repository, digest, retry=retry)
        if started == "foreign":
            # Another worker's fill is for some repository: follow it only under one
            # known to hold the digest.
            if not self._may_follow(upstream, repository, digest):
                await self.holdings.check(upstream, repository, digest, "blob")
            return await self._follow_foreign(upstream, repository, digest)
        return await PassedThroughBlob(passing).open()

    async def _plan_fill(
        self, fleet: Fleet, upstream: Upstream, repository: str, digest: Digest
    ) -> FleetFill:
        """Where a replica's fill comes from. Content from the bucket or a peer was
        fetched for some repository: this one must be known to hold it, as for a hit."""
        if self.offline:
            if await fleet.size(digest) is None:
                raise self._offline_error(BlobUnknown, f"blob {digest}")
            planned = FleetFill("bucket", fleet.bucket_source(digest))
        else:
            planned = await fleet.plan(digest)
        try:
            if planned.from_upstream:
                self.before_upstream()
            else:
                await self.holdings.check(upstream, repository, digest, "blob")
        except BaseException:
            await planned.discard()
            raise
        return planned

    def _start_fill(
        self,
        upstream: Upstream,
        repository: str,
        digest: Digest,
        source: BlobSource,
        gate: FillGate,
        planned: FleetFill | None = None,
    ) -> Fill | str:
        """Start filling ``digest`` with the slot taken from ``gate``, which the fill
        releases; else "cached", "foreign" (another worker fills it) or "no-disk".
        With replicas, ``planned`` says where from, and what is owed the fleet after."""
        lock = FileLock(self.store.lock_path(digest))
        try:
            if not lock.try_acquire():
                return "foreign"
        except OSError as exc:  # out of descriptors or disk: serve, don't cache
            report_disk_failure(exc, f"blob {digest}")
            return "no-disk"
        if self.store.has_blob(digest):  # filled and adopted while we looked
            lock.release()
            return "cached"
        try:
            fill = Fill(
                digest,
                self.store.temp_path(digest),
                lock,
                max_size=self.max_cached_blob,
                abandon_after=upstream.settings.abandon_after,
                route=upstream.name,
            )
        except OSError as exc:
            lock.release(remove=True)
            report_disk_failure(exc, f"blob {digest}")
            return "no-disk"
        self._fills[digest] = fill
        self._fill_for[digest] = (upstream.name, repository)
        fleet = self.fleet
        if planned is not None and planned.stream is not None:
            bucket = planned.source == "bucket" and not self.offline
            source = _bucket_else(planned.stream, source) if bucket else planned.stream

        async def adopt(path: Path) -> None:
            await self.holdings.note(upstream.name, repository, digest)

            async def into_hot_tier() -> None:
                self._evicted(await self._disk(self.store.adopt_blob, path, digest))

            if fleet is not None and planned is not None and planned.from_upstream:
                # In the bucket before the lease is let go: whoever asks next finds it.
                await fleet.store(digest, path, into_hot_tier)
            else:
                await into_hot_tier()

        async def run() -> None:
            self.metrics.fills_in_flight.inc()
            try:
                if fleet is not None and planned is not None:
                    self.metrics.fleet_fills.labels(planned.source).inc()
                    async with fleet.holding(planned):
                        await fill.run(lambda: source(0), adopt)
                else:
                    await fill.run(lambda: source(0), adopt)
            finally:
                self._fills.pop(digest, None)
                self._fill_for.pop(digest, None)
                self.metrics.fills_in_flight.dec()
                gate.release()
            if isinstance(fill.error, DigestMismatch):
                self.metrics.digest_mismatches.labels("blob").inc()

        # The fill is nobody's request: keep a reference so it runs to its end.
        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return fill

    async def _join(
        self,
        fill: Fill,
        result: str,
        source: BlobSource,
        upstream: Upstream,
        own_route: Callable[[], Awaitable[Blob]] | None,
    ) -> Blob:
        fd = fill.open_reader()  # before any await: the fill may end meanwhile
        try:
            if fill.route == upstream.name:
                await fill.ready.wait()
            else:
                # Another upstream's fill: it may be stuck on a route that is not
                # ours; wait a little for its first answer, then fetch our own way.
                with anyio.move_on_after(upstream.settings.join_timeout):
                    await fill.ready.wait()
                if not fill.ready.is_set():
                    raise _SlowRoute
            fill.outcome()  # raises if the fill failed before its first byte
        except _SlowRoute:
            fill.close_reader(fd)
            log.info("fill of %s via %s is slow; passing through", fill.digest, fill.route)
            return await PassedThroughBlob(source).open()
        except DiskFull:
            fill.close_reader(fd)
            return await PassedThroughBlob(source).open()
        except _STALE_ON:
            fill.close_reader(fd)
            if own_route is None or fill.route == upstream.name:
                raise
            return await own_route()  # that route failed; ours may not
        except BaseException:
            fill.close_reader(fd)
            raise
        return FollowedBlob(fill, fd, result, source)

    async def blob_redirect(
        self, upstream: Upstream, repository: str, digest: Digest
    ) -> str | None:
        """A presigned URL of the blob in the bucket, for a client to fetch it from there
        (``storage.redirect``), after the checks of a hit; None: answer it here."""
        if self.shared is None or not self.shared.settings.redirect:
            return None
        url = await self.shared.redirect_url(digest)
        if url is not None:
            await self.holdings.check(upstream, repository, digest, "blob")
            self.metrics.cache_results.labels("blob", "redirect").inc()
        return url

    async def _follow_foreign(self, upstream: Upstream, repository: str, digest: Digest) -> Blob:
        lock_path = self.store.lock_path(digest)
        while True:
            try:
                fd = os.open(self.store.temp_path(digest), os.O_RDONLY)
            except FileNotFoundError:
                pass
            else:
                open_cached = functools.partial(self.store.open_blob, digest)
                return ForeignBlob(digest, fd, lock_path, open_cached)
            # Between the other worker's lock and its file, or its rename and its
            # index commit, there is no file to follow: that is no failure.
            running = lock_is_held(lock_path)
            handle = await self._disk(self.store.open_blob, digest)
            if handle is not None:
                return CachedBlob(handle)
            if not running:  # it ended without caching: fill it here
                return await self._get_blob(upstream, repository, digest)
            await asyncio.sleep(FOREIGN_POLL_SECONDS)

    async def head_blob(self, upstream: Upstream, repository: str, digest: Digest) -> int | None:
        """A blob's size, without downloading it."""
        handle = self.store.memo_open_blob(digest) or await self._disk(self.store.open_blob, digest)
        if handle is not None:
            with handle:
                await self.holdings.check(upstream, repository, digest, "blob")
                return os.fstat(handle.fileno()).st_size
        fill = self._fills.get(digest)
        if fill is not None and fill.route == upstream.name:
            if not self._may_follow(upstream, repository, digest):
                await self.holdings.check(upstream, repository, digest, "blob")
            await fill.ready.wait()
            fill.outcome()
            return fill.size
        if self.fleet is not None:
            stored = await self.fleet.size(digest)
            if stored is not None:
                await self.holdings.check(upstream, repository, digest, "blob")
                return stored
        if self.offline:
            raise self._offline_error(BlobUnknown, f"blob {digest}")
        self.before_upstream()
        size = await upstream.head_blob(repository, digest)
        await self.holdings.note(upstream.name, repository, digest)
        return size

    async def peer_blob(self, digest: Digest) -> Blob | None:
        """The blob as this replica holds it, for another replica: cached, or its fill
        here (bytes as they land, the last ones once verified); None when it has neither.
        Never from the upstream, and for no repository: the route is for replicas only."""
        handle = self.store.memo_open_blob(digest) or await self._disk(self.store.open_blob, digest)
        if handle is not None:
            return CachedBlob(handle)
        fill = self._fills.get(digest)
        if fill is not None:
            fd = fill.open_reader()  # before any await: the fill may end meanwhile
            try:
                await fill.ready.wait()
                fill.outcome()
            except BaseException:
                fill.close_reader(fd)
                raise
            return FollowedBlob(fill, fd, "coalesced", _no_upstream)
        lock_path = self.store.lock_path(digest)
        if lock_is_held(lock_path):  # another worker of this replica fills it
            try:
                fd = os.open(self.store.temp_path(digest), os.O_RDONLY)
            except FileNotFoundError:
                return None
            open_cached = functools.partial(self.store.open_blob, digest)
            return ForeignBlob(digest, fd, lock_path, open_cached)
        return None

    def _may_follow(self, upstream: Upstream, repository: str, digest: Digest) -> bool:
        """May a request follow a fill under way, ours (for some repository) or
        another worker's? Only one for this repository, or one it is known to hold."""
        if self._fill_for.get(digest) == (upstream.name, repository):
            return True
        return self.holdings.known(upstream.name, repository, digest)

    # listings

    async def get_tags(self, upstream: Upstream, repository: str) -> list[str]:
        """The upstream's tag list; the last one fetched when it fails or we are offline."""
        if not self.offline:
            self.before_upstream()

            async def fetch() -> list[str]:
                tags = sorted(await upstream.get_tags(repository))
                await self.records.put_tag_list(upstream.name, repository, tags)
                return tags

            try:
                # One download of a (possibly large) list for everyone asking at once.
                tags, _ = await self._tag_lists.do((upstream.name, repository), fetch)
            except _STALE_ON as exc:
                log.warning(
                    "upstream %s failed (%s); serving the last tag list of %s",
                    upstream.name,
                    exc,
                    repository,
                )
            else:
                return tags
        cached = await self.records.get_tag_list(upstream.name, repository)
        if cached is None:
            if self.offline:
                raise self._offline_error(NameUnknown, f"tag list of {repository}")
            raise Unavailable(f"upstream {upstream.name} failed and no tag list is cached")
        return cached

    async def get_referrers(
        self, upstream: Upstream, repository: str, digest: Digest, artifact_type: str | None
    ) -> ReferrersAnswer:
        return await self.referrers.get(upstream, repository, digest, artifact_type)

    async def _referrers_tag(self, upstream: Upstream, repository: str, tag: str) -> bytes | None:
        """The index a referrers tag holds, through the tag cache; None when there is no
        valid one (the spec's clients then assume no referrers)."""
        try:
            return (await self.get_manifest(upstream, repository, tag, (OCI_INDEX,))).body
        except (ManifestUnknown, ManifestInvalid):
            return None

    async def catalog(
        self, n: int, last: str | None, visible: Callable[[str], bool] | None = None
    ) -> list[str]:
        names: list[str] = []
        while len(names) < n:
            page = await self.records.repositories(last, n)
            names.extend(name for name in page if visible is None or visible(name))
            if len(page) < n:
                break
            last = page[-1]
        return names[:n]
