"""The records replicas share, in Redis: tags, tag lists, referrers, remembered 404s,
the catalog, which repositories hold which digests, leases, and the access and size
bookkeeping that eviction across replicas reads.

Redis is a helper, not a dependency of serving: when it cannot be reached every call
raises ``StorageUnavailable`` within the short socket timeouts, and after a failure
the next calls fail at once for a moment (a circuit breaker) instead of each paying a
timeout; the outage is logged once, and the first call after the pause that gets an
answer closes the breaker again. The caller decides what an outage means (serve from
the shared store, fill without coordination).

Every key starts with the configured prefix, so several mirrors (or tests) can share
one Redis. Run Redis with ``maxmemory-policy noeviction`` (its default): an evicted
lease or size counter would be a silent lie, a refused write is an error the caller sees.
Keys, below the prefix::

    tag:{upstream}/{repository}:{tag}|{accept}   hash: digest, media_type, checked_at
    tags:{upstream}/{repository}                 JSON list of tag names
    referrers:{upstream}/{repository}@{digest}   hash: body, fetched_at
    missing:{key}                                "1", expiring (PX)
    catalog                                      sorted set, all scores 0: lexical order
    held:{upstream}/{repository}                 hash: digest -> 1 held, 2 references noted
    lease:{name}                                 "{token} {owner}", expiring (PX)
    objects:size                                 hash: object key -> bytes
    objects:bytes                                the sum of objects:size
    objects:used                                 sorted set: object key -> last use (seconds)
    objects:pinned                               set of object keys eviction leaves alone
    pins                                         hash: pinned reference -> JSON of the pin
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from ..breaker import CircuitBreaker
from ..reference import Digest
from .base import StorageError, StorageFull, StorageUnavailable, TagRecord

__all__ = ["RedisLease", "RedisRecords", "RedisSettings", "redacted"]

log = logging.getLogger("mirror.storage.redis")

T = TypeVar("T")

# Failures in a row before Redis is left alone for ``retry_after``: one refused
# connection may be a restart's instant, three are an outage.
_FAILURES = 3
_HELD = b"1"
_EXPANDED = b"2"

# The size bookkeeping: KEYS sizes, total, used, pinned. A pinned object's last use
# is +inf: no eviction picks it, no touch moves it.
_RECORD_OBJECT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) - (tonumber(old) or 0))
local at = ARGV[3]
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then at = 'inf' end
redis.call('ZADD', KEYS[3], 'GT', at, ARGV[1])
"""
# Replaces the pinned set (KEYS pinned, used; ARGV now, keys…): objects unpinned are
# used now (a fresh start in the eviction order), objects pinned are used at +inf.
_SET_PINNED = """
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not wanted[key] then
    redis.call('SREM', KEYS[1], key)
    redis.call('ZADD', KEYS[2], 'XX', ARGV[1], key)
  end
end
for i = 2, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', 'inf', ARGV[i])
end
"""
# Forgets an object unless it was used at or after ARGV[2] (when given): the evictor
# picked it as old, and a replica may have read it since.
_FORGET_OBJECT = """
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return false end
if ARGV[2] ~= '' then
  local used = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if used and tonumber(used) >= tonumber(ARGV[2]) then return false end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[2], size)
redis.call('ZREM', KEYS[3], ARGV[1])
return tonumber(size)
"""
_LEAST_RECENT = """
local keys = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, key in ipairs(keys) do
  local size = redis.call('HGET', KEYS[1], key)
  if size then
    out[#out + 1] = key
    out[#out + 1] = size
  end
end
return out
"""
# A lease's value is "{token} {owner}": only the holder of that very acquisition
# (not a later one by the same owner) may extend or drop it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class RedisSettings:
    url: str  # redis://[user:password@]host:port/db, or rediss:// for TLS
    prefix: str = "mirror:"
    connect_timeout: float = 0.5
    timeout: float = 1.0  # for each command's answer
    retry_after: float = 2.0  # how long Redis is left alone after it failed
    max_connections: int = 32  # per process


def redacted(url: str) -> str:
    """The URL without user name and password, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _digest(text: str) -> Digest | None:
    algorithm, sep, hex_ = text.partition(":")
    return Digest(algorithm, hex_) if sep and algorithm and hex_ else None


class RedisLease:
    """A lease held in Redis; see ``RedisRecords.acquire``."""

    def __init__(self, records: RedisRecords, name: str, owner: str, value: str, ttl: int) -> None:
        self.name = name
        self.owner = owner
        self._records = records
        self._value = value
        self._ttl = ttl  # milliseconds

    async def renew(self) -> bool:
        try:
            return bool(await self._records._renew(self.name, self._value, self._ttl))
        except StorageError:
            return False

    async def release(self) -> None:
        try:
            await self._records._release(self.name, self._value)
        except StorageError as exc:  # it expires by itself
            log.debug("could not release lease %s: %s", self.name, exc)


class RedisRecords:
    """``MetadataStore`` on Redis, and what replicas share beyond it."""

    def __init__(self, settings: RedisSettings, *, now: Callable[[], float] = time.time) -> None:
        self._prefix = settings.prefix
        self._now = now
        self.where = redacted(settings.url)
        # Bounded: a burst of requests queues for a connection (Redis answers one
        # command at a time anyway) instead of opening hundreds of sockets at once.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.timeout,
            # A retry would double the cost of an outage; the breaker decides when to try again.
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        self._retry_after = settings.retry_after
        self._breaker = CircuitBreaker(_FAILURES, settings.retry_after)
        self._down = False
        self._record_object = self._client.register_script(_RECORD_OBJECT)
        self._forget_object = self._client.register_script(_FORGET_OBJECT)
        self._least_recent = self._client.register_script(_LEAST_RECENT)
        self._renew_script = self._client.register_script(_RENEW)
        self._release_script = self._client.register_script(_RELEASE)
        self._set_pinned = self._client.register_script(_SET_PINNED)
        objects = f"{self._prefix}objects"
        self._object_keys = [
            f"{objects}:size",
            f"{objects}:bytes",
            f"{objects}:used",
            f"{objects}:pinned",
        ]

    async def aclose(self) -> None:
        await self._client.aclose()

    def _key(self, *parts: str) -> str:
        return self._prefix + "".join(parts)

    async def _run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation through the breaker, translating its failures."""
        probe = self._breaker.state == "half-open"
        if not self._breaker.allow():
            raise StorageUnavailable(f"Redis at {self.where} is not answering; retrying shortly")
        try:
            result = await operation()
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,  # a replica, after a failover
            OSError,
        ) as exc:
            self._failed(exc)
            raise StorageUnavailable(f"Redis at {self.where}: {exc}") from exc
        except redis.exceptions.OutOfMemoryError as exc:
            self._answered()
            raise StorageFull(f"Redis at {self.where}: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            self._answered()
            raise StorageError(f"Redis at {self.where}: {exc}") from exc
        except BaseException:
            if probe:  # cancelled while probing: let a later call probe again
                self._breaker.failed()
            raise
        self._answered()
        return result

    def _failed(self, exc: Exception) -> None:
        self._breaker.failed()
        if not self._down:
            self._down = True
            log.warning(
                "Redis at %s unreachable (%s); working without it, retrying every %.1f s",
                self.where,
                exc,
                self._retry_after,
            )

    def _answered(self) -> None:
        self._breaker.succeeded()
        if self._down:
            self._down = False
            log.info("Redis at %s answers again", self.where)

    async def ping(self) -> bool:
        """Does Redis answer now? For readiness; never raises."""
        try:
            return bool(await self._run(self._client.ping))
        except StorageError:
            return False

    # tags

    def _tag_key(self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]) -> str:
        return self._key("tag:", f"{upstream}/{repository}:{tag}|{','.join(accept)}")

    async def get_tag(
        self, upstream: str, repository: str, tag: str, accept: tuple[str, ...]
    ) -> TagRecord | None:
        key = self._tag_key(upstream, repository, tag, accept)
        digest, media_type, checked_at = await self._run(
            lambda: self._client.hmget(key, ["digest", "media_type", "checked_at"])
        )
        if digest is None or media_type is None or checked_at is None:
            return None
        parsed = _digest(_text(digest))
        if parsed is None:  # not ours: a miss, overwritten by the next fill
            return None
        return TagRecord(parsed, _text(media_type), float(checked_at))

    async def put_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        digest: Digest,
        media_type: str,
    ) -> None:
        key = self._tag_key(upstream, repository, tag, accept)
        record: dict[FieldT, EncodableT] = {
            "digest": str(digest),
            "media_type": media_type,
            "checked_at": repr(self._now()),
        }
        await self._run(lambda: self._client.hset(key, mapping=record))

    async def get_tag_list(self, upstream: str, repository: str) -> list[str] | None:
        value = await self._run(
            lambda: self._client.get(self._key("tags:", upstream, "/", repository))
        )
        if value is None:
            return None
        try:
            tags = json.loads(value)
        except ValueError:
            return None
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            return None
        return tags

    async def put_tag_list(self, upstream: str, repository: str, tags: list[str]) -> None:
        key = self._key("tags:", upstream, "/", repository)
        body = json.dumps(tags)
        await self._run(lambda: self._client.set(key, body))

    # referrers

    def _referrers_key(self, upstream: str, repository: str, digest: Digest) -> str:
        return self._key("referrers:", f"{upstream}/{repository}@{digest}")

    async def get_referrers(
        self, upstream: str, repository: str, digest: Digest
    ) -> tuple[bytes, float] | None:
        key = self._referrers_key(upstream, repository, digest)
        body, fetched_at = await self._run(lambda: self._client.hmget(key, ["body", "fetched_at"]))
        if body is None or fetched_at is None:
            return None
        return _bytes(body), float(fetched_at)

    async def put_referrers(
        self, upstream: str, repository: str, digest: Digest, body: bytes
    ) -> None:
        key = self._referrers_key(upstream, repository, digest)
        record: dict[FieldT, EncodableT] = {"body": body, "fetched_at": repr(self._now())}
        await self._run(lambda: self._client.hset(key, mapping=record))

    # remembered 404s

    async def put_missing(self, key: str, ttl: float) -> None:
        if ttl > 0:
            name = self._key("missing:", key)
            await self._run(lambda: self._client.set(name, b"1", px=_milliseconds(ttl)))

    async def is_missing(self, key: str) -> bool:
        return bool(await self._run(lambda: self._client.exists(self._key("missing:", key))))

    # catalog

    async def add_repository(self, name: str) -> None:
        await self._run(lambda: self._client.zadd(self._key("catalog"), {name: 0}, nx=True))

    async def repositories(self, after: str | None, limit: int) -> list[str]:
        if limit <= 0:
            return []
        start = "-" if after is None else f"({after}"
        names = await self._run(
            lambda: self._client.zrangebylex(self._key("catalog"), start, "+", 0, limit)
        )
        return [_text(name) for name in names]

    # holdings: which repositories hold which digests

    def _held_key(self, upstream: str, repository: str) -> str:
        return self._key("held:", upstream, "/", repository)

    async def note_holding(self, upstream: str, repository: str, *digests: Digest) -> None:
        """The repository holds these digests (one round trip for all)."""
        if not digests:
            return
        key = self._held_key(upstream, repository)

        async def note() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hsetnx(key, str(digest), _HELD)  # an expanded record stays expanded
                await pipe.execute()

        await self._run(note)

    async def note_manifest(
        self, upstream: str, repository: str, digest: Digest, references: Iterable[Digest]
    ) -> None:
        """The repository holds the manifest and what it references, in one transaction:
        a manifest marked expanded has its references recorded."""
        key = self._held_key(upstream, repository)

        async def note() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                for reference in references:
                    pipe.hsetnx(key, str(reference), _HELD)
                pipe.hset(key, str(digest), _EXPANDED)
                await pipe.execute()

        await self._run(note)

    async def holds(self, upstream: str, repository: str, digest: Digest) -> bool:
        key = self._held_key(upstream, repository)
        return bool(await self._run(lambda: self._client.hexists(key, str(digest))))

    async def expanded(self, upstream: str, repository: str, digest: Digest) -> bool:
        """Were the references of this manifest recorded for the repository?"""
        key = self._held_key(upstream, repository)
        return await self._run(lambda: self._client.hget(key, str(digest))) == _EXPANDED

    # leases

    async def acquire(self, name: str, owner: str, ttl_seconds: float) -> RedisLease | None:
        """The lease on ``name`` for ``ttl_seconds``, or None when another holds it.

        Raises ``StorageUnavailable`` when Redis cannot say: the caller goes on alone.
        A lease is no fence: a holder paused past its TTL may still act, so what it
        writes must be safe to write twice (content by digest is).
        """
        value = f"{secrets.token_hex(16)} {owner}"
        ttl = _milliseconds(ttl_seconds)
        key = self._key("lease:", name)
        taken = await self._run(lambda: self._client.set(key, value, nx=True, px=ttl))
        return RedisLease(self, name, owner, value, ttl) if taken else None

    async def holder(self, name: str) -> str | None:
        """The owner of the lease on ``name`` now, or None."""
        value = await self._run(lambda: self._client.get(self._key("lease:", name)))
        return None if value is None else _text(value).partition(" ")[2]

    async def _renew(self, name: str, value: str, ttl: int) -> bool:
        key = self._key("lease:", name)
        return bool(await self._run(lambda: self._renew_script(keys=[key], args=[value, ttl])))

    async def _release(self, name: str, value: str) -> None:
        key = self._key("lease:", name)
        await self._run(lambda: self._release_script(keys=[key], args=[value]))

    # access and size bookkeeping for eviction across replicas

    async def record_object(self, key: str, size: int, used_at: float | None = None) -> None:
        """An object of ``size`` bytes is stored under ``key`` (again: its size is
        replaced), used now or at ``used_at``."""
        at = self._now() if used_at is None else used_at
        await self._run(
            lambda: self._record_object(keys=self._object_keys, args=[key, size, repr(at)])
        )

    async def forget_object(self, key: str, unless_used_since: float | None = None) -> int | None:
        """Drop an object from the bookkeeping; returns its size, or None when it was not
        recorded or, with ``unless_used_since``, was used at or after that time (then it
        stays: an evictor's pick that a replica read meanwhile)."""
        since = "" if unless_used_since is None else repr(unless_used_since)
        size = await self._run(
            lambda: self._forget_object(keys=self._object_keys, args=[key, since])
        )
        return None if size is None else int(size)

    async def touch_many(self, times: Mapping[str, float]) -> None:
        """Record uses (key -> time) in one command; only recorded objects, and only
        forward: an older time from a slower replica does not undo a newer one."""
        if times:
            used = self._object_keys[2]
            await self._run(lambda: self._client.zadd(used, dict(times), xx=True, gt=True))

    async def total_size(self) -> int:
        """Bytes of all recorded objects."""
        value = await self._run(lambda: self._client.get(self._object_keys[1]))
        return 0 if value is None else int(value)

    async def least_recent(self, limit: int, older_than: float) -> list[tuple[str, int]]:
        """Up to ``limit`` (key, size) of objects last used before ``older_than``, the least
        recently used first."""
        if limit <= 0:
            return []
        flat = await self._run(
            lambda: self._least_recent(keys=self._object_keys, args=[repr(older_than), limit])
        )
        return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def objects(self, keys: list[str]) -> list[tuple[int | None, float | None, bool]]:
        """(size, last use, pinned) of each object key; None where it is not recorded."""
        sizes, used, pinned = self._object_keys[0], self._object_keys[2], self._object_keys[3]

        async def read() -> list[object]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(sizes, keys)
            pipe.zmscore(used, keys)
            pipe.smismember(pinned, keys)
            return list(await pipe.execute())

        if not keys:
            return []
        got_sizes, got_used, got_pinned = await self._run(read)
        return [
            (None if size is None else int(size), when, bool(pin))
            for size, when, pin in zip(got_sizes, got_used, got_pinned, strict=True)  # type: ignore[call-overload]
        ]

    async def object_count(self) -> int:
        """How many objects are recorded."""
        return int(await self._run(lambda: self._client.hlen(self._object_keys[0])))

    # pins: what eviction across replicas leaves alone

    async def put_pin(self, name: str, pin: Mapping[str, object]) -> None:
        await self._run(lambda: self._client.hset(self._key("pins"), name, json.dumps(pin)))

    async def delete_pin(self, name: str) -> bool:
        return bool(await self._run(lambda: self._client.hdel(self._key("pins"), name)))

    async def pins(self) -> dict[str, dict[str, object]]:
        """Every pin, by name."""
        found = await self._run(lambda: self._client.hgetall(self._key("pins")))
        return {_text(name): json.loads(value) for name, value in found.items()}

    async def set_pinned(self, keys: Iterable[str]) -> None:
        """The object keys pins reach, all of them: the others are pinned no more."""
        pinned, used = self._object_keys[3], self._object_keys[2]
        args = [repr(self._now()), *sorted(set(keys))]
        await self._run(lambda: self._set_pinned(keys=[pinned, used], args=args))

    async def tag_records(self, upstream: str, repository: str, tag: str) -> list[TagRecord]:
        """The records of a tag, one per Accept list it was asked with."""
        pattern = self._tag_key(upstream, repository, tag, ()).replace("*", "\\*") + "*"

        async def scan() -> list[bytes]:
            return [key async for key in self._client.scan_iter(match=pattern, count=1000)]

        records = []
        for key in await self._run(scan):
            accept = _text(key).rpartition("|")[2]
            record = await self.get_tag(upstream, repository, tag, tuple(accept.split(",")))
            if record is not None:
                records.append(record)
        return records
