"""Building and running the mirror's own container image, offline, as an air-gapped site would.

``scripts/install test`` leaves under :data:`IMAGE_CACHE` what a site without internet
would bring in: a Debian + Python root filesystem made by ``mmdebstrap`` (the stand-in for
the Dockerfile's ``python:3.11-slim``) and a directory of the wheels the build installs.
:func:`write_base_image` turns the root filesystem into a one-layer OCI image to push to a
test upstream; :class:`ContainerTools` runs buildah and podman on one private storage, so
podman runs what buildah built; :class:`Container` is one ``podman run`` of it, and
:class:`StallingUpstream` a registry whose blob download stops half-way, to stop a
container in the middle of a fill.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx

from .clients import Podman, _clean_environ, _run, host_architecture
from .ports import free_port

__all__ = [
    "IMAGE_CACHE",
    "Container",
    "ContainerTools",
    "StallingUpstream",
    "base_rootfs",
    "wheels_dir",
    "write_base_image",
]

IMAGE_CACHE = Path("/var/cache/mirror-test")
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def base_rootfs() -> Path:
    path = IMAGE_CACHE / "base.tar"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `scripts/install test` (it makes it)")
    return path


def wheels_dir() -> Path:
    """The wheels of this checkout's dependencies (one directory per set of them), as
    ``scripts/install test`` last made or found them for this checkout."""
    note = Path(__file__).parents[2] / ".venv" / "image-wheels"
    path = Path(note.read_text().strip()) if note.exists() else IMAGE_CACHE / "wheels-unknown"
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
        engine = self.containers_conf.read_text()
        self.containers_conf.write_text(
            engine.replace("[engine]\n", '[engine]\nruntime = "runc"\n')
            + '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
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
                logs = self.podman("logs", name)
                output = (logs.stdout + logs.stderr)[-3000:]
                raise RuntimeError(f"container {name} exited while starting:\n{output}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{url} not answering 200 after {timeout}s")
            time.sleep(0.1)


class Container:
    """``podman run -d IMAGE`` in this network namespace, a new named volume at ``volume_at``
    and the port in ``MIRROR_SERVER_PORT``; removed on exit."""

    def __init__(self, tools: ContainerTools, image: str, volume_at: str, *args: str) -> None:
        self.tools = tools
        self.image = image
        self.volume_at = volume_at
        self.name = f"mirror-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-cache"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args

    def __enter__(self) -> Container:
        self.tools.podman("volume", "create", self.volume)
        self.tools.podman(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--health-interval",
            "disable",  # no systemd timer here; `podman healthcheck run` still checks
            "--volume",
            f"{self.volume}:{self.volume_at}",
            "--env",
            f"MIRROR_SERVER_PORT={self.port}",
            *self.args,
            self.image,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.tools.podman("rm", "--force", "--time", "0", self.name)
        self.tools.podman("volume", "rm", "--force", self.volume)

    def wait_ready(self) -> float:
        """Seconds until ``/readyz`` answers 200 (the cache volume is writable)."""
        return self.tools.wait_http_ok(self.name, f"{self.url}/readyz")

    def stop(self) -> int:
        """``podman stop`` (SIGTERM, SIGKILL after 30 s); the server's exit code."""
        self.tools.podman("stop", "--time", "30", self.name)
        return int(self.tools.inspect(self.name, "{{.State.ExitCode}}"))

    def restart(self) -> float:
        self.tools.podman("start", self.name)
        return self.wait_ready()

    def cache_dir(self) -> Path:
        """The volume's directory on this machine."""
        volume = self.tools.podman("volume", "inspect", "--format", "{{.Mountpoint}}", self.volume)
        return Path(volume.stdout.strip())

    def uids(self) -> list[str]:
        """Real, effective, saved and filesystem uid of the server process."""
        status = Path(f"/proc/{self.tools.inspect(self.name, '{{.State.Pid}}')}/status")
        match = re.search(r"^Uid:\s+(.*)$", status.read_text(), re.MULTILINE)
        assert match is not None
        return match[1].split()


class StallingUpstream(http.server.ThreadingHTTPServer):
    """A registry with one blob whose download stops half-way until :attr:`release` is set;
    once :attr:`whole` is set, it is served in full."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.blob = os.urandom(4 << 20)
        self.digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        self.whole = threading.Event()
        self.release = threading.Event()
        self.blob_gets = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> StallingUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.thread.join()


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    server: StallingUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/v2/":
            self._headers(200, 2, "application/json")
            self.wfile.write(b"{}")
            return
        if not self.path.endswith(f"/blobs/{self.server.digest}"):
            self._headers(404, 0, "application/json")
            return
        self.server.blob_gets += 1
        blob = self.server.blob
        self._headers(200, len(blob), "application/octet-stream")
        if self.server.whole.is_set():
            self.wfile.write(blob)
            return
        self.wfile.write(blob[: len(blob) // 2])
        self.wfile.flush()
        self.server.release.wait(60)
        self.close_connection = True

    def _headers(self, status: int, length: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.end_headers()
