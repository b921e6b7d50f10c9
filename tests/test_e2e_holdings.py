"""End to end: after skopeo pulls ``private/app`` through a real ``mirror serve``, its
digest and blobs are refused under another name and through another upstream, each
refusal the real registry's own answer to a confirmation asked under that name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support import skopeo
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def test_a_pulled_image_is_refused_under_another_name_and_another_upstream(
    tmp_path: Path,
) -> None:
    image = write_image(tmp_path / "layout", "1", [4096, 60_000], seed=21)
    blobs = [image.config_digest, *(layer.digest for layer in image.layers)]
    with UpstreamRegistry(auth="token") as upstream:
        upstream.push_image(image, "private/app:1")
        # Two upstreams on one registry: what matters is who is asked, and under what name.
        upstreams = [
            {"name": "docker.io", "url": upstream.url, "retries": 0},
            {"name": "quay.io", "url": upstream.url, "retries": 0},
        ]
        with MirrorProcess(upstreams, workdir=tmp_path / "mirror") as mirror:
            pulled = skopeo.copy_to_dir(mirror.ref("private/app:1"), tmp_path / "pulled")
            assert pulled == image.manifest_digest
            mirror.wait_fills_settled()
            mark = upstream.mark()

            with pytest.raises(skopeo.SkopeoError):
                skopeo.copy_to_dir(
                    mirror.ref(f"someone/else@{image.manifest_digest}"), tmp_path / "other"
                )
            asks = [("someone/else", ""), ("someone/else", "?ns=quay.io"), ("quay.io/x/y", "")]
            for name, query in asks:
                url = f"{mirror.url}/v2/{name}/manifests/{image.manifest_digest}{query}"
                response = httpx.get(url, headers=ACCEPT)
                assert response.status_code == 404
                assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
                for blob in blobs:
                    response = httpx.get(f"{mirror.url}/v2/{name}/blobs/{blob}{query}")
                    assert response.status_code == 404
                    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"

            seen = upstream.requests_since(mark)
            confirmations = {(e.method, e.repo, e.reference, e.status) for e in seen}
            for repo in ("someone/else", "x/y"):
                assert ("HEAD", repo, image.manifest_digest, 404) in confirmations
                assert all(("HEAD", repo, blob, 404) in confirmations for blob in blobs)
            assert [e for e in seen if e.method == "GET" and e.kind in ("manifest", "blob")] == []

            # The same repository through the other upstream holds it there too:
            # confirmed with one HEAD, then served from the cache.
            mark = upstream.mark()
            again = mirror.ref(f"quay.io/private/app@{image.manifest_digest}")
            assert skopeo.copy_to_dir(again, tmp_path / "quay") == image.manifest_digest
            seen = upstream.requests_since(mark)
            assert [(e.method, e.kind, e.repo) for e in seen if e.kind != "base"] == [
                ("HEAD", "manifest", "private/app")
            ]
