"""Small upstreams on 127.0.0.1 for scenarios that need real sockets: an httpx-style
handler (such as ``FakeRegistry``) served over HTTP, and a server that accepts
connections and never answers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

__all__ = ["HandlerServer", "SilentServer", "served"]

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class served:  # noqa: N801 - used like a function
    """An ASGI app on uvicorn at 127.0.0.1:<free port>, in the test's event loop."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        force_exit: bool = True,
        **options: Any,
    ) -> None:
        self.force_exit = force_exit  # streams held open by a scenario end with the server
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options = {"lifespan": "off", "http": "h11", "interface": "asgi3", **options}
        config = uvicorn.Config(app, log_level="warning", **options)
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.server.force_exit = self.force_exit
        assert self._task is not None
        await self._task
        self.socket.close()


class HandlerServer(served):
    """Serves ``handler(httpx.Request) -> httpx.Response`` over real HTTP."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        super().__init__(self._app)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        query = scope["query_string"].decode()
        url = f"http://upstream{scope['raw_path'].decode()}" + (f"?{query}" if query else "")
        request = httpx.Request(scope["method"], url, headers=scope["headers"])
        response = await self.handler(request)
        headers = [(k.lower(), v) for k, v in response.headers.raw]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        if scope["method"] != "HEAD":
            async for chunk in _body(response):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        yield response.content  # built from bytes
    except httpx.ResponseNotRead:
        async for chunk in response.aiter_raw():  # built from a stream
            yield chunk


class SilentServer:
    """Accepts connections, reads what is sent, never answers."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    def hang_up(self) -> None:
        """Close every connection accepted so far, without a word."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def __aexit__(self, *exc: object) -> None:
        self.hang_up()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
