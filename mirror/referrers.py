"""Referrers (OCI distribution 1.1): the manifests whose ``subject`` is a digest.

The mirror offers the referrers API whatever its upstream speaks, since policy
engines on air-gapped clusters find signatures and SBOMs only there:

- An upstream with the API: its answer (every page), cached like a tag: fresh for
  the upstream's ``tag_ttl``, fetched again after it, the last answer served when
  the upstream fails, and offline.
- An upstream without it (404, or an answer that is not an index): the referrers
  tag schema, the tag ``<alg>-<hex>`` of the subject holding the index the API
  would give, read through the manifest cache; no such tag: an empty index.

The upstream is always asked unfiltered (one cached answer serves every filter);
the ``artifactType`` filter is applied here and announced as the spec says.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import ManifestInvalid, ManifestUnknown, TooManyRequests, Unavailable
from .manifest import MAX_MANIFEST_BYTES, OCI_INDEX
from .metrics import Metrics
from .reference import Digest
from .storage.base import MetadataStore
from .upstream.client import Upstream

__all__ = ["ReferrersAnswer", "ReferrersCache", "index_body", "referrers_of", "referrers_tag"]

log = logging.getLogger("mirror.referrers")

_NOT_IN_TAG = re.compile(r"[^a-zA-Z0-9_.-]")
_MAX_PAGES = 100
# Reads the referrers tag's index through the manifest cache; None when there is none.
TagReader = Callable[[Upstream, str, str], Awaitable[bytes | None]]


@dataclass(frozen=True)
class ReferrersAnswer:
    body: bytes  # an OCI image index
    manifests: list[dict[str, object]]  # its descriptors
    filters_applied: str | None  # "artifactType" when the answer is filtered
    result: str  # hit, miss, stale


def referrers_tag(digest: Digest) -> str:
    """The referrers tag schema (spec main): algorithm cut to 32, encoded part to 64."""
    return _NOT_IN_TAG.sub("-", f"{digest.algorithm[:32]}-{digest.hex[:64]}")


def referrers_of(body: bytes) -> list[dict[str, object]] | None:
    """The descriptors of an image index; None when the body is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        return None
    return manifests


def index_body(manifests: list[dict[str, object]]) -> bytes:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(index, separators=(",", ":")).encode()


class ReferrersCache:
    """Answers the referrers API from the cache, filling it from the upstream."""

    def __init__(
        self,
        records: MetadataStore,
        metrics: Metrics,
        read_tag: TagReader,
        *,
        before_upstream: Callable[[], None],
        offline: bool,
        now: Callable[[], float],
    ) -> None:
        self._records = records
        self._metrics = metrics
        self._read_tag = read_tag
        self._before_upstream = before_upstream  # the client's upstream budget; may refuse
        self._offline = offline
        self._now = now

    async def get(
        self, upstream: Upstream, repository: str, digest: Digest, artifact_type: str | None
    ) -> ReferrersAnswer:
        body, result = await self._get(upstream, repository, digest)
        self._metrics.cache_results.labels("referrers", result).inc()
        manifests = referrers_of(body) or []
        if artifact_type is None:
            return ReferrersAnswer(body, manifests, None, result)
        kept = [m for m in manifests if m.get("artifactType") == artifact_type]
        return ReferrersAnswer(index_body(kept), kept, "artifactType", result)

    async def _get(self, upstream: Upstream, repository: str, digest: Digest) -> tuple[bytes, str]:
        record = await self._records.get_referrers(upstream.name, repository, digest)
        if record is not None:
            body, checked_at = record
            if self._offline or 0 <= self._now() - checked_at < upstream.settings.tag_ttl:
                return body, "hit"
        if self._offline:  # an imported layout carries referrers as their tag
            return await self._from_tag(upstream, repository, digest), "hit"
        try:
            self._before_upstream()  # refused: like an upstream 429, stale if we have it
            body = await self._fetch(upstream, repository, digest)
        except (Unavailable, TooManyRequests) as exc:
            if record is None:
                raise
            log.warning(
                "upstream %s failed (%s); serving stale referrers of %s", upstream.name, exc, digest
            )
            return record[0], "stale"
        await self._records.put_referrers(upstream.name, repository, digest, body)
        return body, "miss"

    async def _fetch(self, upstream: Upstream, repository: str, digest: Digest) -> bytes:
        manifests: list[dict[str, object]] = []
        size, path = 0, None
        for _ in range(_MAX_PAGES):
            try:
                page = await upstream.get_referrers(repository, digest, path)
            except ManifestUnknown:
                page = None
            found = referrers_of(page.body) if page is not None else None
            if page is None or found is None:
                if manifests:
                    raise Unavailable(f"upstream {upstream.name} broke off its referrers pages")
                # No referrers API (404, or not an index): the spec's fallback.
                return await self._from_tag(upstream, repository, digest)
            manifests.extend(found)
            size += len(page.body)
            if size > MAX_MANIFEST_BYTES:
                raise ManifestInvalid(f"referrers of {digest} exceed {MAX_MANIFEST_BYTES} bytes")
            path = page.next_path
            if path is None:
                break
        return index_body(manifests)

    async def _from_tag(self, upstream: Upstream, repository: str, digest: Digest) -> bytes:
        body = await self._read_tag(upstream, repository, referrers_tag(digest))
        found = referrers_of(body) if body is not None else None
        return index_body(found or [])
