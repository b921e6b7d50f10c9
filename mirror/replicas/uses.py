"""Uses of the bucket's objects, for the least-recently-used eviction across replicas.

A hit must count as a use on every replica, but a Redis round trip per hit would put
the network on the warm path: hits record the time in a dict (no I/O, fine on the
event loop) and a task writes the batch to Redis once a second, in one command. A
replica that dies loses at most a second of uses: the eviction order gets a little
older, nothing is lost. A replica reading an object from the bucket for a client
records uses as it reads, and a presigned URL is a use when it is given, so the
evictor, which spares objects used in the last minutes, does not delete an object
under its reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ..storage.base import StorageError

__all__ = ["BucketUses"]

log = logging.getLogger("mirror.replicas")


class BucketUses:
    """Pending uses by object key, written by ``write`` (Redis's ``touch_many``) in batches."""

    def __init__(
        self,
        write: Callable[[Mapping[str, float]], Awaitable[None]],
        *,
        interval: float = 1.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._write = write
        self._interval = interval
        self._now = now
        self._pending: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def touch(self, key: str) -> None:
        """Record a use of ``key`` now; no I/O."""
        self._pending[key] = self._now()

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if batch:
            try:
                await self._write(batch)
            except StorageError as exc:  # a lost batch only ages the eviction order
                log.debug("could not record %d bucket uses: %s", len(batch), exc)

    def start(self) -> None:
        async def run() -> None:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()

        if self._task is None:
            self._task = asyncio.ensure_future(run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
