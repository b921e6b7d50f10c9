"""How uvicorn serves the app: bounded request heads.

uvicorn's default parser (httptools) accepts request heads of any size, and no
uvicorn parser has a timeout for reading a head: 1,100 half-sent requests held
every descriptor for as long as their clients liked. The h11 parser bounds a
head's bytes (``h11_max_incomplete_event_size``); the protocol below adds the
missing deadline. The header count is checked in the web layer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServerSettings

__all__ = ["HeadTimeoutH11Protocol", "uvicorn_options"]

log = logging.getLogger("mirror.server")


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not
    complete ``header_timeout`` seconds after its first byte (or after connecting)."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a head has begun, or nothing yet
            if self._head_timer is None:
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed a connection that sent no complete request head in time")
            self.transport.close()


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """The uvicorn settings that bound request heads."""
    return {
        "http": functools.partial(HeadTimeoutH11Protocol, header_timeout=server.header_timeout),
        "h11_max_incomplete_event_size": server.max_header_bytes,
    }
