"""How uvicorn serves the app: bounded request heads, files sent by the kernel,
a listening socket per worker.

uvicorn's fast parser (httptools) accepts request heads of any size, and no
uvicorn parser has a timeout for reading a head: 1,100 half-sent requests held
every descriptor for as long as their clients liked. The protocol below keeps
httptools (twice the requests/s of h11 here, a quarter to half of its p99) and
adds both bounds: a head's bytes and a deadline for it. The header count is
checked in the web layer.

It also offers the ASGI ``http.response.zerocopysend`` extension on plain TCP: a
cached blob goes from the page cache to the socket with ``os.sendfile``, never
through Python. TLS has to encrypt in user space, so a TLS connection is not
offered it and gets body messages as before.

With several workers each also listens on a socket of its own (``SO_REUSEPORT``),
and the kernel spreads new connections over them. On uvicorn's one shared socket
alone the worker that woke first accepted every connection waiting: of 1,000
connections opened at once, all went to one worker in two runs of three.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..config import ConfigError, ServerSettings

__all__ = [
    "BoundedHttpToolsProtocol",
    "ZERO_COPY",
    "bind_address",
    "serve",
    "uvicorn_options",
]

log = logging.getLogger("mirror.server")

ZERO_COPY = "http.response.zerocopysend"
# What one os.sendfile call sends at most: 512 KiB streamed 5-8% faster than 4 MiB over
# loopback at the same CPU per GB (measured with bench.ab; figures in the commit). The
# event loop gets its turn when the socket is full, not between calls.
_SENDFILE_CHUNK = 512 * 1024


class _HeadTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head: more than
    ``max_header_bytes`` before the head ends is refused (400, as h11 does), and a
    connection whose head is not complete ``header_timeout`` seconds after its first
    byte (or after connecting) is closed."""

    def __init__(
        self, *args: Any, header_timeout: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._max_head = max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a message's first byte and the end of its head
        self._head_bytes = 0  # read since the head began (see on_message_begin)
        self._read = 0  # bytes of the read being parsed
        self._begun = 0  # messages begun in it
        self._zero_copy = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._zero_copy = self.scheme == "http" and transport.get_extra_info("socket") is not None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._read, self._begun = len(data), 0
        if self._in_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _HeadTooLarge):
                raise  # pragma: no cover - uvicorn's callbacks do not raise
            self._refuse()
            return
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head:
            if max(self._head_bytes, self._head_seen()) > self._max_head:
                self._refuse()
            elif self._head_timer is None:
                self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        # A head that begins a read owns all of it, as far as we can tell (the rest of
        # a request body may come first); one pipelined after another in the same
        # read counts as what the parser shows of it (the field being read stays
        # hidden). The reads after count whole.
        self._head_bytes = self._read if self._begun == 0 else 0
        self._begun += 1
        if self._zero_copy:
            self.scope["extensions"] = {ZERO_COPY: {}}

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if (
            max(self._head_bytes, self._read) > self._max_head
            and self._head_seen() > self._max_head
        ):
            raise _HeadTooLarge
        existing = self.cycle
        super().on_headers_complete()
        if self.cycle is not existing:
            # uvicorn builds its cycle by name; its send is looked up when the task runs.
            self.cycle.__class__ = _Cycle
            cast(_Cycle, self.cycle).transport = _HeadHeldTransport(self.transport)

    def _head_seen(self) -> int:
        """The bytes of the head the parser has passed on (within 4 per field)."""
        return len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def _refuse(self) -> None:
        log.info("refused a request head of more than %d bytes", self._max_head)
        self._disarm()
        if not self.transport.is_closing():
            # 400 as h11 answers; 431 would name the cause, clients treat both alike
            self.send_400_response(f"request head longer than {self._max_head} bytes")

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        waiting = self._in_head or self.cycle is None  # a head begun, or nothing yet
        if waiting and not self.transport.is_closing():
            log.info("closed a connection that sent no complete request head in time")
            self.transport.close()


class _HeadHeldTransport:
    """The cycle's view of its connection: a response head waits for the body's
    first bytes in the same turn of the event loop and leaves in the same write.
    Two writes were two system calls and, with Nagle off, two segments the client
    wakes for, on every manifest and config blob."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.under = transport
        self._head = b""
        self.holding = False

    def write(self, data: bytes) -> None:
        if self.holding:
            self._head += data
            return
        if self._head:
            data, self._head = self._head + data, b""
        self.under.write(data)

    def flush(self) -> None:
        head, self._head = self._head, b""
        if head and not self.under.is_closing():  # a client gone takes no head
            self.under.write(head)

    def close(self) -> None:
        self.flush()
        self.under.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.under, name)


class _Cycle(RequestResponseCycle):
    """uvicorn's request cycle, writing a head with its body, and also taking
    ``http.response.zerocopysend`` messages where the connection offers them."""

    transport: _HeadHeldTransport  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.transport.holding = True
            try:
                await super().send(message)
            finally:
                self.transport.holding = False
            # A small answer's body follows in this turn of the loop and takes the head
            # along; a body that waits (a blob still coming from the upstream) must not
            # hold the head back from a client that times its headers.
            asyncio.get_running_loop().call_soon(self.transport.flush)
            return
        if kind == ZERO_COPY:
            await self._send_file(message)
            return
        await super().send(message)
        self.transport.flush()  # a HEAD's body, or an empty one, writes nothing

    async def _send_file(self, message: Any) -> None:
        if ZERO_COPY not in self.scope.get("extensions", {}):
            raise RuntimeError(f"{ZERO_COPY} is not offered on this connection")
        if not self.response_started or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {ZERO_COPY!r}")
        file = message["file"]
        offset = message.get("offset")
        count = message.get("count")
        if offset is None:
            offset = file.tell()
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        if self.chunked_encoding or count > self.expected_content_length:
            raise RuntimeError(f"{ZERO_COPY} needs a Content-Length that covers it")
        self.transport.flush()
        if self.scope["method"] != "HEAD" and not self.disconnected:
            if not await _sendfile(self.transport.under, file.fileno(), offset, count):
                self.disconnected = True
                return
            self.expected_content_length -= count
        if not message.get("more_body", False):
            await self.send({"type": "http.response.body", "body": b""})


async def _sendfile(transport: asyncio.Transport, fd: int, offset: int, count: int) -> bool:
    """``count`` bytes of ``fd`` from ``offset`` into the transport's socket, after
    what the transport still buffers; False when the connection broke or closed
    (then it is closed), an error when the file ended early (the connection too)."""
    loop = asyncio.get_running_loop()
    # Our own descriptor: the transport's number may be closed and reused by another
    # connection while we wait, ours keeps naming this socket.
    out = os.dup(transport.get_extra_info("socket").fileno())
    ready: asyncio.Future[None] | None = None

    def writable() -> None:
        if ready is not None and not ready.done():
            ready.set_result(None)

    async def wait() -> None:
        nonlocal ready
        ready = loop.create_future()
        loop.add_writer(out, writable)
        try:
            await ready
        finally:
            loop.remove_writer(out)

    try:
        while transport.get_write_buffer_size():  # the head, or a slow reader's backlog
            await wait()
            await asyncio.sleep(0)  # the transport writes in its own turn
        while count > 0:
            if transport.is_closing():
                return False
            try:
                sent = os.sendfile(out, fd, offset, min(count, _SENDFILE_CHUNK))
            except BlockingIOError:
                await wait()
                continue
            if sent == 0:
                transport.close()
                raise EOFError(f"the file ended {count} bytes before its Content-Length")
            offset += sent
            count -= sent
        return True
    except OSError:
        transport.close()
        return False
    finally:
        os.close(out)


def bind_address(host: str, port: int, *, workers: int) -> socket.socket:
    """The API's listening socket, bound before anything else starts: an address
    another server holds is refused at once, naming it, not after the app started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Shared only once bound: another mirror's workers, sharing their address
        # too, refuse this bind rather than take it in.
        sock.bind((host, port))
        if workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        sock.close()
        raise ConfigError("server.port", f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def serve(config: uvicorn.Config, sock: socket.socket, scheme: str) -> None:
    """Serve on ``sock`` (from ``bind_address``) with ``config.workers`` processes."""
    with sock, contextlib.suppress(KeyboardInterrupt):
        if config.workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            _serve_workers(config, sock, scheme)


def _serve_workers(config: uvicorn.Config, shared: socket.socket, scheme: str) -> None:
    """uvicorn's supervisor over ``config.workers`` processes, each listening on the
    address twice: on a socket of its own (``SO_REUSEPORT``: the kernel spreads new
    connections over those), and on ``shared``, where connections wait while no
    worker is up (a crash, a restart); on their own sockets they would be refused then."""
    from uvicorn.supervisors import Multiprocess

    host, port = shared.getsockname()[:2]
    own = _OwnSocket(shared.family, host, port)
    log.info("serving %s://%s:%d with %d workers", scheme, host, port, config.workers)
    with own:
        Multiprocess(config, sockets=[shared, own]).run()


class _OwnSocket(socket.socket):
    """Sent to a worker process, arrives as a socket of that worker's own, bound to
    the address (the parent's stays unbound)."""

    def __init__(self, family: int, host: str, port: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.address = (host, port)

    def __reduce__(self) -> tuple[Any, ...]:
        return _bound_like, (self.family, *self.address)


def _bound_like(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """The uvicorn settings that bound request heads and send files zero-copy."""
    return {
        # asyncio's own loop, not uvloop: under 100 connections at full CPU uvloop served
        # some connections seconds late (p99 0.8-1.2 s, timeouts at 1,000 connections,
        # even for a three-line app) where asyncio's loop takes them in turn (p99 60-130
        # ms, none over 0.7 s at 1,000), for about the same requests/s.
        "loop": "asyncio",
        "http": functools.partial(
            BoundedHttpToolsProtocol,
            header_timeout=server.header_timeout,
            max_header_bytes=server.max_header_bytes,
        ),
    }
