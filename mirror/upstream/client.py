"""One upstream registry, spoken to over httpx.

Knows the v2 pull API's URLs, authentication, timeouts and retries, and turns
every upstream answer that is not a success into an ``OCIError``. It knows
nothing of the cache or of the client's HTTP request.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from ..breaker import CircuitBreaker
from ..config import UpstreamSettings
from ..errors import (
    BlobUnknown,
    Denied,
    DigestMismatch,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    OCIError,
    TooManyRequests,
    Unavailable,
    UpstreamRefused,
    retry_after,
)
from ..manifest import MAX_MANIFEST_BYTES, manifest_media_type
from ..metrics import Metrics
from ..numbers import bounded_int
from ..reference import Digest, parse_digest
from .auth import RegistryAuth, parse_challenges
from .redirects import RedirectGuard

__all__ = ["BlobResponse", "FetchedManifest", "ManifestHead", "ReferrersPage", "Upstream"]

log = logging.getLogger("mirror.upstream")

_RETRY_STATUSES = {429, 500, 502, 503, 504}
_BACKOFF_SECONDS = 0.25  # first retry delay; doubles per attempt
_MAX_RETRY_AFTER = 30.0  # never sleep longer than this on a Retry-After
_BLOB_CHUNK = 1024 * 1024
# A tag list is names of at most 128 bytes; Docker Hub's largest repositories
# have some tens of thousands. Past this, the upstream is not sending a tag list.
MAX_TAG_LIST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: Digest  # of the body, checked against the upstream's claim


@dataclass(frozen=True)
class ManifestHead:
    digest: Digest | None
    media_type: str | None
    size: int | None


@dataclass(frozen=True)
class ReferrersPage:
    body: bytes  # what the upstream answered, verbatim and unchecked
    next_path: str | None  # the upstream's next page (its Link), on the upstream's host


@dataclass
class BlobResponse:
    size: int | None
    chunks: AsyncIterator[bytes]


@dataclass
class RateLimit:
    limit: int | None = None
    remaining: int | None = None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the upstream asks us to wait (bounded); None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    seconds = bounded_int(value, limit=int(_MAX_RETRY_AFTER))
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
        delay = when.timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # "soon", "nan" and friends: no advice
    return min(max(delay, 0.0), _MAX_RETRY_AFTER) if math.isfinite(delay) else None


def _rate_value(value: str | None) -> int | None:
    # Docker Hub sends "100;w=21600": the number before the window.
    if not value:
        return None
    return bounded_int(value.split(";", 1)[0].strip(), limit=2**31)


def _length(response: httpx.Response) -> int | None:
    """The upstream's Content-Length, when it is a plain number of sane size."""
    return bounded_int(response.headers.get("Content-Length"), limit=2**62)


def _claimed_digest(response: httpx.Response, upstream: str) -> Digest | None:
    """The upstream's Docker-Content-Digest; a malformed one is the upstream's fault."""
    claimed = response.headers.get("Docker-Content-Digest")
    if not claimed:
        return None
    try:
        return parse_digest(claimed)
    except OCIError as exc:
        raise Unavailable(
            f"upstream {upstream} sent a malformed Docker-Content-Digest {claimed[:80]!r}"
        ) from exc


class Upstream:
    """A configured upstream registry."""

    def __init__(
        self,
        settings: UpstreamSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self.name = settings.name
        self.rate_limit = RateLimit()
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown, now)
        timeout = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.read_timeout,
            pool=settings.connect_timeout,
        )
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        common = {
            "timeout": timeout,
            "limits": limits,
            "transport": transport,
            "verify": (
                ssl.create_default_context(cafile=settings.tls_verify)
                if isinstance(settings.tls_verify, str)
                else settings.tls_verify
            ),
            # Digests are of the bytes as stored: ask for them unencoded (httpx asks for
            # gzip, br and zstd by default); open_blob copes with an upstream that encodes anyway.
            "headers": {"User-Agent": "mirror/0.1", "Accept-Encoding": "identity"},
            "event_hooks": {"request": [self._on_request], "response": [self._on_response]},
        }
        self._token_client = httpx.AsyncClient(**common)  # type: ignore[arg-type]
        auth = RegistryAuth(
            self._token_client,
            settings.url,
            settings.username,
            settings.password,
            now,
            allowed_realms=settings.auth_realms,
            token_timeout=settings.read_timeout,
        )
        self._client = httpx.AsyncClient(
            base_url=settings.url,
            auth=auth,
            # Docker Hub answers blob GETs with a redirect to a CDN; httpx drops the
            # Authorization header when a redirect leaves the upstream's origin.
            follow_redirects=True,
            **common,  # type: ignore[arg-type]
        )
        self._client.event_hooks["request"].append(RedirectGuard(settings.url))
        # Blob bodies get a pool of their own, sized to the downloads the service
        # lets run at once: a slow or abandoned body never makes a manifest, a
        # HEAD or a token wait for a connection.
        blob_limits = httpx.Limits(
            max_connections=settings.max_fills, max_keepalive_connections=settings.max_fills
        )
        self._blob_client = httpx.AsyncClient(
            base_url=settings.url,
            auth=auth,
            follow_redirects=True,
            **{**common, "limits": blob_limits},  # type: ignore[arg-type]
        )
        self._blob_client.event_hooks["request"].append(RedirectGuard(settings.url))

    async def aclose(self) -> None:
        await self._blob_client.aclose()
        await self._client.aclose()
        await self._token_client.aclose()

    def _path(self, repository: str, kind: str, reference: str) -> str:
        return f"/v2/{repository}/{kind}/{reference}"

    async def _send(
        self,
        method: str,
        path: str,
        *,
        unknown: type[OCIError],
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        """Send with retries; return a streaming 2xx response (the caller closes it)."""
        client = client or self._client
        if not self.breaker.allow():
            raise self._unavailable(
                f"upstream {self.name} is down (circuit open after repeated failures)"
            )
        attempt = 0
        while True:
            request = client.build_request(method, path, headers=headers, params=params)
            delay = _BACKOFF_SECONDS * 2**attempt
            try:
                response = await client.send(request, stream=True)
            except UpstreamRefused:
                raise  # a configuration matter: the upstream is up
            except OCIError:
                self._set_up(False)  # the token service failed
                raise
            except httpx.PoolTimeout as exc:
                # Our own connections were all busy: says nothing of the upstream's health.
                if self._metrics:
                    self._metrics.upstream_requests.labels(self.name, method, "busy").inc()
                raise Unavailable(
                    f"upstream {self.name}: no free connection; retry shortly",
                    headers={"Retry-After": "1"},
                ) from exc
            except httpx.HTTPError as exc:
                if self._metrics:
                    self._metrics.upstream_requests.labels(self.name, method, "error").inc()
                if attempt >= self.settings.retries:
                    self._set_up(False)
                    log.warning(
                        "upstream %s: %s %s failed: %s", self.name, method, path, type(exc).__name__
                    )
                    raise self._unavailable(
                        f"upstream {self.name} is unreachable ({type(exc).__name__})"
                    ) from exc
            else:
                self._note_rate_limit(response)
                if response.status_code < 300:
                    self._set_up(True)
                    return response
                await response.aclose()
                retryable = response.status_code in _RETRY_STATUSES
                if not retryable or attempt >= self.settings.retries:
                    self._set_up(not retryable)  # any other answer means it is up
                    raise self._error(response, unknown)
                delay = _retry_after(response) or delay
            attempt += 1
            await asyncio.sleep(delay)

    def _set_up(self, up: bool) -> None:
        if up:
            self.breaker.succeeded()
        else:
            self.breaker.failed()
        if self._metrics:
            is_open = self.breaker.state != "closed"
            self._metrics.breaker_open.labels(self.name).set(1 if is_open else 0)

    async def _on_request(self, request: httpx.Request) -> None:
        request.extensions["mirror_started"] = time.monotonic()

    async def _on_response(self, response: httpx.Response) -> None:
        """Every upstream answer, token service and redirects included."""
        if self._metrics is None:
            return
        request = response.request
        self._metrics.upstream_requests.labels(
            self.name, request.method, str(response.status_code)
        ).inc()
        started = request.extensions.get("mirror_started")
        if isinstance(started, float):
            self._metrics.upstream_seconds.labels(self.name).observe(time.monotonic() - started)

    def _note_rate_limit(self, response: httpx.Response) -> None:
        limit = _rate_value(response.headers.get("ratelimit-limit"))
        if limit is not None:
            self.rate_limit.limit = limit
            self.rate_limit.remaining = _rate_value(response.headers.get("ratelimit-remaining"))
            if self._metrics:
                self._metrics.ratelimit_limit.labels(self.name).set(limit)
                if self.rate_limit.remaining is not None:
                    remaining = self.rate_limit.remaining
                    self._metrics.ratelimit_remaining.labels(self.name).set(remaining)

    def _count_bytes(self, size: int) -> None:
        if self._metrics:
            self._metrics.upstream_bytes.labels(self.name).inc(size)

    def _error(self, response: httpx.Response, unknown: type[OCIError]) -> OCIError:
        status = response.status_code
        # The path names what was asked (repository, reference) as the upstream knows it.
        where = f"upstream {self.name} answered {status} for {response.request.url.path}"
        if status == 404:
            return unknown(f"{unknown.code.lower().replace('_', ' ')} ({where})")
        if status == 401:
            return self._refusal(response, unknown, where)
        if status == 403:
            return Denied(f"{where}: access denied")
        if status == 429:
            wait = _retry_after(response)
            headers = {"Retry-After": retry_after(wait)} if wait else {}
            return TooManyRequests(where, headers=headers)
        return self._unavailable(where, _retry_after(response))

    def _unavailable(self, reason: str, upstream_wait: float | None = None) -> Unavailable:
        """A 503 for the upstream's failure that says when to come back where that is
        known: the upstream's own ``Retry-After``, or the rest of the breaker's cool-down."""
        wait = max(upstream_wait or 0.0, self.breaker.open_for())
        return Unavailable(reason, headers={"Retry-After": retry_after(wait)} if wait else {})

    def _refusal(self, response: httpx.Response, unknown: type[OCIError], where: str) -> OCIError:
        """An upstream 401, which is never the client's to answer: the mirror's own
        credentials, or no credentials, were refused."""
        if response.url.host != self._client.base_url.host:
            return UpstreamRefused(f"{where}: blob storage at {response.url.host} refused access")
        challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        if any(c.error == "insufficient_scope" for c in challenges):
            # Docker Hub's answer for a repository that is missing or private to us.
            return unknown(
                f"{unknown.code.lower().replace('_', ' ')} ({where}: insufficient_scope)"
            )
        if self.settings.username:
            log.warning("upstream %s refused user %s", self.name, self.settings.username)
            return UpstreamRefused(f"{where}: it refused the mirror's own credentials")
        log.warning("upstream %s wants credentials; none are configured", self.name)
        return UpstreamRefused(f"{where}: it wants credentials the mirror is not configured with")

    async def get_manifest(
        self, repository: str, reference: str | Digest, accept: tuple[str, ...]
    ) -> FetchedManifest:
        """GET a manifest, refusing oversized ones and checking its digest."""
        response = await self._send(
            "GET",
            self._path(repository, "manifests", str(reference)),
            unknown=ManifestUnknown,
            headers={"Accept": ", ".join(accept)},
        )
        try:
            data = await self._read_capped(
                response, MAX_MANIFEST_BYTES, "a manifest", too_large=ManifestInvalid
            )
        finally:
            await response.aclose()
        media_type = manifest_media_type(response.headers.get("Content-Type"), data)
        # By digest, the bytes must hash to it; by tag, to what the upstream claims.
        claimed = _claimed_digest(response, self.name)
        if isinstance(reference, Digest):
            digest = reference
        else:
            digest = claimed or Digest.of(data)
        actual = Digest.of(data, digest.algorithm)
        if actual != digest:
            log.error(
                "digest mismatch: upstream %s sent %s for manifest %s@%s; not cached",
                self.name,
                actual,
                repository,
                reference,
            )
            raise DigestMismatch(
                f"upstream {self.name} sent a manifest that does not match {digest}"
            )
        return FetchedManifest(data, media_type, digest)

    async def head_manifest(
        self, repository: str, reference: str | Digest, accept: tuple[str, ...]
    ) -> ManifestHead:
        response = await self._send(
            "HEAD",
            self._path(repository, "manifests", str(reference)),
            unknown=ManifestUnknown,
            headers={"Accept": ", ".join(accept)},
        )
        await response.aclose()
        return ManifestHead(
            digest=_claimed_digest(response, self.name),
            media_type=response.headers.get("Content-Type"),
            size=_length(response),
        )

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        response = await self._send(
            "HEAD", self._path(repository, "blobs", str(digest)), unknown=BlobUnknown
        )
        await response.aclose()
        return _length(response)

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: Digest, start: int = 0
    ) -> AsyncIterator[BlobResponse]:
        """Stream a blob from byte ``start``; a broken stream raises Unavailable."""
        headers = {"Range": f"bytes={start}-"} if start else None
        response = await self._send(
            "GET",
            self._path(repository, "blobs", str(digest)),
            unknown=BlobUnknown,
            headers=headers,
            client=self._blob_client,
        )
        # A Content-Length of an encoded body is not the blob's: decode, and say no size.
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        length = None if encoded else _length(response)
        # An upstream that ignores Range sends it all: skip what the reader has.
        skip = start if start and response.status_code == 200 else 0

        async def chunks() -> AsyncIterator[bytes]:
            # httpx's own re-chunking (aiter_raw(n)) costs twice the CPU of the
            # transfer itself; gathering the network's pieces into one join is cheap.
            # Bytes are counted per chunk too: a metric update costs more than a piece.
            to_skip, pending, pending_size, received = skip, list[bytes](), 0, 0
            try:
                async for piece in response.aiter_bytes() if encoded else response.aiter_raw():
                    received += len(piece)
                    if to_skip:
                        piece, to_skip = piece[to_skip:], max(to_skip - len(piece), 0)
                    pending.append(piece)
                    pending_size += len(piece)
                    if pending_size >= _BLOB_CHUNK:
                        self._count_bytes(received)
                        yield b"".join(pending)
                        pending, pending_size, received = [], 0, 0
                self._count_bytes(received)
                if pending_size:
                    yield b"".join(pending)
            except httpx.HTTPError as exc:
                raise Unavailable(
                    f"upstream {self.name} broke off blob {digest}: {type(exc).__name__}"
                ) from exc

        size = length - skip if length is not None else None
        try:
            yield BlobResponse(size, chunks())
        finally:
            await response.aclose()

    async def _read_capped(
        self,
        response: httpx.Response,
        cap: int,
        what: str,
        *,
        too_large: type[OCIError] = Unavailable,
    ) -> bytes:
        """The whole body, refused (``too_large``) once it passes ``cap`` bytes."""
        refused = too_large(f"upstream {self.name} sent {what} larger than {cap} bytes")
        declared = _length(response)
        if declared is not None and declared > cap:
            raise refused
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > cap:
                    raise refused
        except httpx.HTTPError as exc:
            raise Unavailable(f"upstream {self.name} broke off {what}") from exc
        self._count_bytes(len(body))
        return bytes(body)

    async def get_tags(self, repository: str) -> list[str]:
        """Every tag of a repository, following the upstream's own pagination."""
        tags: list[str] = []
        budget = MAX_TAG_LIST_BYTES  # over all pages
        path: str | None = self._path(repository, "tags", "list")
        params: dict[str, str] | None = {"n": "1000"}
        for _ in range(100):  # a bound on pages, so a looping Link cannot hold us forever
            assert path is not None
            response = await self._send("GET", path, unknown=NameUnknown, params=params)
            try:
                body = await self._read_capped(response, budget, "a tag list")
                budget -= len(body)
                document = json.loads(body)
            except ValueError as exc:
                raise Unavailable(f"upstream {self.name} sent an unreadable tag list") from exc
            finally:
                await response.aclose()
            page = document.get("tags") if isinstance(document, dict) else None
            tags.extend(t for t in page or [] if isinstance(t, str))
            link = response.links.get("next", {}).get("url")
            if not link:
                break
            next_url = self._client.base_url.join(link)
            if next_url.host != self._client.base_url.host:
                break  # never follow a Link to another host
            path, params = next_url.raw_path.decode(), None
        return tags

    async def get_referrers(
        self, repository: str, digest: Digest, path: str | None = None
    ) -> ReferrersPage:
        """One page of the upstream's referrers API (``path``: a next page's);
        ManifestUnknown when the upstream has no such API (404)."""
        response = await self._send(
            "GET", path or self._path(repository, "referrers", str(digest)), unknown=ManifestUnknown
        )
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise ManifestInvalid(f"referrers list larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise Unavailable(f"upstream {self.name} broke off a referrers list") from exc
        finally:
            await response.aclose()
        self._count_bytes(len(body))
        next_path = None
        link = response.links.get("next", {}).get("url")
        if link:
            next_url = self._client.base_url.join(link)
            if next_url.host == self._client.base_url.host:  # never follow a Link elsewhere
                next_path = next_url.raw_path.decode()
        return ReferrersPage(bytes(body), next_path)

    async def ping(self) -> int:
        """GET /v2/ through the auth flow; the status the upstream finally answered."""
        response = await self._send("GET", "/v2/", unknown=NameUnknown)
        await response.aclose()
        return response.status_code
