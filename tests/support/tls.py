"""A private certificate authority for the tests, made with the ``openssl`` command.

``TestCA(directory)`` writes a CA (``ca.crt``, ``ca.key``); :meth:`TestCA.issue` signs a
certificate for the names and addresses given (in subjectAltName, as clients check them) or,
with ``client=True``, a client certificate. Every certificate gets a serial of its own, which
is how the rotation tests tell one from another.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Issued", "TestCA", "ROUTABLE_ADDRESS"]

# TEST-NET-1, documentation only, never routed: the address a client must verify the mirror's
# certificate for (Docker trusts anything on 127.0.0.0/8 without verifying it).
ROUTABLE_ADDRESS = "192.0.2.10"
SERVER_NAMES = ("127.0.0.1", "localhost", ROUTABLE_ADDRESS)


@dataclass(frozen=True)
class Issued:
    certificate: Path
    key: Path
    serial: int


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class TestCA:
    """A CA in ``directory``: ``ca.crt`` is what clients are told to trust."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "mirror test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.certificate = directory / "ca.crt"
        self.key = directory / "ca.key"
        self._serial = 0x1000
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(self.key), "-out", str(self.certificate),
            "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(
        self, name: str, names: tuple[str, ...] = SERVER_NAMES, *, client: bool = False
    ) -> Issued:
        """A new key and a certificate for ``names`` signed by this CA, as ``NAME.crt/.key``."""
        self._serial += 1
        key = self.directory / f"{name}.key"
        certificate = self.directory / f"{name}.crt"
        request = self.directory / f"{name}.csr"
        extensions = self.directory / f"{name}.ext"
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
        if client:
            lines.append("extendedKeyUsage=clientAuth")
        else:
            lines.append("extendedKeyUsage=serverAuth")
            lines.append("subjectAltName=" + ",".join(map(_alt_name, names)))
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(request), "-subj", f"/CN={names[0]}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.certificate),
            "-CAkey", str(self.key), "-set_serial", str(self._serial), "-days", "2",
            "-extfile", str(extensions), "-out", str(certificate),
        )  # fmt: skip
        return Issued(certificate, key, self._serial)


def _alt_name(name: str) -> str:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"DNS:{name}"
    return f"IP:{name}"
