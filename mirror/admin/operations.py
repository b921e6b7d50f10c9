"""The admin operations behind ``/admin`` and ``mirror ls|inspect|purge|pin|verify``:
what the cache holds, purging, pinning and verifying, as JSON-ready dicts.

The web layer (``web/admin.py``) and the CLI on a stopped cache call the same
methods, so both print the same figures. Every change is logged (who, what, how
much freed) and counted in ``mirror_admin_actions_total``. Synchronous: the web
layer runs them in a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from ..config import ConfigError, parse_duration
from ..errors import ManifestUnknown, OCIError, RequestInvalid
from ..manifest import MANIFEST_TYPES
from ..reference import parse_digest, parse_image_reference
from ..service import PullThroughCache
from .fleet import FleetAdmin, hot_tier_only
from .integrity import Progress, verify
from .inventory import Inventory, NotCached, PurgeResult

__all__ = ["Admin"]

log = logging.getLogger("mirror.admin")

_MAX_PAGE = 1000


class Admin:
    def __init__(self, cache: PullThroughCache, now: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.inventory = Inventory(cache.store, now)
        self._now = now
        # Replicas: pins are the fleet's; what knows one hot tier only is refused.
        self.fleet = FleetAdmin(cache.shared, self._count) if cache.shared is not None else None

    def refuse_on_replicas(self, what: str) -> None:
        if self.fleet is not None:
            raise hot_tier_only(what)

    # names

    def resolve(self, text: str) -> tuple[str, str, str]:
        """``debian:12``, ``ghcr.io/org/img@sha256:…`` → (upstream, repository, tag or digest),
        routed as a pull of that name would be."""
        try:
            reference = parse_image_reference(text)
            upstream, repository = self.cache.route(reference.path_name)
        except OCIError as exc:
            raise RequestInvalid(
                f"{text[:200]!r} is not an image reference: {exc.message}"
            ) from None
        return upstream.name, repository, str(reference.reference)

    def _repository(self, name: str) -> tuple[str, str]:
        try:
            upstream, repository = self.cache.route(name)
        except OCIError as exc:
            raise RequestInvalid(f"{name[:200]!r} is not a repository: {exc.message}") from None
        return upstream.name, repository

    def _upstream(self, name: str) -> str:
        if name not in self.cache.upstreams:
            raise RequestInvalid(f"{name[:100]!r} is not an upstream of this mirror")
        return name

    # reading

    def repositories(
        self, upstream: str | None = None, prefix: str = "", last: str | None = None, n: int = 100
    ) -> dict[str, Any]:
        self.refuse_on_replicas("listing repositories")
        n = max(1, min(n, _MAX_PAGE))
        found = self.inventory.repositories(
            upstream=self._upstream(upstream) if upstream else None,
            prefix=prefix,
            after=last,
            limit=n,
        )
        rows = [{"name": f"{r.upstream}/{r.repository}", **dataclasses.asdict(r)} for r in found]
        return {"repositories": rows, "next": rows[-1]["name"] if len(rows) == n else None}

    def tags(self, name: str) -> dict[str, Any]:
        self.refuse_on_replicas("listing tags")
        upstream, repository = self._repository(name)
        tags = self.inventory.tags(upstream, repository)
        return {
            "upstream": upstream,
            "repository": repository,
            "tags": [_tag(t, self._now()) for t in tags],
        }

    def blobs(self, last: str | None = None, n: int = 100) -> dict[str, Any]:
        self.refuse_on_replicas("listing blobs")
        n = max(1, min(n, _MAX_PAGE))
        rows = [dataclasses.asdict(b) for b in self.inventory.blobs(after=last, limit=n)]
        return {"blobs": rows, "next": rows[-1]["digest"] if len(rows) == n else None}

    def image(self, ref: str) -> dict[str, Any]:
        self.refuse_on_replicas("inspecting an image")
        upstream, repository, reference = self.resolve(ref)
        try:
            image = self.inventory.image(upstream, repository, reference)
        except NotCached as exc:
            raise ManifestUnknown(str(exc)) from None
        body = dataclasses.asdict(image)
        body["tags"] = [_tag(t, self._now()) for t in image.tags]
        body["upstream_url"] = self.cache.upstreams[upstream].settings.url
        return body

    async def pins(self) -> dict[str, Any]:
        if self.fleet is not None:
            return await self.fleet.list_pins()
        return await anyio.to_thread.run_sync(self._pins)

    def _pins(self) -> dict[str, Any]:
        return {
            "pins": [
                {"upstream": u, "repository": r, "reference": ref, "digest": d}
                for u, r, ref, d in self.inventory.pins()
            ]
        }

    def status(self) -> dict[str, Any]:
        """The status page's figures: cache use, hit ratio, bytes saved, upstreams."""
        size, entries, cap = self.cache.store.facts()
        samples = _samples(self.cache.metrics.scrape_registry())
        results = samples.get("mirror_cache_requests_total", {})
        hits = int(sum(v for labels, v in results.items() if ("result", "hit") in labels))
        lookups = int(sum(results.values()))
        sent = samples.get("mirror_sent_bytes_total", {})
        upstreams = []
        for upstream in self.cache.upstreams.values():
            upstreams.append(
                {
                    "name": upstream.name,
                    "url": upstream.settings.url,
                    "state": upstream.breaker.state,
                    "ratelimit_limit": upstream.rate_limit.limit,
                    "ratelimit_remaining": upstream.rate_limit.remaining,
                }
            )
        fills = samples.get("mirror_fills_in_flight", {})
        return {
            "cache": {"size": size, "max_size": cap, "entries": entries},
            "lookups": lookups,
            "hits": hits,
            "hit_ratio": hits / lookups if lookups else None,
            "bytes_from_cache": int(sum(v for k, v in sent.items() if ("source", "cache") in k)),
            "bytes_from_upstream": int(
                sum(v for k, v in sent.items() if ("source", "upstream") in k)
            ),
            "upstreams": upstreams,
            "fills_in_flight": int(sum(fills.values())),
            "top": [
                {"name": f"{u}/{r}", "reference": ref, "pulls": count, "last_pull": last}
                for u, r, ref, count, last in self.inventory.top()
            ],
            "pins": len(self.inventory.pins()),
        }

    # changing

    def purge(self, who: str, request: dict[str, Any]) -> dict[str, Any]:
        """``{"kind": "tag"|"repository"|"upstream"|"digest"|"age", ...}``; see README."""
        self.refuse_on_replicas("purge")
        kind = request.get("kind")
        target = str(request.get("ref") or request.get("digest") or request.get("age") or "")
        try:
            result = self._purge(kind, request, target)
        except NotCached as exc:
            self._count("purge", "not_found")
            raise ManifestUnknown(str(exc)) from None
        self._count("purge", "done")
        self.cache.metrics.admin_freed_bytes.inc(result.freed)
        log.info(
            "admin %s purged %s %s: %d tags, %d manifests, %d blobs, %d bytes freed",
            who,
            kind,
            target,
            result.tags,
            result.manifests,
            result.blobs,
            result.freed,
        )
        return {"kind": kind, "target": target, **dataclasses.asdict(result)}

    def _purge(self, kind: object, request: dict[str, Any], target: str) -> PurgeResult:
        purge = self.inventory.purge
        if kind == "age":
            try:
                age = parse_duration(request.get("age"), "age")
            except ConfigError as exc:
                raise RequestInvalid(str(exc)) from None
            return purge("age", age=age)
        if kind == "digest":
            try:
                digest = str(parse_digest(target))
            except OCIError as exc:
                raise RequestInvalid(exc.message) from None
            return purge("digest", digest=digest)
        if kind == "upstream":
            return purge("upstream", upstream=self._upstream(target))
        if kind == "repository":
            upstream, repository = self._repository(target)
            return purge("repository", upstream=upstream, repository=repository)
        if kind == "tag":
            upstream, repository, reference = self.resolve(target)
            if reference.startswith(("sha256:", "sha512:")):
                return purge("digest", digest=reference)
            return purge("tag", upstream=upstream, repository=repository, tag=reference)
        raise RequestInvalid(
            f"purge kind must be tag, repository, upstream, digest or age, not {kind!r}"
        )

    async def pin(self, who: str, ref: str) -> dict[str, Any]:
        upstream, repository, reference = self.resolve(ref)
        if self.fleet is not None:
            return await self.fleet.pin(who, ref, upstream, repository, reference)
        return await anyio.to_thread.run_sync(self._pin, who, ref, upstream, repository, reference)

    def _pin(
        self, who: str, ref: str, upstream: str, repository: str, reference: str
    ) -> dict[str, Any]:
        try:
            image = self.inventory.pin(upstream, repository, reference)
        except NotCached as exc:
            self._count("pin", "not_found")
            raise ManifestUnknown(f"{exc}: pull or warm it first") from None
        self._count("pin", "done")
        log.info("admin %s pinned %s (%s, %d bytes)", who, ref, image.digest, image.size)
        return {"pinned": ref, "digest": image.digest, "size": image.size}

    async def unpin(self, who: str, ref: str) -> dict[str, Any]:
        upstream, repository, reference = self.resolve(ref)
        if self.fleet is not None:
            return await self.fleet.unpin(who, ref, upstream, repository, reference)
        return await anyio.to_thread.run_sync(
            self._unpin, who, ref, upstream, repository, reference
        )

    def _unpin(
        self, who: str, ref: str, upstream: str, repository: str, reference: str
    ) -> dict[str, Any]:
        if not self.inventory.unpin(upstream, repository, reference):
            self._count("unpin", "not_found")
            raise ManifestUnknown(f"{ref} is not pinned")
        self._count("unpin", "done")
        log.info("admin %s unpinned %s", who, ref)
        return {"unpinned": ref}

    async def refresh(self, who: str, ref: str) -> dict[str, Any]:
        """Ask the upstream what a tag is now (not waiting for its tag_ttl)."""
        self.refuse_on_replicas("refresh")
        upstream, repository, reference = self.resolve(ref)
        if reference.startswith(("sha256:", "sha512:")):
            raise RequestInvalid("a digest never changes; refresh a tag")
        accepts = await anyio.to_thread.run_sync(
            self.inventory.expire_tag, upstream, repository, reference
        )
        # Each record answers clients of its Accept list: revalidate each (a HEAD
        # when the tag did not move). Not cached yet: fetch it as warm would.
        for accept in accepts or [MANIFEST_TYPES]:
            found = await self.cache.get_manifest(
                self.cache.upstreams[upstream], repository, reference, accept
            )
        self._count("refresh", found.result)
        log.info("admin %s refreshed %s: %s (%s)", who, ref, found.digest, found.result)
        return {"refreshed": ref, "digest": str(found.digest), "result": found.result}

    def verify(self, who: str, progress: Progress, rate: float | None = None) -> dict[str, Any]:
        self.refuse_on_replicas("verify")
        log.info("admin %s started verify (rate %s bytes/s)", who, rate or "unlimited")
        verify(self.cache.store, progress, rate=rate)
        self._count("verify", "corrupt" if progress.corrupt else "clean")
        log.info(
            "verify by %s: %d entries, %d bytes checked, %d corrupt dropped: %s",
            who,
            progress.checked,
            progress.bytes,
            len(progress.corrupt),
            ", ".join(progress.corrupt) or "none",
        )
        return progress_json(progress)

    def _count(self, action: str, outcome: str) -> None:
        self.cache.metrics.admin_actions.labels(action, outcome).inc()


def progress_json(progress: Progress) -> dict[str, Any]:
    return {
        "checked": progress.checked,
        "bytes": progress.bytes,
        "corrupt": list(progress.corrupt),
        "done": progress.done,
        "started": progress.started,
    }


def _tag(tag: Any, now: float) -> dict[str, Any]:
    body = dataclasses.asdict(tag)
    body["age"] = max(0.0, now - tag.checked_at)
    return body


def _samples(registry: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Metric samples by name, then by their labels."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples
