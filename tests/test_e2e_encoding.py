"""An upstream or CDN that compresses blob answers (``Content-Encoding: gzip``) whatever it
is asked: the mirror hashes and serves the blob's own bytes, and skopeo pulls through it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.manifest import DOCKER_MANIFEST
from tests.fakes import FakeRegistry
from tests.support import skopeo
from tests.support.mirror import MirrorProcess
from tests.support.quirky import QuirkyUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def gzipping() -> Iterator[QuirkyUpstream]:
    registry = FakeRegistry()
    with QuirkyUpstream(registry, gzip_blobs=True) as upstream:
        yield upstream


def test_blobs_sent_gzip_encoded_are_served_as_their_digest(gzipping: QuirkyUpstream) -> None:
    data = b"compressible " * 100_000
    digest = gzipping.registry.add_blob(data)
    entry = {"name": "docker.io", "url": gzipping.url, "retries": 0}
    with MirrorProcess([entry]) as mirror:
        url = f"{mirror.url}/v2/library/x/blobs/{digest}"
        for _ in range(2):  # the miss, then the cached copy
            response = httpx.get(url, headers={"Accept-Encoding": "identity"})
            assert response.status_code == 200
            assert "content-encoding" not in response.headers
            assert response.headers.get("content-length") in (None, str(len(data)))
            assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest
    assert len(gzipping.blob_gets()) == 1  # verified and cached the first time
    assert {s.accept_encoding for s in gzipping.seen} == {"identity"}


def test_skopeo_pulls_through_the_mirror_from_a_gzipping_upstream(
    gzipping: QuirkyUpstream, tmp_path: Path
) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layers = [os.urandom(200_000), b"\0" * 500_000]
    registry = gzipping.registry
    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": registry.add_blob(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": registry.add_blob(layer),
                "size": len(layer),
            }
            for layer in layers
        ],
    }
    expected = registry.add_manifest(
        "library/x", "1", DOCKER_MANIFEST, json.dumps(document).encode()
    )
    entry = {"name": "docker.io", "url": gzipping.url, "retries": 0}
    with MirrorProcess([entry]) as mirror:
        assert skopeo.copy_to_dir(mirror.ref("library/x:1"), tmp_path / "out") == expected
