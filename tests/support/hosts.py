"""Small HTTP servers on distinct loopback hosts, for tests where origins matter.

On Linux all of 127.0.0.0/8 is loopback, so ``127.0.0.1``, ``127.0.0.2`` and
``127.0.0.3`` are three different origins on one machine: an upstream, the blob
storage it redirects to, and a stranger. :class:`AppServer` serves any ASGI app on
one of them (optionally over TLS) in a thread; :class:`Recorder` keeps every
request an app received.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp

from .ports import Service

__all__ = ["AppServer", "Recorder", "Seen"]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names

    @property
    def carries_secrets(self) -> bool:
        return any(h in self.headers for h in ("authorization", "proxy-authorization", "cookie"))


class Recorder:
    """Every request seen, in order; thread-safe (servers run in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def record(self, request: Request) -> Seen:
        seen = Seen(
            request.method,
            request.url.path,
            request.url.query,
            {k.lower(): v for k, v in request.headers.items()},
        )
        with self._lock:
            self._seen.append(seen)
        return seen

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)


class AppServer(Service):
    """An ASGI app served by uvicorn on ``host:<free port>`` in a background thread."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.certfile, self.keyfile = certfile, keyfile
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.certfile else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10) -> AppServer:
        sock = socket.socket()
        sock.bind((self.host, 0))
        sock.listen(64)
        self._sock, self.port = sock, sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            ssl_certfile=str(self.certfile) if self.certfile else None,
            ssl_keyfile=str(self.keyfile) if self.keyfile else None,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.host} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
