"""Where cached blob files are, by digest, in memory.

The index names each blob's file (with a random suffix, see ``store._BlobDisk``); asking it
on every hit costs a SQLite read on a thread. This map remembers the answer, bounded, least
recently used first out. An entry may outlive its file (evicted, possibly by another
worker): opening it then fails and the caller asks the index again. While the file exists its
bytes are the verified blob, whatever the index says meanwhile, so a stale entry never
serves wrong bytes.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from .reference import Digest

__all__ = ["BlobPaths"]


class BlobPaths:
    def __init__(self, max_entries: int, mark: Path | None = None) -> None:
        self._max_entries = max_entries
        self._paths: OrderedDict[Digest, str] = OrderedDict()
        self._lock = threading.Lock()
        # The file every worker's purge touches (see store._Memo): after a purge, a blob
        # is asked of the index again, whatever became of its file.
        self._mark = mark
        self._seen = self._stamp()

    def _stamp(self) -> int:
        try:
            return os.stat(self._mark).st_mtime_ns if self._mark else 0
        except OSError:
            return 0

    def get(self, digest: Digest) -> str | None:
        stamp = self._stamp()
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                self._paths.clear()
            path = self._paths.get(digest)
            if path is not None:
                self._paths.move_to_end(digest)
            return path

    def put(self, digest: Digest, path: str) -> None:
        with self._lock:
            self._paths[digest] = path
            self._paths.move_to_end(digest)
            while len(self._paths) > self._max_entries:
                self._paths.popitem(last=False)

    def forget(self, digest: Digest, path: str) -> None:
        """Drop the entry if it still names ``path`` (a newer one stays)."""
        with self._lock:
            if self._paths.get(digest) == path:
                del self._paths[digest]
