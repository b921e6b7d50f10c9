"""What the cache holds, read from the store's index: repositories, tags, images and
blobs with their sizes and pulls; purging, pinning and pull counts.

Everything is read with SQL range queries on diskcache's key index (keys are
``tag:<upstream>/<repository>:<tag>|<accept>``, ``manifest:<digest>``,
``blob:<digest>``), never by loading the whole index: a page of repositories is one
index seek per repository. Reads do not count as uses (the LRU order stays the
clients'). Deletions go through diskcache, which removes files and keeps the size
accounting. Beside diskcache's table in ``cache.db`` live ``Pinned`` (keys the
store never culls, created by the store), ``Pins`` (what was pinned, from which
``Pinned`` is rebuilt) and ``Pulls`` (pull counts, added up by every worker).

Synchronous, like the store: callers run it off the event loop.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ManifestInvalid, OCIError
from ..images import Descriptor, children, is_index, referenced_blobs
from ..reference import Digest, parse_digest
from ..storage.disk import Store

__all__ = [
    "BlobEntry",
    "Image",
    "Inventory",
    "NotCached",
    "PurgeResult",
    "Repository",
    "Tag",
]

PurgeKind = Literal["upstream", "repository", "tag", "digest", "age"]
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS Pins (upstream TEXT, repository TEXT, reference TEXT,"
    " digest TEXT, created REAL, PRIMARY KEY (upstream, repository, reference))",
    "CREATE TABLE IF NOT EXISTS Pulls (upstream TEXT, repository TEXT, reference TEXT,"
    " count INTEGER, last REAL, PRIMARY KEY (upstream, repository, reference))",
)
_FLUSH_SECONDS = 2.0
# Values kept inside SQLite (manifests, tag records) have size 0 in diskcache's books.
_FIELDS = (
    "key, CASE WHEN filename IS NULL THEN length(value) ELSE size END,"
    " access_time, mode, filename, value"
)


class NotCached(LookupError):
    """The image or entry asked about is not in the cache."""


@dataclass(frozen=True)
class Tag:
    upstream: str
    repository: str
    tag: str
    digest: str
    media_type: str
    checked_at: float  # when the upstream last confirmed it (or warm/import wrote it)
    accepts: tuple[str, ...]  # the Accept lists it was recorded for
    size: int  # bytes of its manifests and blobs in the cache
    pulls: int
    last_pull: float | None
    pinned: bool


@dataclass(frozen=True)
class Repository:
    upstream: str
    repository: str
    tags: int
    size: int  # bytes of the manifests and blobs its tags reach, each counted once
    pulls: int
    last_pull: float | None


@dataclass(frozen=True)
class BlobEntry:
    digest: str
    size: int
    last_used: float
    pinned: bool


@dataclass(frozen=True)
class Part:
    """A manifest or blob an image references, and whether the cache holds it."""

    kind: Literal["manifest", "blob"]
    digest: str
    media_type: str
    size: int
    cached: bool
    platform: str | None = None


@dataclass(frozen=True)
class Image:
    upstream: str
    repository: str
    reference: str
    digest: str
    media_type: str
    tags: list[Tag]  # the tag records naming it (one per Accept list), empty by digest
    manifests: list[Part]
    blobs: list[Part]
    size: int  # cached bytes
    pinned: bool


@dataclass
class PurgeResult:
    tags: int = 0
    manifests: int = 0
    blobs: int = 0
    freed: int = 0  # bytes
    keys: list[str] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class _Row:
    key: str
    size: int
    access_time: float
    mode: int
    filename: str | None
    value: Any


def _range(prefix: str) -> tuple[str, str]:
    """Keys starting with ``prefix``: [prefix, prefix with its last character + 1)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection, rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _parse_tag_key(key: str) -> tuple[str, str, str, tuple[str, ...]]:
    head, _, accept = key.removeprefix("tag:").partition("|")
    name, _, tag = head.rpartition(":")
    upstream, _, repository = name.partition("/")
    return upstream, repository, tag, tuple(a for a in accept.split(",") if a)


def tag_prefix(upstream: str, repository: str | None = None, tag: str | None = None) -> str:
    if repository is None:
        return f"tag:{upstream}/"
    if tag is None:
        return f"tag:{upstream}/{repository}:"
    return f"tag:{upstream}/{repository}:{tag}|"


class Inventory:
    """Queries and changes the cache's contents; one per store, thread-safe."""

    def __init__(self, store: Store, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self._index = store.index
        self._now = now
        self._path = str(store.directory / "cache.db")
        with self._db() as db:
            for statement in _SCHEMA:
                db.execute(statement)
        self._pulls: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._pulls_lock = threading.Lock()
        self._flushed = now()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    # reading entries without touching them

    def _rows(
        self, db: sqlite3.Connection, prefix: str, after: str | None = None, limit: int = -1
    ) -> list[_Row]:
        low, high = _range(prefix)
        op = ">"
        if after is None or after < low:
            after, op = low, ">="
        rows = db.execute(
            f"SELECT {_FIELDS} FROM Cache"
            f" WHERE key {op} ? AND key < ? AND raw = 1 ORDER BY key LIMIT ?",
            (after, high, limit),
        ).fetchall()
        return [_Row(*row) for row in rows]

    def _row(self, db: sqlite3.Connection, key: str) -> _Row | None:
        row = db.execute(
            f"SELECT {_FIELDS} FROM Cache WHERE key = ? AND raw = 1",
            (key,),
        ).fetchone()
        return _Row(*row) if row else None

    def _value(self, row: _Row) -> Any:
        return self._index.disk.fetch(row.mode, row.filename, row.value, False)

    def _manifest(self, db: sqlite3.Connection, digest: str) -> tuple[str, bytes, int] | None:
        row = self._row(db, f"manifest:{digest}")
        if row is None:
            return None
        media_type, body = self._value(row)
        return str(media_type), bytes(body), len(body)

    # images

    def _parts(self, db: sqlite3.Connection, digest: str) -> tuple[list[Part], list[Part]]:
        """The manifests (the root first) and blobs a manifest reaches."""
        manifests: list[Part] = []
        blobs: dict[str, Part] = {}
        todo: list[tuple[str, str, str | None]] = [(digest, "", None)]
        seen: set[str] = set()
        while todo:
            current, media_type, platform = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            found = self._manifest(db, current)
            if found is None:
                manifests.append(Part("manifest", current, media_type, 0, False, platform))
                continue
            media_type, body, size = found
            manifests.append(Part("manifest", current, media_type, size, True, platform))
            try:
                if is_index(media_type):
                    for child in children(body):
                        todo.append((str(child.digest), child.media_type, _platform(child)))
                    continue
                descriptors = referenced_blobs(body)
            except (ManifestInvalid, OCIError):
                continue  # an artifact or odd manifest: nothing more we can name
            for blob in descriptors:
                name = str(blob.digest)
                if name not in blobs:
                    row = db.execute(
                        "SELECT size FROM Cache WHERE key = ? AND raw = 1", (f"blob:{name}",)
                    ).fetchone()
                    cached = row is not None
                    blobs[name] = Part(
                        "blob", name, blob.media_type, row[0] if cached else blob.size, cached
                    )
        return manifests, list(blobs.values())

    def _keys_of(
        self, db: sqlite3.Connection, digest: str, seen: dict[str, dict[str, int]] | None = None
    ) -> dict[str, int]:
        """Cache keys (with sizes) of what a manifest reaches, cached or not (size 0);
        ``seen`` keeps the answers of one query (tags of a repository share digests)."""
        if seen is not None and digest in seen:
            return seen[digest]
        manifests, blobs = self._parts(db, digest)
        keys = {f"manifest:{m.digest}": m.size if m.cached else 0 for m in manifests}
        keys.update({f"blob:{b.digest}": b.size if b.cached else 0 for b in blobs})
        if seen is not None:
            seen[digest] = keys
        return keys

    def _tags(
        self, db: sqlite3.Connection, prefix: str, seen: dict[str, dict[str, int]] | None = None
    ) -> list[Tag]:
        """Tag records under a prefix, one per tag (the Accept lists merged)."""
        by_name: dict[tuple[str, str, str], list[tuple[_Row, tuple[Any, ...]]]] = {}
        for row in self._rows(db, prefix):
            upstream, repository, tag, _ = _parse_tag_key(row.key)
            by_name.setdefault((upstream, repository, tag), []).append((row, self._value(row)))
        pinned = self._pinned_keys(db)
        tags = []
        for (upstream, repository, tag), records in by_name.items():
            # The newest record says what the tag is now.
            row, (digest, media_type, checked_at) = max(records, key=lambda r: r[1][2])
            name = str(Digest(*digest))
            sizes = self._keys_of(db, name, seen)
            pulls, last = self._pull_count(db, upstream, repository, tag)
            tags.append(
                Tag(
                    upstream,
                    repository,
                    tag,
                    name,
                    media_type,
                    checked_at,
                    tuple(a for r, _ in records for a in _parse_tag_key(r.key)[3]),
                    sum(sizes.values()),
                    pulls,
                    last,
                    row.key in pinned,
                )
            )
        return tags

    def repositories(
        self,
        *,
        upstream: str | None = None,
        prefix: str = "",
        after: str | None = None,
        limit: int = 100,
    ) -> list[Repository]:
        """Cached repositories (those with a tag record) in name order, ``upstream/repository``,
        after the one named ``after``; each found by one seek on the key index."""
        start = f"tag:{upstream}/{prefix}" if upstream else f"tag:{prefix}"
        low, high = _range(start) if prefix or upstream else ("tag:", "tag;")
        cursor = low
        if after:
            cursor = max(cursor, f"tag:{after};")
        found: list[Repository] = []
        with self._db() as db:
            while len(found) < limit:
                row = db.execute(
                    "SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1"
                    " ORDER BY key LIMIT 1",
                    (cursor, high),
                ).fetchone()
                if row is None:
                    break
                up, repository, _, _ = _parse_tag_key(row[0])
                found.append(self._repository(db, up, repository))
                cursor = f"tag:{up}/{repository};"  # past every tag of this repository
        return found

    def _repository(self, db: sqlite3.Connection, upstream: str, repository: str) -> Repository:
        seen: dict[str, dict[str, int]] = {}
        tags = self._tags(db, tag_prefix(upstream, repository), seen)
        sizes: dict[str, int] = {}
        for tag in tags:
            sizes.update(self._keys_of(db, tag.digest, seen))
        pulls = sum(t.pulls for t in tags)
        lasts = [t.last_pull for t in tags if t.last_pull is not None]
        return Repository(
            upstream, repository, len(tags), sum(sizes.values()), pulls, max(lasts, default=None)
        )

    def tags(self, upstream: str, repository: str) -> list[Tag]:
        with self._db() as db:
            return self._tags(db, tag_prefix(upstream, repository))

    def blobs(self, *, after: str | None = None, limit: int = 100) -> list[BlobEntry]:
        with self._db() as db:
            pinned = self._pinned_keys(db)
            rows = self._rows(db, "blob:", f"blob:{after}" if after else None, limit)
        return [
            BlobEntry(r.key.removeprefix("blob:"), r.size, r.access_time, r.key in pinned)
            for r in rows
        ]

    def image(self, upstream: str, repository: str, reference: str) -> Image:
        """One image by tag or digest; NotCached when the cache holds no manifest for it."""
        with self._db() as db:
            tags: list[Tag] = []
            if reference.startswith(("sha256:", "sha512:")):
                digest = str(parse_digest(reference))
            else:
                tags = self._tags(db, tag_prefix(upstream, repository, reference))
                if not tags:
                    raise NotCached(f"{upstream}/{repository}:{reference} is not cached")
                digest = tags[0].digest
            manifests, blobs = self._parts(db, digest)
            if not manifests[0].cached:
                raise NotCached(f"manifest {digest} is not cached")
            pinned = self._pinned_keys(db)
        parts = [*manifests, *blobs]
        return Image(
            upstream,
            repository,
            reference,
            digest,
            manifests[0].media_type,
            tags,
            manifests,
            blobs,
            sum(p.size for p in parts if p.cached),
            f"manifest:{digest}" in pinned,
        )

    # purging

    def purge(
        self,
        kind: PurgeKind,
        *,
        upstream: str | None = None,
        repository: str | None = None,
        tag: str | None = None,
        digest: str | None = None,
        age: float | None = None,
    ) -> PurgeResult:
        """Delete tag records and what only they reach.

        A tag, repository or upstream purge deletes its tag records, then the
        manifests and blobs they reach that no other cached manifest references
        (a base layer shared with another image stays). A digest purge deletes that
        manifest (and what only it reaches) or blob. An age purge deletes every entry
        not used for ``age`` seconds, pinned ones excepted. Purged content is fetched
        again by the next pull. A purge of something pinned unpins it.
        """
        with self._db() as db:
            if kind == "age":
                assert age is not None
                return self._purge_age(db, age)
            if kind == "digest":
                assert digest is not None
                name = str(parse_digest(digest))
                if self._row(db, f"blob:{name}") is not None:
                    return self._delete(db, [f"blob:{name}"])
                if self._row(db, f"manifest:{name}") is None:
                    raise NotCached(f"{name} is not cached")
                return self._purge_roots(db, [], {name}, forced=f"manifest:{name}")
            assert upstream is not None
            if kind == "upstream":
                prefix = tag_prefix(upstream)
            elif kind == "repository":
                assert repository is not None
                prefix = tag_prefix(upstream, repository)
            else:
                assert repository is not None and tag is not None
                prefix = tag_prefix(upstream, repository, tag)
            rows = self._rows(db, prefix)
            if not rows:
                raise NotCached(f"nothing cached under {prefix.removeprefix('tag:')}")
            roots = {str(Digest(*self._value(r)[0])) for r in rows}
            return self._purge_roots(db, [r.key for r in rows], roots)

    def _purge_roots(
        self,
        db: sqlite3.Connection,
        tag_keys: list[str],
        roots: set[str],
        forced: str | None = None,
    ) -> PurgeResult:
        """Delete the tag records, ``forced``, and what the roots reach that nothing
        staying uses: no manifest outside the purge references it, no other tag record
        names it."""
        doomed: set[str] = set()
        for root in roots:
            doomed.update(k for k, size in self._keys_of(db, root).items() if size)
        doomed_tags = set(tag_keys)
        changed = True
        while changed:  # what stays keeps what it references: until nothing moves
            changed = False
            for key in sorted(doomed):
                if key != forced and self._used_elsewhere(db, key, doomed, doomed_tags):
                    doomed.discard(key)
                    changed = True
        return self._delete(db, [*tag_keys, *sorted(doomed)])

    def _used_elsewhere(
        self, db: sqlite3.Connection, key: str, doomed: set[str], doomed_tags: set[str]
    ) -> bool:
        # A digest's hex appears verbatim in every manifest that references it and in
        # every tag record naming it (pickled): a byte search in SQLite, no parsing.
        # A chance match elsewhere in a document only keeps an entry, never loses one.
        needle = key.rpartition(":")[2].encode()
        ranges = [("manifest:", doomed)]
        if key.startswith("manifest:"):
            ranges.append(("tag:", doomed_tags))
        for prefix, going in ranges:
            low, high = _range(prefix)
            users = db.execute(
                "SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1"
                " AND instr(value, ?) > 0",
                (low, high, needle),
            ).fetchall()
            if any(user not in going and user != key for (user,) in users):
                return True
        return False

    def _purge_age(self, db: sqlite3.Connection, age: float) -> PurgeResult:
        cutoff = time.time() - age  # diskcache's access times are wall-clock
        rows = db.execute(
            "SELECT key FROM Cache WHERE access_time < ? AND raw = 1 AND"
            " (key >= 'blob:' AND key < 'blob;' OR key >= 'manifest:' AND key < 'manifest;'"
            " OR key >= 'tag:' AND key < 'tag;')"
            " AND NOT EXISTS (SELECT 1 FROM Pinned WHERE Pinned.key = Cache.key)",
            (cutoff,),
        ).fetchall()
        return self._delete(db, [key for (key,) in rows])

    def _delete(self, db: sqlite3.Connection, keys: Iterable[str]) -> PurgeResult:
        result = PurgeResult()
        for key in keys:
            row = self._row(db, key)
            if row is None or not self._index.delete(key, retry=True):
                continue
            result.keys.append(key)
            kind = key.partition(":")[0]
            if kind == "tag":
                result.tags += 1
                continue
            result.freed += row.size
            if kind == "manifest":
                result.manifests += 1
            else:
                result.blobs += 1
        if result.keys:
            self.store.purged()
            self._unpin_deleted(db, result.keys)
        return result

    def expire_tag(self, upstream: str, repository: str, tag: str) -> list[tuple[str, ...]]:
        """Make a tag's records due for revalidation (their upstream check long ago),
        keeping them to serve stale if the upstream fails; the Accept lists they are for."""
        with self._db() as db:
            rows = self._rows(db, tag_prefix(upstream, repository, tag))
        for row in rows:
            digest, media_type, _ = self._value(row)
            self._index.set(row.key, (digest, media_type, 0.0))
        if rows:
            self.store.purged()
        return [_parse_tag_key(row.key)[3] for row in rows]

    # pinning

    def _pinned_keys(self, db: sqlite3.Connection) -> set[str]:
        return {key for (key,) in db.execute("SELECT key FROM Pinned")}

    def pins(self) -> list[tuple[str, str, str, str]]:
        """(upstream, repository, reference, digest) of every pin."""
        with self._db() as db:
            rows = db.execute(
                "SELECT upstream, repository, reference, digest FROM Pins ORDER BY 1, 2, 3"
            ).fetchall()
        return [tuple(r) for r in rows]

    def pin(self, upstream: str, repository: str, reference: str) -> Image:
        """Keep an image (its tag records, manifests and blobs, also those of platforms
        not pulled yet) out of eviction. Pins what the tag names now."""
        image = self.image(upstream, repository, reference)
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO Pins VALUES (?, ?, ?, ?, ?)",
                (upstream, repository, reference, image.digest, self._now()),
            )
            self._rebuild_pinned(db)
        return self.image(upstream, repository, reference)

    def unpin(self, upstream: str, repository: str, reference: str) -> bool:
        with self._db() as db:
            gone = db.execute(
                "DELETE FROM Pins WHERE upstream = ? AND repository = ? AND reference = ?",
                (upstream, repository, reference),
            ).rowcount
            self._rebuild_pinned(db)
        return bool(gone)

    def _pin_keys(self, db: sqlite3.Connection) -> set[str]:
        keys: set[str] = set()
        pins = db.execute("SELECT upstream, repository, reference, digest FROM Pins").fetchall()
        for upstream, repository, reference, digest in pins:
            keys.update(self._keys_of(db, digest))
            if not reference.startswith(("sha256:", "sha512:")):
                keys.update(
                    r.key for r in self._rows(db, tag_prefix(upstream, repository, reference))
                )
        return keys

    def _rebuild_pinned(self, db: sqlite3.Connection) -> None:
        keys = self._pin_keys(db)
        with _transaction(db):
            db.execute("DELETE FROM Pinned")
            db.executemany("INSERT OR IGNORE INTO Pinned VALUES (?)", [(k,) for k in keys])

    def _unpin_deleted(self, db: sqlite3.Connection, keys: list[str]) -> None:
        """Pins whose root manifest or tag record was purged go; the rest hold."""
        gone = set(keys)
        pins = db.execute("SELECT upstream, repository, reference, digest FROM Pins").fetchall()
        dropped = False
        for upstream, repository, reference, digest in pins:
            if f"manifest:{digest}" in gone or (
                not reference.startswith(("sha256:", "sha512:"))
                and any(k.startswith(tag_prefix(upstream, repository, reference)) for k in gone)
            ):
                db.execute(
                    "DELETE FROM Pins WHERE upstream = ? AND repository = ? AND reference = ?",
                    (upstream, repository, reference),
                )
                dropped = True
        if dropped:
            self._rebuild_pinned(db)

    # pull counts

    def record_pull(self, upstream: str, repository: str, reference: str) -> bool:
        """Count a manifest pull in memory; True when the counts are due to be flushed."""
        with self._pulls_lock:
            key = (upstream, repository, reference)
            count, _ = self._pulls.get(key, (0, 0.0))
            self._pulls[key] = (count + 1, self._now())
            return self._now() - self._flushed >= _FLUSH_SECONDS

    def flush_pulls(self) -> None:
        """Add the counts kept in memory to ``Pulls`` (workers add theirs alike)."""
        with self._pulls_lock:
            pulls, self._pulls = self._pulls, {}
            self._flushed = self._now()
        if not pulls:
            return
        # One transaction: each row its own (autocommit) took 0.3 s for 1,000 tags.
        with self._db() as db, _transaction(db):
            db.executemany(
                "INSERT INTO Pulls VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " count = count + excluded.count, last = max(last, excluded.last)",
                [(*key, count, last) for key, (count, last) in pulls.items()],
            )

    def _pull_count(
        self, db: sqlite3.Connection, upstream: str, repository: str, reference: str
    ) -> tuple[int, float | None]:
        row = db.execute(
            "SELECT count, last FROM Pulls WHERE upstream = ? AND repository = ? AND reference = ?",
            (upstream, repository, reference),
        ).fetchone()
        with self._pulls_lock:
            count, last = self._pulls.get((upstream, repository, reference), (0, None))
        if row is not None:
            count += row[0]
            last = max(last or 0.0, row[1])
        return count, last

    def top(self, limit: int = 10) -> list[tuple[str, str, str, int, float]]:
        """The most pulled references: (upstream, repository, reference, pulls, last)."""
        self.flush_pulls()
        with self._db() as db:
            rows = db.execute(
                "SELECT upstream, repository, reference, count, last FROM Pulls"
                " ORDER BY count DESC, last DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [tuple(r) for r in rows]


def _platform(descriptor: Descriptor) -> str | None:
    return str(descriptor.platform) if descriptor.platform is not None else None
