"""Last-access times of cache entries, written behind the request path.

A hit served from memory (a manifest, a blob opened by its known path) must still count as
a use for the least-recently-used eviction, but a SQLite write per hit is what made the
warm path slow under load: writes serialize on the index's lock. Hits record the time in a
dict; a thread of its own writes the batch to the index once a second, and the store writes
it at once before it culls, so eviction sees every use this process made. A kill -9 loses at
most the last second of bumps: eviction order gets slightly older, nothing gets corrupt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["AccessTimes"]

log = logging.getLogger("mirror.store")


class AccessTimes:
    """Pending access times by index key, flushed by ``write`` in batches."""

    def __init__(
        self,
        write: Callable[[Mapping[str, float]], None],
        *,
        interval: float = 1.0,
    ) -> None:
        self._write = write
        self._interval = interval
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()  # guards _pending and _thread
        self._flushing = threading.Lock()  # one batch at a time, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self, key: str) -> None:
        """Record a use of ``key`` now; cheap enough for the event loop."""
        with self._lock:
            # diskcache keeps access times by the real clock, whatever the store's says
            self._pending[key] = time.time()
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="mirror-access-times", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        """Write what is pending now (blocking: not on the event loop)."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
            if batch:
                self._write(batch)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - a lost batch only ages LRU order
                log.warning("could not record access times in the index: %s", exc)
