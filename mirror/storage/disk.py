"""The disk cache: blobs as content-addressed files, manifests and tag records,
all indexed by diskcache.

diskcache owns the record of every entry (size, last access) and the
least-recently-used culling; ``_BlobDisk`` teaches it to adopt a finished,
verified temporary file by rename instead of copying a big blob a second time.
Every method is synchronous and small: the caller runs them off the event loop.

Layout under the cache directory::

    cache.db                      diskcache's SQLite index
    blobs/sha256/ab/abcd….<rand>  blob files (adopted by rename)
    tmp/                          fills in progress; never served from the index
    locks/                        one lock file per digest being filled
    repositories/                 a second, never-culled index: the catalog
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import diskcache

from ..reference import Digest
from .accesstimes import AccessTimes
from .base import RememberedTag, TagRecord
from .locks import FileLock
from .memo import Memo, PurgeMark, TagMemo

__all__ = ["ORPHAN_GRACE_SECONDS", "SQLITE_SETTINGS", "AdoptFile", "Store", "TagRecord"]

log = logging.getLogger("mirror.store")

# Manifests (≤ 4 MiB) stay inside SQLite; only blobs become files.
_INLINE_LIMIT = 8 * 1024 * 1024
# Memory for hot manifests and tag records, per process.
_MEMO_BYTES = 64 * 1024 * 1024
_TAG_RECORD_SIZE = 256  # roughly what one record costs in memory
_RENAME_ATTEMPTS = 5
# How every SQLite index here is opened. diskcache's defaults give each connection (one
# per thread that touches the index: up to anyio's 40) a 64 MiB memory map and a 32 MiB
# page cache. The map's pages are the kernel's page cache, shared, yet count in RSS once
# per connection: 3,000 hits on a 100,000-entry cache took a worker from 58 to 370 MiB.
# Reads go through pread into the kernel's page cache instead, and each connection keeps
# a small cache of its own (the memos answer hot lookups without SQLite anyway).
SQLITE_SETTINGS = {"sqlite_mmap_size": 0, "sqlite_cache_size": 256}  # pages of 4 KiB
# A blob file that no index entry names is an orphan once it is this old: a crash
# between an adoption's rename and its commit, or between an eviction's commit and
# its unlink, leaves one. The index waits up to 60 s for a write lock; this is
# far beyond the time from an adoption's rename to its commit.
ORPHAN_GRACE_SECONDS = 600.0
# Blob file paths kept in memory, per process (~250 bytes each).
_BLOB_PATHS = 100_000
_BATCH = 512  # tag records read at once by tag_targets
# Entries evicted in one transaction at most: other workers' writes wait for it (a few
# milliseconds idle; 256 took ~150 ms on 2 cores under a load average of 15).
_CULL_BATCH = 64
# A pause between batches. A write waiting on SQLite's lock sleeps and polls, at
# 1, 3, 8, 18, 33 … 103 ms and then every 100 ms; a cull taking the lock again at once
# would win nearly every time and keep every other writer (a fill's adoption, the
# access times written behind) waiting for the whole eviction (reads never wait).
# Pausing longer than those first polls' gaps lets waiting writers in between batches.
_CULL_PAUSE = 0.03
# What deleting a row frees, roughly: a file's size, and inside SQLite the value, the key
# (in the table and in its index) and the filename. Rather over than under: a row that
# frees less than counted only costs one more round.
_FOOTPRINT = (
    "size + 2 * length(key) + coalesce(length(value), 0) + coalesce(length(filename), 0) + 64"
)
# Entries by kind (the key's prefix), kept by triggers as rows come and go: the
# metrics and the status page read them without counting a million rows.
_KIND = "substr({row}.key, 1, instr({row}.key, ':') - 1)"
_KINDS_SCHEMA = (
    "CREATE TABLE Kinds (kind TEXT PRIMARY KEY, entries INTEGER NOT NULL) WITHOUT ROWID",
    f"INSERT INTO Kinds SELECT {_KIND.format(row='Cache')}, COUNT(*) FROM Cache GROUP BY 1",
    "CREATE TRIGGER Kinds_insert AFTER INSERT ON Cache FOR EACH ROW BEGIN"
    f" INSERT INTO Kinds VALUES ({_KIND.format(row='NEW')}, 1)"
    " ON CONFLICT (kind) DO UPDATE SET entries = entries + 1; END",
    "CREATE TRIGGER Kinds_delete AFTER DELETE ON Cache FOR EACH ROW BEGIN"
    f" UPDATE Kinds SET entries = entries - 1 WHERE kind = {_KIND.format(row='OLD')}; END",
)
_KINDS = ("blob", "manifest", "tag", "tags", "missing", "referrers")


@dataclass(frozen=True)
class AdoptFile:
    """A verified file to be moved (renamed) into the cache as a blob."""

    path: Path
    digest: Digest


class _BlobDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that stores ``AdoptFile`` values by renaming them."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not isinstance(value, AdoptFile):
            return super().store(value, read, key=key)
        digest = value.digest
        # The random suffix keeps a replaced entry's cleanup from deleting its successor.
        filename = os.path.join(
            "blobs", digest.algorithm, digest.hex[:2], f"{digest.hex}.{os.urandom(4).hex()}"
        )
        full_path = os.path.join(self._directory, filename)
        size = os.path.getsize(value.path)
        # The orphan sweep judges a file unindexed by age: it is young from its rename.
        os.utime(value.path)
        for attempt in range(_RENAME_ATTEMPTS):
            os.makedirs(os.path.dirname(full_path), mode=0o700, exist_ok=True)
            try:
                os.replace(value.path, full_path)
                break
            except FileNotFoundError:
                # Another worker's eviction removed the emptied directory (diskcache's
                # cleanup prunes empty parents) between our makedirs and rename.
                if not os.path.exists(value.path) or attempt == _RENAME_ATTEMPTS - 1:
                    raise
        return size, diskcache.core.MODE_BINARY, filename, None


class _Index(diskcache.Cache):  # type: ignore[misc]
    """diskcache, culling just enough least-recently-used entries, in batches.

    ``Cache.cull`` removes ten entries per step, which for a cache of large blobs can
    throw away far more than the room needed, up to the blob just added; one entry per
    transaction, the other way out, took 79 s to evict 36,000 entries. This keeps
    diskcache's own policy order, size accounting (its triggers) and file cleanup (after
    the commit, outside the lock), and deletes per transaction the fewest
    least-recently-used rows whose sizes cover the excess, at most ``_CULL_BATCH``.
    """

    def cull_to_limit(self) -> int:
        count = int(self.expire())
        if diskcache.core.EVICTION_POLICY[self.eviction_policy]["cull"] is None:
            return count
        # Access times only grow (uses bump them, new entries are newer): rows older than
        # the last one taken are pinned ones, skipped without walking them again.
        since = -math.inf
        while True:
            with self._transact(retry=True) as (sql, cleanup):
                # Under the write lock: another worker's cull is counted, not repeated.
                excess = self.volume() - self.size_limit
                if excess <= 0:
                    break
                rows = sql(
                    f"SELECT rowid, filename, access_time, {_FOOTPRINT} FROM Cache"
                    " WHERE access_time >= ? AND NOT EXISTS"
                    " (SELECT 1 FROM Pinned WHERE Pinned.key = Cache.key)"
                    " ORDER BY access_time LIMIT ?",
                    (since, _CULL_BATCH),
                ).fetchall()
                if not rows:
                    break  # what is left is pinned: it stays, and counts against the limit
                taken = 0
                for rowid, filename, accessed, footprint in rows:
                    sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                    cleanup(filename)
                    taken += 1
                    since = accessed
                    excess -= footprint
                    if excess <= 0:
                        break
            count += taken
            if taken == len(rows):  # more to come, maybe: let the others write first
                time.sleep(_CULL_PAUSE)
        return count


def _blob_key(digest: Digest) -> str:
    return f"blob:{digest}"


def _manifest_key(digest: Digest) -> str:
    return f"manifest:{digest}"


def _tag_key(upstream: str, repository: str, tag: str, accept: tuple[str, ...]) -> str:
    return f"tag:{upstream}/{repository}:{tag}|{','.join(accept)}"


class Store:
    """Blobs, manifests, tag records and the catalog, on disk."""

    def __init__(
        self, directory: Path, max_size: int, now: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self.tmp_dir = directory / "tmp"
        self.lock_dir = directory / "locks"
        for path in (directory, self.tmp_dir, self.lock_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._now = now
        self._index = _Index(
            str(directory),
            disk=_BlobDisk,
            size_limit=max_size,
            eviction_policy="least-recently-used",
            disk_min_file_size=_INLINE_LIMIT,
            # No culling inside set(): cull_to_limit() runs after each write, and counts.
            cull_limit=0,
            # Other workers share the index; wait for their writes rather than fail.
            timeout=60,
            **SQLITE_SETTINGS,
        )
        # Keys of pinned entries (maintained by admin/inventory.py), never culled.
        self._index._sql("CREATE TABLE IF NOT EXISTS Pinned (key TEXT PRIMARY KEY)")
        with self._index._transact(retry=True) as (sql, _):
            # Once per index; a cache made by an older version is counted now, in the
            # same transaction as the triggers start, so no row is missed or counted twice.
            if not sql("SELECT 1 FROM sqlite_master WHERE name = 'Kinds'").fetchall():
                for statement in _KINDS_SCHEMA:
                    sql(statement)
        # Held by the one process of those sharing the cache that sweeps it for orphans.
        self._sweeper: FileLock | None = None
        self._purge_mark = PurgeMark(directory / "purged")
        self._memo = Memo(_MEMO_BYTES, self._purge_mark)
        self._tags = TagMemo(self._memo, now, _TAG_RECORD_SIZE)
        # Where each cached blob's file is (the index gives it a random suffix): a hit
        # opens it without asking the index. An entry may outlive its file (evicted,
        # maybe by another worker): opening fails and the index is asked again; while
        # the file exists its bytes are the verified blob, so a stale entry is harmless.
        self._blob_paths = Memo(_BLOB_PATHS, self._purge_mark)
        self._access_times = AccessTimes(self._write_access_times)
        self._repositories = diskcache.Cache(
            str(directory / "repositories"), eviction_policy="none", timeout=60, **SQLITE_SETTINGS
        )

    @property
    def index(self) -> diskcache.Cache:
        """The diskcache index itself, for the inventory's queries and purges."""
        return self._index

    def purged(self) -> None:
        """Entries were deleted: every worker forgets what it holds in memory."""
        self._purge_mark.change()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.release()
            self._sweeper = None
        self._access_times.close()
        self._index.close()
        self._repositories.close()

    # blobs

    def memo_open_blob(self, digest: Digest) -> BinaryIO | None:
        """An open handle on a cached blob whose file is known in memory, or None; marks
        it recently used (written behind). No index read: fine on the event loop.

        Eviction may unlink the file later, but an open handle keeps reading.
        """
        path = self._blob_paths.get(str(digest))
        if not isinstance(path, str):
            return None
        try:
            handle = open(path, "rb")  # the caller owns and closes it
        except FileNotFoundError:  # evicted since: ask the index
            self._blob_paths.discard(str(digest), path)
            return None
        self._access_times.touch(_blob_key(digest))
        return handle

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        """An open handle on a cached blob, or None; marks it recently used.

        Eviction may unlink the file later, but an open handle keeps reading.
        """
        known = self.memo_open_blob(digest)
        if known is not None:
            return known
        handle: BinaryIO | None = self._read(_blob_key(digest), file=True)
        if handle is not None:
            self._blob_paths.put(str(digest), handle.name)
        return handle

    def has_blob(self, digest: Digest) -> bool:
        return _blob_key(digest) in self._index

    def adopt_blob(self, temp: Path, digest: Digest) -> int:
        """Move a verified temporary file into the cache, then cull to the cap.

        Returns how many entries were evicted to make room.
        """
        self._index.set(_blob_key(digest), AdoptFile(temp, digest))
        handle = self._read(_blob_key(digest), file=True, use=False)
        if handle is not None:  # the file's name is the index's choice: remember it
            handle.close()
            self._blob_paths.put(str(digest), handle.name)
        return self._cull()

    def temp_path(self, digest: Digest) -> Path:
        """Where a blob is filled; fixed, so other workers can follow the fill."""
        return self.tmp_dir / f"{digest.algorithm}-{digest.hex}"

    def lock_path(self, digest: Digest) -> Path:
        return self.lock_dir / f"{digest.algorithm}-{digest.hex}.lock"

    # manifests

    def memo_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """A manifest from memory only: no I/O, fine on the event loop; a hit counts as a
        use for eviction (written behind)."""
        key = _manifest_key(digest)
        manifest = self._memo.get(key)
        if manifest is not None:
            self._access_times.touch(key)
        return manifest  # type: ignore[return-value]

    def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        memo = self.memo_manifest(digest)
        if memo is not None:
            return memo
        key = _manifest_key(digest)
        value = self._read(key)
        if value is None:
            return None
        media_type, body = value
        manifest = (str(media_type), bytes(body))
        self._memo.put(key, manifest, len(body))
        return manifest

    def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> int:
        """Store a verified manifest; returns how many entries were evicted."""
        key = _manifest_key(digest)
        self._index.set(key, (media_type, body))
        self._memo.put(key, (media_type, body), len(body))
        return self._cull()

    def _read(self, key: str, *, file: bool = False, use: bool = True) -> Any:
        """An entry's value (an open handle on its file with ``file``), or None; ``use``
        marks it recently used, written behind.

        diskcache's ``get`` under LRU writes the access time in a transaction of its own:
        every read would take the index's write lock, and wait behind an eviction (or any
        other worker's write) for as long as it holds it. A plain read sees the last
        commit and never waits for one.
        """
        rows = self._index._sql(
            "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (key, time.time()),
        ).fetchall()
        if not rows:
            return None
        ((mode, filename, value),) = rows
        try:
            found = self._index.disk.fetch(mode, filename, value, file)
        except OSError:  # evicted between the read and the open
            return None
        if use:
            self._access_times.touch(key)
        return found

    # eviction

    def _cull(self) -> int:
        """Evict least recently used entries down to the cap, counting the uses served
        from memory that are not written yet."""
        self._access_times.flush()
        return int(self._index.cull_to_limit())

    def _write_access_times(self, times: Mapping[str, float]) -> None:
        # The LRU order diskcache culls by is its access_time column; a later bump from
        # another worker stays.
        with self._index._transact(retry=True):
            self._index._con.executemany(
                "UPDATE Cache SET access_time = max(access_time, ?) WHERE key = ? AND raw = 1",
                [(accessed, key) for key, accessed in times.items()],
            )

    # tags

    def memo_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> RememberedTag | None:
        """A tag record from memory only: no I/O, fine on the event loop."""
        return self._tags.recall(_tag_key(upstream, repository, tag, accept))

    def get_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        key = _tag_key(upstream, repository, tag, accept)
        record = self._tags.trusted(key)
        if record is not None:
            return record
        value = self._read(key)
        if value is None:
            self._tags.forget(key)  # gone from the index (evicted, deleted)
            return None
        digest, media_type, checked_at = value
        record = TagRecord(Digest(*digest), media_type, checked_at)
        self._tags.remember(key, record)
        return record

    def put_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        digest: Digest,
        media_type: str,
    ) -> None:
        key = _tag_key(upstream, repository, tag, accept)
        checked_at = self._now()
        self._index.set(key, ((digest.algorithm, digest.hex), media_type, checked_at))
        self._tags.remember(key, TagRecord(digest, media_type, checked_at))

    def tag_targets(
        self, prefix: str = "tag:", after: str = "", limit: int = _BATCH
    ) -> list[tuple[str, str, str, Digest]]:
        """(key, upstream, repository, digest) of up to ``limit`` tag records whose keys
        start with ``prefix`` and sort after ``after``, in key order: one seek on the key
        index per call. Reading them is not a use."""
        # Every key starting with the prefix sorts below the prefix with its last
        # character incremented.
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self._index._sql(
            "SELECT key, mode, filename, value FROM Cache"
            " WHERE key > ? AND key >= ? AND key < ? AND raw = 1 ORDER BY key LIMIT ?",
            (after, prefix, end, limit),
        ).fetchall()
        targets = []
        for key, mode, filename, value in rows:
            name = key[len("tag:") :].partition("|")[0].rpartition(":")[0]
            upstream, _, repository = name.partition("/")
            digest = self._index.disk.fetch(mode, filename, value, False)[0]
            targets.append((key, upstream, repository, Digest(*digest)))
        return targets

    def read_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """A cached manifest from the index, neither a use nor kept in memory: for
        housekeeping that walks many of them."""
        value = self._read(_manifest_key(digest), use=False)
        return None if value is None else (str(value[0]), bytes(value[1]))

    def get_tag_list(self, upstream: str, repository: str) -> list[str] | None:
        value = self._read(f"tags:{upstream}/{repository}")
        return list(value) if value is not None else None

    def put_tag_list(self, upstream: str, repository: str, tags: list[str]) -> int:
        """Store a tag list; returns how many entries were evicted to stay under the cap."""
        self._index.set(f"tags:{upstream}/{repository}", tags)
        return self._index.cull_to_limit()

    def get_referrers(
        self, upstream: str, repository: str, digest: Digest
    ) -> tuple[bytes, float] | None:
        """The last referrers index of a subject, and when the upstream gave it."""
        value = self._read(f"referrers:{upstream}/{repository}@{digest}")
        return None if value is None else (bytes(value[0]), float(value[1]))

    def put_referrers(self, upstream: str, repository: str, digest: Digest, body: bytes) -> None:
        key = f"referrers:{upstream}/{repository}@{digest}"
        self._index.set(key, (body, self._now()))

    def put_missing(self, key: str, ttl: float) -> None:
        """Remember an upstream 404 for ``ttl`` seconds."""
        if ttl > 0:
            self._index.set(f"missing:{key}", True, expire=ttl)

    def is_missing(self, key: str) -> bool:
        return bool(self._read(f"missing:{key}"))

    # catalog

    def add_repository(self, name: str) -> None:
        if name not in self._repositories:
            self._repositories.set(name, True)

    def repositories(self) -> Iterator[str]:
        """Cached repository names in sorted order."""
        for key in self._repositories.iterkeys():
            yield str(key)

    # housekeeping

    def clean_temp(self) -> None:
        """Remove temporary files left by fills that died with their process."""
        for path in self.tmp_dir.iterdir():
            lock = FileLock(self.lock_dir / f"{path.name}.lock")
            if lock.try_acquire():
                with contextlib.suppress(OSError):
                    path.unlink()
                lock.release(remove=True)

    def reclaim_orphans(self, grace: float = ORPHAN_GRACE_SECONDS, share: float = 1.0) -> int:
        """Remove blob files older than ``grace`` that no index entry names; returns how many.

        One process sweeps for all sharing the cache: the first to call this keeps the
        sweeper's lock until it closes (or dies: the kernel drops the lock, and the next
        call elsewhere takes over); in the others it does nothing and returns 0.

        ``share`` is the part of its time the sweep works: after each folder it rests for
        the rest. A sweep is Python work (7 s of CPU at a million files) holding the GIL
        that a serving event loop waits for at every system call; at full speed, in the
        first seconds after a start, hits at a million entries took 3× as long.
        """
        if self._sweeper is None:
            lock = FileLock(self.directory / "sweeper.lock")
            if not lock.try_acquire():
                return 0
            self._sweeper = lock
        cutoff = time.time() - grace  # file times are wall-clock, whatever self._now says
        removed = 0
        with contextlib.closing(sqlite3.connect(self.directory / "cache.db", timeout=60)) as db:
            # One directory at a time (blobs/<algorithm>/<first two hex digits>), against
            # the index's entries for that key range: memory stays small at a million files,
            # and only files the index does not name are looked at (stat) at all.
            for folder in _folders(self.directory / "blobs", depth=2):
                began = time.monotonic()
                names = _file_names(folder)
                if not names:
                    continue
                # Read after listing: a file adopted meanwhile is either not listed or young.
                low = f"blob:{folder.parent.name}:{folder.name}"
                rows = db.execute(
                    "SELECT filename FROM Cache WHERE key >= ? AND key < ? AND raw = 1",
                    (low, low + "~"),  # "~" sorts after every hex digit
                ).fetchall()
                names.difference_update(str(f).rpartition("/")[2] for (f,) in rows if f)
                for name in names:
                    with contextlib.suppress(OSError):
                        path = folder / name
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
                time.sleep((time.monotonic() - began) * (1 / share - 1))
        if removed:
            log.warning(
                "removed %d blob files that the index does not know (crash leftovers)", removed
            )
        return removed

    def facts(self) -> tuple[int, dict[str, int], int]:
        """Bytes on disk, entries by kind (blob, manifest, tag, tags, missing, referrers),
        and the cap. Reads a few counters, not the index."""
        entries = dict.fromkeys(_KINDS, 0)
        rows = self._index._sql("SELECT kind, entries FROM Kinds").fetchall()
        entries.update({str(kind): int(count) for kind, count in rows if kind in entries})
        return int(self._index.volume()), entries, int(self._index.size_limit)

    def writable(self) -> bool:
        """Can a file be created in the cache directory, and does the index answer?"""
        try:
            with tempfile.TemporaryFile(dir=self.tmp_dir):
                pass
            self._read("readiness-probe")
        except (OSError, sqlite3.Error):
            return False
        return True


def _folders(root: Path, depth: int) -> Iterator[Path]:
    """The directories ``depth`` levels below ``root``."""
    if depth == 0:
        yield root
        return
    folders: list[Path] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        folders = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    for folder in sorted(folders):
        yield from _folders(folder, depth - 1)


def _file_names(folder: Path) -> set[str]:
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        return {e.name for e in entries if e.is_file(follow_symlinks=False)}
    return set()
