"""Which repositories are known to hold which digests.

Upstream, content is shared by digest but readable per repository: a registry
serves a digest under a repository only when that repository holds it, and a
private repository's content only to whom may read it. The cache is shared by
every repository of every upstream, so before a cached digest is served under a
repository, that repository must be known to hold it: seen in one of its
manifests (a tag's target, an index's children, an image's config and layers)
or confirmed by its upstream. Otherwise one pull of
``private/app`` would hand its layers to anyone asking under any name.

Records are keys of a diskcache of their own, never culled: a record dropped by
the LRU while its blob stays would turn a hit into a refusal offline. A record
costs about 200 bytes; records of evicted content stay true (the repository does
hold the digest) and cost nothing but that room. An in-memory LRU in front
answers the warm hot path without SQLite.

Replicas share the records in Redis: what one replica saw, the others need not
confirm again. The local records stay in front (records are only ever added, so a
local one is as good as Redis's) and take every write too: when Redis cannot be
reached, a replica goes on with what it knows, confirming the rest upstream.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import diskcache

from .errors import BlobUnknown, Denied, ManifestUnknown, OCIError
from .manifest import MANIFEST_TYPES
from .reference import Digest, parse_digest
from .singleflight import SingleFlight
from .storage.base import StorageError
from .storage.disk import SQLITE_SETTINGS, Store
from .storage.locks import FileLock
from .upstream.client import Upstream

if TYPE_CHECKING:
    from .storage.redis import RedisRecords

__all__ = ["Holdings", "Kind", "references"]

log = logging.getLogger("mirror.holdings")

Kind = Literal["blob", "manifest"]
_UNKNOWN: dict[Kind, type[BlobUnknown | ManifestUnknown]] = {
    "blob": BlobUnknown,
    "manifest": ManifestUnknown,
}

# Per process: about 250 bytes an entry, so some 16 MiB.
_MEMORY_ENTRIES = 65_536
# On disk, what a record says: the repository holds the digest; and, for a
# manifest, that what it references is recorded too.
_HELD: Literal[1] = 1
_EXPANDED: Literal[2] = 2
# Set once what a cache made before holdings were recorded showed was recorded.
_BACKFILLED = "backfilled-from-tag-records"
_BATCH = 256  # tag records backfilled per transaction
_BACKFILL_AFTER = "backfilled-up-to"  # the last tag record's key done so far
_BACKFILL_WAIT = 1.0  # seconds between looks at another worker's backfill


def _digests(descriptors: object) -> list[Digest]:
    listed = descriptors if isinstance(descriptors, list) else [descriptors]
    digests = []
    for descriptor in listed:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                digests.append(parse_digest(descriptor["digest"]))
            except OCIError:
                continue
    return digests


def references(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """The digests a manifest says its repository holds: an index's children
    (manifests), and an image's config and layers (blobs). Tolerant: what cannot
    be read is skipped.

    Not its ``subject``: a registry accepts a referrer whose subject it does not
    hold, so a subject proves nothing about the repository.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(document, dict):
        return [], []
    blobs = _digests(document.get("config")) + _digests(document.get("layers"))
    return _digests(document.get("manifests")), blobs


def _key(upstream: str, repository: str, digest: Digest) -> str:
    return f"{upstream}/{repository}@{digest}"


class _Records:
    """Records of (upstream, repository) → digests held, on disk and in memory.

    ``known`` and ``expanded`` read memory only and are fine on the event loop;
    the rest touch the disk and belong off it.
    """

    def __init__(self, directory: Path, memory_entries: int) -> None:
        self._directory = directory
        self._disk = diskcache.Cache(
            str(directory), eviction_policy="none", timeout=60, **SQLITE_SETTINGS
        )
        self._memory: OrderedDict[str, bool] = OrderedDict()  # key → expanded
        self._memory_entries = memory_entries
        self._lock = threading.Lock()  # guards _memory and _repositories
        self._backfilled = False
        # Repositories whose tag records were recorded ahead of the backfill.
        self._repositories: set[tuple[str, str]] = set()

    def close(self) -> None:
        self._disk.close()

    def _remember(self, key: str, expanded: bool) -> None:
        with self._lock:
            self._memory[key] = expanded or self._memory.get(key, False)
            self._memory.move_to_end(key)
            if len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)

    def known(self, upstream: str, repository: str, digest: Digest) -> bool:
        key = _key(upstream, repository, digest)
        with self._lock:
            if key not in self._memory:
                return False
            self._memory.move_to_end(key)
            return True

    def expanded(self, upstream: str, repository: str, digest: Digest) -> bool:
        with self._lock:
            return self._memory.get(_key(upstream, repository, digest), False)

    def holds(self, store: Store, upstream: str, repository: str, digest: Digest) -> bool:
        key = _key(upstream, repository, digest)
        value = self._disk.get(key)
        if value is None and not self.backfilled():
            # What the backfill will record may not be recorded yet: the repository's
            # tag records answer now, as the backfill would have.
            self.backfill_repository(store, upstream, repository)
            value = self._disk.get(key)
        if value is None:
            return False
        self._remember(key, value == _EXPANDED)
        return True

    def record(self, upstream: str, repository: str, digest: Digest) -> None:
        key = _key(upstream, repository, digest)
        self._disk.add(key, _HELD)  # add: an expanded record stays expanded
        self._remember(key, False)

    def record_manifest(self, upstream: str, repository: str, digest: Digest, body: bytes) -> None:
        key = _key(upstream, repository, digest)
        if self._disk.get(key) != _EXPANDED:
            # What a client asks for next: keep it in memory too.
            for reference in self.write_manifest(upstream, repository, digest, body):
                self._remember(_key(upstream, repository, reference), False)
        self._remember(key, True)

    def write_manifest(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> list[Digest]:
        """Record the manifest and what it references; returns the latter."""
        manifests, blobs = references(body)
        with self._disk.transact():
            for reference in manifests + blobs:
                self._disk.add(_key(upstream, repository, reference), _HELD)
            self._disk.set(_key(upstream, repository, digest), _EXPANDED)
        return manifests + blobs

    # The one-time backfill of a cache from before holdings were recorded

    def backfilled(self) -> bool:
        if not self._backfilled and self._disk.get(_BACKFILLED):
            self._backfilled = True  # maybe by another worker
        return self._backfilled

    def needs_backfill(self, store: Store) -> bool:
        if self.backfilled():
            return False
        if not store.tag_targets(limit=1):  # a new cache: every record is made as it fills
            self._disk.set(_BACKFILLED, True)
            self._backfilled = True
        return not self._backfilled

    def backfill(self, store: Store, stop: threading.Event) -> None:
        """Record what every tag record shows, in batches, until done or ``stop``.

        One process of those sharing the cache does it; the others wait for its lock, in
        case it dies. The last tag record done is kept with each batch's records, so a
        restart goes on from there (records are only ever added: redoing some is safe).
        """
        lock = FileLock(self._directory / "backfill.lock")
        while not lock.try_acquire():
            if stop.wait(_BACKFILL_WAIT) or self.backfilled():
                return
        try:
            after = str(self._disk.get(_BACKFILL_AFTER, ""))
            log.warning("recording repository holdings from the cache's tag records")
            started, count = time.monotonic(), 0
            while not self.backfilled():
                if stop.is_set():
                    return  # the next start goes on from here
                targets = store.tag_targets(after=after, limit=_BATCH)
                if targets:
                    after = targets[-1][0]
                    with self._disk.transact():
                        self._backfill_targets(store, targets)
                        self._disk.set(_BACKFILL_AFTER, after)
                    count += len(targets)
                else:
                    self._disk.set(_BACKFILLED, True)
                    log.warning(
                        "recorded repository holdings from %d tag records in %.1f s",
                        count,
                        time.monotonic() - started,
                    )
            with self._lock:
                self._repositories.clear()
        finally:
            lock.release()

    def backfill_repository(self, store: Store, upstream: str, repository: str) -> None:
        """Before the backfill is over, what one repository's tag records show."""
        with self._lock:
            if (upstream, repository) in self._repositories:
                return
        prefix = f"tag:{upstream}/{repository}:"  # ":" ends a repository name
        after = ""
        while targets := store.tag_targets(prefix, after, _BATCH):
            with self._disk.transact():
                self._backfill_targets(store, targets)
            after = targets[-1][0]
        with self._lock:
            self._repositories.add((upstream, repository))

    def _backfill_targets(self, store: Store, targets: list[tuple[str, str, str, Digest]]) -> None:
        for _, upstream, repository, top in targets:
            pending, seen = [top], {top}
            while pending:
                digest = pending.pop()
                cached = store.read_manifest(digest)
                if cached is None:
                    continue  # a platform never pulled
                manifests, _ = references(cached[1])
                self.write_manifest(upstream, repository, digest, cached[1])
                pending.extend(d for d in manifests if d not in seen)
                seen.update(manifests)


class Holdings:
    """Whether a cached digest may be served under a repository, and the records
    that say so. The service asks ``check`` before serving a cached digest and
    tells ``note``/``note_manifest`` what the upstream or a manifest showed."""

    def __init__(
        self,
        store: Store,
        *,
        offline: bool,
        before_upstream: Callable[[], None] = lambda: None,
        memory_entries: int = _MEMORY_ENTRIES,
        shared: RedisRecords | None = None,
    ) -> None:
        self._store = store
        self._records = _Records(store.directory / "holdings", memory_entries)
        self._shared = shared
        self._offline = offline
        self._before_upstream = before_upstream  # the client's upstream budget; may refuse
        self._confirmations: SingleFlight[None] = SingleFlight()
        # A cache from before holdings were recorded: the backfill runs behind serving
        # (a minute or more at 100,000 tags), and ``check`` reads a repository's tag
        # records itself meanwhile, so every answer is the one the finished backfill
        # would give: nothing for /readyz to wait for.
        self._stop = threading.Event()
        self._backfill: threading.Thread | None = None
        if self._records.needs_backfill(store):
            self._backfill = threading.Thread(
                target=self._run_backfill, name="mirror-holdings-backfill", daemon=True
            )
            self._backfill.start()

    def _run_backfill(self) -> None:
        try:
            self._records.backfill(self._store, self._stop)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            log.error(
                "could not record holdings from the tag records (next start goes on): %s", exc
            )

    async def aclose(self) -> None:
        self._stop.set()  # the backfill stops after its batch and goes on at the next start
        if self._backfill is not None:
            await anyio.to_thread.run_sync(self._backfill.join)
        await self._confirmations.aclose()
        self._records.close()

    def known(self, upstream: str, repository: str, digest: Digest) -> bool:
        """Known from memory to hold it (no I/O)."""
        return self._records.known(upstream, repository, digest)

    async def check(self, upstream: Upstream, repository: str, digest: Digest, kind: Kind) -> None:
        """Return if the repository holds the digest; raise the client's answer if not.

        Known (in memory, or on disk) passes. Otherwise the upstream is asked under
        that repository with a HEAD, once for all concurrent askers; its refusal
        (404, 403, Docker Hub's 401 ``insufficient_scope``) is the client's
        ``*_UNKNOWN``, as it would be without the cache. When the upstream cannot
        answer (down, rate-limited, the mirror's credentials refused) the error is
        the client's too and nothing is served: a repository never seen to hold
        the digest has no claim on it, and serving it there is the very leak this
        prevents. Offline, not known is unknown.
        """
        name = upstream.name
        if self._records.known(name, repository, digest):
            return
        if await anyio.to_thread.run_sync(
            self._records.holds, self._store, name, repository, digest
        ):
            return
        if await self._shared_holds(name, repository, digest):
            await self._write(self._records.record, name, repository, digest)
            return
        unknown = _UNKNOWN[kind]
        if self._offline:
            raise unknown(f"{kind} {digest} is not known in {repository} and the mirror is offline")
        self._before_upstream()

        async def confirm() -> None:
            try:
                if kind == "manifest":
                    head = await upstream.head_manifest(repository, digest, MANIFEST_TYPES)
                    if head.digest not in (None, digest):
                        raise unknown(f"upstream {name} names another digest for {digest}")
                else:
                    await upstream.head_blob(repository, digest)
            except (Denied, unknown) as exc:
                log.info(
                    "refused %s %s in %s: upstream %s: %s", kind, digest, repository, name, exc
                )
                raise unknown(
                    f"upstream {name} does not serve {kind} {digest} in {repository}"
                ) from exc
            await self.note(name, repository, digest)

        await self._confirmations.do((name, repository, digest), confirm)

    async def note(self, upstream: str, repository: str, digest: Digest) -> None:
        """The upstream served (or confirmed) the digest under the repository."""
        if not self._records.known(upstream, repository, digest):
            await self._write(self._records.record, upstream, repository, digest)
            if self._shared is not None:
                await self._share(self._shared.note_holding(upstream, repository, digest))

    async def note_manifest(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None:
        """The repository holds this manifest, so it holds what the manifest references."""
        if not self._records.expanded(upstream, repository, digest):
            await self._write(self._records.record_manifest, upstream, repository, digest, body)
            if self._shared is not None:
                manifests, blobs = references(body)
                noted = self._shared.note_manifest(upstream, repository, digest, manifests + blobs)
                await self._share(noted)

    def note_manifest_now(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None:
        """``note_manifest`` for callers already off the event loop (``mirror import``)."""
        self._records.record_manifest(upstream, repository, digest, body)

    async def _shared_holds(self, upstream: str, repository: str, digest: Digest) -> bool:
        if self._shared is None:
            return False
        try:
            return await self._shared.holds(upstream, repository, digest)
        except StorageError:  # Redis logs its outage: confirm upstream meanwhile
            return False

    async def _share(self, write: Awaitable[None]) -> None:
        try:
            await write
        except StorageError:  # the other replicas confirm it themselves
            pass

    async def _write(self, function: Callable[..., None], *args: object) -> None:
        # A record lost to a disk failure costs one confirmation later, not a refusal.
        try:
            await anyio.to_thread.run_sync(function, *args)
        except (OSError, sqlite3.Error) as exc:
            log.error("could not record repository holdings: %s", exc)
