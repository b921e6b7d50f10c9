from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import live_server
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


async def test_blob_miss_streams_and_is_cached(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = fake.add_blob(data)
    for _ in range(2):
        response = await client.get(f"/v2/library/a/blobs/{digest}")
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Accept-Ranges"] == "bytes"
    assert fake.count("GET", "blob") == 1


async def test_blob_head_of_uncached_blob_asks_upstream_head_only(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest = fake.add_blob(b"hello")
    response = await client.head(f"/v2/library/a/blobs/{digest}")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == "5"
    assert fake.count("HEAD", "blob") == 1
    assert fake.count("GET", "blob") == 0


@pytest.mark.parametrize(
    ("header", "status", "expected"),
    [
        ("bytes=0-9", 206, slice(0, 10)),
        ("bytes=100-", 206, slice(100, None)),
        ("bytes=-5", 206, slice(-5, None)),
        ("bytes=990-5000", 206, slice(990, None)),
        ("bytes=0-1,5-6", 200, slice(None)),
    ],
)
async def test_range_requests_on_cached_blobs(
    client: httpx.AsyncClient, fake: FakeRegistry, header: str, status: int, expected: slice
) -> None:
    data = os.urandom(1000)
    digest = fake.add_blob(data)
    await client.get(f"/v2/library/a/blobs/{digest}")
    response = await client.get(f"/v2/library/a/blobs/{digest}", headers={"Range": header})
    assert response.status_code == status
    assert response.content == data[expected]
    if status == 206:
        start = expected.start % len(data)
        assert response.headers["Content-Range"] == (
            f"bytes {start}-{start + len(response.content) - 1}/1000"
        )


async def test_range_beyond_the_end_is_416(client: httpx.AsyncClient, fake: FakeRegistry) -> None:
    digest = fake.add_blob(b"0123456789")
    await client.get(f"/v2/library/a/blobs/{digest}")
    response = await client.get(f"/v2/library/a/blobs/{digest}", headers={"Range": "bytes=10-"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */10"


async def test_range_on_a_miss_is_served_from_the_fill(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    response = await client.get(
        f"/v2/library/a/blobs/{digest}", headers={"Range": "bytes=1048576-"}
    )
    assert response.status_code == 206
    assert response.content == data[1048576:]
    assert fake.count("GET", "blob") == 1


async def test_wrong_bytes_from_upstream_never_enter_the_cache(
    live: live_server, fake: FakeRegistry
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.corrupt.add(digest)
    async with httpx.AsyncClient(base_url=live.url) as client:
        # The mirror aborts the body instead of ending it cleanly.
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"/v2/library/a/blobs/{digest}")
        fake.corrupt.clear()
        response = await client.get(f"/v2/library/a/blobs/{digest}")
    assert response.content == data
    assert fake.count("GET", "blob") == 2


async def test_unknown_blob_is_blob_unknown(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/library/a/blobs/sha256:" + "1" * 64)
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_tags_list_paginates_with_link(client: httpx.AsyncClient, fake: FakeRegistry) -> None:
    for tag in ("a", "b", "c"):
        fake.add_image("library/t", tag, [tag.encode()])
    first = await client.get("/v2/library/t/tags/list?n=2")
    assert first.json() == {"name": "library/t", "tags": ["a", "b"]}
    assert first.headers["Link"] == '</v2/library/t/tags/list?n=2&last=b>; rel="next"'
    second = await client.get("/v2/library/t/tags/list?n=2&last=b")
    assert second.json()["tags"] == ["c"]
    assert "Link" not in second.headers
    routed = await client.get("/v2/library/t/tags/list?ns=docker.io&n=2")
    assert routed.headers["Link"] == (
        '</v2/library/t/tags/list?ns=docker.io&n=2&last=b>; rel="next"'
    )
    bad = await client.get("/v2/library/t/tags/list?n=x")
    assert bad.status_code == 400


async def test_catalog_lists_cached_repositories(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    for name in ("library/b", "library/a", "org/c"):
        fake.add_image(name, "1", [name.encode()])
        await client.get(f"/v2/{name}/manifests/1")
    page = await client.get("/v2/_catalog?n=2")
    assert page.json() == {"repositories": ["library/a", "library/b"]}
    assert "last=library%2Fb" in page.headers["Link"]
    rest = await client.get("/v2/_catalog?n=2&last=library/b")
    assert rest.json() == {"repositories": ["org/c"]}


async def test_referrers_are_passed_through_with_their_filter(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    signature = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "c" * 64,
        "size": 10,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
    }
    fake.referrers = [signature, {**signature, "artifactType": "application/spdx+json"}]
    subject = "sha256:" + "d" * 64
    everything = await client.get(f"/v2/library/a/referrers/{subject}")
    assert everything.status_code == 200
    assert everything.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert len(everything.json()["manifests"]) == 2
    filtered = await client.get(
        f"/v2/library/a/referrers/{subject}",
        params={"artifactType": "application/spdx+json"},
    )
    assert [m["artifactType"] for m in filtered.json()["manifests"]] == ["application/spdx+json"]
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert "OCI-Filters-Applied" not in everything.headers
    assert fake.count("GET", "referrer") == 1  # one cached answer serves every filter
