from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from mirror.config import Settings, parse
from mirror.storage.redis import RedisSettings
from mirror.web.app import create_app
from mirror.web.server import uvicorn_options
from tests.fakes import TOKEN_REALM, FakeRegistry
from tests.support.hostile import served
from tests.support.images import ImageInfo, IndexInfo, write_image, write_index
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweed import S3Endpoint, SeaweedS3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """A wall clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def make_settings(tmp_path: Path, **upstream: object) -> Settings:
    entry = {
        "name": "docker.io",
        "url": "http://upstream.fake",
        "retries": 0,
        "auth_realms": [TOKEN_REALM],  # the fake's token service is on another host
        **upstream,
    }
    return parse(
        {"cache": {"directory": str(tmp_path / "cache")}, "upstreams": [entry]}, environ={}
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as http:
        yield http


class app_client:  # noqa: N801 - used like a function
    """An httpx client on the app in process, closing the app's resources after."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://mirror")

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.http

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.app.state.cache.aclose()
        self.app.state.cache.store.close()


class live_server(served):  # noqa: N801 - used like a function
    """The app served by a real uvicorn on 127.0.0.1:<free port>, in the test's event loop,
    with its lifespan, letting requests under way finish at the end.

    In-process transports buffer whole bodies; streaming, aborts and overlapping
    requests need real connections.
    """

    def __init__(self, app: Starlette, **options: Any) -> None:
        self.app = app
        super().__init__(app, force_exit=False, **{"lifespan": "on", "http": "auto", **options})


@pytest.fixture
async def live(settings: Settings, fake: FakeRegistry, clock: Clock) -> AsyncIterator[live_server]:
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    # the protocol `mirror serve` runs: bounded heads, cached blobs by os.sendfile
    async with live_server(app, **uvicorn_options(settings.server)) as server:
        yield server


@dataclass
class SeededUpstream:
    """A token-auth docker-registry holding the images the end-to-end tests pull."""

    registry: UpstreamRegistry
    single: ImageInfo  # library/test:1, OCI
    docker: ImageInfo  # library/v2:1, Docker schema 2
    multi: IndexInfo  # library/multi:1, OCI index of two platforms
    large: ImageInfo  # library/large:1, one 256 MiB layer

    def mirror(self, **options: Any) -> MirrorProcess:
        upstream = {"name": "docker.io", "url": self.registry.url, "retries": 1}
        upstream.update(options.pop("upstream", {}))
        return MirrorProcess([upstream], **options)


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededUpstream]:
    layouts = tmp_path_factory.mktemp("layouts")
    with UpstreamRegistry(auth="token") as registry:
        single = write_image(layouts / "single", "1", [4096, 300_000], seed=1)
        docker = write_image(layouts / "docker", "1", [2048, 100_000], seed=2)
        multi = write_index(layouts / "multi", "1", layers=(1024, 50_000), seed=3)
        large = write_image(layouts / "large", "1", [256 * 1024 * 1024], seed=4)
        registry.push_image(single, "library/test:1")
        registry.push_image(docker, "library/v2:1", fmt="v2s2")
        registry.push_image(multi, "library/multi:1")
        registry.push_image(large, "library/large:1")
        yield SeededUpstream(registry, single, docker, multi, large)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[S3Endpoint]:
    """One SeaweedFS S3 server for the session (tests keep apart by key prefix)."""
    with SeaweedS3() as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix (``redis_settings``)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own: one it may stop and start."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_settings(redis_server: RedisServer) -> RedisSettings:
    return RedisSettings(redis_server.url, prefix=f"test-{uuid.uuid4().hex}:")


async def fills_settled(client: httpx.AsyncClient) -> None:
    """Wait until no fill is under way: a reader may finish before its fill is adopted."""
    while "\nmirror_fills_in_flight 0.0" not in (await client.get("/metrics")).text:
        await asyncio.sleep(0)


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts os.sendfile was asked for in this process (by the servers that
    tests run in process)."""
    calls: list[int] = []
    real: Callable[..., int] = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    return calls
