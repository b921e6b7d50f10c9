"""A Docker Hub style token server (``auth: token:`` for CNCF distribution), in a thread.

At construction it makes an RSA key and a self-signed certificate and writes the certificate
PEM to ``cert_path`` (distribution's ``rootcertbundle``).  ``GET /token?service=…&scope=…``
answers ``{"token", "access_token", "expires_in", "issued_at"}``; the token is an RS256 JWT whose
header carries the certificate in ``x5c`` (distribution 2.8 verifies the chain against the
``rootcertbundle`` and then the signature with the leaf's key; no ``kid`` needed).

Policy (default): anonymous requests get ``pull`` only; requests with valid Basic credentials
get every action they ask for (``pull``, ``push``, ``delete``, ``*``); wrong or unknown
credentials get 401 (like Docker Hub).  ``POST /token`` (the OAuth2 form containerd tries first)
is supported too.  Every request to ``/token`` is counted and recorded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .ports import Service

__all__ = [
    "Access",
    "DEFAULT_ISSUER",
    "DEFAULT_SERVICE",
    "GrantPolicy",
    "TokenRequest",
    "TokenServer",
    "default_grant",
    "parse_scope",
]

DEFAULT_ISSUER = "mirror-test-token-issuer"
DEFAULT_SERVICE = "registry.test"

#: ``grant(user, type, name, requested_actions) -> granted_actions``; user is None if anonymous.
GrantPolicy = Callable[[str | None, str, str, list[str]], list[str]]


@dataclass(frozen=True)
class Access:
    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received (also recorded when refused)."""

    method: str
    user: str | None  #: authenticated user, None if anonymous or refused
    service: str | None
    scopes: tuple[str, ...]
    granted: tuple[Access, ...]
    status: int


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/x:pull,push`` -> ``("repository", "library/x", ["pull", "push"])``.

    The name may itself contain ``:`` (e.g. a registry host with a port).
    """
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def default_grant(user: str | None, kind: str, name: str, actions: list[str]) -> list[str]:
    if user is None:
        return [a for a in actions if a == "pull"]
    return [a for a in actions if a in ("pull", "push", "delete", "*")]


def _make_key_and_cert(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class TokenServer(Service):
    """Token server on ``127.0.0.1:<free port>`` served by uvicorn in a background thread.

    ``users`` maps user names to passwords accepted as Basic credentials.  ``expires_in`` is
    the token lifetime in seconds (note distribution adds 60 s of leeway when checking ``exp``).
    Setting :attr:`fail_with` to a status code makes ``/token`` answer that status (to simulate
    an auth outage); ``None`` restores normal service.  ``port`` fixes the port in advance (the
    URL is then known before :meth:`start`); by default a free one is picked at the first start
    and kept for restarts.
    """

    def __init__(
        self,
        cert_path: str | Path,
        *,
        users: Mapping[str, str] | None = None,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int = 300,
        grant: GrantPolicy = default_grant,
        port: int | None = None,
    ) -> None:
        self.cert_path = Path(cert_path)
        self.users: dict[str, str] = dict(users or {})
        self.issuer = issuer
        self.expires_in = expires_in
        self.grant = grant
        self.fail_with: int | None = None
        self._key, self._cert = _make_key_and_cert(issuer)
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self.cert_path.parent.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._log: list[TokenRequest] = []
        self._port: int | None = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._app = Starlette(
            routes=[
                Route("/token", self._token_endpoint, methods=["GET", "POST"]),
                Route("/", self._root, methods=["GET"]),
            ]
        )

    # ----------------------------------------------------------------- bookkeeping
    @property
    def token_requests(self) -> int:
        """How many requests ``/token`` received (granted or refused)."""
        with self._lock:
            return len(self._log)

    @property
    def log(self) -> list[TokenRequest]:
        """A copy of the recorded requests, oldest first."""
        with self._lock:
            return list(self._log)

    def reset_counters(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._log.append(entry)

    # ------------------------------------------------------------------- tokens
    @property
    def certificate_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def make_token(
        self,
        access: Iterable[Access],
        *,
        service: str | None = DEFAULT_SERVICE,
        subject: str | None = None,
        expires_in: int | None = None,
        issuer: str | None = None,
    ) -> str:
        """Sign a token directly (no HTTP, not counted); handy for forging special cases."""
        now = int(time.time())
        lifetime = self.expires_in if expires_in is None else expires_in
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "sub": subject or "",
            "aud": service or "",
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a.claim() for a in access],
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [self._x5c]})

    def _check_basic(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, user): no header -> (True, None); valid -> (True, user); else (False, None)."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        expected = self.users.get(user)
        if not sep or expected is None or not secrets.compare_digest(expected, password):
            return False, None
        return True, user

    def _grant(self, user: str | None, scopes: Sequence[str]) -> list[Access]:
        granted: list[Access] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            allowed = self.grant(user, kind, name, actions)
            if allowed:
                granted.append(Access(kind, name, tuple(allowed)))
        return granted

    async def _token_endpoint(self, request: Request) -> Response:
        params: dict[str, list[str]] = {}
        for key, value in request.query_params.multi_items():
            params.setdefault(key, []).append(value)
        basic_header = request.headers.get("authorization")
        if request.method == "POST":
            # application/x-www-form-urlencoded (python-multipart is not a dependency)
            body = (await request.body()).decode(errors="replace")
            for key, field_value in urllib.parse.parse_qsl(body, keep_blank_values=True):
                params.setdefault(key, []).append(field_value)
            if "username" in params and "password" in params:
                raw = f"{params['username'][0]}:{params['password'][0]}".encode()
                basic_header = "Basic " + base64.b64encode(raw).decode()
        scopes = tuple(s for value in params.get("scope", []) for s in value.split(" ") if s)
        service = params.get("service", [None])[0]

        if self.fail_with is not None:
            status = self.fail_with
            self._record(TokenRequest(request.method, None, service, scopes, (), status))
            return PlainTextResponse("token server failure (simulated)", status_code=status)

        ok, user = self._check_basic(basic_header)
        if not ok:
            self._record(TokenRequest(request.method, None, service, scopes, (), 401))
            return JSONResponse(
                {"details": "incorrect username or password"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="token"'},
            )
        granted = self._grant(user, scopes)
        token = self.make_token(granted, service=service, subject=user)
        self._record(TokenRequest(request.method, user, service, scopes, tuple(granted), 200))
        issued_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        answer = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at.replace("+00:00", "Z"),
        }
        return JSONResponse(answer)

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("token server\n")

    # ---------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("token server not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the realm is ``url + "/token"``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10) -> TokenServer:
        """Start serving (again on the same port after :meth:`stop`)."""
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self._port or 0))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="token-server", daemon=True
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                self._cleanup()
                raise RuntimeError("token server thread died during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("token server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop serving and join the thread (the port is kept for a later :meth:`start`)."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                if server is not None:
                    server.force_exit = True
                thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("token server thread did not stop")
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._server = None
        self._thread = None
