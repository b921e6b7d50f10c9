"""End to end: real clients pull through ``mirror serve`` with the configuration of
``docs/clients.md``, read from the page itself so that the page and the tests cannot drift.

A Docker daemon (``registry-mirrors``), containerd with ``ctr --hosts-dir`` (``hosts.toml``,
``?ns=``) and podman (``registries.conf`` mirrors) pull from a mirror whose default upstream,
``docker.io``, is a token-auth registry and whose ``ghcr.io`` upstream is a basic-auth one.
Each test checks the client got the right image, the mirror's access log shows it served the
pull from the right upstream, and the upstreams saw no request but the mirror's (no client
fell back to the registry behind the mirror's back).

Root only, and only in a network namespace with nothing but loopback (``scripts/test`` runs
the suite so): these clients fall back to the real registries when the mirror fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.clients import (
    AccessLine,
    ClientError,
    Containerd,
    DockerDaemon,
    Podman,
    access_lines,
    config_dump,
    doc_snippet,
    doc_snippets,
    host_architecture,
    missing_tools,
    only_loopback,
)
from tests.support.images import ImageInfo, write_image
from tests.support.mirror import MirrorProcess
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e

TOOLS = ("dockerd", "docker", "containerd", "ctr", "runc", "podman", "conmon", "skopeo", "ip")
# What provides TOOLS on Debian 12 (see shared/CLIENTS.md).
PACKAGES = "docker.io containerd runc podman crun conmon iptables iproute2 skopeo"
USER_VARIABLE = "MIRROR_TEST_GHCR_USERNAME"
PASSWORD_VARIABLE = "MIRROR_TEST_GHCR_PASSWORD"
ROUTABLE_ADDRESS = "192.0.2.10"  # TEST-NET-1, documentation only: never routed anywhere
TESTED_SNIPPETS = {
    "daemon.json",
    "hosts.toml docker.io",
    "hosts.toml ghcr.io",
    "hosts.toml mirror only",
    "hosts.toml _default",
    "containerd config.toml",
    "containerd cri auth",
    "registries.conf",
    # Tested in test_e2e_clients_tls.py:
    "daemon.json https",
    "hosts.toml docker.io https",
    "registries.conf https",
}


@dataclass
class Upstreams:
    hub: UpstreamRegistry  # "docker.io": token auth, anonymous pulls, the default upstream
    ghcr: UpstreamRegistry  # "ghcr.io": basic auth, credentials only the mirror has
    test: ImageInfo  # library/test:1 on hub
    app: ImageInfo  # library/app:1 on ghcr

    def mirror(self, extra_args: tuple[str, ...] = ()) -> MirrorProcess:
        assert self.ghcr.push_credentials is not None
        user, password = self.ghcr.push_credentials
        upstreams = [
            {"name": "docker.io", "url": self.hub.url, "retries": 0},
            {
                "name": "ghcr.io",
                "url": self.ghcr.url,
                "retries": 0,
                "username_env": USER_VARIABLE,
                "password_env": PASSWORD_VARIABLE,
            },
        ]
        env = {USER_VARIABLE: user, PASSWORD_VARIABLE: password}
        return MirrorProcess(upstreams, env=env, extra_args=extra_args)

    def marks(self) -> tuple[int, int]:
        return self.hub.mark(), self.ghcr.mark()


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    # Fail rather than skip: a client test that did not run has shown nothing. The
    # checks come before any daemon starts, so nothing can fall back to a real registry.
    if os.geteuid() != 0:
        pytest.fail("real clients (dockerd, containerd, podman) need root: run scripts/test")
    if not only_loopback():
        pytest.fail(
            "run inside `unshare --net` with only loopback (as scripts/test does): "
            "these clients fall back to the real registries when the mirror fails"
        )
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.fail(f"missing {missing}: apt-get install --no-install-recommends {PACKAGES}")
    layouts = tmp_path_factory.mktemp("client-layouts")
    arch = host_architecture()
    test = write_image(layouts / "test", "1", [2000, 30_000], seed=301, arch=arch)
    app = write_image(layouts / "app", "1", [3000, 40_000], seed=302, arch=arch)
    with UpstreamRegistry(auth="token") as hub, UpstreamRegistry(auth="basic") as ghcr:
        hub.push_image(test, "library/test:1")
        ghcr.push_image(app, "library/app:1")
        yield Upstreams(hub, ghcr, test, app)


@pytest.fixture
def mirror(upstreams: Upstreams) -> Iterator[MirrorProcess]:
    with upstreams.mirror() as process:
        yield process


@pytest.fixture
def routable_mirror(upstreams: Upstreams) -> Iterator[tuple[MirrorProcess, str]]:
    """A mirror on an address outside 127.0.0.0/8 (which Docker always trusts with plain
    HTTP), so that what ``insecure-registries`` does shows; and that ``host:port``.

    The address goes on this namespace's own ``lo`` (the module runs only in a private one).
    """
    added = subprocess.run(
        ["ip", "address", "add", f"{ROUTABLE_ADDRESS}/32", "dev", "lo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0 or "exists" in added.stderr, added.stderr
    try:
        with upstreams.mirror(extra_args=("--host", "0.0.0.0")) as process:
            yield process, f"{ROUTABLE_ADDRESS}:{process.port}"
    finally:
        if added.returncode == 0:
            subprocess.run(
                ["ip", "address", "del", f"{ROUTABLE_ADDRESS}/32", "dev", "lo"], check=False
            )


def _wait_for_lines(
    mirror: MirrorProcess, wanted: Callable[[list[AccessLine]], bool], timeout: float = 5
) -> list[AccessLine]:
    """The mirror's access log once ``wanted`` holds (a line is written as its answer ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = access_lines(mirror.log())
        if wanted(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _eventually(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _served(lines: list[AccessLine], path: str, *, upstream: str, query: str = "") -> bool:
    return any(
        line.path == path and line.status == 200 and line.upstream == upstream
        for line in lines
        if line.query == query
    )


def _blobs_served(lines: list[AccessLine], repository: str, query: str = "") -> set[str]:
    prefix = f"/v2/{repository}/blobs/"
    return {
        line.path.removeprefix(prefix)
        for line in lines
        if line.method == "GET"
        and line.path.startswith(prefix)
        and line.status == 200
        and line.query == query
    }


def _ctr_pull_through(
    containerd: Containerd, hosts: Path, mirror: MirrorProcess, reference: str, image: ImageInfo
) -> list[AccessLine]:
    """Pull ``registry/repository:tag`` with ctr, check its digest, and return the mirror's
    access log once every blob was served under containerd's ``?ns=registry``."""
    containerd.ctr("images", "pull", "--hosts-dir", str(hosts), reference)
    assert containerd.image_digest(reference) == image.manifest_digest
    registry, _, rest = reference.partition("/")
    repository = rest.rpartition(":")[0]
    return _wait_for_lines(
        mirror,
        lambda lines: _blobs_served(lines, repository, f"ns={registry}") >= set(image.blob_digests),
    )


def _only_the_mirror_asked(registry: UpstreamRegistry, mark: int) -> None:
    agents = {entry.user_agent for entry in registry.requests_since(mark)}
    assert all(agent.startswith("mirror/") for agent in agents), agents


def test_every_tested_snippet_is_in_the_doc() -> None:
    assert set(doc_snippets()) == TESTED_SNIPPETS


def test_docker_daemon_pulls_docker_hub_images_through_registry_mirrors(
    upstreams: Upstreams, routable_mirror: tuple[MirrorProcess, str]
) -> None:
    hub, test, app = upstreams.hub, upstreams.test, upstreams.app
    mirror, address = routable_mirror
    daemon_json = json.loads(doc_snippet("daemon.json", mirror=address))
    assert daemon_json["registry-mirrors"] == [f"http://{address}"]
    with DockerDaemon(daemon_json) as docker:
        assert isinstance(docker, DockerDaemon)
        hub_mark, ghcr_mark = upstreams.marks()
        docker.docker("pull", "library/test:1")
        assert docker.repo_digests("test:1") == [f"test@{test.manifest_digest}"]
        lines = _wait_for_lines(
            mirror, lambda lines: _blobs_served(lines, "library/test") >= set(test.blob_digests)
        )
        # Docker asks by tag, then by digest, with no ns: the default upstream answers.
        assert _served(lines, "/v2/library/test/manifests/1", upstream="docker.io")
        manifest = f"/v2/library/test/manifests/{test.manifest_digest}"
        assert _served(lines, manifest, upstream="docker.io")
        assert _blobs_served(lines, "library/test") == set(test.blob_digests)
        assert not any(line.query for line in lines)
        _only_the_mirror_asked(hub, hub_mark)
        assert upstreams.ghcr.requests_since(ghcr_mark) == []

        # Another registry, named through the mirror: plain HTTP thanks to insecure-registries.
        docker.docker("pull", f"{address}/ghcr.io/library/app:1")
        named = f"{address}/ghcr.io/library/app"
        assert docker.repo_digests(f"{named}:1") == [f"{named}@{app.manifest_digest}"]
        path = "/v2/ghcr.io/library/app/manifests/1"
        lines = _wait_for_lines(mirror, lambda lines: _served(lines, path, upstream="ghcr.io"))
        assert _served(lines, path, upstream="ghcr.io")
        _only_the_mirror_asked(upstreams.ghcr, ghcr_mark)

        # What the page warns about: an image the mirror cannot serve is looked for on
        # Docker Hub itself (here unreachable, so its error is what the user sees).
        failed = docker.try_docker("pull", "library/absent:1")
        assert failed.returncode != 0
        assert "registry-1.docker.io" in failed.stderr, failed.stderr
        lines = _wait_for_lines(
            mirror, lambda lines: any("/library/absent/" in line.path for line in lines)
        )
        assert any(
            line.path == "/v2/library/absent/manifests/1" and line.status == 404 for line in lines
        )
        assert _eventually(lambda: "Attempting next endpoint" in docker.log())

    # And what the page says of insecure-registries: registry-mirrors alone does for Docker
    # Hub, but naming the mirror then means HTTPS.
    del daemon_json["insecure-registries"]
    with DockerDaemon(daemon_json) as docker:
        assert isinstance(docker, DockerDaemon)
        docker.docker("pull", "library/test:1")
        failed = docker.try_docker("pull", f"{address}/ghcr.io/library/app:1")
        assert failed.returncode != 0
        assert "server gave HTTP response to HTTPS client" in failed.stderr, failed.stderr


def _hosts_dir(root: Path, files: dict[str, str]) -> Path:
    for registry, text in files.items():
        (root / registry).mkdir(parents=True)
        (root / registry / "hosts.toml").write_text(text)
    return root


def test_containerd_pulls_each_registry_through_the_mirror_by_ns(
    upstreams: Upstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub, ghcr, test, app = upstreams.hub, upstreams.ghcr, upstreams.test, upstreams.app
    # The page's files, with the registries' own addresses (the fallback) on loopback.
    hosts = _hosts_dir(
        tmp_path / "certs.d",
        {
            "docker.io": doc_snippet(
                "hosts.toml docker.io",
                mirror=mirror.host,
                replace={'"https://registry-1.docker.io"': f'"{hub.url}"'},
            ),
            "ghcr.io": doc_snippet(
                "hosts.toml ghcr.io",
                mirror=mirror.host,
                replace={'"https://ghcr.io"': f'"{ghcr.url}"'},
            ),
        },
    )
    with Containerd() as containerd:
        assert isinstance(containerd, Containerd)
        hub_mark, ghcr_mark = upstreams.marks()
        lines = _ctr_pull_through(containerd, hosts, mirror, "docker.io/library/test:1", test)
        tagged = [line for line in lines if line.path == "/v2/library/test/manifests/1"]
        assert [(line.method, line.query, line.status) for line in tagged] == [
            ("HEAD", "ns=docker.io", 200)
        ]
        assert _blobs_served(lines, "library/test", "ns=docker.io") == set(test.blob_digests)
        routed = [line for line in lines if line.query == "ns=docker.io"]
        assert {line.upstream for line in routed} == {"docker.io"}
        _only_the_mirror_asked(hub, hub_mark)
        assert ghcr.requests_since(ghcr_mark) == []

        hub_mark = hub.mark()
        lines = _ctr_pull_through(containerd, hosts, mirror, "ghcr.io/library/app:1", app)
        assert _served(lines, "/v2/library/app/manifests/1", upstream="ghcr.io", query="ns=ghcr.io")
        routed = [line for line in lines if line.query == "ns=ghcr.io"]
        assert routed and {line.upstream for line in routed} == {"ghcr.io"}
        assert all(line.status == 200 for line in routed)
        _only_the_mirror_asked(ghcr, ghcr_mark)
        assert hub.requests_since(hub_mark) == []


def test_containerd_with_the_mirror_as_server_never_goes_past_it(
    upstreams: Upstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub, test = upstreams.hub, upstreams.test
    text = doc_snippet("hosts.toml mirror only", mirror=mirror.host)
    hosts = _hosts_dir(tmp_path / "certs.d", {"docker.io": text})
    with Containerd() as containerd:
        assert isinstance(containerd, Containerd)
        hub_mark = hub.mark()
        lines = _ctr_pull_through(containerd, hosts, mirror, "docker.io/library/test:1", test)
        assert _served(
            lines, "/v2/library/test/manifests/1", upstream="docker.io", query="ns=docker.io"
        )
        with pytest.raises(ClientError):
            containerd.ctr(
                "images", "pull", "--hosts-dir", str(hosts), "docker.io/library/absent:1"
            )
        lines = _wait_for_lines(
            mirror, lambda lines: any("/library/absent/" in line.path for line in lines)
        )
        assert any(
            line.path == "/v2/library/absent/manifests/1" and line.status == 404 for line in lines
        )
        _only_the_mirror_asked(hub, hub_mark)


def test_containerd_default_hosts_file_sends_every_registry_to_the_mirror(
    upstreams: Upstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub, ghcr, test, app = upstreams.hub, upstreams.ghcr, upstreams.test, upstreams.app
    text = doc_snippet("hosts.toml _default", mirror=mirror.host)
    hosts = _hosts_dir(tmp_path / "certs.d", {"_default": text})
    with Containerd() as containerd:
        assert isinstance(containerd, Containerd)
        hub_mark, ghcr_mark = upstreams.marks()
        lines = _ctr_pull_through(containerd, hosts, mirror, "ghcr.io/library/app:1", app)
        assert _served(lines, "/v2/library/app/manifests/1", upstream="ghcr.io", query="ns=ghcr.io")
        _only_the_mirror_asked(ghcr, ghcr_mark)
        assert hub.requests_since(hub_mark) == []

        # A registry the mirror has no upstream for: refused by the mirror, without
        # contacting anything, then pulled by containerd from the registry itself.
        containerd.ctr("images", "pull", "--hosts-dir", str(hosts), f"{hub.host}/library/test:1")
        assert containerd.image_digest(f"{hub.host}/library/test:1") == test.manifest_digest
        ns = f"ns={hub.host}".replace(":", "%3A")  # as containerd encodes it
        lines = _wait_for_lines(mirror, lambda lines: any(line.query == ns for line in lines))
        refused = [line for line in lines if line.query == ns]
        assert refused and all(line.status == 404 for line in refused)
        assert all(line.upstream == "-" for line in refused)
        direct = {e.user_agent for e in hub.requests_since(hub_mark)}
        assert direct and all(agent.startswith("containerd/") for agent in direct), direct


def test_containerd_config_snippet_points_the_cri_plugin_at_certs_d() -> None:
    dump = config_dump(doc_snippets()["containerd config.toml"])
    section = dump.split('[plugins."io.containerd.grpc.v1.cri".registry]', 1)[1]
    assert section.split("[", 1)[0].strip() == 'config_path = "/etc/containerd/certs.d"'


def test_podman_and_skopeo_pull_through_registries_conf_mirrors(
    upstreams: Upstreams, mirror: MirrorProcess, tmp_path: Path
) -> None:
    hub, ghcr, test, app = upstreams.hub, upstreams.ghcr, upstreams.test, upstreams.app
    # The page's file, with the registries themselves (the fallback) on loopback.
    conf = doc_snippet(
        "registries.conf",
        mirror=mirror.host,
        replace={
            'location = "docker.io"': f'location = "{hub.host}"',
            'location = "ghcr.io"': f'location = "{ghcr.host}"',
        },
    )
    with Podman(conf) as podman:
        hub_mark, ghcr_mark = upstreams.marks()
        podman.podman("pull", "docker.io/library/test:1")
        assert podman.image_digest("docker.io/library/test:1") == test.manifest_digest
        podman.podman("pull", "ghcr.io/library/app:1")
        assert podman.image_digest("ghcr.io/library/app:1") == app.manifest_digest
        lines = _wait_for_lines(
            mirror,
            lambda lines: _blobs_served(lines, "ghcr.io/library/app") >= set(app.blob_digests),
        )
        assert _served(lines, "/v2/library/test/manifests/1", upstream="docker.io")
        assert _blobs_served(lines, "library/test") == set(test.blob_digests)
        assert _served(lines, "/v2/ghcr.io/library/app/manifests/1", upstream="ghcr.io")
        assert _blobs_served(lines, "ghcr.io/library/app") == set(app.blob_digests)
        _only_the_mirror_asked(hub, hub_mark)
        _only_the_mirror_asked(ghcr, ghcr_mark)

        # skopeo reads the same file when given it with --registries-conf.
        out = tmp_path / "skopeo"
        out.mkdir()
        skopeo.run_skopeo(
            [
                "copy",
                "--retry-times",
                "0",
                "--src-authfile",
                str(podman.auth_file),
                "docker://ghcr.io/library/app:1",
                f"dir:{out}",
            ],
            registries_conf=str(podman.registries_conf),
        )
        assert skopeo.verify_dir(out) == app.manifest_digest
        _only_the_mirror_asked(ghcr, ghcr_mark)
