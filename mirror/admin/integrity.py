"""``mirror verify``: re-hash every cached blob and manifest, drop the corrupt ones.

Bit rot, a disk swapped under a running cache or a file edited by hand would
otherwise be served for ever: the cache verifies bytes once, when it fills them.
A corrupt or missing entry is deleted, so the next pull fetches it again.
Synchronous; on a live mirror it runs in a thread, at ``rate`` bytes a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from ..reference import Digest, parse_digest
from ..storage.disk import Store

__all__ = ["Progress", "verify"]

log = logging.getLogger("mirror.verify")

_CHUNK = 1024 * 1024


@dataclass
class Progress:
    """What a run has done so far; read by the admin API while it runs."""

    checked: int = 0
    bytes: int = 0
    corrupt: list[str] = field(default_factory=list)  # cache keys dropped
    done: bool = False
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)


def verify(
    store: Store,
    progress: Progress | None = None,
    *,
    rate: float | None = None,
) -> Progress:
    """Check every blob and manifest; ``rate`` caps bytes read a second (None: no cap)."""
    progress = progress or Progress()
    index = store.index
    started = time.monotonic()
    db = sqlite3.connect(store.directory / "cache.db", timeout=60)
    try:
        after = ""
        while not progress.stop.is_set():
            row = db.execute(
                "SELECT key, mode, filename, value FROM Cache WHERE key > ? AND raw = 1"
                " AND (key >= 'blob:' AND key < 'blob;'"
                " OR key >= 'manifest:' AND key < 'manifest;')"
                " ORDER BY key LIMIT 1",
                (after,),
            ).fetchone()
            if row is None:
                break
            key, mode, filename, value = row
            after = key
            kind, _, name = key.partition(":")
            digest = parse_digest(name)
            if kind == "blob":
                good, size = _file_matches(os.path.join(store.directory, filename or ""), digest)
            else:
                try:
                    _, body = index.disk.fetch(mode, filename, value, False)
                    good, size = Digest.of(bytes(body), digest.algorithm) == digest, len(body)
                except Exception:  # an unreadable record is as corrupt as a wrong one
                    good, size = False, 0
            progress.checked += 1
            progress.bytes += size
            if not good:
                log.warning("verify: %s is corrupt or missing; dropped", key)
                index.delete(key, retry=True)
                store.purged()
                progress.corrupt.append(key)
            if rate:
                ahead = progress.bytes / rate - (time.monotonic() - started)
                if ahead > 0:
                    progress.stop.wait(ahead)
    finally:
        db.close()
        progress.done = True
    return progress


def _file_matches(path: str, digest: Digest) -> tuple[bool, int]:
    hasher = hashlib.new(digest.algorithm)
    size = 0
    try:
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except OSError:
        return False, size
    return hasher.hexdigest() == digest.hex, size
