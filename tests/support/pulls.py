"""Pulling an image through the mirror in process, as a client does, and its size."""

from __future__ import annotations

import json

import httpx

from mirror.manifest import OCI_MANIFEST
from tests.conftest import fills_settled
from tests.fakes import FakeRegistry

ACCEPT = {"Accept": OCI_MANIFEST}


async def pull(client: httpx.AsyncClient, name: str, tag: str) -> None:
    """What a client does: the manifest by tag, then each blob."""
    response = await client.get(f"/v2/{name}/manifests/{tag}", headers=ACCEPT)
    assert response.status_code == 200, response.text
    document = response.json()
    for descriptor in [document["config"], *document["layers"]]:
        blob = await client.get(f"/v2/{name}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200
        await fills_settled(client)


def image_size(fake: FakeRegistry, manifest: str) -> int:
    media_type, body = fake.manifests[manifest]
    document = json.loads(body)
    return len(body) + sum(int(d["size"]) for d in [document["config"], *document["layers"]])
