"""The server protocol `mirror serve` runs (mirror/web/server.py): httptools with
bounded request heads, and cached blobs sent by the kernel."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.fills.fill import Fill
from mirror.web import server
from mirror.web.app import create_app
from mirror.web.server import uvicorn_options
from tests.conftest import fills_settled, live_server, make_settings
from tests.fakes import FakeRegistry
from tests.support.descriptors import open_descriptors
from tests.support.hostile import served
from tests.support.tls import TestCA

pytestmark = pytest.mark.anyio

BOUND = 4096


async def _answer(port: int, *writes: bytes) -> bytes:
    """What the server sends back to these writes, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in writes:
            writer.write(data)
            await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_a_head_past_the_bound_is_refused_however_it_arrives(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings = replace(settings, server=replace(settings.server, max_header_bytes=BOUND))
    app = create_app(settings)
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 100) for i in range(30))  # ~3.4 KiB
    assert len(fields) < BOUND < 2 * len(fields)
    start = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n"
    async with served(app, **uvicorn_options(settings.server)) as mirror:
        # under the bound: served
        assert (await _answer(mirror.port, start + fields + b"Connection: close\r\n\r\n"))[
            :12
        ] == b"HTTP/1.1 200"
        # complete, in one write, over the bound
        whole = start + fields + fields.replace(b"X-F", b"X-G") + b"\r\n"
        assert (await _answer(mirror.port, whole))[:12] == b"HTTP/1.1 400"
        # not complete, in one write: many fields, or one long one
        assert (await _answer(mirror.port, start + fields + fields))[:12] == b"HTTP/1.1 400"
        long = start + b"X-Long: " + b"v" * (BOUND + 1)
        assert (await _answer(mirror.port, long))[:12] == b"HTTP/1.1 400"
        # one long field, a piece at a time
        pieces = [start + b"X-Long: ", *[b"v" * 1024] * 5]
        assert (await _answer(mirror.port, *pieces))[:12] == b"HTTP/1.1 400"
    await app.state.cache.aclose()
    app.state.cache.store.close()


async def _two_readers_across_the_hold(
    client: httpx.AsyncClient,
    path: str,
    fake: FakeRegistry,
    while_held: Callable[[], None] = lambda: None,
) -> list[bytes]:
    """Two GETs of a blob the upstream holds halfway: each reads its first bytes
    during the hold, the rest once it is released."""
    assert fake.hold_blobs is not None
    async with client.stream("GET", path) as first, client.stream("GET", path) as second:
        streams = [first.aiter_raw(), second.aiter_raw()]
        got = [await stream.__anext__() for stream in streams]
        assert not fake.hold_blobs.is_set()
        while_held()
        fake.hold_blobs.set()
        for i, stream in enumerate(streams):
            got[i] += b"".join([piece async for piece in stream])
    return got


async def test_blobs_go_by_sendfile_from_a_fill_and_from_the_cache_in_ranges_and_to_http_1_0(
    live: live_server, fake: FakeRegistry, sendfile_calls: list[int]
) -> None:
    data = os.urandom(6 * 1024 * 1024 + 17)  # held halfway, past a few upstream chunks
    digest = fake.add_blob(data)
    path = f"/v2/library/a/blobs/{digest}"
    fake.hold_blobs = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url) as client:

        def while_held() -> None:  # the fill's readers are sent its file as it grows
            assert sendfile_calls and fake.count("GET", "blob") == 1

        assert await _two_readers_across_the_hold(client, path, fake, while_held) == [data] * 2
        assert sum(sendfile_calls) >= 2 * len(data)  # asked for; a full socket takes less
        sendfile_calls.clear()
        await fills_settled(client)  # the miss may end before its blob is in the cache
        whole = await client.get(path)
        ranged = await client.get(path, headers={"Range": "bytes=100-1048675"})
        tail = await client.get(path, headers={"Range": "bytes=-70000"})
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Content-Length"] == str(len(data))
    assert ranged.status_code == 206 and ranged.content == data[100:1048676]
    assert ranged.headers["Content-Range"] == f"bytes 100-1048675/{len(data)}"
    assert tail.status_code == 206 and tail.content == data[-70000:]
    assert sum(sendfile_calls) >= len(data) + 1048576 + 70000
    port = int(live.url.rsplit(":", 1)[1])
    answer = await _answer(port, f"GET {path} HTTP/1.0\r\nHost: mirror\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"200"
    assert f"content-length: {len(data)}".encode() in head.lower().split(b"\r\n")
    assert body == data


async def test_readers_of_a_fill_that_runs_out_of_disk_get_the_rest_from_upstream(
    live: live_server,
    fake: FakeRegistry,
    sendfile_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What reached the disk goes by sendfile, the rest as bytes in the same answer."""
    data = os.urandom(6 * 1024 * 1024 + 17)
    digest = fake.add_blob(data)
    fake.hold_blobs = asyncio.Event()
    write = Fill._write

    def write_until_full(fill: Fill, chunk: bytes) -> None:
        if fake.hold_blobs is not None and fake.hold_blobs.is_set():  # both readers are in
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(fill, chunk)

    monkeypatch.setattr(Fill, "_write", write_until_full)
    path = f"/v2/library/a/blobs/{digest}"
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        assert await _two_readers_across_the_hold(client, path, fake) == [data] * 2
    assert sendfile_calls
    assert fake.count("GET", "blob") == 3  # the fill, then one resume per reader


async def test_clients_gone_mid_sendfile_leave_no_descriptor_open(
    live: live_server, fake: FakeRegistry, sendfile_calls: list[int]
) -> None:
    data = os.urandom(24 * 1024 * 1024)
    digest = fake.add_blob(data)
    path = f"/v2/library/a/blobs/{digest}"
    port = int(live.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=live.url) as client:
        assert (await client.get(path)).content == data
        before = open_descriptors()
        for _ in range(10):  # read a little, then hang up
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
            await reader.readexactly(256 * 1024)
            writer.transport.abort()
        assert sendfile_calls
        await _until(lambda: open_descriptors() <= before)
        assert (await client.get(path)).content == data  # and the server goes on


async def test_zero_copy_is_offered_on_plain_tcp_only(tmp_path: Path) -> None:
    """TLS encrypts in user space: its connections get body messages, as before."""
    offered: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            offered.append(scope.get("extensions", {}))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    ca = TestCA(tmp_path)
    issued = ca.issue("server")
    options = uvicorn_options(make_settings(tmp_path).server)
    async with served(app, **options) as plain:
        async with httpx.AsyncClient(base_url=plain.url) as client:
            assert (await client.get("/")).status_code == 200
    tls: dict[str, Any] = {"ssl_certfile": str(issued.certificate), "ssl_keyfile": str(issued.key)}
    async with served(app, **options, **tls) as secure:
        url = secure.url.replace("http:", "https:")
        trust = ssl.create_default_context(cafile=str(ca.certificate))
        async with httpx.AsyncClient(base_url=url, verify=trust) as client:
            assert (await client.get("/")).status_code == 200
    assert offered == [{server.ZERO_COPY: {}}, {}]


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class _Recorded:
    """A connection's transport that remembers what each write carried."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_a_small_answer_leaves_in_one_write_with_its_head(tmp_path: Path) -> None:
    """Head and body in one write: one system call and one segment for the client to
    wake for, not two; a HEAD's head, a streamed answer's chunks and a closing
    connection's last answer still all leave."""
    writes: list[bytes] = []
    head_seen = asyncio.Event()

    class Recording(server.BoundedHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_Recorded(transport, writes))  # type: ignore[arg-type]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/late":  # the body waits for the client to have the head
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await head_seen.wait()
            await send({"type": "http.response.body", "body": b"late"})
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one", b"two"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})

    settings = make_settings(tmp_path).server
    protocol = functools.partial(
        Recording,
        header_timeout=settings.header_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    async with served(app, http=protocol) as plain:
        async with httpx.AsyncClient(base_url=plain.url) as client:
            got = await client.get("/")
            assert (got.status_code, got.content) == (200, b"hello")
            assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200")
            assert writes[0].endswith(b"\r\n\r\nhello")

            writes.clear()
            got = await client.head("/")
            assert (got.status_code, got.headers["content-length"]) == (200, "5")
            assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")

            writes.clear()
            async with client.stream("GET", "/late") as late:
                head_seen.set()
                assert await asyncio.wait_for(late.aread(), 30) == b"late"
            assert len(writes) == 2 and writes[0].endswith(b"\r\n\r\n")  # the head first

            writes.clear()
            assert (await client.get("/stream")).content == b"onetwo"
            assert len(writes) == 3 and writes[0].startswith(b"HTTP/1.1 200")
            assert writes[1:] == [b"3\r\ntwo\r\n", b"0\r\n\r\n"]
        writes.clear()
        answer = await _answer(
            plain.port, b"GET / HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nhello")
        assert len(writes) == 1
