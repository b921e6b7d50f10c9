"""The records a replica consults: Redis, shared by every replica, so that all of
them give one answer for a tag; this host's disk records when Redis fails.

Tag records read from Redis are trusted from memory for about a second, as workers
on one host trust the shared index's: the bound on replicas disagreeing about a tag,
for a Redis read per tag per replica per second on the warm path.

Every write goes to Redis and to the local records (a thread hop, on misses and
revalidations only), so that when Redis cannot be reached the replica goes on from
what it last knew: it serves and fills on its own (duplicate upstream fetches are
then possible, and counted), logs the outage once, and reads Redis again as soon as
it answers (the Redis client's breaker decides when to try).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..reference import Digest
from ..storage.base import MetadataStore, RememberedTag, StorageError, TagRecord
from ..storage.memo import Memo, TagMemo
from .shared import Shared

__all__ = ["ReplicaRecords"]

log = logging.getLogger("mirror.replicas")

T = TypeVar("T")

_MEMO_ENTRIES = 65_536


class ReplicaRecords:
    """``MetadataStore`` over the replicas' Redis with this host's records (``local``)
    as the fallback and write-through copy."""

    def __init__(
        self, shared: Shared, local: MetadataStore, *, now: Callable[[], float] = time.time
    ) -> None:
        self._shared = shared
        self.local = local
        self._now = now
        self._tags = TagMemo(Memo(_MEMO_ENTRIES), now)

    # the fallback

    async def _read(self, read: Callable[[MetadataStore], Awaitable[T]]) -> T:
        try:
            value = await read(self._shared.records)
        except StorageError as exc:
            self._shared.failed("redis", exc)
            return await read(self.local)
        self._shared.answered("redis")
        return value

    async def _write(self, write: Callable[[MetadataStore], Awaitable[None]]) -> None:
        try:
            await write(self._shared.records)
        except StorageError as exc:
            self._shared.failed("redis", exc)
        else:
            self._shared.answered("redis")
        try:
            await write(self.local)
        except StorageError as exc:  # a copy for outages: its loss costs a refetch then
            log.warning("could not copy a record to the local cache: %s", exc)

    # tags

    def memo_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> RememberedTag | None:
        """A tag record from memory only, due for a read of Redis a second after it
        was read or written."""
        return self._tags.recall(_tag_key(upstream, repository, tag, accept))

    async def get_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        key = _tag_key(upstream, repository, tag, accept)
        remembered = self._tags.trusted(key)
        if remembered is not None:
            return remembered
        record = await self._read(lambda s: s.get_tag(upstream, repository, tag, accept))
        if record is not None:
            self._tags.remember(key, record)
        else:  # gone from the records
            self._tags.forget(key)
        return record

    async def put_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        digest: Digest,
        media_type: str,
    ) -> None:
        await self._write(
            lambda s: s.put_tag(upstream, repository, tag, accept, digest, media_type)
        )
        record = TagRecord(digest, media_type, self._now())
        self._tags.remember(_tag_key(upstream, repository, tag, accept), record)

    # the rest, as they are

    async def get_tag_list(self, upstream: str, repository: str) -> list[str] | None:
        return await self._read(lambda s: s.get_tag_list(upstream, repository))

    async def put_tag_list(self, upstream: str, repository: str, tags: list[str]) -> None:
        await self._write(lambda s: s.put_tag_list(upstream, repository, tags))

    async def get_referrers(
        self, upstream: str, repository: str, digest: Digest
    ) -> tuple[bytes, float] | None:
        return await self._read(lambda s: s.get_referrers(upstream, repository, digest))

    async def put_referrers(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None:
        await self._write(lambda s: s.put_referrers(upstream, repository, digest, body))

    async def put_missing(self, key: str, ttl: float) -> None:
        await self._write(lambda s: s.put_missing(key, ttl))

    async def is_missing(self, key: str) -> bool:
        return await self._read(lambda s: s.is_missing(key))

    async def add_repository(self, name: str) -> None:
        await self._write(lambda s: s.add_repository(name))

    async def repositories(self, after: str | None, limit: int) -> list[str]:
        return await self._read(lambda s: s.repositories(after, limit))


def _tag_key(upstream: str, repository: str, tag: str, accept: tuple[str, ...]) -> str:
    return f"{upstream}/{repository}:{tag}|{','.join(accept)}"
