"""HTTP details as RFC 9110/9112 and the OCI distribution spec say."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from tests.conftest import live_server
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


async def test_a_closed_range_of_a_blob_being_filled_gets_only_verified_bytes(
    live: live_server, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.corrupt.add(digest)  # the fill will turn out wrong
    fake.hold_blobs = asyncio.Event()
    url = f"{live.url}/v2/library/x/blobs/{digest}"
    async with httpx.AsyncClient(timeout=30) as http:
        leader = asyncio.create_task(http.get(url))
        await fake.halfway.wait()
        ranged = asyncio.create_task(http.get(url, headers={"Range": "bytes=0-99"}))
        await asyncio.sleep(0.05)
        assert not ranged.done()  # written but unverified bytes are not served
        fake.hold_blobs.set()
        results = await asyncio.gather(leader, ranged, return_exceptions=True)
    # The fill failed verification: the range is aborted, never a clean 206.
    assert isinstance(results[1], httpx.HTTPError), results[1]


async def test_a_closed_range_of_a_blob_being_filled_is_served_once_verified(
    live: live_server, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.hold_blobs = asyncio.Event()
    url = f"{live.url}/v2/library/x/blobs/{digest}"
    async with httpx.AsyncClient(timeout=30) as http:
        leader = asyncio.create_task(http.get(url))
        await fake.halfway.wait()
        ranged = asyncio.create_task(http.get(url, headers={"Range": "bytes=100-199"}))
        fake.hold_blobs.set()
        whole, part = await asyncio.gather(leader, ranged)
    assert whole.content == data
    assert part.status_code == 206
    assert part.content == data[100:200]


async def test_head_of_a_blob_of_unknown_size_gives_no_content_length(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.no_length = True
    digest = fake.add_blob(b"x" * 1000)
    response = await client.head(f"/v2/library/x/blobs/{digest}")
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert "content-length" not in response.headers


async def test_an_http_1_0_client_gets_a_content_length_not_chunks(
    live: live_server, fake: FakeRegistry
) -> None:
    fake.no_length = True  # the upstream does not say; chunked would be the easy way
    data = os.urandom(300_000)
    digest = fake.add_blob(data)
    host, port = live.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v2/library/x/blobs/{digest} HTTP/1.0\r\nHost: mirror\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()  # HTTP/1.0: the server closes after the response
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].split()[1] == "200"
    assert "transfer-encoding: chunked" not in lines
    assert f"content-length: {len(data)}" in lines
    assert body == data


async def test_a_405_says_which_methods_are_allowed(client: httpx.AsyncClient) -> None:
    response = await client.put("/v2/library/x/manifests/1", content=b"{}")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"


async def test_an_accept_of_only_unsupported_types_costs_no_upstream_request(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/x", "1", [b"layer"])
    headers = {"Accept": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    response = await client.get("/v2/library/x/manifests/1", headers=headers)
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake.count("GET", "manifest") == fake.count("HEAD", "manifest") == 0
