"""End to end over HTTPS: real clients pull through ``mirror serve`` with TLS on, trusting a
private CA the way ``docs/clients.md`` says (the ``… https`` snippets, read from the page),
and authenticate to it.

The mirror listens on an address outside 127.0.0.0/8 (Docker trusts anything on loopback
without verifying it), and nothing anywhere says ``insecure`` or ``tls-verify=false``. Its
client authentication is on, with its own tokens (the ``/token`` realm must be HTTPS too):
``library/*`` is open to anonymous clients, ``acme/app`` only to alice, who logs in with
each client's own means (``docker login``, ``ctr --user``, ``podman login``, ``skopeo
--src-creds``). The mirror's access log, which only HTTPS can reach, must show each pull
served to alice, and the upstream must have seen no client but the mirror.

Root only, and only in a network namespace with nothing but loopback (``scripts/test``).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.clients import (
    AccessLine,
    Containerd,
    Credentials,
    DockerDaemon,
    Podman,
    access_lines,
    doc_snippet,
    host_architecture,
    missing_tools,
    only_loopback,
)
from tests.support.htpasswd import write_htpasswd
from tests.support.images import ImageInfo, write_image
from tests.support.mirror import MirrorProcess
from tests.support.registry import UpstreamRegistry
from tests.support.tls import ROUTABLE_ADDRESS, TestCA

pytestmark = pytest.mark.e2e

TOOLS = ("dockerd", "docker", "containerd", "ctr", "podman", "skopeo", "ip", "unshare", "openssl")
PUBLIC = "library/test:1"  # anonymous clients may pull it
PRIVATE = "acme/app:1"  # only alice may
ALICE = Credentials("alice", "alice-Secret-pw")
AUTH = """
[auth]
htpasswd = "{htpasswd}"
tokens = true
anonymous = ["docker.io/library/*"]
[[auth.rules]]
users = ["alice"]
repositories = ["docker.io/acme/*"]
"""


@dataclass
class Setup:
    hub: UpstreamRegistry  # "docker.io": token auth, the mirror's default upstream
    public: ImageInfo  # PUBLIC on hub
    private: ImageInfo  # PRIVATE on hub
    ca: TestCA
    mirror: MirrorProcess  # HTTPS on ROUTABLE_ADDRESS, certificate signed by ca
    address: str  # host:port clients reach the mirror by

    def mark(self) -> tuple[int, int]:
        """Where the upstream's request log and the mirror's access log are now."""
        return self.hub.mark(), len(self.lines())

    def check_pull(
        self, mark: tuple[int, int], *, private: bool = True, query: str = "", timeout: float = 10
    ) -> None:
        """Since ``mark``: the mirror served every blob of the private image to alice (of the
        public one to an anonymous client), waiting for each answer's log line; and the
        upstream saw no client but the mirror."""
        image, repository, user = (
            (self.private, "acme/app", ALICE.username)
            if private
            else (self.public, "library/test", "-")
        )
        wanted = set(image.blob_digests)
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()[mark[1] :]
            served = {
                line.path.rpartition("/")[2]
                for line in lines
                if line.method == "GET"
                and line.path.startswith(f"/v2/{repository}/blobs/")
                and line.status == 200
                and line.query == query
                and line.user == user
            }
            if served >= wanted or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert served == wanted
        agents = {entry.user_agent for entry in self.hub.requests_since(mark[0])}
        assert all(agent.startswith("mirror/") for agent in agents), agents

    def lines(self) -> list[AccessLine]:
        return access_lines(self.mirror.log())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if os.geteuid() != 0:
        pytest.fail("real clients (dockerd, containerd, podman) need root: run scripts/test")
    if not only_loopback():
        pytest.fail("run inside `unshare --net` with only loopback (as scripts/test does)")
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.fail(f"missing {missing}: see scripts/install")
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    pair = ca.issue("mirror")
    layouts = tmp_path_factory.mktemp("layouts")
    arch = host_architecture()
    public = write_image(layouts / "test", "1", [2000, 30_000], seed=311, arch=arch)
    private = write_image(layouts / "app", "1", [2500, 25_000], seed=312, arch=arch)
    htpasswd = layouts / "htpasswd"
    write_htpasswd(htpasswd, {ALICE.username: ALICE.password})
    added = subprocess.run(
        ["ip", "address", "add", f"{ROUTABLE_ADDRESS}/32", "dev", "lo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0 or "exists" in added.stderr, added.stderr
    try:
        with UpstreamRegistry(auth="token") as hub:
            hub.push_image(public, PUBLIC)
            hub.push_image(private, PRIVATE)
            upstream = {"name": "docker.io", "url": hub.url, "retries": 0}
            server = {"tls_certificate": pair.certificate, "tls_key": pair.key}
            client_tls = ssl.create_default_context(cafile=str(ca.certificate))
            with MirrorProcess(
                [upstream],
                server=server,
                client_tls=client_tls,
                extra_args=("--host", "0.0.0.0"),
                extra_toml=AUTH.format(htpasswd=htpasswd),
            ) as mirror:
                address = f"{ROUTABLE_ADDRESS}:{mirror.port}"
                yield Setup(hub, public, private, ca, mirror, address)
    finally:
        if added.returncode == 0:
            subprocess.run(
                ["ip", "address", "del", f"{ROUTABLE_ADDRESS}/32", "dev", "lo"], check=False
            )


def test_docker_pulls_through_https_registry_mirrors_and_logs_in_trusting_certs_d(
    setup: Setup,
) -> None:
    daemon_json = json.loads(doc_snippet("daemon.json https", mirror=setup.address))
    assert daemon_json == {"registry-mirrors": [f"https://{setup.address}"]}
    with DockerDaemon(daemon_json) as docker:
        assert isinstance(docker, DockerDaemon)
        mark = setup.mark()
        # Not trusted yet: refused, however lenient Docker is with registries on loopback.
        failed = docker.try_docker("pull", f"{setup.address}/{PUBLIC}")
        assert "x509: certificate signed by unknown authority" in failed.stderr, failed.stderr

        docker.trust(setup.address, setup.ca.certificate)
        # registry-mirrors: anonymous (it would send a Docker Hub login, not the mirror's).
        docker.docker("pull", PUBLIC)
        assert docker.repo_digests("test:1") == [f"test@{setup.public.manifest_digest}"]
        setup.check_pull(mark, private=False)
        # By the mirror's name, logged in to it, over the same CA.
        mark = setup.mark()
        docker.login(setup.address, ALICE)
        named = f"{setup.address}/acme/app"
        docker.docker("pull", f"{named}:1")
        assert docker.repo_digests(f"{named}:1") == [f"{named}@{setup.private.manifest_digest}"]
        setup.check_pull(mark)


def test_containerd_pulls_through_https_with_the_ca_in_hosts_toml_and_user(
    setup: Setup, tmp_path: Path
) -> None:
    text = doc_snippet(
        "hosts.toml docker.io https",
        mirror=setup.address,
        replace={
            '"https://registry-1.docker.io"': f'"{setup.hub.url}"',
            '"/etc/containerd/certs.d/mirror-ca.crt"': f'"{setup.ca.certificate}"',
        },
    )
    hosts = tmp_path / "certs.d"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(text)
    with Containerd() as containerd:
        assert isinstance(containerd, Containerd)
        mark = setup.mark()
        containerd.pull(hosts, f"docker.io/{PRIVATE}", ALICE)
        assert containerd.image_digest(f"docker.io/{PRIVATE}") == setup.private.manifest_digest
        setup.check_pull(mark, query="ns=docker.io")


def test_podman_logs_in_and_pulls_through_an_https_mirror_with_certs_d(
    setup: Setup,
) -> None:
    conf = doc_snippet(
        "registries.conf https",
        mirror=setup.address,
        replace={'location = "docker.io"': f'location = "{setup.hub.host}"'},
    )
    assert "insecure" not in conf
    with Podman(conf) as podman:
        podman.trust(setup.address, setup.ca.certificate)
        mark = setup.mark()
        podman.login(setup.address, ALICE)
        podman.podman("pull", f"docker.io/{PRIVATE}")
        assert podman.image_digest(f"docker.io/{PRIVATE}") == setup.private.manifest_digest
        setup.check_pull(mark)


def test_skopeo_copies_from_the_mirror_by_name_with_a_cert_dir_and_creds(
    setup: Setup, tmp_path: Path
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(setup.ca.certificate.read_bytes())
    out = tmp_path / "out"
    mark = setup.mark()
    digest = skopeo.copy(
        f"docker://{setup.address}/{PRIVATE}",
        f"dir:{out}",
        src_tls_verify=True,
        src_creds=ALICE.joined(),
        extra=["--src-cert-dir", str(cert_dir)],
    )
    assert digest == setup.private.manifest_digest
    assert skopeo.verify_dir(out) == setup.private.manifest_digest
    setup.check_pull(mark)


def test_skopeo_presents_its_client_certificate_to_a_mirror_that_wants_one(
    setup: Setup, tmp_path: Path
) -> None:
    pair, user = setup.ca.issue("mtls-server"), setup.ca.issue("skopeo", ("skopeo",), client=True)
    server = {
        "tls_certificate": pair.certificate,
        "tls_key": pair.key,
        "tls_client_ca": setup.ca.certificate,
    }
    client_tls = ssl.create_default_context(cafile=str(setup.ca.certificate))
    client_tls.load_cert_chain(user.certificate, user.key)
    upstream = {"name": "docker.io", "url": setup.hub.url, "retries": 0}
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(setup.ca.certificate.read_bytes())
    with MirrorProcess([upstream], server=server, client_tls=client_tls) as mirror:

        def copy(name: str) -> str:
            return skopeo.copy(
                f"docker://{mirror.host}/{PUBLIC}",
                f"dir:{tmp_path / name}",
                src_tls_verify=True,
                extra=["--src-cert-dir", str(cert_dir)],
            )

        # The readiness check's GET /v2/ is logged once its answer has ended.
        deadline = time.monotonic() + 10
        while not access_lines(mirror.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        before = len(access_lines(mirror.log()))
        assert before == 1
        with pytest.raises(skopeo.SkopeoError) as refused:
            copy("refused")
        # Refused in the TLS handshake: skopeo's first request never reached the API.
        assert "pinging container registry" in refused.value.stderr, refused.value.stderr
        assert len(access_lines(mirror.log())) == before
        # A *.cert and *.key pair in the same directory is the client's identity.
        (cert_dir / "client.cert").write_bytes(user.certificate.read_bytes())
        (cert_dir / "client.key").write_bytes(user.key.read_bytes())
        assert copy("out") == setup.public.manifest_digest
