"""End to end: signatures and SBOMs of an image in docker-registry (no referrers API,
the referrers tag schema as tools push it there), through a cold mirror, then across
an air gap by warm, export and import, served by an offline mirror."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.manifest import OCI_INDEX, OCI_MANIFEST
from tests.support import skopeo
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess, run_cli
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
EMPTY = "application/vnd.oci.empty.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_blob(client: httpx.Client, repo: str, data: bytes, media_type: str) -> dict[str, object]:
    started = client.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    separator = "&" if "?" in location else "?"
    done = client.put(f"{location}{separator}digest={_digest(data)}", content=data)
    assert done.status_code == 201, done.text
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}


def _push_manifest(
    client: httpx.Client, repo: str, reference: str, media_type: str, body: bytes
) -> str:
    response = client.put(
        f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, response.text
    return _digest(body)


def _push_referrers(
    upstream: UpstreamRegistry, repo: str, subject: str, subject_size: int
) -> list[dict[str, Any]]:
    """A signature and an SBOM of ``subject``, and its referrers tag, as cosign or oras
    push them to a registry without the referrers API. Returns the tag's descriptors."""
    descriptors = []
    with upstream.client() as client:
        empty = _push_blob(client, repo, b"{}", EMPTY)
        for artifact_type, payload in ((SIG, b'{"critical":{"type":"cosign"}}'), (SBOM, b"{}\n")):
            layer = _push_blob(client, repo, payload + subject.encode(), artifact_type)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": empty,
                "layers": [layer],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
                "annotations": {"org.example.kind": artifact_type},
            }
            body = json.dumps(manifest).encode()
            digest = _push_manifest(client, repo, _digest(body), OCI_MANIFEST, body)
            descriptors.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": len(body),
                    "artifactType": artifact_type,
                    "annotations": manifest["annotations"],
                }
            )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        tag = subject.replace(":", "-")
        _push_manifest(client, repo, tag, OCI_INDEX, json.dumps(index).encode())
    return descriptors


def _referrers_and_artifacts(
    url: str, repo: str, subject: str
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The referrers index's descriptors, and each artifact with its blobs, as served."""
    with httpx.Client(base_url=url, timeout=30) as client:
        listed = client.get(f"/v2/{repo}/referrers/{subject}")
        assert listed.status_code == 200, listed.text
        assert listed.headers["Content-Type"] == OCI_INDEX
        manifests = listed.json()["manifests"]
        content: dict[str, bytes] = {}
        for descriptor in manifests:
            got = client.get(
                f"/v2/{repo}/manifests/{descriptor['digest']}", headers={"Accept": OCI_MANIFEST}
            )
            assert got.status_code == 200, got.text
            content[descriptor["digest"]] = got.content
            document = got.json()
            for blob in [document["config"], *document["layers"]]:
                content[blob["digest"]] = client.get(f"/v2/{repo}/blobs/{blob['digest']}").content
        filtered = client.get(f"/v2/{repo}/referrers/{subject}", params={"artifactType": SBOM})
        assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
        assert [m["artifactType"] for m in filtered.json()["manifests"]] == [SBOM]
    return manifests, content


def test_referrers_cross_an_air_gap_with_their_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "layout", "1", [10_000], seed=21)
    archive = tmp_path / "carry.tar"
    with UpstreamRegistry(auth="token") as upstream:
        upstream.push_image(image, "library/signed:1")
        subject = upstream.manifest_digest("library/signed", "1")
        size = len(upstream.get_manifest("library/signed", "1").content)
        pushed = _push_referrers(upstream, "library/signed", subject, size)
        upstream_content = {
            d["digest"]: upstream.get_manifest("library/signed", d["digest"]).content
            for d in pushed
        }
        # docker-registry has no referrers API: the mirror answers from the tag.
        with upstream.client() as client:
            assert client.get(f"/v2/library/signed/referrers/{subject}").status_code == 404
        connected = MirrorProcess(
            [{"name": "docker.io", "url": upstream.url}], workdir=tmp_path / "connected"
        )
        with connected:
            pulled = skopeo.copy_to_dir(connected.ref("library/signed:1"), tmp_path / "cold")
            assert pulled == subject
            listed, content = _referrers_and_artifacts(connected.url, "library/signed", subject)
            assert listed == pushed  # the upstream's referrers, as its tag lists them
            for digest, data in content.items():
                assert _digest(data) == digest
            assert {d: content[d] for d in upstream_content} == upstream_content
            nothing = httpx.get(
                f"{connected.url}/v2/library/signed/referrers/{'sha256:' + '0' * 64}"
            )
            assert nothing.status_code == 200 and nothing.json()["manifests"] == []
        fresh = MirrorProcess(
            [{"name": "docker.io", "url": upstream.url}], workdir=tmp_path / "warmed"
        )
        warm_config = ["--config", str(fresh.config_path)]
        warmed = run_cli("warm", "library/signed:1", *warm_config)
        assert warmed.returncode == 0, warmed.stderr
        assert "2 referrers" in warmed.stdout
        exported = run_cli("export", "library/signed:1", "-o", str(archive), *warm_config)
        assert exported.returncode == 0, exported.stderr
    island = MirrorProcess(
        [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
        extra_args=("--offline",),
        workdir=tmp_path / "island",
    )
    imported = run_cli("import", str(archive), "--config", str(island.config_path))
    assert imported.returncode == 0, imported.stderr
    with island:
        pulled = skopeo.copy_to_dir(island.ref("library/signed:1"), tmp_path / "offline")
        assert pulled == subject
        offline_listed, offline_content = _referrers_and_artifacts(
            island.url, "library/signed", subject
        )
    assert offline_listed == listed
    assert offline_content == content
