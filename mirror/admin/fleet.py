"""The admin operations of a replica (``storage.backend = "s3"``): about the bucket and
the records every replica shares, not about this replica's hot tier.

Pins are the fleet's (``replicas/pins.py``); the status adds the bucket's figures.
What still reads or changes one replica's hot tier only (listings of repositories,
tags, images and blobs; purge; verify; refresh) is refused with an error saying so,
rather than giving a partial answer as if it were the fleet's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..errors import ManifestUnknown, Unavailable, Unsupported
from ..replicas.pins import FleetPins, NotInBucket
from ..replicas.shared import Shared
from ..storage.base import StorageError

__all__ = ["FleetAdmin", "hot_tier_only"]

log = logging.getLogger("mirror.admin")


def hot_tier_only(what: str) -> Unsupported:
    """The error for an operation that would act on one replica's hot tier only."""
    return Unsupported(
        f"{what} reads or changes this replica's hot tier only, not the shared bucket "
        '(storage.backend = "s3"): not available on replicas yet'
    )


class FleetAdmin:
    """Pins and figures of the shared bucket, as JSON-ready dicts."""

    def __init__(self, shared: Shared, count: Callable[[str, str], None]) -> None:
        self.shared = shared
        self.pins = FleetPins(shared)
        self._count = count

    async def list_pins(self) -> dict[str, Any]:
        try:
            pins = await self.pins.pins()
        except StorageError as exc:
            raise Unavailable(f"the shared records cannot be read: {exc}") from None
        return {
            "pins": [
                {
                    "upstream": p.upstream,
                    "repository": p.repository,
                    "reference": p.reference,
                    "digest": p.digest,
                }
                for p in pins
            ]
        }

    async def pin(
        self, who: str, ref: str, upstream: str, repository: str, reference: str
    ) -> dict[str, Any]:
        try:
            pin, size = await self.pins.pin(upstream, repository, reference)
        except NotInBucket as exc:
            self._count("pin", "not_found")
            raise ManifestUnknown(f"{exc}: pull or warm it first") from None
        except StorageError as exc:
            raise Unavailable(f"could not pin {ref}: {exc}") from None
        self._count("pin", "done")
        log.info("admin %s pinned %s on every replica (%s, %d bytes)", who, ref, pin.digest, size)
        return {"pinned": ref, "digest": pin.digest, "size": size}

    async def unpin(
        self, who: str, ref: str, upstream: str, repository: str, reference: str
    ) -> dict[str, Any]:
        try:
            gone = await self.pins.unpin(upstream, repository, reference)
        except StorageError as exc:
            raise Unavailable(f"could not unpin {ref}: {exc}") from None
        if not gone:
            self._count("unpin", "not_found")
            raise ManifestUnknown(f"{ref} is not pinned")
        self._count("unpin", "done")
        log.info("admin %s unpinned %s on every replica", who, ref)
        return {"unpinned": ref}

    async def status(self) -> dict[str, Any]:
        """The bucket's size, cap, objects and pins (None where Redis cannot say)."""
        records = self.shared.records
        size: int | None = None
        objects: int | None = None
        pins: int | None = None
        try:
            size, objects = await records.total_size(), await records.object_count()
            pins = len(await records.pins())
        except StorageError:
            pass  # Redis cannot say now
        return {
            "bucket": {"size": size, "max_size": self.shared.settings.max_size, "objects": objects},
            "pins": pins,
        }
