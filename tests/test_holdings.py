"""A shared cache never widens access: a digest cached through one repository is
served under another only when that one is known to hold it (seen in one of its
manifests, or confirmed by its upstream)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from mirror.config import Settings, parse
from mirror.layout import import_layout
from mirror.manifest import MANIFEST_TYPES, OCI_INDEX
from mirror.reference import parse_image_reference
from mirror.singleflight import SingleFlight
from mirror.warm import warm
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled
from tests.fakes import FakeRegistry
from tests.support.images import write_image

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


def two_upstreams(tmp_path: Path, *, offline: bool = False) -> Settings:
    upstreams = [
        {"name": "docker.io", "url": "http://upstream.fake", "retries": 0},
        {"name": "other.io", "url": "http://other.fake", "retries": 0},
    ]
    cache = {"directory": str(tmp_path / "cache"), "offline": offline}
    return parse({"cache": cache, "upstreams": upstreams}, environ={})


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry(strict=True)


@pytest.fixture
def other() -> FakeRegistry:
    return FakeRegistry(strict=True)


class Upstreams:
    """The transport of both upstreams, by host."""

    def __init__(self, fake: FakeRegistry, other: FakeRegistry) -> None:
        self.fake, self.other = fake, other

    def __call__(self, request: httpx.Request) -> Coroutine[None, None, httpx.Response]:
        return (self.other if request.url.host == "other.fake" else self.fake)(request)


def mirror(
    tmp_path: Path,
    fake: FakeRegistry,
    other: FakeRegistry,
    clock: Clock,
    *,
    offline: bool = False,
    handler: Callable[[httpx.Request], Coroutine[None, None, httpx.Response]] | None = None,
) -> app_client:
    transport = httpx.MockTransport(handler or Upstreams(fake, other))
    app = create_app(
        two_upstreams(tmp_path, offline=offline), upstream_transport=transport, now=clock
    )
    return app_client(app)


@pytest.fixture
async def client(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    async with mirror(tmp_path, fake, other, clock) as http:
        yield http


def blobs_of(body: bytes) -> list[str]:
    document = json.loads(body)
    return [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]


async def pull(client: httpx.AsyncClient, name: str, reference: str) -> tuple[str, list[str]]:
    """Pull an image manifest and its blobs; returns its digest and blob digests."""
    response = await client.get(f"/v2/{name}/manifests/{reference}", headers=ACCEPT)
    assert response.status_code == 200, response.text
    blobs = blobs_of(response.content)
    for blob in blobs:
        assert (await client.get(f"/v2/{name}/blobs/{blob}")).status_code == 200
    await fills_settled(client)
    return response.headers["Docker-Content-Digest"], blobs


def error_code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["code"])


async def test_content_of_one_repository_is_not_served_under_another(
    client: httpx.AsyncClient, fake: FakeRegistry, other: FakeRegistry
) -> None:
    fake.add_image("private/app", "1", [b"secret layer"])
    digest, blobs = await pull(client, "private/app", "1")
    for name, upstream in (("someone/else", fake), ("other.io/private/app", other)):
        path = name.removeprefix("other.io/")
        response = await client.get(f"/v2/{name}/manifests/{digest}", headers=ACCEPT)
        assert response.status_code == 404
        assert error_code(response) == "MANIFEST_UNKNOWN"
        assert (await client.head(f"/v2/{name}/manifests/{digest}")).status_code == 404
        for blob in blobs:
            response = await client.get(f"/v2/{name}/blobs/{blob}")
            assert response.status_code == 404
            assert error_code(response) == "BLOB_UNKNOWN"
            assert (await client.head(f"/v2/{name}/blobs/{blob}")).status_code == 404
        # Each refusal is the upstream's own answer, asked under that repository.
        assert f"HEAD /v2/{path}/manifests/{digest}" in upstream.paths
        assert all(f"HEAD /v2/{path}/blobs/{blob}" in upstream.paths for blob in blobs)
    assert other.count("GET", "blob") == other.count("GET", "manifest") == 0
    assert fake.count("GET", "blob") == len(blobs)  # nothing fetched again
    assert fake.count("GET", "manifest") == 1
    # The repository that holds it is still served, from the cache.
    before = fake.total
    await pull(client, "private/app", digest)
    assert fake.total == before


async def test_a_blob_two_repositories_hold_upstream_is_served_under_both(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    _, body = fake.add_image("team/one", "1", [b"base layer"])
    shared = blobs_of(body)[1]
    fake.hold("team/two", shared)
    await pull(client, "team/one", "1")
    for _ in range(3):
        response = await client.get(f"/v2/team/two/blobs/{shared}")
        assert response.status_code == 200
        assert response.content == b"base layer"
    # One confirmation, then known: the bytes came from the cache each time.
    assert fake.paths.count(f"HEAD /v2/team/two/blobs/{shared}") == 1
    assert fake.count("GET", "blob") == 2


async def test_warm_hits_make_no_upstream_request_once_the_repository_is_known(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/app", "1", [b"layer one", b"layer two"])
    digest, blobs = await pull(client, "library/app", "1")
    before = fake.total
    for _ in range(5):
        await pull(client, "library/app", digest)
        await pull(client, "library/app", "1")
        for blob in blobs:
            assert (await client.head(f"/v2/library/app/blobs/{blob}")).status_code == 200
    assert fake.total == before


async def test_an_index_makes_its_children_and_their_blobs_known(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    amd64, amd64_body = fake.add_image("team/one", None, [b"amd64 layer"])
    arm64, arm64_body = fake.add_image("team/one", None, [b"arm64 layer"])
    index = fake.add_index("team/one", "1", [amd64, arm64])
    fake.add_manifest("team/two", "1", OCI_INDEX, fake.manifests[index][1])
    for child in (amd64, arm64):
        await pull(client, "team/one", child)
    # team/two's tag names the same index: its children and blobs are then team/two's.
    response = await client.get("/v2/team/two/manifests/1", headers=ACCEPT)
    assert response.status_code == 200
    before = fake.total
    for child, body in ((amd64, amd64_body), (arm64, arm64_body)):
        assert await pull(client, "team/two", child) == (child, blobs_of(body))
    assert fake.total == before


async def test_concurrent_askers_share_one_confirmation(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> None:
    _, body = fake.add_image("team/one", "1", [b"base layer"])
    shared = blobs_of(body)[1]
    fake.hold("team/two", shared)
    gate = asyncio.Event()

    async def held_heads(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            await gate.wait()
        return await fake(request)

    async with mirror(tmp_path, fake, other, clock, handler=held_heads) as client:
        await pull(client, "team/one", "1")
        flight = Counting()
        holdings = client._transport.app.state.cache.holdings  # type: ignore[attr-defined]
        assert isinstance(holdings._confirmations, SingleFlight)
        holdings._confirmations = flight
        asks = [asyncio.ensure_future(client.get(f"/v2/team/two/blobs/{shared}")) for _ in range(8)]
        # Until every asker has joined the one confirmation (or, were they not
        # held, answered without one). The bound only keeps a broken build from hanging.
        with anyio.fail_after(60):
            while flight.calls < len(asks) and not all(ask.done() for ask in asks):
                await asyncio.sleep(0.001)
        gate.set()
        for response in await asyncio.gather(*asks):
            assert response.status_code == 200
            assert response.content == b"base layer"
    assert fake.paths.count(f"HEAD /v2/team/two/blobs/{shared}") == 1


class Counting(SingleFlight[None]):
    """A SingleFlight that counts its callers."""

    calls = 0

    async def do(self, key: Hashable, work: Any) -> tuple[None, bool]:
        self.calls += 1
        return await super().do(key, work)


# 401: the mirror's own credentials refused, which is never the client's to answer.
@pytest.mark.parametrize(
    ("failure", "code"), [("down", "UNAVAILABLE"), (401, "UNAVAILABLE"), (403, "BLOB_UNKNOWN")]
)
async def test_a_confirmation_that_fails_refuses(
    client: httpx.AsyncClient, fake: FakeRegistry, failure: str | int, code: str
) -> None:
    fake.add_image("private/app", "1", [b"secret layer"])
    digest, blobs = await pull(client, "private/app", "1")
    if failure == "down":
        fake.down = True
    else:
        fake.status = int(failure)
    response = await client.get(f"/v2/someone/else/blobs/{blobs[1]}")
    assert error_code(response) == code
    response = await client.get(f"/v2/someone/else/manifests/{digest}", headers=ACCEPT)
    assert error_code(response) == code.replace("BLOB", "MANIFEST")
    # What the repository is known to hold is served whatever the upstream does.
    assert (await client.get(f"/v2/private/app/blobs/{blobs[1]}")).status_code == 200
    assert (await client.get(f"/v2/private/app/manifests/{digest}")).status_code == 200


async def test_offline_serves_only_what_a_repository_is_known_to_hold(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> None:
    fake.add_image("private/app", "1", [b"secret layer"])
    fake.add_image("public/app", "1", [b"public layer"])
    async with mirror(tmp_path, fake, other, clock) as client:
        digest, blobs = await pull(client, "private/app", "1")
        await pull(client, "public/app", "1")
    before = fake.total
    async with mirror(tmp_path, fake, other, clock, offline=True) as client:
        await pull(client, "private/app", digest)
        await pull(client, "private/app", "1")
        response = await client.get(f"/v2/public/app/manifests/{digest}", headers=ACCEPT)
        assert error_code(response) == "MANIFEST_UNKNOWN"
        for blob in blobs:
            response = await client.get(f"/v2/public/app/blobs/{blob}")
            if blob in fake.held["public/app"]:  # the same config: seen in its manifest
                assert response.status_code == 200
                continue
            assert error_code(response) == "BLOB_UNKNOWN"
            assert (await client.head(f"/v2/public/app/blobs/{blob}")).status_code == 404
    assert fake.total == before


async def test_a_cache_from_before_holdings_keeps_serving_what_its_tags_show(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> None:
    amd64, _ = fake.add_image("team/one", None, [b"amd64 layer"])
    arm64, _ = fake.add_image("team/one", None, [b"arm64 layer"])
    fake.add_index("team/one", "1", [amd64, arm64])
    pinned, pinned_body = fake.add_image("team/pinned", None, [b"pinned layer"])
    async with mirror(tmp_path, fake, other, clock) as client:
        assert (await client.get("/v2/team/one/manifests/1", headers=ACCEPT)).status_code == 200
        for child in (amd64, arm64):
            await pull(client, "team/one", child)
        await pull(client, "team/pinned", pinned)
    # What the previous version left: the same store, no holdings.
    shutil.rmtree(tmp_path / "cache" / "holdings")
    before = fake.total
    async with mirror(tmp_path, fake, other, clock, offline=True) as client:
        for child in (amd64, arm64):  # by digest first: the backfill, not a tag hit, knows
            await pull(client, "team/one", child)
        assert (await client.get("/v2/team/one/manifests/1", headers=ACCEPT)).status_code == 200
        response = await client.get(f"/v2/team/two/manifests/{amd64}", headers=ACCEPT)
        assert error_code(response) == "MANIFEST_UNKNOWN"
        # Pulled only by digest, it left no trace of its repository: unknown offline...
        response = await client.get(f"/v2/team/pinned/manifests/{pinned}", headers=ACCEPT)
        assert error_code(response) == "MANIFEST_UNKNOWN"
    assert fake.total == before
    # ...and confirmed once by the upstream when online.
    async with mirror(tmp_path, fake, other, clock) as client:
        assert await pull(client, "team/pinned", pinned) == (pinned, blobs_of(pinned_body))
    assert fake.paths[before:] == [f"HEAD /v2/team/pinned/manifests/{pinned}"]


async def test_import_and_warm_record_what_they_write(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> None:
    image = write_image(tmp_path / "layout", "1", [1000, 2000], seed=11)
    warmed, warmed_body = fake.add_image("team/warmed", "1", [b"warmed layer"])
    async with mirror(tmp_path, fake, other, clock) as client:
        cache = client._transport.app.state.cache  # type: ignore[attr-defined]
        summary = import_layout(cache, image.layout_dir, repository="team/imported")
        assert summary.failures == []
        warm_summary = await warm(
            cache, [parse_image_reference("team/warmed:1")], None, 2, show_progress=False
        )
        assert warm_summary.failures == []
    before = fake.total
    imported_blobs = [image.config_digest, *(layer.digest for layer in image.layers)]
    async with mirror(tmp_path, fake, other, clock, offline=True) as client:
        assert await pull(client, "team/imported", image.manifest_digest) == (
            image.manifest_digest,
            imported_blobs,
        )
        assert await pull(client, "team/warmed", warmed) == (warmed, blobs_of(warmed_body))
        for name in ("team/other", "team/warmed"):
            response = await client.get(f"/v2/{name}/blobs/{imported_blobs[1]}")
            assert error_code(response) == "BLOB_UNKNOWN"
    assert fake.total == before


async def test_docker_hubs_insufficient_scope_is_unknown(
    tmp_path: Path, fake: FakeRegistry, other: FakeRegistry, clock: Clock
) -> None:
    challenge = 'Bearer realm="http://upstream.fake/token",service="fake"'

    async def private_elsewhere(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "t", "expires_in": 300})
        if request.url.path.startswith("/v2/someone/"):  # private to us, or missing
            if "Authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": challenge})
            scope = f'{challenge},error="insufficient_scope"'
            return httpx.Response(401, headers={"WWW-Authenticate": scope})
        return await fake(request)

    fake.add_image("private/app", "1", [b"secret layer"])
    async with mirror(tmp_path, fake, other, clock, handler=private_elsewhere) as client:
        digest, blobs = await pull(client, "private/app", "1")
        response = await client.get(f"/v2/someone/else/blobs/{blobs[1]}")
        assert error_code(response) == "BLOB_UNKNOWN"
        response = await client.get(f"/v2/someone/else/manifests/{digest}", headers=ACCEPT)
        assert error_code(response) == "MANIFEST_UNKNOWN"
