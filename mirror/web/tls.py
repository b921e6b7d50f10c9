"""TLS for ``mirror serve``: a server context from the configured files, reloaded when they change.

Certificates rotate every few weeks (cert-manager, ACME clients), and uvicorn has no reload.
So the context uvicorn listens with only carries the settings fixed for the process's life
(TLS 1.2 at least, the client-certificate requirement); its ``sni_callback``, which OpenSSL
runs on every handshake (with or without SNI), checks the files and hands the handshake the
newest context built from them. Connections already open keep the context they started with.

A new pair is built in a fresh context and used only if it loads whole: loading a key that
does not match the certificate into a live context leaves it unable to handshake. A pair
that fails (half-written, mismatched, unreadable) is logged once and the previous one keeps
serving until the files change again. Each worker process checks for itself.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, ServerSettings

__all__ = ["CertificateFiles", "ReloadingContext", "TLSFileError"]

log = logging.getLogger("mirror.tls")

# (st_dev, st_ino, st_size, st_mtime_ns) per file, None for a file that cannot be stat'ed.
# A rename into place (cert-manager swaps a symlink, certbot too) changes the inode.
_Signature = tuple[tuple[int, int, int, int] | None, ...]


class TLSFileError(Exception):
    """A certificate, key or CA file is unusable; ``key`` is the configuration key naming it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _no_password(*_: object) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSFileError("server.tls_key", "the key is encrypted; give an unencrypted key")


@dataclass(frozen=True)
class CertificateFiles:
    """The configured files; picklable, so uvicorn can hand it to each worker process."""

    certificate: Path  # the server's certificate, then any intermediates (PEM)
    key: Path  # its private key (PEM, unencrypted)
    client_ca: Path | None = None  # when set, clients must present a certificate it signed

    @classmethod
    def from_settings(cls, server: ServerSettings) -> CertificateFiles | None:
        if server.tls_certificate is None or server.tls_key is None:
            return None
        return cls(server.tls_certificate, server.tls_key, server.tls_client_ca)

    def _named(self) -> list[tuple[str, Path]]:
        named = [("server.tls_certificate", self.certificate), ("server.tls_key", self.key)]
        if self.client_ca is not None:
            named.append(("server.tls_client_ca", self.client_ca))
        return named

    def signature(self) -> _Signature:
        stats: list[tuple[int, int, int, int] | None] = []
        for _, path in self._named():
            try:
                st = os.stat(path)
            except OSError:
                stats.append(None)
            else:
                stats.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stats)

    def load(self) -> ssl.SSLContext:
        """A server context from the files as they are now; TLSFileError names the bad one."""
        for key, path in self._named():
            try:
                with open(path, "rb") as file:
                    text = file.read()
            except OSError as exc:
                raise TLSFileError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
            if b"-----BEGIN" not in text:
                raise TLSFileError(key, f"{path} holds no PEM data")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certificate, self.key, password=_no_password)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                reason = f"{self.key} is not the key of the certificate in {self.certificate}"
                raise TLSFileError("server.tls_key", reason) from exc
            reason = f"cannot load {self.certificate} with {self.key}: {exc}"
            raise TLSFileError("server.tls_certificate", reason) from exc
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as exc:
                reason = f"no CA certificate in {self.client_ca}: {exc}"
                raise TLSFileError("server.tls_client_ca", reason) from exc
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def check(self) -> None:
        """Fail at start, with ConfigError naming the key, if the files cannot serve."""
        try:
            self.load()
        except TLSFileError as exc:
            raise ConfigError(exc.key, exc.reason) from exc

    def listening_context(self, _config: Any = None, _default: Any = None) -> ssl.SSLContext:
        """uvicorn's ``ssl_context_factory``, called once in each worker process."""
        return ReloadingContext(self).listening


class ReloadingContext:
    """The listening context and the newest good context built from the files."""

    def __init__(self, files: CertificateFiles) -> None:
        self.files = files
        self._signature = files.signature()
        self.current = files.load()
        # The listening context: its protocol range and verify mode are the handshake's (the
        # swap replaces only certificates and trust store), so it is built the same way.
        self.listening = files.load()
        self.listening.sni_callback = self._on_handshake

    def _on_handshake(self, connection: ssl.SSLObject, _name: str | None, _: Any) -> None:
        self.refresh()
        connection.context = self.current

    def refresh(self) -> None:
        """Load the files again if they changed since the last look; keep the old on failure."""
        signature = self.files.signature()
        if signature == self._signature:
            return
        self._signature = signature  # a bad pair is reported once, retried when it changes
        try:
            self.current = self.files.load()
        except TLSFileError as exc:
            log.warning("TLS files changed but cannot be used, still serving the old ones: %s", exc)
        else:
            log.info("TLS certificate reloaded from %s", self.files.certificate)
