"""The read-only pull checks of the OCI distribution-spec conformance suite, through a
cold and then a warm ``mirror serve`` in front of docker-registry (no referrers API).

The suite itself (Go) cannot be built by the test command here: its current runner
needs Go 1.22 (Debian has 1.19), its legacy Ginkgo tests need ginkgo v2 and reggie,
which no package carries. These are its checks, from ``01_pull_test.go``,
``03_discovery_test.go`` and the runner's ``TestPull``, ``TestHead``,
``TestManifestErrors``, ``TestEmpty`` and ``TestReferrers``.
"""

from __future__ import annotations

import hashlib
import secrets

import httpx
import pytest

from mirror.manifest import OCI_INDEX, OCI_MANIFEST
from tests.conftest import SeededUpstream
from tests.support.oci import SPEC_CODES

pytestmark = pytest.mark.e2e

ACCEPT = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}


def _random_digest() -> str:
    return "sha256:" + hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def _pull_checks(client: httpx.Client, seeded: SeededUpstream, manifest_body: bytes) -> None:
    repo, image = "library/test", seeded.single
    assert client.get("/v2/").status_code == 200
    # Pull blobs.
    for method in ("HEAD", "GET"):
        missing = client.request(method, f"/v2/{repo}/blobs/{_random_digest()}")
        assert missing.status_code == 404
        blob = client.request(method, f"/v2/{repo}/blobs/{image.config_digest}")
        assert blob.status_code == 200
        assert blob.headers["Docker-Content-Digest"] == image.config_digest
        assert int(blob.headers["Content-Length"]) == image.config_size
    # Pull manifests, by digest and by tag, with the headers the runner checks.
    for method in ("HEAD", "GET"):
        for reference in (image.manifest_digest, "1"):
            got = client.request(method, f"/v2/{repo}/manifests/{reference}", headers=ACCEPT)
            assert got.status_code == 200
            assert got.headers["Content-Type"] == OCI_MANIFEST
            assert got.headers["Docker-Content-Digest"] == image.manifest_digest
            assert got.headers["Content-Length"] == str(len(manifest_body))
            if method == "GET":
                assert got.content == manifest_body
        for reference in (".INVALID_MANIFEST_NAME", _random_digest(), "missing-abc123"):
            gone = client.request(method, f"/v2/{repo}/manifests/{reference}", headers=ACCEPT)
            assert gone.status_code == 404
    # Error codes: a bad digest is 400 with an OCI error from the spec's table, or 404.
    bad = client.get(
        f"/v2/{repo}/manifests/sha256:totallywrong",
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert bad.status_code in (400, 404)
    assert {e["code"] for e in bad.json()["errors"]} <= SPEC_CODES
    # Discovery: tags in order, limited by n, started after last.
    tags = client.get(f"/v2/{repo}/tags/list").json()["tags"]
    assert tags == sorted(tags) and "1" in tags
    assert client.get(f"/v2/{repo}/tags/list", params={"n": 1}).json()["tags"] == tags[:1]
    after = client.get(f"/v2/{repo}/tags/list", params={"n": 1, "last": tags[0]})
    assert tags[0] not in after.json()["tags"]
    # Referrers of a digest nothing refers to, and of a listed subject: a valid index.
    for subject in (_random_digest(), image.manifest_digest):
        listed = client.get(f"/v2/{repo}/referrers/{subject}")
        assert listed.status_code == 200
        assert listed.headers["Content-Type"] == OCI_INDEX
        index = listed.json()
        assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2
        assert index["manifests"] == []


def test_the_suites_pull_checks_pass_through_a_cold_and_a_warm_mirror(
    seeded: SeededUpstream,
) -> None:
    body = seeded.registry.get_manifest("library/test", "1").content
    with seeded.mirror() as mirror, httpx.Client(base_url=mirror.url, timeout=30) as client:
        _pull_checks(client, seeded, body)  # cold
        mirror.wait_fills_settled()
        mark = seeded.registry.mark()
        _pull_checks(client, seeded, body)  # warm
        served = [e for e in seeded.registry.requests_since(mark) if e.status == 200]
        assert [e for e in served if e.kind in ("blob", "manifest")] == []
