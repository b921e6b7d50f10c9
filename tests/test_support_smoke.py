"""Smoke tests of the e2e support code: real docker-registry, token server, skopeo, images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tests.support import skopeo
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageInfo,
    IndexInfo,
    write_image,
    write_index,
)
from tests.support.ports import ServiceNotReady, free_port, wait_http_ok
from tests.support.registry import UpstreamRegistry, parse_access_log
from tests.support.token_server import TokenServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layout")


@pytest.fixture(scope="module")
def single(layout: Path) -> ImageInfo:
    return write_image(layout, "single", [2000, 300_000], seed=11)


@pytest.fixture(scope="module")
def multi(layout: Path) -> IndexInfo:
    return write_index(layout, "multi", layers=[1000, 5000], seed=12)


@pytest.fixture(scope="module")
def token_registry(single: ImageInfo, multi: IndexInfo) -> Iterator[UpstreamRegistry]:
    with UpstreamRegistry("token", users={"alice": "secret"}) as registry:
        registry.push_image(single, "library/single:1")
        registry.push_image(single, "library/v2:1", fmt="v2s2")
        registry.push_image(multi, "library/multi:1")
        yield registry


def _blob_sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_is_valid(layout: Path, single: ImageInfo, multi: IndexInfo) -> None:
    listing = subprocess.run(
        ["umoci", "ls", "--layout", str(layout)], capture_output=True, text=True, check=True
    )
    assert set(listing.stdout.split()) >= {"single", "multi"}
    blobs = layout / "blobs" / "sha256"
    for path in blobs.iterdir():
        assert _blob_sha(path) == "sha256:" + path.name
    config = json.loads((blobs / single.config_digest.split(":")[1]).read_bytes())
    for layer, diff_id in zip(single.layers, config["rootfs"]["diff_ids"], strict=True):
        raw = gzip.decompress((blobs / layer.digest.split(":")[1]).read_bytes())
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id == layer.diff_id
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            (member,) = tar.getmembers()
            assert member.size == layer.content_size
    assert single.total_size == single.config_size + sum(la.size for la in single.layers)
    assert {img.architecture for img in multi.images} == {"amd64", "arm64"}
    # deterministic: the same seed gives the same digests
    again = write_image(layout, "again", [2000, 300_000], seed=11)
    assert again.layer_digests == single.layer_digests


def test_large_layer_is_streamed(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        info = write_image(tmp_path, "big", [256 << 20], seed=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak Python allocation {peak} bytes"
    assert info.layers[0].content_size == 256 << 20
    assert info.layers[0].size > 256 << 20  # incompressible data, stored deflate blocks
    assert skopeo.sha256_file(tmp_path / "blobs/sha256" / info.layers[0].digest[7:]) == (
        info.layers[0].digest
    )


def test_token_registry_pull_single(
    token_registry: UpstreamRegistry, single: ImageInfo, tmp_path: Path
) -> None:
    reg = token_registry
    assert reg.manifest_digest("library/single", "1") == single.manifest_digest
    mark = reg.mark()
    tokens_before = reg.token_server.token_requests if reg.token_server else 0
    digest = skopeo.copy_to_dir(reg.ref("library/single:1"), tmp_path / "out")
    assert digest == single.manifest_digest
    assert skopeo.dir_blobs(tmp_path / "out") == single.blob_sizes
    # access log: one GET per blob, the bytes are exactly the blobs' sizes
    gets = reg.blob_gets(mark)
    assert sorted(e.reference or "" for e in gets) == sorted(single.blob_digests)
    assert all(e.status == 200 and e.repo == "library/single" for e in gets)
    assert reg.blob_bytes_sent(mark) == single.total_size
    assert [e.method for e in reg.manifest_requests(mark)] == ["GET"]
    # skopeo fetched an anonymous pull token
    assert reg.token_server is not None
    new_tokens = reg.token_server.log[tokens_before:]
    assert len(new_tokens) >= 1
    assert all(t.user is None for t in new_tokens)
    assert new_tokens[-1].granted[0].actions == ("pull",)


def test_token_registry_v2s2_and_index(
    token_registry: UpstreamRegistry, single: ImageInfo, multi: IndexInfo, tmp_path: Path
) -> None:
    reg = token_registry
    v2_digest = reg.manifest_digest("library/v2", "1")
    assert v2_digest != single.manifest_digest
    raw = skopeo.inspect_raw(reg.ref("library/v2:1"))
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == v2_digest
    assert skopeo.copy_to_dir(reg.ref("library/v2:1"), tmp_path / "v2") == v2_digest
    # the config and layers are unchanged by the conversion
    assert skopeo.dir_blobs(tmp_path / "v2") == single.blob_sizes

    assert reg.manifest_digest("library/multi", "1") == multi.index_digest
    assert reg.manifest_digest("library/multi", "1", accept=[OCI_INDEX]) == multi.index_digest
    # without OCI types in Accept, distribution 2.8 answers 404 for OCI content
    assert reg.get_manifest("library/multi", "1", [DOCKER_MANIFEST]).status_code == 404
    out = tmp_path / "multi"
    mark = reg.mark()
    digest = skopeo.copy_to_dir(reg.ref("library/multi:1"), out, all_platforms=True)
    assert digest == multi.index_digest
    skopeo.verify_dir(out, require_children=True)
    assert skopeo.dir_blobs(out) == multi.blob_sizes
    assert reg.blob_bytes_sent(mark) == multi.total_size
    by_digest = {e.reference for e in reg.manifest_requests(mark, method="GET")}
    assert by_digest >= {img.manifest_digest for img in multi.images}
    assert (
        reg.get_manifest("library/multi", multi.images[0].manifest_digest).headers["content-type"]
        == OCI_MANIFEST
    )


def test_token_registry_refuses_anonymous_push(
    token_registry: UpstreamRegistry, single: ImageInfo
) -> None:
    with pytest.raises(skopeo.SkopeoError):
        skopeo.copy(single.ref, token_registry.ref("library/anon:1"))
    # a user known to the token server may push
    skopeo.copy(single.ref, token_registry.ref("library/alice:1"), dest_creds="alice:secret")
    assert token_registry.manifest_digest("library/alice", "1") == single.manifest_digest


def test_basic_registry(single: ImageInfo, tmp_path: Path) -> None:
    with UpstreamRegistry("basic", users={"bob": "hunter2"}) as reg:
        reg.push_image(single, "library/single:1")
        anonymous = httpx.get(f"{reg.url}/v2/library/single/manifests/1")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == 'Basic realm="basic-realm"'
        with pytest.raises(skopeo.SkopeoError):
            skopeo.copy_to_dir(reg.ref("library/single:1"), tmp_path / "anon")
        with pytest.raises(skopeo.SkopeoError):
            skopeo.copy_to_dir(reg.ref("library/single:1"), tmp_path / "bad", creds="bob:nope")
        mark = reg.mark()
        digest = skopeo.copy_to_dir(
            reg.ref("library/single:1"), tmp_path / "ok", creds="bob:hunter2"
        )
        assert digest == single.manifest_digest
        assert len(reg.blob_gets(mark)) == len(single.blob_digests)
        assert reg.blob_bytes_sent(mark) == single.total_size


def test_registry_restart_keeps_port_storage_and_log(single: ImageInfo) -> None:
    with UpstreamRegistry("none") as reg:
        reg.push_image(single, "library/single:1")
        url = reg.url
        count = len(reg.requests())
        reg.stop()
        assert not reg.running
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v2/", timeout=2)
        assert len(reg.requests()) == count  # no sync probe when stopped
        reg.start()
        assert reg.url == url
        assert reg.manifest_digest("library/single", "1") == single.manifest_digest
        assert len(reg.requests()) == count + 1  # the HEAD; readiness probes are left out
    assert not reg.workdir.exists()


def test_token_server_standalone(tmp_path: Path) -> None:
    server = TokenServer(tmp_path / "cert.pem", users={"alice": "secret"})
    assert (tmp_path / "cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    threads_before = set(threading.enumerate())
    with server:
        params = {"service": "registry.test", "scope": "repository:library/x:pull,push"}
        assert httpx.get(server.realm, params=params, auth=("alice", "wrong")).status_code == 401
        body = httpx.get(server.realm, params=params, auth=("alice", "secret")).json()
        assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
        assert body["issued_at"].endswith("Z")
        claims = jwt.decode(
            body["token"], server.public_key_pem(), algorithms=["RS256"], audience="registry.test"
        )
        assert claims["sub"] == "alice"
        assert claims["access"] == [
            {"type": "repository", "name": "library/x", "actions": ["pull", "push"]}
        ]
        assert "x5c" in jwt.get_unverified_header(body["token"])
        anon = httpx.get(server.realm, params=params).json()["token"]
        assert jwt.decode(anon, options={"verify_signature": False})["access"][0]["actions"] == [
            "pull"
        ]
        assert httpx.get(server.realm).status_code == 200  # no scope at all
        assert server.token_requests == 4
        url = server.url
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)


def test_wait_http_ok_reports_dead_process() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"],
        stderr=subprocess.PIPE,
    )
    try:
        with pytest.raises(ServiceNotReady, match=r"(?s)code 3.*boom"):
            wait_http_ok(f"http://127.0.0.1:{free_port()}/", timeout=10, process=process)
    finally:
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_access_log_parsing() -> None:
    line = (
        '127.0.0.1 - - [26/Nov/2026:23:51:01 +0000] "GET /v2/library/x/blobs/sha256:'
        + "a" * 64
        + ' HTTP/1.1" 206 1024 "" "skopeo/1.9.3"\n'
        "garbage line\n"
        '127.0.0.1 - - [26/Nov/2026:23:51:01 +0000] "HEAD /v2/a/b/c/manifests/1?ns=docker.io '
        'HTTP/1.1" 200 559 "" "containerd/1.6"\n'
    )
    blob, manifest = parse_access_log(line)
    assert (blob.kind, blob.repo, blob.reference, blob.status, blob.size) == (
        "blob",
        "library/x",
        "sha256:" + "a" * 64,
        206,
        1024,
    )
    assert blob.is_blob_get
    assert (manifest.kind, manifest.repo, manifest.reference) == ("manifest", "a/b/c", "1")
    assert manifest.query == {"ns": ["docker.io"]}
    assert manifest.path == "/v2/a/b/c/manifests/1"
