"""Hostile numbers from clients and upstreams: bounded parsing, no 500, nothing leaked."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings
from mirror.manifest import OCI_MANIFEST
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, make_settings
from tests.fakes import FakeRegistry
from tests.support.descriptors import blob_descriptors

pytestmark = pytest.mark.anyio

HUGE = "9" * 5000
SQUARED = "²".encode("latin-1")  # a digit to str.isdigit(), not to int()


def raw(headers: dict[str, str | bytes]) -> list[tuple[bytes, bytes]]:
    """Headers as bytes: httpx refuses to encode a non-ASCII str."""
    return [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]


async def test_huge_range_on_a_filling_blob_is_no_500_and_leaks_nothing(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.hold_blobs = asyncio.Event()
    url = f"/v2/library/a/blobs/{digest}"
    first = asyncio.create_task(client.get(url))
    await fake.halfway.wait()
    ranged = [
        asyncio.create_task(client.get(url, headers={"Range": f"bytes={HUGE}-"})) for _ in range(20)
    ]
    fake.hold_blobs.set()
    assert (await first).content == data
    for response in await asyncio.gather(*ranged):
        assert response.status_code in (200, 416), response.text  # ignored or refused
    await fills_settled(client)
    assert blob_descriptors() == 0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"bytes=0-{HUGE}", slice(None)),
        (f"bytes=-{HUGE}", slice(None)),
        (b"bytes=" + SQUARED + b"-", slice(None)),
    ],
)
async def test_huge_range_ends_are_clamped_to_the_blob(
    client: httpx.AsyncClient, fake: FakeRegistry, header: str | bytes, expected: slice
) -> None:
    data = os.urandom(1000)
    digest = fake.add_blob(data)
    url = f"/v2/library/a/blobs/{digest}"
    await client.get(url)
    response = await client.get(url, headers=raw({"Range": header}))
    assert response.status_code in (200, 206)
    assert response.content == data[expected]


@pytest.mark.parametrize("n", ["²", HUGE, "-1", "1e3", " 5"])
async def test_catalog_and_tag_page_sizes_are_parsed_with_bounds(
    client: httpx.AsyncClient, fake: FakeRegistry, n: str
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    for path in ("/v2/_catalog", "/v2/library/a/tags/list"):
        response = await client.get(path, params={"n": n})
        assert response.status_code < 500, (path, n, response.text)


async def test_unreadable_retry_after_still_serves_stale(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    digest, _ = fake.add_image("library/a", "1", [b"layer"])
    retry_settings = make_settings(tmp_path, retries=1)
    app = create_app(retry_settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
        clock.now += 3600
        fake.status = 503
        fake.headers = {"Retry-After": "soon"}
        response = await client.get("/v2/library/a/manifests/1")
        assert response.status_code == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Warning"].startswith("110")


async def test_an_upstream_503_says_when_to_come_back(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    app = create_app(
        make_settings(tmp_path), upstream_transport=httpx.MockTransport(fake), now=clock
    )
    async with app_client(app) as client:
        fake.status = 503
        fake.headers = {"Retry-After": "7"}
        response = await client.get("/v2/library/a/manifests/1")
        assert (response.status_code, response.headers["Retry-After"]) == (503, "7")
        fake.headers = {}
        response = await client.get("/v2/library/a/manifests/1")
        assert response.status_code == 503
        assert "Retry-After" not in response.headers  # unknown until the breaker opens


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "soon"},
        {"Retry-After": "nan"},
        {"Retry-After": HUGE},
        {"ratelimit-limit": SQUARED, "ratelimit-remaining": HUGE},
    ],
)
async def test_hostile_upstream_headers_on_errors_are_no_500(
    settings: Settings, clock: Clock, headers: dict[str, str | bytes]
) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers=raw(headers))

    app = create_app(settings, upstream_transport=httpx.MockTransport(upstream), now=clock)
    async with app_client(app) as client:
        response = await client.get("/v2/library/a/manifests/1")
        assert response.status_code == 429
        retry_after = response.headers.get("Retry-After")
        assert retry_after is None or retry_after.isdigit()


@pytest.mark.parametrize("claimed", ["sha256:nothex", "md5:abc", SQUARED, "sha256:" + "a" * 5000])
async def test_malformed_upstream_digest_serves_stale_or_an_upstream_error(
    settings: Settings, fake: FakeRegistry, clock: Clock, claimed: str | bytes
) -> None:
    digest, body = fake.add_image("library/a", "1", [b"layer"])
    fake.add_manifest("library/b", "1", OCI_MANIFEST, body)
    hostile = False

    async def upstream(request: httpx.Request) -> httpx.Response:
        response = await fake(request)
        if not hostile:
            return response
        headers = {**response.headers, "Docker-Content-Digest": claimed}
        return httpx.Response(response.status_code, headers=raw(headers), content=response.content)

    app = create_app(settings, upstream_transport=httpx.MockTransport(upstream), now=clock)
    async with app_client(app) as client:
        assert (await client.get("/v2/library/a/manifests/1")).status_code == 200
        clock.now += 3600
        hostile = True
        stale = await client.get("/v2/library/a/manifests/1")
        assert stale.status_code == 200
        assert stale.headers["Docker-Content-Digest"] == digest
        fresh = await client.get("/v2/library/b/manifests/1")
        assert fresh.status_code == 503, fresh.text


@pytest.mark.parametrize("length", [SQUARED, HUGE, "-5"])
async def test_hostile_upstream_content_length_is_no_500(
    settings: Settings, clock: Clock, length: str | bytes
) -> None:
    fake = FakeRegistry()
    digest = fake.add_blob(b"hello")

    async def upstream(request: httpx.Request) -> httpx.Response:
        response = await fake(request)
        if request.method == "HEAD":
            return httpx.Response(200, headers=raw({"Content-Length": length}))
        return response

    app = create_app(settings, upstream_transport=httpx.MockTransport(upstream), now=clock)
    async with app_client(app) as client:
        response = await client.head(f"/v2/library/a/blobs/{digest}")
        assert response.status_code < 500
