"""The container image, the whole way an operator takes it, offline.

buildah builds the repository's ``Dockerfile``; its base image comes from the test
upstream through a running ``mirror serve`` (the mirror dogfooding itself: buildah's
``registries.conf`` sends Docker Hub to the mirror, and its fallback to a closed port), and
pip takes its wheels from the directory ``scripts/install test`` prepared. podman runs the
result; skopeo pulls through the running container and verifies every byte.

Root only, in a network namespace with nothing but loopback (``scripts/test`` runs the
suite so): the containers share that namespace (``--network host``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import skopeo
from tests.support.clients import access_lines, missing_tools, only_loopback
from tests.support.image import (
    Container,
    ContainerTools,
    StallingUpstream,
    base_rootfs,
    wheels_dir,
    write_base_image,
)
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
TAG = "localhost/mirror:test"
UID = 10001
CACHE = "/var/cache/mirror"  # the image's VOLUME and its config.toml's cache.directory


def _base_image() -> tuple[str, str]:
    """(repository, tag) on Docker Hub of the Dockerfile's base image."""
    bases = set()
    stages: set[str] = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if match := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            if match[1] not in stages:
                bases.add(match[1])
            if match[2]:
                stages.add(match[2])
    assert len(bases) == 1, f"one base image expected, found {bases}"
    name, _, tag = bases.pop().partition(":")
    return (name if "/" in name else f"library/{name}"), tag


@dataclass
class Built:
    tools: ContainerTools
    upstream: UpstreamRegistry
    builder_mirror: MirrorProcess


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if os.geteuid() != 0:
        pytest.fail("buildah and podman run containers as root here: run scripts/test")
    if not only_loopback():
        pytest.fail("run inside `unshare --net` with only loopback, as scripts/test does")
    missing = missing_tools("buildah", "podman", "runc", "conmon", "skopeo")
    if missing:
        pytest.fail(f"missing {missing}: run `scripts/install test`")
    work = tmp_path_factory.mktemp("image")
    repository, tag = _base_image()
    with UpstreamRegistry() as upstream:
        write_base_image(work / "base", base_rootfs(), tag)
        upstream.push(work / "base", tag, f"{repository}:{tag}")
        with MirrorProcess([{"name": "docker.io", "url": upstream.url}]) as mirror:
            closed = f"127.0.0.1:{free_port()}"  # nothing listens: only the mirror can serve
            registries = (
                'unqualified-search-registries = ["docker.io"]\n'
                'short-name-mode = "permissive"\n'
                f'[[registry]]\nprefix = "docker.io"\nlocation = "{closed}"\ninsecure = true\n'
                f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n'
            )
            with ContainerTools(registries) as tools:
                tools.buildah(
                    "bud",
                    "--isolation",
                    "chroot",
                    "--format",
                    "docker",  # OCI image configs have no HEALTHCHECK
                    "--tls-verify=false",
                    "--signature-policy",
                    str(tools.policy),
                    "--volume",
                    f"{wheels_dir()}:/wheels:ro",
                    "--build-arg",
                    "PIP_NO_INDEX=1",
                    "--build-arg",
                    "PIP_FIND_LINKS=/wheels",
                    "--tag",
                    TAG,
                    str(REPO),
                )
                yield Built(tools, upstream, mirror)


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_takes_its_base_through_the_mirror(built: Built) -> None:
    repository, tag = _base_image()
    # buildah's only other source for docker.io is a closed port, so the build itself shows
    # the mirror served the base; its access log shows the layers went through it.
    served = {
        line.target
        for line in access_lines(built.builder_mirror.log())
        if line.method == "GET" and line.status == 200
    }
    layers = built.upstream.get_manifest(repository, tag).json()["layers"]
    assert {f"/v2/{repository}/blobs/{layer['digest']}" for layer in layers} <= served


def test_the_image_is_small_runs_as_non_root_and_has_no_compiler(built: Built) -> None:
    (image,) = json.loads(built.tools.podman("image", "inspect", TAG).stdout)
    assert image["User"] == f"{UID}:{UID}"
    assert "mirror healthcheck" in " ".join(image["Healthcheck"]["Test"])
    added = image["Size"] - base_rootfs().stat().st_size
    assert added < 64 << 20  # the mirror and its libraries; a toolchain alone is more
    absent = "import shutil, sys; sys.exit(any(map(shutil.which, ('cc', 'gcc', 'make', 'pip'))))"
    built.tools.podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python", TAG, "-c", absent
    )


def test_the_container_serves_a_verified_pull_from_its_volume(built: Built, tmp_path: Path) -> None:
    image = write_image(tmp_path / "layout", "1", [64 << 10, 1 << 20], seed=15)
    pushed = built.upstream.push_image(image, "library/test:1")
    # Configuration by a mounted file (the upstream) and the environment (the port).
    config = tmp_path / "config.toml"
    config.write_text(
        (REPO / "config.toml")
        .read_text()
        .replace('url = "https://registry-1.docker.io"', f'url = "{built.upstream.url}"')
    )
    config.chmod(0o644)
    with Container(
        built.tools, TAG, CACHE, "--volume", f"{config}:/etc/mirror/config.toml:ro"
    ) as mirror:
        mirror.wait_ready()
        assert mirror.uids() == [str(UID)] * 4
        out = tmp_path / "out"
        assert skopeo.copy_to_dir(f"docker://127.0.0.1:{mirror.port}/library/test:1", out) == pushed
        built.tools.podman("healthcheck", "run", mirror.name)  # exits 0 when healthy
        cached = mirror.cache_dir()
        assert (cached / "cache.db").stat().st_uid == UID
        assert mirror.stop() == 0


def test_sigterm_mid_fill_leaves_no_temporary_file_and_no_half_entry(built: Built) -> None:
    with (
        StallingUpstream() as upstream,
        Container(
            built.tools,
            TAG,
            CACHE,
            "--env",
            f"MIRROR_UPSTREAMS_0_URL=http://127.0.0.1:{upstream.server_port}",
        ) as mirror,
    ):
        mirror.wait_ready()
        blob_url = f"{mirror.url}/v2/library/stall/blobs/{upstream.digest}"
        client = threading.Thread(target=_read_until_cut, args=(blob_url,))
        client.start()
        tmp = mirror.cache_dir() / "tmp"
        deadline = time.monotonic() + 60
        while not any(path.stat().st_size for path in tmp.glob("sha256-*")):
            assert time.monotonic() < deadline, "the fill never started"
            time.sleep(0.05)  # until the fill has its first half on disk
        assert mirror.stop() == 0  # stopped by SIGTERM within its grace, not killed
        client.join()
        assert list(tmp.iterdir()) == []
        upstream.whole.set()
        upstream.release.set()
        mirror.restart()
        body = httpx.get(blob_url, timeout=30).content
        assert hashlib.sha256(body).hexdigest() == upstream.digest.removeprefix("sha256:")
        assert upstream.blob_gets == 2  # nothing half-filled was served from the cache


def _read_until_cut(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=60) as response:
        for _ in response.iter_bytes():
            pass
