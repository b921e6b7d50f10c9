"""Per-client budgets: every request, and apart from it the requests that go upstream,
so that one client's cold pulls cannot spend the upstream's pull limit for everyone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from mirror.config import ConfigError, parse
from mirror.manifest import OCI_MANIFEST
from mirror.web.app import create_app
from tests.conftest import Clock
from tests.fakes import FakeRegistry
from tests.support.htpasswd import basic, write_htpasswd

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}


def limited_app(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, auth: bool = False, **limits: Any
) -> Starlette:
    data: dict[str, Any] = {
        "cache": {"directory": str(tmp_path / "cache")},
        "upstreams": [{"name": "docker.io", "url": "http://upstream.fake", "retries": 0}],
        "limits": limits,
    }
    if auth:
        write_htpasswd(tmp_path / "htpasswd", {"alice": "a", "bob": "b"})
        data["auth"] = {"htpasswd": str(tmp_path / "htpasswd")}
    return create_app(parse(data, {}), upstream_transport=httpx.MockTransport(fake), now=clock)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Starlette, str], httpx.AsyncClient]]:
    """Clients of one app from different addresses."""
    opened: list[tuple[httpx.AsyncClient, Starlette]] = []

    def make(app: Starlette, address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app, client=(address, 40000))
        client = httpx.AsyncClient(transport=transport, base_url="http://mirror")
        opened.append((client, app))
        return client

    yield make
    apps = {id(app): app for _, app in opened}
    for client, _ in opened:
        await client.aclose()
    for app in apps.values():
        await app.state.cache.aclose()
        app.state.cache.store.close()


async def test_request_budget_per_address(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, connect: Any
) -> None:
    app = limited_app(tmp_path, fake, clock, requests="2/s")
    one, two = connect(app, "10.0.0.1"), connect(app, "10.0.0.2")
    assert [(await one.get("/v2/")).status_code for _ in range(2)] == [200, 200]
    refused = await one.get("/v2/")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert (await two.get("/v2/")).status_code == 200  # another address, another budget
    assert (await one.get("/healthz")).status_code == 200
    assert (await one.get("/metrics")).status_code == 200  # scrapes are not budgeted
    clock.now += 0.5
    assert (await one.get("/v2/")).status_code == 200
    assert (await one.get("/v2/")).status_code == 429
    assert 'mirror_rate_limited_total{budget="requests"} 2.0' in (await two.get("/metrics")).text


async def test_request_budget_per_user_behind_one_address(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, connect: Any
) -> None:
    app = limited_app(
        tmp_path, fake, clock, auth=True, requests="3/m", requests_burst=2, per_address=False
    )
    nat = connect(app, "10.0.0.1")
    alice, bob = basic("alice", "a"), basic("bob", "b")
    assert [(await nat.get("/v2/", headers=alice)).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    assert (await nat.get("/v2/", headers=bob)).status_code == 200
    refused = await nat.get("/v2/", headers=alice)
    assert refused.headers["Retry-After"] == "20"


async def test_misses_have_their_own_budget_and_hits_do_not_spend_it(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, connect: Any
) -> None:
    app = limited_app(tmp_path, fake, clock, upstream="2/m")
    cold, other = connect(app, "10.0.0.1"), connect(app, "10.0.0.2")
    blobs = [fake.add_blob(f"blob {i}".encode()) for i in range(4)]
    assert (await cold.get(f"/v2/library/a/blobs/{blobs[0]}")).status_code == 200
    assert (await cold.get(f"/v2/library/a/blobs/{blobs[1]}")).status_code == 200
    calls = fake.total
    refused = await cold.get(f"/v2/library/a/blobs/{blobs[2]}")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "30"
    assert fake.total == calls  # refused before going upstream
    # Hits cost the upstream nothing and stay served.
    for _ in range(5):
        assert (await cold.get(f"/v2/library/a/blobs/{blobs[0]}")).status_code == 200
    # Another client's misses are not held up by this one's.
    assert (await other.get(f"/v2/library/a/blobs/{blobs[2]}")).status_code == 200
    assert (await other.get(f"/v2/library/a/blobs/{blobs[3]}")).status_code == 200
    clock.now += 30
    assert (await cold.get(f"/v2/library/a/blobs/{blobs[3]}")).status_code == 200  # a hit
    metrics = (await other.get("/metrics")).text
    assert 'mirror_rate_limited_total{budget="upstream"} 1.0' in metrics


async def test_a_client_over_its_miss_budget_gets_a_stale_tag_rather_than_nothing(
    tmp_path: Path, fake: FakeRegistry, clock: Clock, connect: Any
) -> None:
    app = limited_app(tmp_path, fake, clock, upstream="1/h")
    client = connect(app, "10.0.0.1")
    fake.add_image("library/a", "1", [b"layer"])
    assert (await client.get("/v2/library/a/manifests/1", headers=ACCEPT)).status_code == 200
    clock.now += 301  # past the tag's TTL: it wants revalidating
    stale = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert stale.status_code == 200
    assert "Stale" in stale.headers["Warning"]
    missing = await client.get("/v2/library/b/manifests/1", headers=ACCEPT)
    assert missing.status_code == 429


def test_limit_configuration(tmp_path: Path) -> None:
    def limits(**raw: Any) -> Any:
        upstreams = [{"name": "docker.io", "url": "http://upstream.fake"}]
        return parse({"upstreams": upstreams, "limits": raw}, {}).limits

    assert limits().requests_rate is None and limits().upstream_rate is None
    assert limits(upstream="100/6h").upstream_rate == pytest.approx(100 / 21600)
    assert limits(upstream="100/6h").upstream_burst == 100
    assert limits(requests="20/s", requests_burst=50).requests_burst == 50
    for bad in ("fast", "0/s", "10/0s", "10/fortnight"):
        with pytest.raises(ConfigError, match=r"limits\.requests"):
            limits(requests=bad)
    with pytest.raises(ConfigError, match=r"limits\.upstream_burst"):
        limits(upstream="1/s", upstream_burst=0)
