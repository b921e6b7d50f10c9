"""This process's open descriptors, for tests that check nothing leaks."""

from __future__ import annotations

import contextlib
import os

__all__ = ["blob_descriptors", "open_descriptors"]

# SQLite keeps a connection per worker thread and per index (diskcache's): their
# count grows with the threads a test happens to use, and is no leak.
_SQLITE_SUFFIXES = (".db", ".db-wal", ".db-shm")


def _targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def open_descriptors() -> int:
    """Open descriptors, SQLite's per-thread connections aside."""
    return sum(not t.endswith(_SQLITE_SUFFIXES) for t in _targets())


def blob_descriptors() -> int:
    """Descriptors on blob or fill files."""
    return sum("/cache/blobs/" in t or "/cache/tmp/" in t for t in _targets())
