"""Content addressed by sha512 is verified, cached and carried like sha256 content.

docker-registry 2.8 cannot hold sha512 content (it answers 404 for it), so the fake
upstream serves it here.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings
from mirror.layout import export_layout, import_layout, plan_export
from mirror.manifest import OCI_MANIFEST
from mirror.reference import parse_image_reference
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, fills_settled, live_server, make_settings
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def add_sha512_image(fake: FakeRegistry, repository: str, tag: str) -> tuple[str, bytes, bytes]:
    """An image whose config, layer and manifest are all addressed by sha512."""
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = b"sha512 layer " * 1000
    fake.blobs[sha512(config)] = config
    fake.blobs[sha512(layer)] = layer
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha512(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha512(layer),
                "size": len(layer),
            }
        ],
    }
    body = json.dumps(document).encode()
    fake.manifests[sha512(body)] = (OCI_MANIFEST, body)
    fake.tags[(repository, tag)] = sha512(body)
    return sha512(body), body, layer


async def test_sha512_blobs_and_manifests_are_verified_and_cached(
    client: httpx.AsyncClient, fake: FakeRegistry, settings: Settings
) -> None:
    digest, body, layer = add_sha512_image(fake, "library/a", "1")
    by_tag = await client.get("/v2/library/a/manifests/1", headers={"Accept": OCI_MANIFEST})
    assert by_tag.status_code == 200
    assert by_tag.headers["Docker-Content-Digest"] == digest  # the upstream's sha512 claim
    assert by_tag.content == body
    by_digest = await client.get(
        f"/v2/library/a/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
    )
    assert by_digest.headers["Docker-Content-Digest"] == digest
    for _ in range(2):
        blob = await client.get(f"/v2/library/a/blobs/{sha512(layer)}")
        assert blob.status_code == 200 and blob.content == layer
        assert blob.headers["Docker-Content-Digest"] == sha512(layer)
        head = await client.head(f"/v2/library/a/blobs/{sha512(layer)}")
        assert head.headers["Content-Length"] == str(len(layer))
    assert fake.count("GET", "blob") == 1
    assert fake.count("GET", "manifest") == 1
    await fills_settled(client)
    stored = settings.cache.directory / "blobs" / "sha512" / sha512(layer)[7:9]
    assert [p.name.split(".")[0] for p in stored.iterdir()] == [sha512(layer)[7:]]


async def test_a_corrupt_sha512_blob_is_never_cached(live: live_server, fake: FakeRegistry) -> None:
    data = bytes(range(256)) * 1200
    digest = sha512(data)
    fake.blobs[digest] = data
    fake.corrupt.add(digest)
    async with httpx.AsyncClient(base_url=live.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"/v2/library/a/blobs/{digest}")
        fake.corrupt.clear()
        response = await client.get(f"/v2/library/a/blobs/{digest}")
    assert response.content == data
    assert fake.count("GET", "blob") == 2


async def test_a_manifest_not_matching_its_sha512_is_refused(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, body, _ = add_sha512_image(fake, "library/a", "1")
    fake.manifests[digest] = (OCI_MANIFEST, body + b"\n")  # valid JSON, other bytes
    response = await client.get(
        f"/v2/library/a/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
    )
    assert response.status_code == 503
    assert fake.count("GET", "manifest") == 1


async def test_sha512_content_crosses_an_air_gap(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    digest, body, layer = add_sha512_image(fake, "library/a", "1")
    settings = make_settings(tmp_path / "connected")
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        await client.get("/v2/library/a/manifests/1")
        for blob in json.loads(body)["layers"] + [json.loads(body)["config"]]:
            await client.get(f"/v2/library/a/blobs/{blob['digest']}")
        cache = app.state.cache
        await cache.drain()
        cache.offline = True  # as `mirror export` reads it
        plan = await plan_export(cache, [parse_image_reference("library/a:1")])
        export_layout(cache, plan, tmp_path / "carry.tar")
    with tarfile.open(tmp_path / "carry.tar") as tar:
        names = set(tar.getnames())
    assert f"blobs/sha512/{sha512(layer).split(':')[1]}" in names
    assert f"blobs/sha512/{digest.split(':')[1]}" in names
    island = make_settings(tmp_path / "island")
    island = replace(island, cache=replace(island.cache, offline=True))
    app = create_app(island, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as client:
        summary = import_layout(app.state.cache, tmp_path / "carry.tar")
        assert summary.failures == [] and summary.blobs_added == 2
        fake.calls.clear()
        served = await client.get("/v2/library/a/manifests/1")
        assert served.headers["Docker-Content-Digest"] == digest
        blob = await client.get(f"/v2/library/a/blobs/{sha512(layer)}")
        assert blob.content == layer
    assert fake.total == 0
