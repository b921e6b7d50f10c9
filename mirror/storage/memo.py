"""Small in-memory LRUs in front of the shared index, one per kind of record.

Hot manifests, tag records and blob file paths are answered from memory, on the
event loop, without a SQLite read (and the write that LRU bookkeeping costs).
Every worker has its own; a file that every worker's purge writes tells the
others to forget what they hold (8 bytes of shared memory read a lookup, no
system call), so purged content does not live on in another worker's memory.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .base import RememberedTag, TagRecord

__all__ = ["TAG_TRUST_SECONDS", "Memo", "PurgeMark", "TagMemo"]

# How long a tag record in one process's memory is answered without a look at the
# shared records (the index, or Redis), where another worker or replica may have
# recorded the tag's move: the bound on processes disagreeing about a tag, for one
# read per tag per process per second.
TAG_TRUST_SECONDS = 1.0


_MARK_BYTES = 8


class PurgeMark:
    """A file whose first bytes every purge changes, read through a shared memory map:
    the processes sharing a cache see the change as soon as it is written, and a lookup
    makes no system call (a ``stat`` of the file's mtime was one per lookup)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size < _MARK_BYTES:  # new, or touched by an older version
                os.ftruncate(fd, _MARK_BYTES)  # never shrinks: another's write stays
            self._map = mmap.mmap(fd, _MARK_BYTES, access=mmap.ACCESS_READ)  # MAP_SHARED
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:_MARK_BYTES]

    def change(self) -> None:
        """Tell every process: random bytes, so two purges at once never write the same
        value a reader could take for no change (a torn read only clears once more)."""
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.pwrite(fd, os.urandom(_MARK_BYTES), 0)
        finally:
            os.close(fd)


class Memo:
    """An LRU bounded by the total of its entries' sizes, cleared when ``mark`` changes."""

    def __init__(self, max_size: int, mark: PurgeMark | None = None) -> None:
        self._max_size = max_size
        self._size = 0
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._mark = mark
        self._seen = self._stamp()

    def _stamp(self) -> bytes:
        return self._mark.read() if self._mark is not None else b""

    def get(self, key: str) -> object | None:
        stamp = self._stamp()
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                self._items.clear()
                self._size = 0
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: object, size: int = 1) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            self._items[key] = (value, size)
            self._size += size
            while self._size > self._max_size and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._size -= dropped

    def discard(self, key: str, value: object) -> None:
        """Drop the entry if it still holds ``value`` (a newer one stays)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0] == value:
                del self._items[key]
                self._size -= item[1]


class TagMemo:
    """Tag records in a :class:`Memo`, each with the moment it was read or written."""

    def __init__(self, memo: Memo, now: Callable[[], float], size: int = 1) -> None:
        self._memo = memo
        self._now = now
        self._size = size  # what one record costs in ``memo``'s measure

    def remember(self, key: str, record: TagRecord) -> None:
        self._memo.put(key, (record, self._now()), self._size)

    def recall(self, key: str) -> RememberedTag | None:
        """The record in memory, due for a read of the shared records once trusted
        for :data:`TAG_TRUST_SECONDS`."""
        memo = self._memo.get(key)
        if not isinstance(memo, tuple):
            return None
        return RememberedTag(memo[0], not 0 <= self._now() - memo[1] < TAG_TRUST_SECONDS)

    def trusted(self, key: str) -> TagRecord | None:
        """The record in memory while it is trusted, else None."""
        recalled = self.recall(key)
        return recalled.record if recalled is not None and not recalled.due else None

    def forget(self, key: str) -> None:
        """The shared records no longer hold it: neither does memory."""
        memo = self._memo.get(key)
        if memo is not None:
            self._memo.discard(key, memo)
