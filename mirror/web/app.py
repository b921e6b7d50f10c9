"""The web layer: Starlette routes ↔ calls into the pull-through cache.

Routes parse what the client sent (names, references, Accept, Range), make one
call into ``PullThroughCache`` and turn the answer into headers and bytes. They
never decide whether to go upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, BinaryIO
from urllib.parse import urlencode

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..admin.operations import Admin
from ..config import Settings
from ..errors import (
    BlobUnknown,
    NameUnknown,
    OCIError,
    PaginationInvalid,
    QueryInvalid,
    RangeNotSatisfiable,
    Unavailable,
    Unsupported,
)
from ..fills.blobs import Blob, FileSpan
from ..manifest import OCI_INDEX, accepted_types
from ..metrics import CONTENT_TYPE
from ..numbers import bounded_int
from ..reference import Digest, parse_digest, requested_digest, requested_reference
from ..replicas.eviction import BucketEvictor
from ..service import Manifest, PullThroughCache
from ..storage.disk import ORPHAN_GRACE_SECONDS
from ..upstream.client import Upstream
from .access_log import AccessLog
from .admin import AdminRoutes
from .auth import Gate
from .peers import peer_routes
from .pull_routes import PullRoutes
from .server import ZERO_COPY

__all__ = ["create_app"]

log = logging.getLogger("mirror.app")

_READ_METHODS = ("GET", "HEAD")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
_MAX_PAGE = 1000
# Longer queries are refused: nothing the API takes (n, last, ns, artifactType) needs more.
_MAX_QUERY = 8192
_API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
# The orphan sweep works a fifth of its time and rests the rest (30-40 s at a million
# files, every 5 minutes): what it holds of the GIL, the requests wait for.
_SWEEP_SHARE = 0.2


def _error_response(exc: OCIError, method: str) -> Response:
    headers = dict(exc.headers)
    body = {"errors": [{"code": exc.code, "message": exc.message, "detail": exc.detail}]}
    if method == "HEAD":
        return Response(status_code=exc.status, headers=headers)
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _oci_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OCIError)
    return _error_response(exc, request.method)


def _under_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _routing_error(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405, as OCI errors under /v2/ (plain text elsewhere)."""
    assert isinstance(exc, HTTPException)
    path = request.scope["path"]
    if not _under_v2(path):
        return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
    if exc.status_code == 405:
        error: OCIError = Unsupported(
            f"{request.method[:20]} is not supported: this registry is a read-only mirror",
            headers={"Allow": "GET, HEAD"},
        )
    else:
        error = NameUnknown(f"no such endpoint {path[:200]!r}")
    return _error_response(error, request.method)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error_response(OCIError("internal error"), request.method)


class _Exchange:
    """Every request's envelope, in one layer: each layer is a frame more for every
    request and every message it sends (four of them cost 2.5% more of a warm
    request's instructions than this one).

    It refuses requests with more header fields than configured (431; their bytes
    are bounded by the server, their number only here) and, under /v2/, a query
    longer than any the API takes. Every answer says it speaks registry/2.0, as
    clients check on ``/v2/``; one routed by containerd's ``?ns=`` says which
    namespace it served (``OCI-Namespace``, from the OCI spec's section on
    proxying). And each exchange goes to the access log once its answer is done."""

    def __init__(self, app: ASGIApp, access_log: AccessLog, max_headers: int) -> None:
        self.app = app
        self.access_log = access_log
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0

        async def observe(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append(_API_VERSION)
                namespace = (scope.get("state") or {}).get("namespace")
                if namespace:
                    headers.append((b"oci-namespace", namespace.encode()))
            elif kind == "http.response.body":
                sent += len(message.get("body", b""))
            elif kind == ZERO_COPY:
                sent += message.get("count") or 0
            await send(message)

        try:
            await (self._refusal(scope) or self.app)(scope, receive, observe)
        finally:
            self.access_log.record(scope, status or 500, sent, time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> Response | None:
        if len(scope["headers"]) > self.max_headers:
            return PlainTextResponse(
                f"more than {self.max_headers} request header fields\n", status_code=431
            )
        if len(scope.get("query_string", b"")) > _MAX_QUERY and _under_v2(scope["path"]):
            error = QueryInvalid(f"the query string is longer than {_MAX_QUERY} bytes")
            return _error_response(error, scope["method"])
        return None


class _BlobStream(StreamingResponse):
    """A blob's bytes start..end, as they come: from its file, from a fill as it
    grows, or from the upstream.

    Spans of a file go by the kernel (``os.sendfile``) where the server offers
    zero-copy sends (plain TCP) and the length is known; the rest, and everything
    on TLS, as body messages. A source that fails aborts the response rather than
    ending it: returning before the final body message makes the server drop the
    connection, so a client never takes a short body for a whole blob.
    """

    def __init__(self, blob: Blob, span: tuple[int, int | None], **kwargs: Any) -> None:
        super().__init__(blob.chunks(*span), **kwargs)
        self._blob = blob
        self._span = span
        self._file: BinaryIO | None = None  # sent by the kernel, when the server offers it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if ZERO_COPY in scope.get("extensions", {}) and self._blob.size is not None:
            self._file = self._blob.file()
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client gone before the first byte leaves the generator unstarted, and
            # an unstarted generator's cleanup never runs: close what the blob holds.
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()
            await self._blob.aclose()

    async def stream_response(self, send: Send) -> None:
        try:
            if self._file is not None:
                await self._send_pieces(send, self._file)
            else:
                await super().stream_response(send)
        except (OCIError, EOFError) as exc:  # EOFError: the file ended early
            log.warning("aborted a blob response: %s", exc)
        except OSError:
            pass  # the client went away

    async def _send_pieces(self, send: Send, file: BinaryIO) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code,
             "headers": self.raw_headers}
        )  # fmt: skip
        async with aclosing(self._blob.pieces(*self._span)) as pieces:
            async for piece in pieces:
                if isinstance(piece, FileSpan):
                    await send({"type": ZERO_COPY, "file": file, "offset": piece.offset,
                                "count": piece.count, "more_body": True})  # fmt: skip
                else:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _size_for_http_1_0(found: Blob) -> None:
    """An HTTP/1.0 client cannot read chunked framing (RFC 9112, 6.1), and uvicorn
    frames a body of unknown length so: wait until the length is known."""
    try:
        size = await found.known_size()
    except BaseException:
        found.close()
        raise
    if size is None:  # passed through from an upstream that does not say
        found.close()
        raise Unavailable("the blob's length is unknown until it is fetched whole; retry")


def _read_only(request: Request) -> None:
    if request.method not in _READ_METHODS:
        raise Unsupported(
            f"{request.method} is not supported: this registry is a read-only mirror",
            headers={"Allow": ", ".join(_READ_METHODS)},  # RFC 9110: a 405 says what is allowed
        )


def _byte_range(header: str | None, size: int | None) -> tuple[int, int] | None:
    """The single byte range asked for, as (start, end exclusive); None for the whole."""
    if not header or size is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None  # several ranges or nonsense: RFC 9110 lets us send it all
    # Past the blob's end is past the end, however many digits it takes.
    first = bounded_int(match.group(1), limit=size)
    last = bounded_int(match.group(2), limit=size)
    if first is None:
        assert last is not None
        start, end = max(size - last, 0), size
    else:
        start = first
        end = min(last + 1, size) if last is not None else size
        if last is not None and last < start:
            return None
    if start >= size or start >= end:
        raise RangeNotSatisfiable(
            f"range {header} is outside the blob's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _page_size(request: Request, default: int) -> int:
    raw = request.query_params.get("n")
    if raw is None:
        return default
    n = bounded_int(raw, limit=_MAX_PAGE)
    if n is None:
        raise PaginationInvalid(f"n must be a non-negative integer, got {raw[:20]!r}")
    return n


def _next_link(request: Request, n: int, last: str) -> str:
    """The next page's URL, keeping the other parameters (containerd's ``ns``)."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("n", "last")]
    query = urlencode([*params, ("n", str(n)), ("last", last)])
    return f'<{request.url.path}?{query}>; rel="next"'


def create_app(
    settings: Settings,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    now: Callable[[], float] | None = None,
) -> Starlette:
    """The mirror as an ASGI app. Tests pass a transport that reaches a fake upstream."""
    cache = PullThroughCache.from_settings(settings, transport=upstream_transport, now=now)
    store, metrics = cache.store, cache.metrics
    gate = Gate(settings, metrics, now=now)
    guard = gate.guard
    if gate.limits.enabled:
        cache.before_upstream = gate.charge_upstream
    admin = AdminRoutes(Admin(cache, **({"now": now} if now else {})), gate, settings)
    inventory = admin.admin.inventory

    def route(request: Request) -> tuple[Upstream, str]:
        # Most pulls have no query: then parsing one (a QueryParams) is work for nothing.
        namespace = request.query_params.get("ns") if request.scope.get("query_string") else None
        upstream, repository = cache.route(request.path_params["name"], namespace)
        request.state.upstream = upstream.name
        if namespace:
            request.state.namespace = upstream.name
        gate.authorize(request, upstream.name, repository)
        return upstream, repository

    flushing: set[asyncio.Task[None]] = set()

    def flush_pulls() -> None:
        """Pull counts to the index, once at a time and behind the requests: every
        request that found them due awaiting its own hop to a thread was a tail."""
        if flushing:
            return
        task = asyncio.ensure_future(anyio.to_thread.run_sync(inventory.flush_pulls))
        flushing.add(task)
        task.add_done_callback(_flushed)

    def _flushed(task: asyncio.Task[None]) -> None:
        flushing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record pull counts: %s", task.exception())

    async def api_root(request: Request) -> Response:
        _read_only(request)
        return JSONResponse({})

    async def manifest(request: Request) -> Response:
        _read_only(request)
        upstream, repository = route(request)
        reference = requested_reference(request.path_params["reference"])
        accept = accepted_types(request.headers.getlist("accept"))
        found = await cache.get_manifest(upstream, repository, reference, accept)
        request.state.cache_result = found.result
        # A pull names a tag (docker HEADs it, then GETs the digest): count tags.
        if not isinstance(reference, Digest) and inventory.record_pull(
            upstream.name, repository, reference
        ):
            flush_pulls()
        return _manifest_response(found, request.method)

    async def blob(request: Request) -> Response:
        _read_only(request)
        upstream, repository = route(request)
        digest = requested_digest(request.path_params["digest"], BlobUnknown)
        if request.method == "HEAD":
            size = await cache.head_blob(upstream, repository, digest)
            response = Response(headers=_blob_headers(digest, size))
            if size is None:  # unknown: say nothing rather than Starlette's "0"
                del response.headers["content-length"]
            return response
        if "range" not in request.headers:  # a range is answered here, not redirected
            url = await cache.blob_redirect(upstream, repository, digest)
            if url is not None:
                request.state.cache_result = "redirect"
                return Response(status_code=307, headers={"Location": url})
        found = await cache.get_blob(upstream, repository, digest)
        request.state.cache_result = found.result
        if found.size is None and request.scope.get("http_version") == "1.0":
            await _size_for_http_1_0(found)
        return _blob_response(found, digest, request.headers.get("range"))

    async def tags(request: Request) -> Response:
        _read_only(request)
        upstream, repository = route(request)
        n = _page_size(request, _MAX_PAGE)
        last = request.query_params.get("last")
        names = await cache.get_tags(upstream, repository)
        if last is not None:
            names = [t for t in names if t > last]
        page, more = names[:n], len(names) > n
        headers = {"Link": _next_link(request, n, page[-1])} if more and page else {}
        return JSONResponse({"name": request.path_params["name"], "tags": page}, headers=headers)

    async def referrers(request: Request) -> Response:
        _read_only(request)
        upstream, repository = route(request)
        digest = parse_digest(request.path_params["digest"])
        artifact_type = request.query_params.get("artifactType")
        found = await cache.get_referrers(upstream, repository, digest, artifact_type)
        request.state.cache_result = found.result
        headers = {"OCI-Filters-Applied": found.filters_applied} if found.filters_applied else {}
        if found.result == "stale":
            headers["Warning"] = '110 mirror "Response is Stale"'
        return Response(found.body, media_type=OCI_INDEX, headers=headers)

    async def catalog(request: Request) -> Response:
        _read_only(request)
        n = _page_size(request, 100)
        visible = gate.catalog_filter(request, cache.route)
        names = await cache.catalog(n + 1, request.query_params.get("last"), visible)
        page, more = names[:n], len(names) > n
        headers = {"Link": _next_link(request, n, page[-1])} if more and page else {}
        return JSONResponse({"repositories": page}, headers=headers)

    async def unknown(request: Request) -> Response:
        _read_only(request)
        raise NameUnknown(f"no such endpoint {request.url.path[:200]!r}")

    async def metrics_endpoint(request: Request) -> Response:
        body = await anyio.to_thread.run_sync(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        writable = await anyio.to_thread.run_sync(store.writable)
        if cache.shared is not None:
            # Ready while the hot tier works: without the bucket or Redis a replica
            # still serves (hot tier, upstream); the answer says which part is down.
            parts: dict[str, str] = {"cache": "ok" if writable else "down"}
            parts.update(await cache.shared.health())
            return JSONResponse(parts, status_code=200 if writable else 503)
        if writable:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("cache directory not writable or index unreadable\n", 503)

    async def sweep_orphans() -> None:
        """Blob files a crash left outside the index, at start and then now and again."""
        while True:
            try:
                await anyio.to_thread.run_sync(
                    store.reclaim_orphans, ORPHAN_GRACE_SECONDS, _SWEEP_SHARE
                )
            except (OSError, sqlite3.Error) as exc:
                log.warning("could not sweep the cache for orphaned blob files: %s", exc)
            await asyncio.sleep(ORPHAN_GRACE_SECONDS / 2)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store.clean_temp()
        await cache.start()
        # What start-up built lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it. Under load one took 150-300 ms
        # with the event loop stopped and every connection waiting.
        gc.collect()
        gc.freeze()
        # The requests in flight are not garbage, yet at 1,000 connections their objects
        # passed the default 700 young objects some 50 times a second: each young
        # collection walked them and moved them on, and the older generations then
        # filled and were walked too (7% of a request's CPU, pauses of 20-40 ms). A
        # warm request leaves next to no cyclic garbage; at most 20,000 young objects
        # wait for a collection.
        gc.set_threshold(20_000, *gc.get_threshold()[1:])
        sweeper = asyncio.ensure_future(sweep_orphans())
        evictor = None
        if cache.shared is not None and settings.storage.max_size is not None:
            bucket = BucketEvictor(cache.shared, settings.storage.max_size)
            evictor = asyncio.ensure_future(bucket.run())
        try:
            yield
        finally:
            sweeper.cancel()
            if evictor is not None:
                evictor.cancel()
            metrics.worker_exiting()
            await admin.aclose()
            await anyio.to_thread.run_sync(inventory.flush_pulls)
            await cache.aclose()
            store.close()

    every = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    routes = [
        # manifests and blobs: PullRoutes, below
        Route("/v2/{name:path}/blobs/uploads/{rest:path}", guard(unknown), methods=every),
        Route("/v2/", guard(api_root, "base"), methods=every),
        Route("/v2/_catalog", guard(catalog), methods=every),
        Route("/v2/{name:path}/tags/list", guard(tags), methods=every),
        Route("/v2/{name:path}/referrers/{digest}", guard(referrers), methods=every),
        Route("/v2/{rest:path}", guard(unknown), methods=every),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *admin.routes(),
    ]
    if settings.storage.peer_secret is not None:  # replicas stream blobs from one another
        secret = settings.storage.peer_secret
        routes += peer_routes(cache, secret, _blob_response, **({"now": now} if now else {}))
    if gate.tokens is not None:
        routes.append(Route("/token", guard(gate.token_endpoint, "token"), methods=["GET", "POST"]))
    if settings.server.metrics_address is None:
        # With auth on, request counts and upstream health are for users, not anyone.
        routes.append(Route("/metrics", guard(metrics_endpoint, "user")))
    app = Starlette(
        routes=routes,
        exception_handlers={
            OCIError: _oci_error,
            HTTPException: _routing_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.cache = cache
    manifest_route, blob_route = guard(manifest), guard(blob)
    app.add_middleware(
        PullRoutes, manifest=manifest_route, blob=blob_route, render_error=_error_response
    )
    max_headers = settings.server.max_headers
    app.add_middleware(_Exchange, access_log=AccessLog(metrics), max_headers=max_headers)
    return app


def _manifest_response(found: Manifest, method: str) -> Response:
    headers = {
        "Content-Type": found.media_type,
        "Content-Length": str(len(found.body)),
        "Docker-Content-Digest": str(found.digest),
        "ETag": f'"{found.digest}"',
    }
    if found.result == "stale":
        headers["Warning"] = '110 mirror "Response is Stale"'
    return Response(b"" if method == "HEAD" else found.body, headers=headers)


def _blob_headers(digest: Digest, size: int | None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _blob_response(found: Blob, digest: Digest, range_header: str | None) -> Response:
    try:
        span = _byte_range(range_header, found.size)
    except BaseException:
        found.close()
        raise
    headers = _blob_headers(digest, found.size)
    status = 200
    if span is not None:
        start, end = span
        headers["Content-Length"] = str(end - start)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{found.size}"
        status = 206
    if found.size is not None:
        # A small cached blob (a config) in one message: no stream task, fewer writes.
        body = found.small_body(*(span or (0, found.size)))
        if body is not None:
            return Response(body, status_code=status, headers=headers)
    return _BlobStream(found, span or (0, None), status_code=status, headers=headers)
