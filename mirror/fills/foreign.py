"""Following a fill that another worker runs, and checking every byte of it here.

A reader in one worker streams another worker's fill from its temporary file as
it grows. That file is not a promise: the fill may fail and be unlinked while a
new fill of the same digest starts under a new file, or succeed and then be
evicted. So the follower hashes what it reads and holds back the last piece
until its own hash matches the digest. When it does not, what was sent so far is
checked against the verified cached blob, and the rest comes from that file;
otherwise the response is aborted. A clean end always means the right bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import anyio

from ..errors import Unavailable
from ..reference import Digest
from ..storage.locks import lock_is_held, read_note
from .blobs import Blob

__all__ = ["FOREIGN_POLL_SECONDS", "ForeignBlob"]

# How often a reader following another worker's fill looks for new bytes.
FOREIGN_POLL_SECONDS = 0.02
_READ_CHUNK = 1024 * 1024

OpenCached = Callable[[], BinaryIO | None]


class ForeignBlob(Blob):
    """A blob read from another worker's fill, verified by this reader."""

    def __init__(self, digest: Digest, fd: int, lock_path: Path, open_cached: OpenCached) -> None:
        note = read_note(lock_path)
        super().__init__(int(note) if note.isdigit() else None, "coalesced")
        self._digest = digest
        self._fd: int | None = fd
        self._lock_path = lock_path
        self._open_cached = open_cached

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fill_running(self) -> bool:
        return lock_is_held(self._lock_path)

    async def _cached(self) -> BinaryIO:
        """The verified cached file, once no fill of the digest runs any more."""
        while True:
            running = self._fill_running()  # before the lookup: a fill ending meanwhile
            handle = await anyio.to_thread.run_sync(self._open_cached)
            if handle is not None:
                return handle
            if not running:
                raise Unavailable(f"the worker filling blob {self._digest} failed; retry")
            await asyncio.sleep(FOREIGN_POLL_SECONDS)

    async def known_size(self) -> int | None:
        if self.size is None:
            with await self._cached() as handle:
                self.size = os.fstat(handle.fileno()).st_size
        return self.size

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        assert self._fd is not None
        try:
            if start == 0 and end is None:
                async for data in self._follow():
                    yield data
            else:
                # A range cannot be hashed on its own: it comes from the verified file.
                with await self._cached() as handle:
                    async for data in _read(handle.fileno(), start, end):
                        yield data
        finally:
            self.close()

    async def _follow(self) -> AsyncIterator[bytes]:
        assert self._fd is not None
        fd = self._fd
        sent_hash = self._digest.hasher()  # of the bytes sent so far
        sent, held = 0, b""  # the last piece read is held back until verified
        while True:
            running = self._fill_running()  # before reading: what it wrote is on disk
            while True:
                data = await anyio.to_thread.run_sync(os.pread, fd, _READ_CHUNK, sent + len(held))
                if not data:
                    break
                if held:
                    await anyio.to_thread.run_sync(sent_hash.update, held)
                    yield held
                    sent += len(held)
                held = data
            if not running:
                break
            await asyncio.sleep(FOREIGN_POLL_SECONDS)
        whole = sent_hash.copy()
        whole.update(held)
        if whole.hexdigest() == self._digest.hex:
            yield held
            return
        # Not the blob: the fill this reader followed failed or was replaced. Carry on
        # from the cached file, if it agrees with every byte already sent.
        with await self._cached() as handle:
            if not await anyio.to_thread.run_sync(_has_prefix, handle, sent, sent_hash):
                raise Unavailable(f"the fill of blob {self._digest} that was followed failed")
            async for data in _read(handle.fileno(), sent, None):
                yield data


def _has_prefix(handle: BinaryIO, length: int, expected: hashlib._Hash) -> bool:
    hasher = hashlib.new(expected.name)
    position = 0
    while position < length:
        data = os.pread(handle.fileno(), min(_READ_CHUNK, length - position), position)
        if not data:
            return False
        hasher.update(data)
        position += len(data)
    return hasher.hexdigest() == expected.hexdigest()


async def _read(fd: int, start: int, end: int | None) -> AsyncIterator[bytes]:
    position = start
    while end is None or position < end:
        want = _READ_CHUNK if end is None else min(_READ_CHUNK, end - position)
        data = await anyio.to_thread.run_sync(os.pread, fd, want, position)
        if not data:
            if end is not None:
                raise Unavailable("cached blob is shorter than its record")
            return
        position += len(data)
        yield data
