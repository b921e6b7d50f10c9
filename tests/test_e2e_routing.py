"""End to end: one mirror, two upstreams holding different images under the same name.

``docker.io`` (the default, token auth) and ``ghcr.io`` (basic auth, credentials from the
environment) both hold ``library/app:1``, but different images. A pull by path prefix
(``MIRROR/ghcr.io/library/app:1``), by default (``MIRROR/library/app:1``) and by containerd's
``?ns=`` must each get the right one, reach only the right upstream, and keep apart in the
cache; a registry that is not configured is refused without any connection anywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import skopeo
from tests.support.images import OCI_MANIFEST, ImageInfo, write_image
from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

ACCEPT_OCI = {"Accept": OCI_MANIFEST}
USER_VARIABLE = "MIRROR_TEST_GHCR_USERNAME"
PASSWORD_VARIABLE = "MIRROR_TEST_GHCR_PASSWORD"
WRONG = "not-the-password-5e1f"


@dataclass
class TwoUpstreams:
    hub: UpstreamRegistry  # "docker.io", token auth, the default upstream
    ghcr: UpstreamRegistry  # "ghcr.io", basic auth
    hub_image: ImageInfo  # library/app:1 on hub
    ghcr_image: ImageInfo  # library/app:1 on ghcr

    def upstreams(self) -> list[dict[str, Any]]:
        hub = {"name": "docker.io", "url": self.hub.url, "retries": 0}
        ghcr = {
            "name": "ghcr.io",
            "url": self.ghcr.url,
            "retries": 0,
            "username_env": USER_VARIABLE,
            "password_env": PASSWORD_VARIABLE,
        }
        return [hub, ghcr]

    def credentials(self, password: str | None = None) -> dict[str, str]:
        assert self.ghcr.push_credentials is not None
        user, real_password = self.ghcr.push_credentials
        return {USER_VARIABLE: user, PASSWORD_VARIABLE: password or real_password}

    def mirror(self) -> MirrorProcess:
        return MirrorProcess(self.upstreams(), env=self.credentials())

    def marks(self) -> tuple[int, int]:
        return self.hub.mark(), self.ghcr.mark()


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoUpstreams]:
    layouts = tmp_path_factory.mktemp("routing-layouts")
    hub_image = write_image(layouts / "hub", "1", [3000, 40_000], seed=101)
    ghcr_image = write_image(layouts / "ghcr", "1", [5000, 60_000], seed=202)
    assert hub_image.manifest_digest != ghcr_image.manifest_digest
    with UpstreamRegistry(auth="token") as hub, UpstreamRegistry(auth="basic") as ghcr:
        hub.push_image(hub_image, "library/app:1")
        ghcr.push_image(ghcr_image, "library/app:1")
        yield TwoUpstreams(hub, ghcr, hub_image, ghcr_image)


@pytest.fixture
def mirror(two: TwoUpstreams) -> Iterator[MirrorProcess]:
    with two.mirror() as process:
        yield process


def _manifest_requests(registry: UpstreamRegistry, mark: int) -> list[str]:
    """Manifest requests answered (the 401 challenges before them left out)."""
    return [
        f"{e.method} {e.repo}"
        for e in registry.requests_since(mark)
        if e.kind == "manifest" and e.status != 401
    ]


def test_a_path_prefix_routes_to_its_upstream_and_only_there(
    two: TwoUpstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub_mark, ghcr_mark = two.marks()
    got = skopeo.copy_to_dir(mirror.ref("ghcr.io/library/app:1"), tmp_path / "ghcr")
    assert got == two.ghcr_image.manifest_digest
    assert two.hub.requests_since(hub_mark) == []
    seen = two.ghcr.requests_since(ghcr_mark)
    assert "GET library/app" in _manifest_requests(two.ghcr, ghcr_mark)
    pulled = {e.reference for e in seen if e.is_blob_get and e.status == 200}
    assert pulled == set(two.ghcr_image.blob_digests)
    assert {e.repo for e in seen if e.repo is not None} == {"library/app"}


def test_a_name_without_prefix_goes_to_the_default_upstream_and_only_there(
    two: TwoUpstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub_mark, ghcr_mark = two.marks()
    got = skopeo.copy_to_dir(mirror.ref("library/app:1"), tmp_path / "hub")
    assert got == two.hub_image.manifest_digest
    assert two.ghcr.requests_since(ghcr_mark) == []
    seen = two.hub.requests_since(hub_mark)
    assert "GET library/app" in _manifest_requests(two.hub, hub_mark)
    pulled = {e.reference for e in seen if e.is_blob_get and e.status == 200}
    assert pulled == set(two.hub_image.blob_digests)


@pytest.mark.parametrize("namespace", ["ghcr.io", "docker.io"])
def test_containerd_ns_parameter_routes_to_that_upstream_and_says_so(
    two: TwoUpstreams, mirror: MirrorProcess, namespace: str
) -> None:
    right, wrong = (two.ghcr, two.hub) if namespace == "ghcr.io" else (two.hub, two.ghcr)
    image = two.ghcr_image if namespace == "ghcr.io" else two.hub_image
    right_mark, wrong_mark = right.mark(), wrong.mark()
    params = {"ns": namespace}
    response = httpx.get(
        f"{mirror.url}/v2/library/app/manifests/1", params=params, headers=ACCEPT_OCI
    )
    assert response.status_code == 200, response.text
    assert response.headers["OCI-Namespace"] == namespace
    assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert response.headers["Content-Type"] == OCI_MANIFEST
    config = image.config_digest
    blob = httpx.get(f"{mirror.url}/v2/library/app/blobs/{config}", params=params)
    assert blob.status_code == 200
    assert blob.headers["OCI-Namespace"] == namespace
    assert len(blob.content) == image.config_size
    assert _manifest_requests(right, right_mark) == ["GET library/app"]
    blobs = [e for e in right.requests_since(right_mark) if e.is_blob_get and e.status != 401]
    assert [e.reference for e in blobs] == [config]
    assert wrong.requests_since(wrong_mark) == []


def test_no_oci_namespace_header_without_ns(two: TwoUpstreams, mirror: MirrorProcess) -> None:
    for path in ("library/app", "ghcr.io/library/app"):
        response = httpx.get(f"{mirror.url}/v2/{path}/manifests/1", headers=ACCEPT_OCI)
        assert response.status_code == 200
        assert "OCI-Namespace" not in response.headers


def test_the_same_name_and_tag_stay_apart_in_the_cache(
    two: TwoUpstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub_digest, ghcr_digest = two.hub_image.manifest_digest, two.ghcr_image.manifest_digest
    assert skopeo.copy_to_dir(mirror.ref("library/app:1"), tmp_path / "a") == hub_digest
    assert skopeo.copy_to_dir(mirror.ref("ghcr.io/library/app:1"), tmp_path / "b") == ghcr_digest
    hub_mark, ghcr_mark = two.marks()
    # Every way of naming each image, now answered from the cache alone.
    assert skopeo.copy_to_dir(mirror.ref("ghcr.io/library/app:1"), tmp_path / "c") == ghcr_digest
    assert skopeo.copy_to_dir(mirror.ref("library/app:1"), tmp_path / "d") == hub_digest
    assert skopeo.copy_to_dir(mirror.ref("docker.io/library/app:1"), tmp_path / "e") == hub_digest
    url = f"{mirror.url}/v2/library/app/manifests/1"
    for namespace, digest in (("ghcr.io", ghcr_digest), ("docker.io", hub_digest)):
        response = httpx.get(url, params={"ns": namespace}, headers=ACCEPT_OCI)
        assert response.headers["Docker-Content-Digest"] == digest
    assert two.hub.requests_since(hub_mark) == []
    assert two.ghcr.requests_since(ghcr_mark) == []
    assert sorted(httpx.get(f"{mirror.url}/v2/_catalog").json()["repositories"]) == [
        "ghcr.io/library/app",
        "library/app",
    ]


class SilentListener:
    """A TCP listener that never accepts: a connection to it stays in its queue."""

    def __init__(self, port: int = 0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1

    def close(self) -> None:
        self.socket.close()


def test_an_unknown_registry_is_refused_without_any_connection(
    two: TwoUpstreams, mirror: MirrorProcess
) -> None:
    with ExitStack() as stack:
        listener = SilentListener()
        stack.callback(listener.close)
        listeners = [listener]
        # A registry host without a port means 443 or 80: listen there too when we may
        # (the test namespace is root's own; elsewhere those ports may be taken).
        for port in (80, 443):
            try:
                extra = SilentListener(port)
            except OSError:
                continue
            stack.callback(extra.close)
            listeners.append(extra)
        assert listener.connections() == 0
        hub_mark, ghcr_mark = two.marks()
        digest = two.hub_image.config_digest
        candidates = [
            ("GET", "/v2/library/app/manifests/1", {"ns": "evil.example"}),
            ("HEAD", "/v2/library/app/manifests/1", {"ns": "evil.example"}),
            ("GET", "/v2/library/app/manifests/1", {"ns": f"127.0.0.1:{listener.port}"}),
            ("GET", "/v2/library/app/manifests/1", {"ns": "127.0.0.1"}),
            ("GET", f"/v2/library/app/blobs/{digest}", {"ns": "evil.example"}),
            ("HEAD", f"/v2/library/app/blobs/{digest}", {"ns": f"127.0.0.1:{listener.port}"}),
            ("GET", "/v2/library/app/tags/list", {"ns": "evil.example"}),
            ("GET", "/v2/evil.example/x/manifests/1", {}),
            ("GET", "/v2/evil.example/library/app/manifests/1", {}),
            ("GET", "/v2/127.0.0.1/library/app/manifests/1", {}),
            ("GET", f"/v2/127.0.0.1/library/app/blobs/{digest}", {}),
            ("GET", "/v2/evil.example/x/tags/list", {}),
        ]
        for method, path, params in candidates:
            response = httpx.request(
                method, f"{mirror.url}{path}", params=params, headers=ACCEPT_OCI
            )
            what = f"{method} {path} {params}"
            assert response.status_code == 404, what
            assert "OCI-Namespace" not in response.headers, what
            if method == "GET":
                assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN", what
        assert [x.connections() for x in listeners] == [0] * len(listeners)
        assert two.hub.requests_since(hub_mark) == []
        assert two.ghcr.requests_since(ghcr_mark) == []
        log = mirror.log()
        assert "upstream=evil.example" not in log
        assert "upstream=127.0.0.1" not in log


def _check_upstreams(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mirror", "check-upstreams", "--config", str(config)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def _lines(output: str) -> dict[str, str]:
    """check-upstreams' lines by upstream name."""
    lines: dict[str, str] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("ok", "FAIL"):
            lines[fields[1]] = line
    return lines


def test_check_upstreams_says_ok_for_both(two: TwoUpstreams) -> None:
    mirror = two.mirror()
    try:
        result = _check_upstreams(mirror.config_path, two.credentials())
    finally:
        shutil.rmtree(mirror.workdir, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert set(lines) == {"docker.io", "ghcr.io"}, result.stdout
    assert lines["docker.io"].startswith("ok ")
    assert two.hub.url in lines["docker.io"]
    assert lines["ghcr.io"].startswith("ok ")
    assert two.ghcr.url in lines["ghcr.io"]
    assert "testuser" in lines["ghcr.io"]


def test_check_upstreams_fails_on_a_wrong_password_or_a_dead_upstream(two: TwoUpstreams) -> None:
    upstreams = two.upstreams()
    dead = f"http://127.0.0.1:{free_port()}"
    upstreams.append({"name": "quay.io", "url": dead, "retries": 0})
    mirror = MirrorProcess(upstreams)
    try:
        result = _check_upstreams(mirror.config_path, two.credentials(password=WRONG))
    finally:
        shutil.rmtree(mirror.workdir, ignore_errors=True)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert set(lines) == {"docker.io", "ghcr.io", "quay.io"}, result.stdout
    assert lines["docker.io"].startswith("ok ")
    assert lines["ghcr.io"].startswith("FAIL ")
    assert "authentication" in lines["ghcr.io"]
    assert WRONG not in result.stdout + result.stderr  # a password is never printed
    assert lines["quay.io"].startswith("FAIL ")
    assert dead in lines["quay.io"]
