"""A blob's bytes as the web layer streams them: from a cached file, from a fill
as it grows, or (when the disk is full) straight from the upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import BinaryIO

import anyio

from ..errors import Unavailable
from ..upstream.client import BlobResponse
from .fill import DiskFull, Progress, readable_spans

__all__ = ["Blob", "BlobSource", "CachedBlob", "FileSpan", "FollowedBlob", "PassedThroughBlob"]

_CACHED_READ_CHUNK = 2 * 1024 * 1024
# Reads this small (configs, small layers, a blob's tail) cost less than the hop to a
# thread and back; they are read on the event loop.
_INLINE_READ = 64 * 1024
_FOLLOW_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileSpan:
    """Bytes ``offset`` to ``offset + count`` of a blob's ``file()``, there to be sent."""

    offset: int
    count: int


class Blob:
    """A blob's bytes: ``chunks(start, end)`` yields bytes start..end (exclusive) once;
    ``close()`` releases what was opened when the bytes are never read."""

    def __init__(self, size: int | None, result: str) -> None:
        self.size = size
        self.result = result  # hit, miss, coalesced

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def known_size(self) -> int | None:
        """The size, once it can be known (a fill of unannounced size must end first)."""
        return self.size

    def small_body(self, start: int, end: int) -> bytes | None:
        """Bytes start..end at once, when they are few and on disk (then the blob is
        closed); None when they must be streamed with ``chunks``."""
        return None

    async def aclose(self) -> None:
        """``close()``, for what only closes asynchronously (an upstream response)."""
        self.close()

    def file(self) -> BinaryIO | None:
        """The open file that holds the blob's bytes, or receives them while a fill
        runs, for a server to send the spans ``pieces`` names (``close()`` still
        closes it); None when the bytes come from elsewhere."""
        return None

    async def pieces(
        self, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes | FileSpan, None]:
        """Bytes start..end (exclusive) once, as ``chunks`` yields them: spans of
        ``file()`` as they are there to send, and bytes for what comes from elsewhere."""
        async for data in self.chunks(start, end):
            yield data


class CachedBlob(Blob):
    def __init__(self, handle: BinaryIO) -> None:
        super().__init__(os.fstat(handle.fileno()).st_size, "hit")
        self._handle = handle

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        fd = self._handle.fileno()
        position, stop = start, self.size if end is None else end
        assert stop is not None
        try:
            while position < stop:
                size = min(_CACHED_READ_CHUNK, stop - position)
                if size <= _INLINE_READ:
                    data = os.pread(fd, size, position)
                else:
                    data = await anyio.to_thread.run_sync(os.pread, fd, size, position)
                if not data:
                    raise Unavailable("cached blob is shorter than its record")
                position += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()

    def file(self) -> BinaryIO | None:
        return self._handle

    async def pieces(
        self, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes | FileSpan, None]:
        assert self.size is not None
        yield FileSpan(start, (self.size if end is None else end) - start)

    def small_body(self, start: int, end: int) -> bytes | None:
        if end - start > _INLINE_READ:
            return None
        try:
            data = os.pread(self._handle.fileno(), end - start, start)
        finally:
            self.close()
        if len(data) != end - start:
            raise Unavailable("cached blob is shorter than its record")
        return data


BlobSource = Callable[[int], AbstractAsyncContextManager[BlobResponse]]


class FollowedBlob(Blob):
    """A blob read from a fill as it grows; on a full disk, the rest comes from upstream.

    Its descriptor was opened on the fill's file before the fill could finish, so it
    keeps naming the same bytes after the file is renamed into the cache."""

    def __init__(self, progress: Progress, fd: int, result: str, resume: BlobSource) -> None:
        super().__init__(progress.size, result)
        self._progress = progress
        self._fd: int | None = fd
        self._file: BinaryIO | None = None
        self._resume = resume

    async def _verified(self) -> None:
        while not self._progress.outcome():  # raises if the fill failed
            await self._progress.wait()

    async def known_size(self) -> int | None:
        if self.size is None:
            await self._verified()
            self.size = self._progress.size
        return self.size

    def file(self) -> BinaryIO | None:
        if self._file is None and self._fd is not None:
            self._file = os.fdopen(self._fd, "rb", closefd=False)
        return self._file

    async def pieces(
        self, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes | FileSpan, None]:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        position = start
        try:
            if (start, end) != (0, None):
                # A range ends short of the blob's end: only verified bytes may end it.
                await self._verified()
            async for offset, stop in readable_spans(self._progress, start, end):
                yield FileSpan(offset, stop - offset)
                position = stop
        except DiskFull:
            async with self._resume(position) as response:
                async for data in response.chunks:
                    if end is not None and position + len(data) > end:
                        data = data[: end - position]
                    position += len(data)
                    yield data
                    if end is not None and position >= end:
                        break
        finally:
            self._progress.close_reader(fd)

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        fd = self._fd
        async with aclosing(self.pieces(start, end)) as pieces:
            async for piece in pieces:
                if isinstance(piece, bytes):
                    yield piece
                    continue
                assert fd is not None
                position, stop = piece.offset, piece.offset + piece.count
                while position < stop:
                    data = os.pread(fd, min(stop - position, _FOLLOW_READ_CHUNK), position)
                    if not data:
                        raise Unavailable("blob fill file was truncated")
                    position += len(data)
                    yield data

    def close(self) -> None:
        if self._fd is not None:
            self._progress.close_reader(self._fd)
            self._fd = None


class PassedThroughBlob(Blob):
    """A blob streamed from the upstream without caching: the disk had no room."""

    def __init__(self, source: BlobSource) -> None:
        super().__init__(None, "miss")
        self._source = source
        self._stack = AsyncExitStack()
        self._response: BlobResponse | None = None

    async def open(self) -> PassedThroughBlob:
        self._response = await self._stack.enter_async_context(self._source(0))
        self.size = self._response.size
        return self

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        assert self._response is not None
        position = 0
        try:
            async for data in self._response.chunks:
                low, high = max(start - position, 0), len(data)
                if end is not None:
                    high = min(high, end - position)
                position += len(data)
                if low < high:
                    yield data[low:high]
                if end is not None and position >= end:
                    break
        finally:
            await self._stack.aclose()

    def close(self) -> None:
        pass  # nothing is opened before chunks() or open(); the stack closes itself

    async def aclose(self) -> None:
        await self._stack.aclose()
