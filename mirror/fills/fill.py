"""Filling a blob from the upstream while any number of readers follow it.

A fill downloads one blob into a temporary file, hashing as it writes. It
belongs to no request: a client hanging up does not stop it, and every request
for the same digest — in this process or, through the lock file, in another
worker — streams from the growing file as bytes land instead of going upstream
or waiting for the end. Readers are always one chunk behind the writer until the
digest is verified, so a client never receives the last bytes of a blob that
turns out to be wrong: its connection is aborted instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio

from ..errors import DigestMismatch, OCIError, Unavailable
from ..reference import Digest
from ..storage.locks import FileLock
from ..upstream.client import BlobResponse

__all__ = [
    "DiskFull",
    "Fill",
    "Progress",
    "TooLargeToCache",
    "report_disk_failure",
    "readable_spans",
]

log = logging.getLogger("mirror.fill")


class Progress:
    """What a reader needs to know of a fill: how far it may read, and whether it ended."""

    size: int | None = None  # expected length, when the upstream said

    def readable(self) -> int:
        raise NotImplementedError

    def outcome(self) -> bool | None:
        """True when complete and verified; None while running; raises if it failed."""
        raise NotImplementedError

    async def wait(self) -> None:
        raise NotImplementedError

    def close_reader(self, fd: int) -> None:
        """A reader is done with its descriptor."""
        os.close(fd)


class DiskFull(Unavailable):
    """The cache's disk is full: readers take the rest of the blob from the upstream."""


class TooLargeToCache(DiskFull):
    """The blob is larger than the cache keeps: readers take it from the upstream."""


class Fill(Progress):
    """A download this process runs, as the holder of the digest's lock."""

    def __init__(
        self,
        digest: Digest,
        path: Path,
        lock: FileLock,
        *,
        max_size: int | None = None,
        abandon_after: float | None = None,
        route: str = "",
    ) -> None:
        self.digest = digest
        self.route = route  # the upstream it downloads from
        self.path = path
        self._lock = lock
        self._max_size = max_size
        # A fill nobody reads any more, not yet half done, is stopped after this long:
        # it would hold a download slot and a connection for no one.
        self._abandon_after = abandon_after
        self._readers = 0
        self._idle_times = 0  # how often the last reader left
        self._task: asyncio.Task[None] | None = None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a leftover of a dead fill; its readers keep their own inode
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # Readers duplicate this descriptor rather than open the path, which the
        # adoption into the cache renames at a moment of its own.
        self._read_fd = os.open(path, os.O_RDONLY)
        self._hasher = digest.hasher()
        self._written = 0
        self._readable = 0
        self._done = False
        self._error: OCIError | None = None
        self._changed = asyncio.Event()
        self.ready = asyncio.Event()  # set once the size is known, or the fill failed

    @property
    def error(self) -> OCIError | None:
        return self._error

    def open_reader(self) -> int:
        """A descriptor on the fill's bytes for one reader, who gives it to ``close_reader``."""
        fd = os.dup(self._read_fd)
        self._readers += 1
        return fd

    @property
    def readers(self) -> int:
        return self._readers

    def close_reader(self, fd: int) -> None:
        os.close(fd)
        self._readers -= 1
        if self._readers == 0 and self._abandon_after is not None and self._task is not None:
            self._idle_times += 1
            loop = self._task.get_loop()
            loop.call_later(self._abandon_after, self._drop_if_abandoned, self._idle_times)

    def _drop_if_abandoned(self, idle_time: int) -> None:
        if idle_time != self._idle_times:
            return  # a reader came and went since: the later timer decides
        if self._readers or self._task is None or self._task.done() or self._done:
            return
        if self.size is not None and self._written * 2 >= self.size:
            return  # more than half there: finishing costs less than fetching it again
        log.info("dropping the fill of %s: no reader left", self.digest)
        self._task.cancel()

    def readable(self) -> int:
        return self._readable

    def outcome(self) -> bool | None:
        if self._error is not None:
            raise self._error
        return True if self._done else None

    async def wait(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]
        self._hasher.update(chunk)

    async def run(
        self,
        source: Callable[[], AbstractAsyncContextManager[BlobResponse]],
        adopt: Callable[[Path], Awaitable[None]],
    ) -> None:
        """Download, verify, adopt into the cache; every failure ends up in ``outcome``."""
        self._task = asyncio.current_task()
        try:
            async with source() as response:
                self.size = response.size
                self._lock.write_note(str(response.size if response.size is not None else ""))
                if response.size is not None:
                    self._check_size(response.size)
                    _check_space(self.path.parent, response.size)
                self.ready.set()
                async for chunk in response.chunks:
                    self._check_size(self._written + len(chunk))
                    # Hashing and writing release the GIL: keep them off the event loop.
                    await anyio.to_thread.run_sync(self._write, chunk)
                    self._readable = self._written  # one chunk behind until verified
                    self._written += len(chunk)
                    self._notify()
            self._verify()
            self.size = self._written
            os.close(self._fd)
            self._fd = -1
            # Verified: every reader may have every byte, whether or not it gets cached.
            self._readable = self._written
            self._done = True
            self._notify()
            try:
                await adopt(self.path)
            except (OSError, sqlite3.Error) as exc:
                report_disk_failure(exc, f"blob {self.digest}")  # served, just not cached
            else:
                _disk_full.logged = False
        except OCIError as exc:
            self._error = exc
        except OSError as exc:
            full = report_disk_failure(exc, f"blob {self.digest}")
            what = f"blob {self.digest}"
            self._error = (
                DiskFull(f"no room to cache {what}")
                if full
                else Unavailable(f"could not store {what}: {exc.strerror}")
            )
        except BaseException:
            self._error = Unavailable(f"fill of {self.digest} was interrupted")
            raise
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._read_fd)
            with contextlib.suppress(OSError):
                self.path.unlink()  # gone already when adopted
            self._lock.release(remove=True)
            self.ready.set()
            self._notify()

    def _check_size(self, size: int) -> None:
        if self._max_size is not None and size > self._max_size:
            raise TooLargeToCache(
                f"blob {self.digest} is larger than the cache keeps ({self._max_size} bytes)"
            )

    def _verify(self) -> None:
        if self.size is not None and self._written != self.size:
            raise Unavailable(
                f"upstream sent {self._written} bytes of blob {self.digest}, announced {self.size}"
            )
        actual = Digest(self.digest.algorithm, self._hasher.hexdigest())
        if actual != self.digest:
            log.error(
                "digest mismatch: upstream sent %s for blob %s; not cached", actual, self.digest
            )
            raise DigestMismatch(f"upstream sent wrong content for blob {self.digest}")


# Room left free on the cache's disk, beyond the blob being filled.
_DISK_RESERVE = 64 * 1024 * 1024


class _DiskFullNotice:
    logged = False  # a full disk is logged once, until something is cached again


_disk_full = _DiskFullNotice()


def _check_space(directory: Path, size: int) -> None:
    if shutil.disk_usage(directory).free < size + _DISK_RESERVE:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def report_disk_failure(exc: BaseException, what: str) -> bool:
    """Log a failed cache write; True when the disk is full (logged once, not per blob)."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        "full" in str(exc)  # SQLite's "database or disk is full"
    )
    if not full:
        log.error("could not store %s: %s", what, exc)
    elif not _disk_full.logged:
        _disk_full.logged = True
        log.error("cache disk is full: passing content through without caching (%s)", what)
    return full


async def readable_spans(
    progress: Progress, start: int = 0, end: int | None = None
) -> AsyncIterator[tuple[int, int]]:
    """Spans ``(offset, stop)`` of a fill's file from ``start`` to ``end`` (exclusive;
    the blob's end when None), each as soon as its bytes may be read: one piece
    behind the writer until the digest is verified. Raises, once what was readable
    is passed on, if the fill failed."""
    position = start
    while end is None or position < end:
        limit = progress.readable() if end is None else min(progress.readable(), end)
        if position < limit:
            yield position, limit
            position = limit
        elif progress.outcome():  # raises if the fill failed
            return  # a verified fill ends at its size, announced or not
        else:
            await progress.wait()
