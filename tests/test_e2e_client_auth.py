"""End to end: real clients log in to ``mirror serve`` with authentication and access
rules on, with Basic credentials and with the mirror's own bearer tokens: skopeo and
podman with ``--creds``, ``docker login`` then ``docker pull``, and ``ctr --user``.

Root only, and only in a network namespace with nothing but loopback (``scripts/test``
runs the suite so): these clients fall back to the real registries when a mirror fails.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import skopeo
from tests.support.clients import (
    ClientError,
    Containerd,
    DockerDaemon,
    Podman,
    access_lines,
    config_dump,
    doc_snippet,
    host_architecture,
    missing_tools,
    only_loopback,
)
from tests.support.htpasswd import write_htpasswd
from tests.support.images import ImageInfo, write_image
from tests.support.mirror import MirrorProcess
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

TOOLS = ("dockerd", "docker", "containerd", "ctr", "podman", "skopeo")
ALICE = ("alice", "alice-Secret-pw")  # group acme: may pull docker.io/acme/*
BOB = ("bob", "bob-Secret-pw")  # only what anonymous clients may pull
ACCESS = """
anonymous = ["docker.io/library/*"]
[auth.groups]
acme = ["alice"]
[[auth.rules]]
users = ["group:acme"]
repositories = ["docker.io/acme/*"]
"""


@dataclass
class Seeded:
    registry: UpstreamRegistry
    test: ImageInfo  # library/test:1, anonymous clients may pull it
    app: ImageInfo  # acme/app:1, only alice may


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    if os.geteuid() != 0:
        pytest.fail("real clients (dockerd, containerd, podman) need root: run scripts/test")
    if not only_loopback():
        pytest.fail("run inside `unshare --net` with only loopback (as scripts/test does)")
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.fail(f"missing {missing}")
    layouts = tmp_path_factory.mktemp("auth-layouts")
    arch = host_architecture()
    test = write_image(layouts / "test", "1", [1500, 20_000], seed=401, arch=arch)
    app = write_image(layouts / "app", "1", [2500, 25_000], seed=402, arch=arch)
    with UpstreamRegistry(auth="none") as registry:
        registry.push_image(test, "library/test:1")
        registry.push_image(app, "acme/app:1")
        yield Seeded(registry, test, app)


@pytest.fixture(params=["basic", "tokens"])
def mirror(
    request: pytest.FixtureRequest, seeded: Seeded, tmp_path: Path
) -> Iterator[MirrorProcess]:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, dict([ALICE, BOB]))
    tokens = "true" if request.param == "tokens" else "false"
    toml = f'[auth]\nhtpasswd = "{htpasswd}"\ntokens = {tokens}\n{ACCESS}'
    upstream = {"name": "docker.io", "url": seeded.registry.url, "retries": 0}
    with MirrorProcess([upstream], extra_toml=toml, workdir=tmp_path / "mirror") as process:
        yield process
    log = process.log()
    hashes = [line.split(":", 1)[1] for line in htpasswd.read_text().split()]
    for secret in (ALICE[1], BOB[1], *hashes):
        assert secret not in log


def _creds(user: tuple[str, str]) -> str:
    return f"{user[0]}:{user[1]}"


def _users_served(mirror: MirrorProcess, repository: str) -> set[str]:
    users = set()
    for line in mirror.log().splitlines():
        if f"/v2/{repository}/blobs/" in line and '" 200 ' in line:
            users.add(line.rsplit("user=", 1)[1].strip())
    return users


def test_skopeo_with_creds_pulls_what_its_user_may(
    seeded: Seeded, mirror: MirrorProcess, tmp_path: Path
) -> None:
    ref = f"docker://{mirror.host}/acme/app:1"
    assert (
        skopeo.copy_to_dir(ref, tmp_path / "a", creds=_creds(ALICE)) == seeded.app.manifest_digest
    )
    assert _users_served(mirror, "acme/app") == {"alice"}
    with pytest.raises(skopeo.SkopeoError) as denied:
        skopeo.copy_to_dir(ref, tmp_path / "b", creds=_creds(BOB))
    assert "denied" in denied.value.stderr.lower()
    with pytest.raises(skopeo.SkopeoError) as anonymous:
        skopeo.copy_to_dir(ref, tmp_path / "c")
    assert "unauthorized" in anonymous.value.stderr.lower()
    with pytest.raises(skopeo.SkopeoError):
        skopeo.copy_to_dir(ref, tmp_path / "d", creds="alice:wrong")
    # The anonymous rule: library images without credentials.
    library = f"docker://{mirror.host}/library/test:1"
    assert skopeo.copy_to_dir(library, tmp_path / "e") == seeded.test.manifest_digest
    lines = access_lines(mirror.log())
    assert any(line.path.startswith("/v2/acme/app/") and line.status == 403 for line in lines)


def test_podman_with_creds(seeded: Seeded, mirror: MirrorProcess) -> None:
    with Podman("") as podman:
        reference = f"{mirror.host}/acme/app:1"
        with pytest.raises(ClientError):
            podman.podman("pull", "--tls-verify=false", "--creds", _creds(BOB), reference)
        podman.podman("pull", "--tls-verify=false", "--creds", _creds(ALICE), reference)
        assert podman.image_digest(reference) == seeded.app.manifest_digest
    assert _users_served(mirror, "acme/app") == {"alice"}


def test_docker_login_then_pull(seeded: Seeded, mirror: MirrorProcess) -> None:
    with DockerDaemon({}) as docker:
        assert isinstance(docker, DockerDaemon)
        failed = docker.try_docker("login", "-u", ALICE[0], "-p", "wrong", mirror.host)
        assert failed.returncode != 0
        docker.docker("login", "-u", ALICE[0], "-p", ALICE[1], mirror.host)
        stored = json.loads((docker.config_dir / "config.json").read_text())["auths"][mirror.host]
        reference = f"{mirror.host}/acme/app:1"
        docker.docker("pull", reference)
        assert docker.repo_digests(reference) == [
            f"{mirror.host}/acme/app@{seeded.app.manifest_digest}"
        ]
        assert _users_served(mirror, "acme/app") == {"alice"}
        log = mirror.log()
        if "identitytoken" in stored:
            # Token mode: docker keeps the refresh token, not the password, and trades it
            # for access tokens (OAuth2) when it pulls.
            assert base64.b64decode(stored["auth"]).decode() == "alice:"
            assert '"POST /token" 200' in log
            assert stored["identitytoken"] not in log
        else:
            assert "/token" not in log
        docker.docker("logout", mirror.host)
        logged_out = docker.try_docker("pull", reference)
        assert logged_out.returncode != 0
        # Anonymous rules reach Docker only through a Bearer challenge (tokens = true):
        # on a Basic challenge it gives up without credentials (docs/clients.md says so).
        anonymous = docker.try_docker("pull", f"{mirror.host}/library/test:1")
        if "identitytoken" in stored:
            assert anonymous.returncode == 0, anonymous.stderr
        else:
            assert "no basic auth credentials" in anonymous.stderr


def test_ctr_with_user(seeded: Seeded, mirror: MirrorProcess) -> None:
    reference = f"{mirror.host}/acme/app:1"
    with Containerd() as containerd:
        assert isinstance(containerd, Containerd)
        with pytest.raises(ClientError):
            containerd.ctr("images", "pull", "--plain-http", reference)
        containerd.ctr("images", "pull", "--plain-http", "--user", _creds(ALICE), reference)
        assert containerd.image_digest(reference) == seeded.app.manifest_digest
    assert _users_served(mirror, "acme/app") == {"alice"}


def test_docker_registry_mirrors_send_the_docker_hub_login(
    seeded: Seeded, mirror: MirrorProcess
) -> None:
    """What docs/clients.md warns about: a daemon's registry-mirrors get the credentials
    stored for Docker Hub, not any stored for the mirror."""
    with DockerDaemon({"registry-mirrors": [f"http://{mirror.host}"]}) as docker:
        assert isinstance(docker, DockerDaemon)
        hub_login = base64.b64encode(_creds(ALICE).encode()).decode()
        (docker.config_dir / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}})
        )
        docker.docker("pull", "acme/app:1")
        assert docker.repo_digests("acme/app:1") == [f"acme/app@{seeded.app.manifest_digest}"]
    assert _users_served(mirror, "acme/app") == {"alice"}


def test_containerd_cri_auth_snippet_gives_the_mirror_host_credentials() -> None:
    dump = config_dump(doc_snippet("containerd cri auth", mirror="mirror.example:5000"))
    section = dump.split(
        '[plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example:5000".auth]', 1
    )[1]
    assert 'username = "node-pull"' in section.split("[", 1)[0]
    assert 'config_path = "/etc/containerd/certs.d"' in dump


def test_tokens_from_one_worker_verify_in_the_other(seeded: Seeded, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, dict([ALICE]))
    toml = f'[auth]\nhtpasswd = "{htpasswd}"\ntokens = true\n'
    upstream = {"name": "docker.io", "url": seeded.registry.url, "retries": 0}
    with MirrorProcess([upstream], workers=2, extra_toml=toml, workdir=tmp_path / "m") as mirror:
        response = httpx.get(f"{mirror.url}/token", auth=ALICE, params={"service": "mirror"})
        token = {"Authorization": f"Bearer {response.json()['token']}"}
        pids: set[str] = set()
        for _ in range(40):  # a new connection each time: both workers get some
            with httpx.Client() as client:
                assert client.get(f"{mirror.url}/v2/", headers=token).status_code == 200
            pids = {
                line.split("[", 1)[1].split("]", 1)[0]
                for line in mirror.log().splitlines()
                if '"GET /v2/" 200' in line
            }
            if len(pids) == 2:
                break
        assert len(pids) == 2, mirror.log()[-2000:]
        key = mirror.cache_dir / "auth" / "token.key"
        assert oct(key.stat().st_mode & 0o777) == "0o600"
