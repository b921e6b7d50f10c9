"""Pins across replicas: an image pinned on any replica stays in the bucket, whatever
the bucket's eviction would pick.

A pin is a record in Redis (what was pinned: a tag or a digest, and the digest it
named then); the objects it reaches (its manifests, those of every platform of an
index, their blobs) are Redis's pinned set, whose members have +inf as their last use:
no eviction round picks them and no touch moves them. The set is rebuilt from the
pins whenever it may have changed: at each pin and unpin, and by the evictor before a
round that deletes (a platform pulled after the pin brings its blobs under it then).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ManifestInvalid, OCIError
from ..images import children, is_index, referenced_blobs
from ..reference import Digest, parse_digest
from .shared import Shared

__all__ = ["FleetPin", "FleetPins", "NotInBucket"]


class NotInBucket(LookupError):
    """The image to pin has no record or no manifest in the shared store."""


@dataclass(frozen=True)
class FleetPin:
    upstream: str
    repository: str
    reference: str  # a tag, or a digest
    digest: str  # what it named when pinned
    created: float

    @property
    def name(self) -> str:
        return f"{self.upstream}/{self.repository}:{self.reference}"


class FleetPins:
    """The pins every replica shares, and the objects they keep in the bucket."""

    def __init__(self, shared: Shared, now: Callable[[], float] = time.time) -> None:
        self._shared = shared
        self._records = shared.records
        self._now = now

    async def pins(self) -> list[FleetPin]:
        found = await self._records.pins()
        pins = [
            FleetPin(
                str(p["upstream"]),
                str(p["repository"]),
                str(p["reference"]),
                str(p["digest"]),
                float(str(p["created"])),
            )
            for p in found.values()
        ]
        return sorted(pins, key=lambda p: (p.upstream, p.repository, p.reference))

    async def pin(self, upstream: str, repository: str, reference: str) -> tuple[FleetPin, int]:
        """Pin what ``reference`` names now; the pin and the bytes it keeps in the bucket."""
        digest = await self._digest(upstream, repository, reference)
        if await self._manifest(digest) is None:
            raise NotInBucket(f"manifest {digest} is not in the bucket")
        pin = FleetPin(upstream, repository, reference, str(digest), self._now())
        await self._records.put_pin(pin.name, dataclasses.asdict(pin))
        await self.rebuild()
        sizes = await self._records.objects(sorted(await self.reachable(digest)))
        return pin, sum(size or 0 for size, _, _ in sizes)

    async def unpin(self, upstream: str, repository: str, reference: str) -> bool:
        name = FleetPin(upstream, repository, reference, "", 0.0).name
        gone = await self._records.delete_pin(name)
        if gone:
            await self.rebuild()
        return gone

    async def rebuild(self) -> set[str]:
        """Make Redis's pinned set what the pins reach now; returns it."""
        keys: set[str] = set()
        for pin in await self.pins():
            keys |= await self.reachable(parse_digest(pin.digest))
        await self._records.set_pinned(keys)
        return keys

    async def reachable(self, digest: Digest) -> set[str]:
        """The object keys of a manifest, of the manifests an index names (in the bucket
        or not), and of the blobs of those in the bucket."""
        keys: set[str] = set()
        todo = [digest]
        while todo:
            current = todo.pop()
            if str(current) in keys:
                continue
            keys.add(str(current))
            found = await self._manifest(current)
            if found is None:
                continue
            media_type, body = found
            try:
                if is_index(media_type):
                    todo += [child.digest for child in children(body)]
                else:
                    keys.update(str(blob.digest) for blob in referenced_blobs(body))
            except (ManifestInvalid, OCIError):
                continue  # an artifact we cannot read further: its manifest stays pinned
        return keys

    async def _manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        return await self._shared.in_bucket(lambda: self._shared.objects.get_manifest(digest))

    async def _digest(self, upstream: str, repository: str, reference: str) -> Digest:
        if reference.startswith(("sha256:", "sha512:")):
            return parse_digest(reference)
        records = await self._records.tag_records(upstream, repository, reference)
        if not records:
            raise NotInBucket(f"{upstream}/{repository}:{reference} is not cached")
        return max(records, key=lambda r: r.checked_at).digest
