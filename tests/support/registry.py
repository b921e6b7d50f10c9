"""A real upstream registry (CNCF distribution 2.8, ``docker-registry serve``) for e2e tests.

``UpstreamRegistry(auth)`` runs ``docker-registry`` on ``127.0.0.1:<free port>`` with its own
temporary storage, with one of three auth modes:

* ``"none"``: open registry.
* ``"token"``: Docker Hub style bearer tokens from a :class:`TokenServer` (started and stopped
  with the registry).  Anonymous tokens allow ``pull``; the given ``users`` (and an internal
  *seed* user used by :meth:`push` and the helper HTTP client) get ``pull``/``push``/``delete``.
* ``"basic"``: an htpasswd (bcrypt) file with the given ``users``, realm ``basic-realm``;
  anonymous access is refused.

Access log: distribution writes one Apache "combined" line per HTTP request to **stdout**
(its own logrus log, "response completed" lines etc., goes to stderr).  Both are captured to
files in the work directory (appended across restarts) and :meth:`requests` parses stdout.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bcrypt
import httpx

from . import skopeo
from .images import ALL_MANIFEST_TYPES, ImageInfo, IndexInfo
from .ports import LoopbackService, Service, free_port, wait_http_ok
from .token_server import DEFAULT_ISSUER, DEFAULT_SERVICE, TokenServer

__all__ = ["AccessLogEntry", "AuthMode", "RegistryAuth", "UpstreamRegistry", "parse_access_log"]

AuthMode = Literal["none", "token", "basic"]
REGISTRY_BINARY = "docker-registry"
BASIC_REALM = "basic-realm"
DEFAULT_BASIC_USERS: Mapping[str, str] = {"testuser": "testpassword"}
SEED_USER = "mirror-test-seeder"
_PROBE_PARAM = "mirror-test-probe"  # marks our own readiness/sync requests

_COMBINED = re.compile(
    r"^(?P<remote>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<agent>.*)"$'
)
_UPLOAD = re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/(?P<ref>[^/]*)$")
_OBJECT = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_TAGS = re.compile(r"^/v2/(?P<name>.+)/tags/list$")

RequestKind = Literal["base", "manifest", "blob", "upload", "tags", "catalog", "other"]


@dataclass(frozen=True)
class AccessLogEntry:
    """One line of distribution's access log (Apache combined format)."""

    remote: str
    user: str
    time: str  #: as logged, e.g. ``26/Nov/2026:23:51:01 +0000`` (1 s resolution)
    method: str
    uri: str  #: request URI as sent: path plus ``?query`` (percent-encoded)
    protocol: str
    status: int
    size: int  #: body bytes the handler wrote; for HEAD this is *not* bytes on the wire
    referer: str
    user_agent: str

    @property
    def path(self) -> str:
        """The URI without the query string, percent-decoded."""
        return urllib.parse.unquote(self.uri.partition("?")[0])

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.uri.partition("?")[2], keep_blank_values=True)

    def _parts(self) -> tuple[RequestKind, str | None, str | None]:
        path = self.path
        if path in ("/v2", "/v2/"):
            return "base", None, None
        if path == "/v2/_catalog":
            return "catalog", None, None
        if match := _UPLOAD.match(path):
            return "upload", match["name"], match["ref"] or None
        if match := _OBJECT.match(path):
            kind: RequestKind = "manifest" if match["kind"] == "manifests" else "blob"
            return kind, match["name"], match["ref"]
        if match := _TAGS.match(path):
            return "tags", match["name"], None
        return "other", None, None

    @property
    def kind(self) -> RequestKind:
        """``base`` (``/v2/``), ``manifest``, ``blob``, ``upload``, ``tags``, ``catalog``…"""
        return self._parts()[0]

    @property
    def repo(self) -> str | None:
        """Repository name (``library/test``) for manifest/blob/upload/tags requests."""
        return self._parts()[1]

    @property
    def reference(self) -> str | None:
        """Tag or digest for manifest requests, digest for blob requests."""
        return self._parts()[2]

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and self.kind == "blob"

    @property
    def is_probe(self) -> bool:
        """One of our own readiness/sync requests (left out of ``requests()``)."""
        return _PROBE_PARAM in self.uri


def parse_access_log(text: str) -> list[AccessLogEntry]:
    """Parse combined-format lines; other lines (none expected on stdout) are skipped."""
    entries: list[AccessLogEntry] = []
    for line in text.splitlines():
        match = _COMBINED.match(line.strip())
        if match is None:
            continue
        entries.append(
            AccessLogEntry(
                remote=match["remote"],
                user=match["user"],
                time=match["time"],
                method=match["method"],
                uri=match["uri"],
                protocol=match["proto"],
                status=int(match["status"]),
                size=0 if match["size"] == "-" else int(match["size"]),
                referer=match["referer"],
                user_agent=match["agent"],
            )
        )
    return entries


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """httpx auth doing the registry dance: on 401, Basic or Bearer (token fetched from the
    challenge's realm, with Basic credentials if given, else anonymously), then retry once.
    Tokens are cached per scope for the life of this object."""

    requires_response_body = True

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self._tokens: dict[str, str] = {}

    def _basic(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = _parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic" and self.credentials is not None:
            request.headers["Authorization"] = self._basic()
            yield request
        elif scheme == "bearer" and "realm" in params:
            scope = params.get("scope", "")
            token = self._tokens.get(scope)
            if token is None:
                query = {k: v for k, v in params.items() if k in ("service", "scope")}
                token_request = httpx.Request("GET", params["realm"], params=query)
                if self.credentials is not None:
                    token_request.headers["Authorization"] = self._basic()
                token_response = yield token_request
                if token_response.status_code != 200:
                    return
                body = token_response.json()
                token = str(body.get("token") or body.get("access_token"))
                self._tokens[scope] = token
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


class UpstreamRegistry(LoopbackService, Service):
    """A ``docker-registry`` process (plus token server in ``"token"`` mode).

    Use as a context manager (``start()`` / ``close()``).  :meth:`stop` and :meth:`start` stop
    and restart the registry on the same port and storage (the token server keeps running;
    stop it via :attr:`token_server` to simulate an auth outage).
    """

    def __init__(
        self,
        auth: AuthMode = "none",
        *,
        users: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        token_expires_in: int = 300,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 30,
    ) -> None:
        if auth not in ("none", "token", "basic"):
            raise ValueError(f"unknown auth mode {auth!r}")
        if auth == "basic" and users is not None and not users:
            raise ValueError("basic auth needs at least one user")
        self.auth: AuthMode = auth
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="upstream-registry-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.access_log_path = self.workdir / "access.log"  # stdout: combined-format lines
        self.app_log_path = self.workdir / "registry.log"  # stderr: logrus lines
        self.service = service
        self.start_timeout = start_timeout
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.token_server: TokenServer | None = None
        self.users: dict[str, str] = {}
        #: credentials used by push() and client(); None for an open registry
        self.push_credentials: tuple[str, str] | None = None

        auth_config: dict[str, Any] | None = None
        if auth == "basic":
            self.users = dict(users if users is not None else DEFAULT_BASIC_USERS)
            self.push_credentials = next(iter(self.users.items()))
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(
                "".join(
                    f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                    for name, pw in self.users.items()
                )
            )
            auth_config = {"htpasswd": {"realm": BASIC_REALM, "path": str(htpasswd)}}
        elif auth == "token":
            self.users = dict(users or {})
            self.push_credentials = (SEED_USER, secrets.token_hex(16))
            self.token_server = TokenServer(
                self.workdir / "token-cert.pem",
                users={**self.users, SEED_USER: self.push_credentials[1]},
                issuer=issuer,
                expires_in=token_expires_in,
                port=free_port(),  # the realm goes into the config before anything starts
            )
            auth_config = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": service,
                    "issuer": issuer,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            }
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if auth_config is not None:
            config["auth"] = auth_config
        if extra_config:
            _deep_merge(config, extra_config)
        self.config = config
        # JSON is YAML: distribution reads it fine
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def push_creds(self) -> str | None:
        """:attr:`push_credentials` as skopeo's ``user:password``."""
        if self.push_credentials is None:
            return None
        return f"{self.push_credentials[0]}:{self.push_credentials[1]}"

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float | None = None) -> UpstreamRegistry:
        """Start the registry (again) and wait until ``GET /v2/`` answers (401 counts)."""
        if self.running:
            return self
        if self.token_server is not None and not self.token_server.running:
            self.token_server.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.access_log_path, "ab") as out, open(self.app_log_path, "ab") as err:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.workdir,
            )
        try:
            wait_http_ok(
                f"{self.url}/v2/?{_PROBE_PARAM}=ready",
                timeout=timeout or self.start_timeout,
                process=self.process,
                stderr_path=self.app_log_path,
                name=f"docker-registry ({self.auth})",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop the registry process (SIGTERM, then SIGKILL); storage and logs are kept."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.process = None

    def close(self) -> None:
        """Stop everything and delete the work directory (if it was created here)."""
        try:
            self.stop()
        finally:
            if self.token_server is not None:
                self.token_server.stop()
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ----------------------------------------------------------------- access log
    def _read_log(self) -> list[AccessLogEntry]:
        try:
            text = self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return parse_access_log(text)

    def sync_log(self, timeout: float = 5) -> None:
        """Wait until requests answered so far are in the access log.

        distribution writes a request's line after its handler returns, so a client may have
        its whole response before the line exists.  This sends a probe request and waits for
        its line (probes are left out of :meth:`requests`).  Requests still in flight (e.g. a
        blob a client is still reading) are not waited for.  No-op if the registry is down.
        """
        if not self.running:
            return
        token = uuid.uuid4().hex
        try:
            httpx.get(f"{self.url}/v2/", params={_PROBE_PARAM: token}, timeout=timeout)
        except httpx.TransportError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if token in self.access_log_path.read_text(errors="replace"):
                return
            time.sleep(0.01)
        raise TimeoutError(f"sync probe {token} never reached {self.access_log_path}")

    def requests(self, *, sync: bool = True) -> list[AccessLogEntry]:
        """All requests logged since the first start (across restarts), oldest first.

        Our readiness and sync probes are left out.  ``sync`` first waits for lines of requests
        already answered (see :meth:`sync_log`).
        """
        if sync:
            self.sync_log()
        return [e for e in self._read_log() if not e.is_probe]

    def mark(self) -> int:
        """A position in the request log; pass it to :meth:`requests_since` and friends."""
        return len(self.requests())

    def requests_since(self, mark: int, *, sync: bool = True) -> list[AccessLogEntry]:
        return self.requests(sync=sync)[mark:]

    def blob_gets(
        self, since: int = 0, *, repo: str | None = None, digest: str | None = None
    ) -> list[AccessLogEntry]:
        """``GET …/blobs/<digest>`` requests (any status) after ``since``."""
        return [
            e
            for e in self.requests_since(since)
            if e.is_blob_get
            and (repo is None or e.repo == repo)
            and (digest is None or e.reference == digest)
        ]

    def blob_bytes_sent(self, since: int = 0, *, repo: str | None = None) -> int:
        """Body bytes served by successful (200/206) blob GETs after ``since``."""
        return sum(e.size for e in self.blob_gets(since, repo=repo) if e.status in (200, 206))

    def manifest_requests(
        self, since: int = 0, *, method: str | None = None, repo: str | None = None
    ) -> list[AccessLogEntry]:
        """Manifest requests (GET and HEAD unless ``method`` is given) after ``since``."""
        return [
            e
            for e in self.requests_since(since)
            if e.kind == "manifest"
            and (method is None or e.method == method)
            and (repo is None or e.repo == repo)
        ]

    # ------------------------------------------------------------------ content
    def push(
        self,
        layout_dir: str | Path,
        ref: str,
        repo_tag: str,
        *,
        all_platforms: bool = False,
        fmt: str | None = None,
        timeout: float = skopeo.DEFAULT_TIMEOUT,
    ) -> str:
        """``skopeo copy oci:LAYOUT:REF docker://HOST/REPO_TAG``; returns the pushed digest.

        Pushes with :attr:`push_credentials` (the first basic user, or the token server's seed
        user); anonymous tokens only allow pull, as on Docker Hub.  ``fmt="v2s2"`` converts to a
        Docker schema 2 manifest (a different digest from the layout's); ``all_platforms``
        pushes a whole index.
        """
        return skopeo.copy(
            f"oci:{layout_dir}:{ref}",
            self.ref(repo_tag),
            dest_creds=self.push_creds,
            all_platforms=all_platforms,
            fmt=fmt,
            timeout=timeout,
        )

    def push_image(
        self, image: ImageInfo | IndexInfo, repo_tag: str, *, fmt: str | None = None
    ) -> str:
        """Push what :func:`~tests.support.images.write_image`/``write_index`` returned."""
        if image.tag is None:
            raise ValueError("image has no tag in its layout")
        return self.push(
            image.layout_dir,
            image.tag,
            repo_tag,
            all_platforms=isinstance(image, IndexInfo),
            fmt=fmt,
        )

    def client(
        self, credentials: tuple[str, str] | None | Literal["push"] = "push", **kwargs: Any
    ) -> httpx.Client:
        """An httpx client on :attr:`url` doing the auth dance (see :class:`RegistryAuth`).

        ``credentials="push"`` (default) uses :attr:`push_credentials`; ``None`` is anonymous.
        """
        creds = self.push_credentials if credentials == "push" else credentials
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, auth=RegistryAuth(creds), trust_env=False, **kwargs)

    def get_manifest(
        self,
        repo: str,
        reference: str,
        accept: Iterable[str] = ALL_MANIFEST_TYPES,
        *,
        method: str = "GET",
    ) -> httpx.Response:
        with self.client() as client:
            return client.request(
                method,
                f"/v2/{repo}/manifests/{reference}",
                headers={"Accept": ", ".join(accept)},
            )

    def manifest_digest(
        self, repo: str, tag: str, accept: Sequence[str] | str = ALL_MANIFEST_TYPES
    ) -> str:
        """The ``Docker-Content-Digest`` the registry reports for ``HEAD manifests/TAG``."""
        accepted = [accept] if isinstance(accept, str) else list(accept)
        response = self.get_manifest(repo, tag, accepted, method="HEAD")
        if response.status_code != 200:
            raise LookupError(f"HEAD {repo}:{tag} -> {response.status_code}")
        return response.headers["Docker-Content-Digest"]

    def delete_manifest(self, repo: str, reference: str) -> None:
        """Delete a manifest (by tag: resolved to its digest first; this untags every tag
        pointing at that digest, as distribution only deletes by digest)."""
        digest = reference if ":" in reference else self.manifest_digest(repo, reference)
        with self.client() as client:
            response = client.delete(f"/v2/{repo}/manifests/{digest}")
        if response.status_code != 202:
            raise RuntimeError(f"DELETE {repo}@{digest} -> {response.status_code}")


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
