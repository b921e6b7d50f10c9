"""Two workers (two apps on one cache directory) agree on what a tag is, within a
moment rather than a ``tag_ttl``, once either of them saw it move."""

from __future__ import annotations

import httpx
import pytest

from mirror.config import Settings
from mirror.manifest import OCI_MANIFEST
from mirror.web.app import create_app
from tests.conftest import Clock, app_client
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}


async def test_a_tag_moved_by_one_worker_is_seen_by_the_other_within_a_second(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> None:
    ttl = settings.upstreams[0].tag_ttl
    old, _ = fake.add_image("library/x", "1", [b"old"])
    transport = httpx.MockTransport(fake)
    first = create_app(settings, upstream_transport=transport, now=clock)
    second = create_app(settings, upstream_transport=transport, now=clock)
    url = "/v2/library/x/manifests/1"

    async def digest(client: httpx.AsyncClient) -> str:
        response = await client.get(url, headers=ACCEPT)
        assert response.status_code == 200
        return response.headers["Docker-Content-Digest"]

    async with app_client(first) as a, app_client(second) as b:
        assert await digest(a) == await digest(b) == old
        clock.now += ttl + 1
        assert await digest(b) == old  # b revalidates: its record is newer than a's
        new, _ = fake.add_image("library/x", "1", [b"new"])  # then the tag moves
        seen_by_a = await digest(a)
        clock.now += 1.5
        # Whatever a answered, b answers the same a moment later, and a sticks to it.
        assert await digest(b) == seen_by_a
        assert await digest(a) == seen_by_a
        clock.now += ttl
        assert await digest(a) == await digest(b) == new
