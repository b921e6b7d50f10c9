"""A ``FakeRegistry`` served over real HTTP on 127.0.0.1, with the quirks of real upstreams.

``mirror serve`` runs as a subprocess and reaches its upstream over the network, so the
in-process ``MockTransport`` cannot stand in for it. This serves a ``FakeRegistry`` with
uvicorn in a thread and bends its blob answers the way upstreams and CDNs are seen to:

- ``no_length``: blob GETs are sent without ``Content-Length`` (chunked);
- ``break_blobs``: that many blob GETs break off (the connection drops) at ``break_at`` of the body;
- ``gzip_blobs``: blob GETs are sent ``Content-Encoding: gzip`` whatever the client asked for;
- ``piece_delay``: blob bodies trickle, so that requests overlap a fill.

Every request's method, path and ``Accept-Encoding`` is recorded.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import FakeRegistry
from tests.support.ports import LoopbackService, Service

__all__ = ["QuirkyUpstream", "Seen"]

_PIECE = 64 * 1024


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    accept_encoding: str | None


class _BrokenOff(Exception):
    """Raised inside a body stream: uvicorn drops the connection mid-body."""


@dataclass
class QuirkyUpstream(LoopbackService, Service):
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    no_length: bool = False
    break_blobs: int = 0
    break_at: float = 0.4
    gzip_blobs: bool = False
    piece_delay: float = 0.0  # seconds between body pieces, to make fills overlap
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def blob_gets(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and "/blobs/" in s.path]

    async def _handle(self, request: Request) -> Response:
        self.seen.append(
            Seen(request.method, request.url.path, request.headers.get("accept-encoding"))
        )
        forwarded = httpx.Request(
            request.method,
            f"http://upstream.fake{request.url.path}?{request.url.query}",
            headers=[(k, v) for k, v in request.headers.items() if k.lower() != "host"],
        )
        answer = await self.registry(forwarded)
        headers = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        is_blob_get = request.method == "GET" and "/blobs/" in request.url.path
        if not is_blob_get or answer.status_code != 200:
            body = await answer.aread()
            return Response(body, status_code=answer.status_code, headers=headers)
        data = await answer.aread()
        with self._lock:
            breaks = self.break_blobs > 0
            self.break_blobs -= breaks
        if self.gzip_blobs:
            data = gzip.compress(data, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        if not self.no_length:
            headers["Content-Length"] = str(len(data))
        return StreamingResponse(self._pieces(data, breaks), headers=headers)

    async def _pieces(self, data: bytes, breaks: bool) -> AsyncIterator[bytes]:
        stop = int(len(data) * self.break_at) if breaks else len(data)
        for offset in range(0, stop, _PIECE):
            yield data[offset : min(offset + _PIECE, stop)]
            if self.piece_delay:
                await asyncio.sleep(self.piece_delay)
        if breaks:
            raise _BrokenOff("upstream broke off, as told")

    def start(self) -> QuirkyUpstream:
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "HEAD"])])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._sock, self.port = sock, sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="quirky-upstream", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("quirky upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
