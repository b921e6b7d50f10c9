"""``mirror warm``: fill the cache ahead of time, through the same store,
single-flight and verification as serving.

A server running on the same cache directory is fine: a blob it is filling is
followed through its lock, not fetched twice.

With a replica's config (``storage.backend = "s3"``) the cache is the fleet's: what
warm fetches goes into the bucket and the shared records (the fill stores it there
before it ends), so that every replica serves it; a blob the bucket holds already is
counted as present, not downloaded.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from tqdm import tqdm

from .errors import OCIError
from .images import Descriptor, Platform, children, is_index, referenced_blobs
from .manifest import MANIFEST_TYPES
from .reference import Digest, ImageReference, parse_digest
from .service import PullThroughCache
from .upstream.client import Upstream

__all__ = ["WarmSummary", "warm"]


@dataclass
class WarmSummary:
    images: int = 0
    manifests: int = 0
    referrers: int = 0
    blobs: int = 0
    bytes_fetched: int = 0
    bytes_present: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.images} images, {self.manifests} manifests, {self.blobs} blobs"
            + (f", {self.referrers} referrers" if self.referrers else "")
            + ": "
            f"{_size(self.bytes_fetched)} fetched, {_size(self.bytes_present)} already present"
            + (f", {len(self.failures)} failed" if self.failures else "")
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class _Image:
    """Warming one reference: its manifests, then its blobs, with a progress bar."""

    def __init__(
        self,
        cache: PullThroughCache,
        reference: ImageReference,
        platforms: list[Platform] | None,
        blob_slots: asyncio.Semaphore,
        summary: WarmSummary,
        total_bar: tqdm[NoReturn] | None,
    ) -> None:
        self.cache = cache
        self.reference = reference
        self.platforms = platforms
        self.blob_slots = blob_slots
        self.summary = summary
        self.total_bar = total_bar
        self.bar: tqdm[NoReturn] | None = None
        self.layers_total = self.layers_done = 0

    async def run(self) -> None:
        upstream, repository = self.cache.route(self.reference.path_name)
        top = await self.cache.get_manifest(
            upstream, repository, self.reference.reference, MANIFEST_TYPES
        )
        self._count_manifest(top.result, len(top.body))
        images = [top.body]
        if is_index(top.media_type):
            wanted = [
                child
                for child in children(top.body)
                if self.platforms is None
                or (child.platform and any(p.matches(child.platform) for p in self.platforms))
            ]
            if not wanted:
                choices = ", ".join(str(c.platform) for c in children(top.body) if c.platform)
                raise ValueError(f"no manifest for the platforms asked for (it has {choices})")
            images = []
            for child in wanted:
                manifest = await self.cache.get_manifest(
                    upstream, repository, child.digest, MANIFEST_TYPES
                )
                self._count_manifest(manifest.result, len(manifest.body))
                images.append(manifest.body)
        blobs = {d.digest: d for body in images for d in referenced_blobs(body)}
        blobs.update(await self._referrers(upstream, repository, top.digest))
        total = sum(d.size for d in blobs.values())
        self.layers_total = len(blobs)
        if self.total_bar is not None:
            self.total_bar.total = (self.total_bar.total or 0) + total
            self.total_bar.refresh()
            self.bar = tqdm(
                total=total, desc=str(self.reference), unit="B", unit_scale=True, leave=True
            )
            self.bar.set_postfix_str(f"blobs 0/{len(blobs)}")
        try:
            await asyncio.gather(*(self._blob(upstream, repository, d) for d in blobs.values()))
        finally:
            if self.bar is not None:
                self.bar.close()
        self.summary.images += 1
        if self.total_bar is None:
            print(f"warmed {self.reference}: {len(blobs)} blobs, {_size(total)}", flush=True)

    async def _referrers(
        self, upstream: Upstream, repository: str, subject: Digest
    ) -> dict[Digest, Descriptor]:
        """The image's signatures, SBOMs and attestations, and the blobs they need, so
        that they verify on the far side of an air gap too."""
        answer = await self.cache.get_referrers(upstream, repository, subject, None)
        blobs: dict[Digest, Descriptor] = {}
        for referrer in answer.manifests:
            try:
                digest = parse_digest(str(referrer.get("digest", "")))
                manifest = await self.cache.get_manifest(
                    upstream, repository, digest, MANIFEST_TYPES
                )
                if not is_index(manifest.media_type):
                    blobs.update((d.digest, d) for d in referenced_blobs(manifest.body))
            except OCIError as exc:
                where = f"{self.reference} referrer {str(referrer.get('digest'))[:80]}"
                self.summary.failures.append((where, str(exc)))
                continue
            self._count_manifest(manifest.result, len(manifest.body))
            self.summary.referrers += 1
        return blobs

    def _count_manifest(self, result: str, size: int) -> None:
        self.summary.manifests += 1
        if result == "hit":
            self.summary.bytes_present += size
        else:
            self.summary.bytes_fetched += size

    async def _blob(self, upstream: Upstream, repository: str, descriptor: Descriptor) -> None:
        async with self.blob_slots:
            if await self._in_bucket(descriptor.digest):
                self.summary.bytes_present += descriptor.size
                self._advance(descriptor.size)
                self._blob_done()
                return
            blob = await self.cache.get_blob(upstream, repository, descriptor.digest)
            if blob.result == "hit":
                blob.close()  # already cached: nothing to read
                self.summary.bytes_present += descriptor.size
                self._advance(descriptor.size)
            else:
                async for chunk in blob.chunks():
                    self.summary.bytes_fetched += len(chunk)
                    self._advance(len(chunk))
        self._blob_done()

    async def _in_bucket(self, digest: Digest) -> bool:
        """In the replicas' bucket already (then warming it is a use of it)."""
        fleet, shared = self.cache.fleet, self.cache.shared
        if fleet is None or shared is None or await fleet.size(digest) is None:
            return False
        shared.uses.touch(str(digest))
        return True

    def _blob_done(self) -> None:
        self.summary.blobs += 1
        self.layers_done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"blobs {self.layers_done}/{self.layers_total}")

    def _advance(self, n: int) -> None:
        if self.bar is not None and self.total_bar is not None:
            self.bar.update(n)
            self.total_bar.update(n)


async def warm(
    cache: PullThroughCache,
    references: list[ImageReference],
    platforms: list[Platform] | None,
    concurrency: int,
    show_progress: bool | None = None,
) -> WarmSummary:
    """Warm every reference; failures are collected, not raised."""
    summary = WarmSummary()
    slots = asyncio.Semaphore(concurrency)
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    total_bar = tqdm(total=0, desc="total", unit="B", unit_scale=True) if progress else None

    async def one(reference: ImageReference) -> None:
        try:
            await _Image(cache, reference, platforms, slots, summary, total_bar).run()
        except (OCIError, ValueError) as exc:
            summary.failures.append((str(reference), str(exc)))

    await cache.start()  # a replica's bucket client, when the config names one
    try:
        await asyncio.gather(*(one(r) for r in references))
        await cache.drain()
    finally:
        if total_bar is not None:
            total_bar.close()
    return summary
