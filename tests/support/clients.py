"""Real registry clients for the end-to-end tests: dockerd, containerd + ctr, podman.

Each runs as root with every path of its own in a fresh temporary directory (data, state,
sockets, pid files), so nothing of the machine's configuration is read or touched. Daemons are
started with :meth:`Daemon.start`, stopped by their pid with :meth:`Daemon.stop` (SIGTERM, a
wait, then SIGKILL for the daemon and whatever it started), and leave no mount behind
(``umount -R`` on whatever is still mounted under their directory) and no directory.

The configuration the tests give these clients comes from ``docs/clients.md``, the page
operators copy: :func:`doc_snippet` reads the fenced block that follows an HTML comment
``<!-- test: NAME -->`` and puts the mirror's address where the page says ``MIRROR``.

These clients fall back to the real registries when a mirror fails: run them in a network
namespace with only loopback (``unshare --net``), as ``scripts/test`` does.

dockerd and podman read the CA certificates they trust for a registry from ``/etc/docker``
and ``/etc/containers``, which cannot be moved: dockerd always runs in a mount namespace of
its own where ``/etc/docker`` is a directory inside its temporary directory
(:meth:`DockerDaemon.trust`), podman once :meth:`Podman.trust` is called. Credentials for
the mirror travel as each client's own flags (:class:`Credentials`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.ports import Service, process_output_tail

__all__ = [
    "DOC",
    "AccessLine",
    "ClientError",
    "Containerd",
    "Credentials",
    "Daemon",
    "DockerDaemon",
    "Podman",
    "access_lines",
    "doc_snippet",
    "doc_snippets",
    "host_architecture",
    "missing_tools",
    "only_loopback",
    "unmount_under",
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
PLACEHOLDER = "MIRROR"
# An HTML comment naming the snippet, then (blank lines allowed) a fenced block, which may be
# indented as a whole (inside a list item).
_MARKER = re.compile(
    r"<!--\s*test:\s*(?P<name>[^>]*?)\s*-->[ \t]*\n(?:[ \t]*\n)*"
    r"(?P<indent>[ \t]*)```[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)
_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<target>\S+)" (?P<status>\d{3}) (?P<bytes>\d+)B \S+s '
    r"cache=(?P<cache>\S+) upstream=(?P<upstream>\S+)(?: user=(?P<user>\S+))?"
)
_PLUGIN_DIR = Path("/run/docker/plugins")
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


class ClientError(RuntimeError):
    """A client command failed or a daemon did not come up; carries its output."""


@dataclass(frozen=True)
class Credentials:
    """A user of the mirror, as a client is told it (``docker login``, ``--creds``, ``--user``)."""

    username: str
    password: str = dataclasses.field(repr=False)

    def joined(self) -> str:
        """``user:password``, as ``--creds`` and ``ctr --user`` take them."""
        return f"{self.username}:{self.password}"


# ------------------------------------------------------------------------ the doc


def doc_snippets(path: Path = DOC) -> dict[str, str]:
    """Every ``<!-- test: NAME -->`` fenced block of the page, by name."""
    snippets: dict[str, str] = {}
    for match in _MARKER.finditer(path.read_text()):
        name = match["name"]
        if name in snippets:
            raise ValueError(f"{path}: two snippets named {name!r}")
        indent = match["indent"]
        lines = match["body"].splitlines(keepends=True)
        snippets[name] = "".join(line.removeprefix(indent) for line in lines)
    return snippets


def doc_snippet(
    name: str, *, mirror: str, replace: Mapping[str, str] | None = None, path: Path = DOC
) -> str:
    """The snippet ``name`` with ``MIRROR`` → ``mirror`` (``host:port``).

    ``replace`` maps exact strings of the snippet to what a test needs instead (e.g. the
    real upstream's address → a loopback registry); each must occur in the snippet, so a
    change of the page that a test relies on fails loudly instead of being ignored.
    """
    snippets = doc_snippets(path)
    if name not in snippets:
        raise KeyError(f"{path} has no <!-- test: {name} --> snippet (has: {sorted(snippets)})")
    text = snippets[name]
    for old, new in (replace or {}).items():
        if old not in text:
            raise ValueError(f"snippet {name!r} no longer contains {old!r}:\n{text}")
        text = text.replace(old, new)
    if not re.search(rf"\b{PLACEHOLDER}\b", text):
        raise ValueError(f"snippet {name!r} does not mention {PLACEHOLDER}:\n{text}")
    return re.sub(rf"\b{PLACEHOLDER}\b", mirror, text)


# ------------------------------------------------------------------- the mirror's log


@dataclass(frozen=True)
class AccessLine:
    """One line of the mirror's access log."""

    method: str
    target: str  #: path and ``?query`` as received
    status: int
    cache: str
    upstream: str
    user: str = "-"  #: who the mirror authenticated, ``-`` for an anonymous client

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


def access_lines(log: str) -> list[AccessLine]:
    lines: list[AccessLine] = []
    for line in log.splitlines():
        match = _ACCESS.search(line)
        if match is not None:
            lines.append(
                AccessLine(
                    match["method"],
                    match["target"],
                    int(match["status"]),
                    match["cache"],
                    match["upstream"],
                    match["user"] or "-",
                )
            )
    return lines


# ---------------------------------------------------------------------- plumbing


def host_architecture() -> str:
    """The OCI name of this machine's architecture (what clients pull by default)."""
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def only_loopback() -> bool:
    """Whether this process's network namespace has no interface but ``lo``."""
    with open("/proc/self/net/dev") as dev:
        names = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
    return names == ["lo"]


def missing_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def _with_private_etc(binds: Mapping[str, Path], argv: Sequence[str]) -> list[str]:
    """``argv`` in a mount namespace of its own where each directory of ``binds`` (e.g.
    ``/etc/docker``) is the given one instead; the namespace ends with the last process in it.
    The shell ``exec``s, so the pid is ``argv``'s."""
    script = 'while [ "$1" != -- ]; do mount --bind "$2" "$1" || exit 1; shift 2; done; shift; '
    pairs = [str(part) for target, source in binds.items() for part in (target, source)]
    return ["unshare", "--mount", "sh", "-c", script + 'exec "$@"', "sh", *pairs, "--", *argv]


def _write_ca(certs_d: Path, registry: str, ca: Path) -> None:
    """``certs.d/<host:port>/ca.crt``, the layout Docker and containers/image share."""
    (certs_d / registry).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, certs_d / registry / "ca.crt")


def _mount_points_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    points: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def unmount_under(root: Path) -> None:
    """``umount -R`` whatever is mounted at or below ``root`` (deepest first)."""
    for point in sorted(_mount_points_under(root), key=len, reverse=True):
        if point not in _mount_points_under(root):
            continue  # gone with a recursive unmount above it
        result = subprocess.run(["umount", "-R", point], capture_output=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "-R", "-l", point], capture_output=True, check=False)
    left = _mount_points_under(root)
    if left:
        raise ClientError(f"still mounted under {root}: {left}")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (children first listed first)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client command; raise ClientError with its output if it fails."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL if input is None else None,
            input=input,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if result.returncode != 0:
        raise ClientError(
            f"exit {result.returncode}: {' '.join(argv)}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
        )
    return result


def _clean_environ(**extra: str) -> dict[str, str]:
    """The environment less anything that would point a client elsewhere."""
    drop = ("DOCKER_", "CONTAINERD_", "CONTAINERS_", "REGISTRY_AUTH_FILE", "XDG_")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        environ.pop(proxy, None)
        environ.pop(proxy.upper(), None)
    environ.update(extra)
    return environ


# ------------------------------------------------------------------------ daemons


class Daemon(Service):
    """A daemon in a temporary directory of its own; subclasses say how to run and probe it."""

    name = "daemon"
    start_timeout = 30.0
    stop_timeout = 20.0

    def __init__(self, prefix: str) -> None:
        # Short paths under /tmp: unix socket paths are limited to 107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def environ(self) -> dict[str, str]:
        return _clean_environ()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Daemon:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environ(),
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ClientError(
                    f"{self.name} exited with {code} while starting:\n"
                    f"{process_output_tail(stderr_path=self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ClientError(
                    f"{self.name} not ready after {self.start_timeout}s:\n"
                    f"{process_output_tail(stderr_path=self.log_path)}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM the daemon by its pid, wait, SIGKILL it and any process it left."""
        process, self.process = self.process, None
        if process is None:
            return
        family = _descendants(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in family:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        try:
            self.stop()
        finally:
            unmount_under(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)


class DockerDaemon(Daemon):
    """``dockerd`` (20.10, package docker.io) with an operator's ``daemon.json`` merged into
    settings that keep it inside its directory: vfs storage, no bridge, no iptables."""

    name = "dockerd"

    def __init__(self, daemon_json: Mapping[str, Any]) -> None:
        super().__init__("dockerd-")
        self.socket = self.workdir / "exec" / "docker.sock"
        self.config_dir = self.workdir / "client"  # the docker CLI's, empty
        self.config_dir.mkdir()
        self.settings: dict[str, Any] = {
            **daemon_json,
            "data-root": str(self.workdir / "root"),
            "exec-root": str(self.workdir / "exec"),
            "pidfile": str(self.workdir / "exec" / "dockerd.pid"),
            # 20.10 otherwise writes its trust key to /etc/docker/key.json.
            "deprecated-key-path": str(self.workdir / "key.json"),
            "hosts": [f"unix://{self.socket}"],
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "bridge": "none",
        }
        self.config_path = self.workdir / "daemon.json"
        self.config_path.write_text(json.dumps(self.settings, indent=2))
        self.etc = self.workdir / "etc-docker"  # /etc/docker as this dockerd sees it
        self.etc.mkdir()

    def command(self) -> list[str]:
        argv = ["dockerd", "--config-file", str(self.config_path)]
        return _with_private_etc({"/etc/docker": self.etc}, argv)

    def trust(self, registry: str, ca: Path) -> None:
        """Trust ``ca`` for ``registry`` (``host:port``) in ``/etc/docker/certs.d``,
        read by dockerd at each pull."""
        _write_ca(self.etc / "certs.d", registry, ca)

    def login(self, registry: str, credentials: Credentials) -> None:
        """``docker login`` (checked by the daemon against ``registry``, stored by the CLI)."""
        args = ["login", "--username", credentials.username, "--password-stdin", registry]
        env = _clean_environ(
            DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.config_dir)
        )
        _run(["docker", *args], env=env, input=credentials.password)

    def start(self) -> Daemon:
        # The one path 20.10 cannot be told to keep elsewhere: its plugin socket directory.
        self._made_run_dir = not _PLUGIN_DIR.parent.exists()
        return super().start()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if getattr(self, "_made_run_dir", False):
                for directory in (_PLUGIN_DIR, _PLUGIN_DIR.parent):
                    try:
                        directory.rmdir()
                    except OSError:
                        break  # not empty (someone else's) or gone

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))) as client:
                return client.get("http://docker/_ping", timeout=2).text == "OK"
        except httpx.TransportError:
            return False

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = _clean_environ(
            DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.config_dir)
        )
        return _run(["docker", *args], env=env, timeout=timeout)

    def try_docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Like :meth:`docker`, but a failure is returned, not raised."""
        env = _clean_environ(
            DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.config_dir)
        )
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    def repo_digests(self, image: str) -> list[str]:
        out = self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image)
        digests: list[str] = json.loads(out.stdout)
        return digests


class Containerd(Daemon):
    """``containerd`` (1.6) with its root, state and socket in its directory and the CRI
    plugin off (``ctr`` talks to it; ``ctr --hosts-dir`` reads ``hosts.toml`` files)."""

    name = "containerd"

    def __init__(self) -> None:
        super().__init__("ctrd-")
        self.socket = self.workdir / "containerd.sock"
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
        )

    def command(self) -> list[str]:
        return ["containerd", "--config", str(self.config_path)]

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "version"],
            capture_output=True,
            env=_clean_environ(),
            timeout=10,
            check=False,
        )
        return result.returncode == 0

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(
            ["ctr", "--address", str(self.socket), *args], env=_clean_environ(), timeout=timeout
        )

    def pull(self, hosts_dir: Path, reference: str, credentials: Credentials | None = None) -> None:
        """``ctr images pull --hosts-dir`` (``hosts.toml`` files), with ``--user`` if given."""
        user = ["--user", credentials.joined()] if credentials is not None else []
        self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), *user, reference)

    def image_digest(self, name: str) -> str:
        """The digest ``ctr images ls`` shows for ``name``."""
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == name:
                return fields[2]
        raise LookupError(f"{name} not in ctr images ls")


def config_dump(config_text: str) -> str:
    """``containerd config dump`` of a config file: how containerd 1.6 reads it."""
    with tempfile.TemporaryDirectory(prefix="ctrd-conf-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(config_text)
        return _run(["containerd", "--config", str(path), "config", "dump"], timeout=30).stdout


class Podman:
    """``podman`` (4.3, root, vfs storage by default) with its storage in a directory of its own and
    the given ``registries.conf`` (``CONTAINERS_REGISTRIES_CONF``). Not a daemon.
    ``storage_driver="overlay"`` starts containers in a second instead of copying the
    image's whole tree (its mounts are undone by :meth:`close`).
    After :meth:`trust` it sees an ``/etc/containers`` of its own, holding only a policy that
    accepts any image and the ``certs.d`` that :meth:`trust` fills."""

    def __init__(self, registries_conf: str, storage_driver: str = "vfs") -> None:
        self.storage_driver = storage_driver
        self.workdir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text(registries_conf)
        self.containers_conf = self.workdir / "containers.conf"
        self.containers_conf.write_text(
            '[engine]\nevents_logger = "file"\n'
            f'events_logfile_path = "{self.workdir / "events.log"}"\n'
        )
        self.auth_file = self.workdir / "auth.json"  # empty: no credentials of the machine's
        self.auth_file.write_text("{}")
        self.storage_conf = self.workdir / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "{storage_driver}"\nrunroot = "{self.workdir / "run"}"\n'
            f'graphroot = "{self.workdir / "root"}"\n'
        )
        # /etc/containers as podman sees it once trust() is called; until then the machine's,
        # so that containers run detached (in no namespace of a single command) are unaffected.
        self.etc: Path | None = None

    def trust(self, registry: str, ca: Path) -> None:
        """Trust ``ca`` for ``registry`` (``host:port``) in ``/etc/containers/certs.d``."""
        if self.etc is None:
            self.etc = self.workdir / "etc-containers"
            self.etc.mkdir()
            policy = '{"default": [{"type": "insecureAcceptAnything"}]}'
            (self.etc / "policy.json").write_text(policy)
        _write_ca(self.etc / "certs.d", registry, ca)

    def login(self, registry: str, credentials: Credentials) -> None:
        """``podman login`` into this podman's auth file: credentials for a mirror must come
        from there, as ``--creds`` goes to the registry a reference names, never its mirrors."""
        args = ["login", "--username", credentials.username, "--password-stdin", registry]
        self.podman(*args, input=credentials.password)

    def podman(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = _clean_environ(
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            REGISTRY_AUTH_FILE=str(self.auth_file),
            TMPDIR=str(self.workdir / "tmp"),
        )
        (self.workdir / "tmp").mkdir(exist_ok=True)
        argv = [
            "podman",
            "--storage-driver",
            self.storage_driver,
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "run"),
            "--tmpdir",
            str(self.workdir / "libpod-tmp"),
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]
        if self.etc is not None:
            argv = _with_private_etc({"/etc/containers": self.etc}, argv)
        return _run(argv, env=env, timeout=timeout, input=input)

    def image_digest(self, name: str) -> str:
        return self.podman("image", "inspect", "--format", "{{.Digest}}", name).stdout.strip()

    def close(self) -> None:
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
