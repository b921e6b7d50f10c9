"""``MetadataStore`` over the disk cache's index: the single-host records, behind the
same async contract as the records replicas share in Redis.

Each call runs the store's synchronous method in a worker thread; the store's own
failures (SQLite, the file system) become ``StorageError``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

from ..reference import Digest
from .base import StorageError, TagRecord
from .disk import Store

__all__ = ["DiskRecords"]

T = TypeVar("T")


class DiskRecords:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        try:
            return await anyio.to_thread.run_sync(function, *args)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cache index: {exc}") from exc

    async def get_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        return await self._run(self._store.get_tag, upstream, repository, tag, accept)

    async def put_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        digest: Digest,
        media_type: str,
    ) -> None:
        await self._run(self._store.put_tag, upstream, repository, tag, accept, digest, media_type)

    async def get_tag_list(self, upstream: str, repository: str) -> list[str] | None:
        return await self._run(self._store.get_tag_list, upstream, repository)

    async def put_tag_list(self, upstream: str, repository: str, tags: list[str]) -> None:
        await self._run(self._store.put_tag_list, upstream, repository, tags)

    async def get_referrers(
        self, upstream: str, repository: str, digest: Digest
    ) -> tuple[bytes, float] | None:
        return await self._run(self._store.get_referrers, upstream, repository, digest)

    async def put_referrers(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None:
        await self._run(self._store.put_referrers, upstream, repository, digest, body)

    async def put_missing(self, key: str, ttl: float) -> None:
        await self._run(self._store.put_missing, key, ttl)

    async def is_missing(self, key: str) -> bool:
        return await self._run(self._store.is_missing, key)

    async def add_repository(self, name: str) -> None:
        await self._run(self._store.add_repository, name)

    async def repositories(self, after: str | None, limit: int) -> list[str]:
        def page() -> list[str]:
            names = self._store.repositories()
            if after is not None:
                names = itertools.dropwhile(lambda name: name <= after, names)
            return list(itertools.islice(names, max(limit, 0)))

        return await self._run(page)
