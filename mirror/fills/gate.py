"""A cap on concurrent blob downloads per upstream, with a bounded line.

Every download holds descriptors (its lock, its temporary file, a reader's copy,
an upstream connection) and one connection of the upstream's blob pool. Past
the cap, misses wait their turn instead of failing or exhausting the process's
descriptors; past the line's length they get 429 with ``Retry-After``, which
clients already know how to wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import TooManyRequests

__all__ = ["FillGate"]


class FillGate:
    def __init__(self, name: str, limit: int, queue: int) -> None:
        self.name = name
        self.limit = limit
        self._queue = queue
        self._free = asyncio.Semaphore(limit)
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self) -> None:
        """Take a slot, waiting in line; TooManyRequests when the line is full."""
        if self._free.locked() and self._waiting >= self._queue:
            raise TooManyRequests(
                f"upstream {self.name}: {self.limit} downloads under way and "
                f"{self._waiting} waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._free.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
