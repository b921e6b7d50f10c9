"""Building and running the mirror's own container image, offline, as an air-gapped site would.

``scripts/install test`` leaves under :data:`IMAGE_CACHE` what a site without internet
would bring in: a Debian + Python root filesystem made by ``mmdebstrap`` (the stand-in for
the Dockerfile's ``python:3.11-slim``) and a directory of the wheels the build installs.
:func:`write_base_image` turns the root filesystem into a one-layer OCI image to push to a
test upstream; :class:`ContainerTools` runs buildah and podman on one private storage, so
podman runs what buildah built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from .clients import Podman, _clean_environ, _run, host_architecture

__all__ = ["IMAGE_CACHE", "ContainerTools", "base_rootfs", "wheels_dir", "write_base_image"]

IMAGE_CACHE = Path("/var/cache/mirror-test")
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def base_rootfs() -> Path:
    path = IMAGE_CACHE / "base.tar"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `scripts/install test` (it makes it)")
    return path


def wheels_dir() -> Path:
    path = IMAGE_CACHE / "wheels"
    if not any(path.glob("*.whl")):
        raise FileNotFoundError(f"no wheels in {path}: run `scripts/install test` (it fills it)")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _add_blob(layout: Path, data: bytes) -> dict[str, object]:
    hexdigest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / hexdigest).write_bytes(data)
    return {"digest": f"sha256:{hexdigest}", "size": len(data)}


def write_base_image(layout: Path, rootfs: Path, tag: str) -> None:
    """An OCI layout holding ``rootfs`` (a tar) as a one-layer image tagged ``tag``.

    The layer stays uncompressed (its digest is its diff_id) and is linked, not copied,
    when the layout is on the same filesystem.
    """
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    hexdigest = _sha256(rootfs)
    target = layout / "blobs" / "sha256" / hexdigest
    try:
        os.link(rootfs, target)
    except OSError:
        shutil.copyfile(rootfs, target)
    layer = {
        "mediaType": OCI_LAYER_TAR,
        "digest": f"sha256:{hexdigest}",
        "size": target.stat().st_size,
    }
    config = {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["python3"],
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hexdigest}"]},
    }
    config_descriptor = _add_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_descriptor},
        "layers": [layer],
    }
    manifest_descriptor = _add_blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                **manifest_descriptor,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


class ContainerTools(Podman):
    """podman that can run containers (CLIENTS.md: ulimits, runc) and buildah on its storage."""

    def __init__(self, registries_conf: str) -> None:
        super().__init__(registries_conf, storage_driver="overlay")
        self.containers_conf.write_text(
            self.containers_conf.read_text()
            + "[containers]\n"
            + 'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        )
        self.containers_conf.write_text(
            self.containers_conf.read_text().replace("[engine]\n", '[engine]\nruntime = "runc"\n')
        )
        self.policy = self.workdir / "policy.json"
        self.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')

    def __enter__(self) -> ContainerTools:
        return self

    def buildah(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        env = _clean_environ(
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            REGISTRY_AUTH_FILE=str(self.auth_file),
            TMPDIR=str(self.workdir / "tmp"),
        )
        argv = [
            "buildah",
            "--storage-driver",
            self.storage_driver,
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "run"),
            *args,
        ]
        return _run(argv, env=env, timeout=timeout)

    def inspect(self, name: str, template: str) -> str:
        return self.podman("inspect", "--format", template, name).stdout.strip()

    def wait_http_ok(self, name: str, url: str, timeout: float = 60) -> float:
        """Poll ``url`` until it answers 200; seconds it took. Fails if the container exits."""
        started = time.monotonic()
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if self.inspect(name, "{{.State.Running}}") != "true":
                logs = self.podman("logs", name).stdout + self.podman("logs", name).stderr
                raise RuntimeError(f"container {name} exited while starting:\n{logs[-3000:]}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{url} not answering 200 after {timeout}s")
            time.sleep(0.1)
