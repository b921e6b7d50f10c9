"""``mirror serve`` over TLS: the configured files, TLS 1.2 at least, rotation in place.

A private CA made with ``openssl`` signs the server's certificates (subjectAltName
127.0.0.1 and localhost). The mirror runs as a real ``mirror serve`` process; clients are
Python ``ssl`` sockets speaking HTTP/1.1 by hand, so a test can keep one connection open
across a rotation and read the serial of the certificate each handshake got.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirror.config import ConfigError, parse
from mirror.web.tls import CertificateFiles
from tests.support.mirror import MirrorProcess, run_cli, write_config
from tests.support.ports import free_port
from tests.support.tls import Issued, TestCA

NOWHERE = [{"name": "docker.io", "url": "http://127.0.0.1:9"}]  # never contacted here


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def _install(issued: Issued, directory: Path) -> tuple[Path, Path]:
    """Put a pair where the mirror reads it, each file renamed into place as cert-manager
    and ACME clients do; returns the (certificate, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "tls.crt", directory / "tls.key"
    for source, target in zip((issued.certificate, issued.key), paths, strict=True):
        temporary = target.with_suffix(".new")
        temporary.write_bytes(source.read_bytes())
        os.replace(temporary, target)
    return paths


def _client(ca: TestCA, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.certificate))
    if versions:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.0 and 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1, on purpose
        for name, version in versions.items():
            setattr(context, name, version)
    return context


class Connection:
    """One TLS connection to the mirror, speaking keep-alive HTTP/1.1 by hand."""

    def __init__(self, mirror: MirrorProcess, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    @property
    def serial(self) -> int:
        certificate = self.sock.getpeercert()
        assert certificate is not None
        return int(str(certificate["serialNumber"]), 16)

    def get_v2(self) -> int:
        """``GET /v2/`` on this connection; the status."""
        self.sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status_line = self.file.readline()
        if not status_line:
            raise ConnectionError("the mirror closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        self.file.read(length)
        return status

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _new_connection_serial(mirror: MirrorProcess, context: ssl.SSLContext) -> int:
    connection = Connection(mirror, context)
    try:
        assert connection.get_v2() == 200
        return connection.serial
    finally:
        connection.close()


def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def tls_mirror(ca: TestCA, tmp_path: Path) -> Iterator[tuple[MirrorProcess, Path, Issued]]:
    """A mirror with two workers serving ``first``'s pair from ``tmp_path/tls``."""
    first = ca.issue("first")
    certificate, key = _install(first, tmp_path / "tls")
    server = {"tls_certificate": certificate, "tls_key": key}
    with MirrorProcess(
        NOWHERE, workers=2, server=server, client_tls=_client(ca), workdir=tmp_path / "m"
    ) as mirror:
        yield mirror, tmp_path / "tls", first


def test_serves_tls_1_2_and_1_3_and_refuses_older_versions(
    ca: TestCA, tls_mirror: tuple[MirrorProcess, Path, Issued]
) -> None:
    mirror, _, first = tls_mirror
    assert _new_connection_serial(mirror, _client(ca)) == first.serial
    for newest in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        connection = Connection(mirror, _client(ca, maximum_version=newest))
        assert connection.sock.version() == newest.name.replace("_", ".")
        assert connection.get_v2() == 200
        connection.close()
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = _client(ca, minimum_version=old, maximum_version=old)
        with pytest.raises(ssl.SSLError) as refused:
            Connection(mirror, context)
        # The client did offer the old version; the mirror hung up on it.
        assert refused.value.reason != "NO_PROTOCOLS_AVAILABLE"
    # Plain HTTP on the TLS port gets no answer.
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as plain:
        plain.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert not plain.recv(100).startswith(b"HTTP/")


def test_new_certificate_is_served_to_new_connections_while_old_ones_carry_on(
    ca: TestCA, tls_mirror: tuple[MirrorProcess, Path, Issued]
) -> None:
    mirror, directory, first = tls_mirror
    # One connection per worker, most likely: the kernel spreads them.
    before = [Connection(mirror, _client(ca)) for _ in range(4)]
    assert {c.get_v2() for c in before} == {200}
    assert {c.serial for c in before} == {first.serial}

    second = ca.issue("second")
    _install(second, directory)
    # Every new handshake, on whichever worker, gets the new certificate.
    assert {_new_connection_serial(mirror, _client(ca)) for _ in range(8)} == {second.serial}
    # Connections opened before keep working on the certificate they started with.
    assert {c.get_v2() for c in before} == {200}
    assert {c.serial for c in before} == {first.serial}
    for connection in before:
        connection.close()
    _until(lambda: mirror.log().count("TLS certificate reloaded") >= 1)


def test_a_broken_new_pair_keeps_the_old_certificate_serving(
    ca: TestCA, tls_mirror: tuple[MirrorProcess, Path, Issued]
) -> None:
    mirror, directory, first = tls_mirror
    certificate, key = directory / "tls.crt", directory / "tls.key"
    # The certificate is replaced and its key is not (a half-done rotation).
    third = ca.issue("third")
    certificate.write_bytes(third.certificate.read_bytes())
    assert {_new_connection_serial(mirror, _client(ca)) for _ in range(6)} == {first.serial}
    _until(lambda: "is not the key of the certificate" in mirror.log())
    # An unreadable file does no harm either.
    key.unlink()
    assert _new_connection_serial(mirror, _client(ca)) == first.serial
    # Once the pair is whole again, it is served.
    key.write_bytes(third.key.read_bytes())
    assert {_new_connection_serial(mirror, _client(ca)) for _ in range(6)} == {third.serial}


def test_client_certificates_are_required_when_a_client_ca_is_configured(
    ca: TestCA, tmp_path: Path
) -> None:
    pair = ca.issue("server")
    user = ca.issue("user", ("user",), client=True)
    server = {
        "tls_certificate": pair.certificate,
        "tls_key": pair.key,
        "tls_client_ca": ca.certificate,
    }
    with_identity = _client(ca)
    with_identity.load_cert_chain(user.certificate, user.key)
    with MirrorProcess(NOWHERE, server=server, client_tls=with_identity) as mirror:
        assert _new_connection_serial(mirror, with_identity) == pair.serial
        anonymous = Connection(mirror, _client(ca))
        # TLS 1.3 sends the refusal after the client's handshake ends: it shows at first read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            anonymous.get_v2()
        anonymous.close()


def test_unusable_tls_files_fail_at_start_naming_the_key(ca: TestCA, tmp_path: Path) -> None:
    pair, other = ca.issue("pair"), ca.issue("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pair.key), "-aes256", "-passout", "pass:x"]
        + ["-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    cases = [
        (CertificateFiles(tmp_path / "absent.crt", pair.key), "server.tls_certificate"),
        (CertificateFiles(pair.certificate, tmp_path / "absent.key"), "server.tls_key"),
        (CertificateFiles(pair.certificate, other.key), "server.tls_key"),
        (CertificateFiles(garbage, pair.key), "server.tls_certificate"),
        (CertificateFiles(pair.key, pair.key), "server.tls_certificate"),
        (CertificateFiles(pair.certificate, encrypted), "server.tls_key"),
        (CertificateFiles(pair.certificate, pair.key, garbage), "server.tls_client_ca"),
    ]
    for files, key in cases:
        with pytest.raises(ConfigError) as caught:
            files.check()
        assert caught.value.key == key, (files, caught.value)
    CertificateFiles(pair.certificate, pair.key, ca.certificate).check()

    upstream = {"name": "docker.io", "url": "http://127.0.0.1:9"}
    for server, key in [
        ({"tls_certificate": "a.crt"}, "server.tls_key"),
        ({"tls_client_ca": "ca.crt"}, "server.tls_client_ca"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse({"upstreams": [upstream], "server": server}, {})
        assert caught.value.key == key

    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\ntls_certificate = "{pair.certificate}"\ntls_key = "{other.key}"\n'
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        '[[upstreams]]\nname = "docker.io"\nurl = "http://127.0.0.1:9"\n'
    )
    result = run_cli("serve", "--config", str(config), timeout=60)
    assert result.returncode == 2
    assert "server.tls_key" in result.stderr and "is not the key" in result.stderr
    assert "Traceback" not in result.stderr


def test_healthcheck_command_asks_the_tls_port(
    tls_mirror: tuple[MirrorProcess, Path, Issued], tmp_path: Path
) -> None:
    mirror, _, _ = tls_mirror
    assert run_cli("healthcheck", "--config", str(mirror.config_path)).returncode == 0
    nothing = tmp_path / "nothing.toml"
    write_config(nothing, port=free_port(), cache_dir=tmp_path / "c", upstreams=NOWHERE)
    failed = run_cli("healthcheck", "--config", str(nothing))
    assert failed.returncode == 1
    assert "/healthz" in failed.stderr
