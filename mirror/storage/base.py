"""What every storage back end offers, and how it fails.

The mirror keeps two kinds of things. **Records** (tag records, remembered 404s,
referrers, tag lists, the catalog, which repositories hold which digests) are small
and answer policy questions: on one host they live in the disk cache's index, for
replicas in Redis. **Objects** (blobs and manifests, keyed by digest, written only
once verified) are content: on one host they are the disk cache's files, for
replicas they are objects in a bucket, in front of which each replica keeps its
disk cache as a hot tier.

Back ends raise ``StorageError`` (never an ``OCIError``): the policy decides what a
failed back end means for a client (serve from another tier, pass through, 503).
One contract test module runs against every implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from ..reference import Digest

__all__ = [
    "Lease",
    "MetadataStore",
    "ObjectReader",
    "ObjectStore",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "TagRecord",
]


class StorageError(Exception):
    """A storage back end failed."""


class StorageUnavailable(StorageError):
    """The back end cannot be reached or did not answer in time."""


class StorageFull(StorageError):
    """The back end has no room for what was to be written."""


@dataclass(frozen=True)
class TagRecord:
    digest: Digest
    media_type: str
    checked_at: float  # wall-clock seconds when the upstream last confirmed it


class RememberedTag(NamedTuple):
    """A tag record from a process's memory. ``due``: past the moment it is trusted
    for (another process may have moved the tag in the shared records), so it should
    be read again; it is still what the tag was a second ago."""

    record: TagRecord
    due: bool


class MetadataStore(Protocol):
    """Records the policy consults, shared by every process that serves the cache."""

    async def get_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None: ...

    async def put_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        digest: Digest,
        media_type: str,
    ) -> None: ...

    async def get_tag_list(self, upstream: str, repository: str) -> list[str] | None: ...

    async def put_tag_list(self, upstream: str, repository: str, tags: list[str]) -> None: ...

    async def get_referrers(
        self, upstream: str, repository: str, digest: Digest
    ) -> tuple[bytes, float] | None:
        """The last referrers index of a subject, and when the upstream gave it."""
        ...

    async def put_referrers(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None: ...

    async def put_missing(self, key: str, ttl: float) -> None:
        """Remember an upstream 404 for ``ttl`` seconds (nothing when ``ttl`` <= 0)."""
        ...

    async def is_missing(self, key: str) -> bool: ...

    async def add_repository(self, name: str) -> None: ...

    async def repositories(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` catalog names sorted after ``after``."""
        ...


class ObjectReader(Protocol):
    """An object being read: its whole size, and the bytes asked for."""

    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class ObjectStore(Protocol):
    """Verified content by digest: blobs, and manifests with their media type."""

    async def stat(self, digest: Digest) -> int | None:
        """The blob's size, or None when it is not stored."""
        ...

    def open(
        self, digest: Digest, start: int = 0, end: int | None = None
    ) -> AbstractAsyncContextManager[ObjectReader | None]:
        """Bytes ``start``..``end`` (exclusive) of a stored blob; None when absent."""
        ...

    async def put_file(self, digest: Digest, path: Path) -> bool:
        """Store a verified file as the blob, unless it is there already (then False).
        A failed or interrupted write leaves nothing readable."""
        ...

    async def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None: ...

    async def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None: ...

    async def delete(self, digest: Digest) -> None:
        """Remove a blob or manifest; absent is no error."""
        ...


class Lease(Protocol):
    """Exclusive ownership of a name among all replicas, for a bounded time."""

    name: str
    owner: str  # who holds it: a replica's address for peers to stream from

    async def renew(self) -> bool:
        """Extend it; False when it was lost (expired and taken, or the store failed)."""
        ...

    async def release(self) -> None:
        """Give it up; a lease already lost is left to its new holder."""
        ...
