"""A real-HTTP fake registry with Docker Hub style token auth, in the dialects registries speak.

:class:`DialectRegistry` is an ASGI app (serve it with :class:`tests.support.hosts.AppServer`)
holding images in memory. Every ``/v2/`` request needs a Bearer token from its own ``/token``
realm (at the same origin); what differs between registries is how they say so:

* ``challenge``: ``"bearer"`` (one ``WWW-Authenticate: Bearer …`` line), ``"two-lines"``
  (a Bearer line, then a ``Basic`` line), or ``"basic-first"`` (one line,
  ``Basic realm="…", Bearer realm="…"``);
* ``realm_query``: the realm carries a query string of its own (``?tenant=x``) that the token
  service insists on getting back;
* a repository that is missing, or private to the caller, answers ``401`` with
  ``error="insufficient_scope"`` (Docker Hub does, for both);
* ``blob_storage``: blob GETs redirect there (``307``), as Docker Hub's do to its CDN.

:class:`BlobStorage` serves blobs by digest (or challenges every request with a realm of
its own choosing), and :class:`Stranger` records every request and hands out tokens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .hosts import Recorder

__all__ = [
    "OCI_MANIFEST",
    "BlobStorage",
    "ChallengeStyle",
    "DialectRegistry",
    "Stranger",
    "layout_content",
]

ChallengeStyle = Literal["bearer", "two-lines", "basic-first"]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layout_content(layout: Path) -> tuple[dict[str, tuple[str, bytes]], dict[str, bytes], str]:
    """(manifests, blobs, top digest) of an OCI layout with one image or index."""
    index = json.loads((layout / "index.json").read_text())
    manifests: dict[str, tuple[str, bytes]] = {}
    blobs: dict[str, bytes] = {}

    def read(digest: str) -> bytes:
        algorithm, _, hex_ = digest.partition(":")
        return (layout / "blobs" / algorithm / hex_).read_bytes()

    def walk(descriptor: dict[str, str]) -> None:
        body = read(descriptor["digest"])
        manifests[descriptor["digest"]] = (descriptor["mediaType"], body)
        document = json.loads(body)
        for child in document.get("manifests", []):
            walk(child)
        for blob in [document.get("config"), *document.get("layers", [])]:
            if blob:
                blobs[blob["digest"]] = read(blob["digest"])

    top = index["manifests"][0]
    walk(top)
    return manifests, blobs, top["digest"]


@dataclass
class _Grant:
    user: str | None
    repositories: frozenset[str]


@dataclass
class DialectRegistry:
    """A token-auth registry; ``url`` must be set to where it is served before use."""

    users: dict[str, str] = field(default_factory=dict)
    challenge: ChallengeStyle = "bearer"
    realm_query: str = ""  # e.g. "tenant=acme": the token service refuses requests without it
    private: set[str] = field(default_factory=set)  # repositories only users may pull
    anonymous: set[str] = field(default_factory=set)  # repositories served without a token
    blob_storage: str | None = None  # base URL blob GETs redirect to
    realm_override: str | None = None  # a realm to name instead of our own /token
    url: str = ""
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    recorder: Recorder = field(default_factory=Recorder)
    _grants: dict[str, _Grant] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_layout(self, repository: str, tag: str, layout: Path) -> str:
        manifests, blobs, top = layout_content(layout)
        self.manifests.update(manifests)
        self.blobs.update(blobs)
        self.tags[(repository, tag)] = top
        return top

    def add_image(self, repository: str, layer: bytes, tag: str = "1") -> str:
        """An OCI image of one layer under ``repository:tag``; returns the layer's digest."""
        config = b'{"architecture":"amd64","os":"linux"}'
        digest = self.add_blob(layer)
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": self.add_blob(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": len(layer),
                }
            ],
        }
        self.add_manifest(repository, tag, OCI_MANIFEST, json.dumps(document).encode())
        return digest

    def add_blob(self, data: bytes) -> str:
        self.blobs[_digest(data)] = data
        return _digest(data)

    def add_manifest(self, repository: str, tag: str, media_type: str, body: bytes) -> str:
        self.manifests[_digest(body)] = (media_type, body)
        self.tags[(repository, tag)] = _digest(body)
        return _digest(body)

    @property
    def realm(self) -> str:
        if self.realm_override is not None:
            return self.realm_override
        return f"{self.url}/token" + (f"?{self.realm_query}" if self.realm_query else "")

    @property
    def token_requests(self) -> list[str]:
        """The query strings of every /token request, in order."""
        return [s.query for s in self.recorder.seen if s.path == "/token"]

    def requests(self, kind: str) -> int:
        return sum(1 for s in self.recorder.seen if f"/{kind}" in s.path)

    # the app

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self._token, methods=["GET"]),
                Route("/v2/", self._v2, methods=["GET"]),
                Route("/v2/{rest:path}", self._v2, methods=["GET", "HEAD"]),
            ]
        )

    def _challenges(self, scope: str, error: str = "") -> list[tuple[str, str]]:
        bearer = f'Bearer realm="{self.realm}",service="dialect"'
        if scope:
            bearer += f',scope="{scope}"'
        if error:
            bearer += f',error="{error}"'
        basic = 'Basic realm="dialect"'
        if self.challenge == "two-lines":
            lines = [bearer, basic]
        elif self.challenge == "basic-first":
            lines = [f"{basic}, {bearer}"]
        else:
            lines = [bearer]
        return [("WWW-Authenticate", line) for line in lines]

    def _refuse(self, scope: str, error: str = "") -> Response:
        body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        response = JSONResponse(body, status_code=401)
        for name, value in self._challenges(scope, error):
            response.headers.append(name, value)
        return response

    async def _token(self, request: Request) -> Response:
        self.recorder.record(request)
        for key, _, value in (p.partition("=") for p in self.realm_query.split("&") if p):
            if request.query_params.get(key) != value:
                return JSONResponse({"details": f"missing {key}"}, status_code=400)
        user: str | None = None
        header = request.headers.get("authorization", "")
        if header:
            decoded = base64.b64decode(header.partition(" ")[2]).decode()
            name, _, password = decoded.partition(":")
            if self.users.get(name) != password:
                return JSONResponse({"details": "incorrect username or password"}, 401)
            user = name
        repositories = set()
        for scope in request.query_params.getlist("scope"):
            kind, _, rest = scope.partition(":")
            name, _, _actions = rest.rpartition(":")
            exists = any(r == name for r, _ in self.tags)
            if kind == "repository" and exists and (name not in self.private or user):
                repositories.add(name)
        token = secrets.token_hex(16)
        with self._lock:
            self._grants[token] = _Grant(user, frozenset(repositories))
        return JSONResponse({"token": token, "expires_in": 300})

    async def _v2(self, request: Request) -> Response:
        self.recorder.record(request)
        path = request.url.path
        header = request.headers.get("authorization", "")
        with self._lock:
            grant = self._grants.get(header.partition(" ")[2]) if header[:7] == "Bearer " else None
        if path == "/v2/":
            return JSONResponse({}) if grant else self._refuse("")
        for kind in ("manifests", "blobs", "tags"):
            name, marker, reference = path[len("/v2/") :].rpartition(f"/{kind}/")
            if marker:
                break
        else:
            return JSONResponse({"errors": [{"code": "NAME_UNKNOWN"}]}, status_code=404)
        scope = f"repository:{name}:pull"
        if name in self.anonymous:
            grant = _Grant(None, frozenset({name}))
        if grant is None:
            return self._refuse(scope)
        if name not in grant.repositories:
            # Missing and private alike: the token does not cover the repository.
            return self._refuse(scope, "insufficient_scope")
        if kind == "tags":
            tags = sorted(t for r, t in self.tags if r == name)
            return JSONResponse({"name": name, "tags": tags})
        if kind == "blobs":
            if reference not in self.blobs:
                return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN"}]}, status_code=404)
            if self.blob_storage and request.method == "GET":
                return Response(status_code=307, headers={"Location": self._storage(reference)})
            data = self.blobs[reference]
            return Response(
                b"" if request.method == "HEAD" else data,
                headers={"Docker-Content-Digest": reference, "Content-Length": str(len(data))},
            )
        digest = reference if ":" in reference else self.tags.get((name, reference), "")
        if digest not in self.manifests:
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status_code=404)
        media_type, body = self.manifests[digest]
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(body)),
        }
        return Response(b"" if request.method == "HEAD" else body, headers=headers)

    def _storage(self, digest: str) -> str:
        return f"{self.blob_storage}/storage/{digest}?signature=x"


@dataclass
class BlobStorage:
    """A CDN: serves blobs by digest, or answers 401 with ``challenge_realm`` as its realm."""

    blobs: dict[str, bytes]
    challenge_realm: str | None = None
    recorder: Recorder = field(default_factory=Recorder)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/storage/{digest}", self._blob, methods=["GET"])])

    async def _blob(self, request: Request) -> Response:
        self.recorder.record(request)
        if self.challenge_realm is not None:
            challenge = f'Bearer realm="{self.challenge_realm}",service="cdn"'
            return Response(status_code=401, headers={"WWW-Authenticate": challenge})
        data = self.blobs.get(request.path_params["digest"])
        if data is None:
            return Response(status_code=404)
        return Response(data, headers={"Content-Length": str(len(data))})


@dataclass
class Stranger:
    """A host nobody configured: records every request, hands out a token to anyone."""

    token: str = "stolen-token"
    recorder: Recorder = field(default_factory=Recorder)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{rest:path}", self._any, methods=["GET", "POST"])])

    async def _any(self, request: Request) -> Response:
        self.recorder.record(request)
        return JSONResponse({"token": self.token, "access_token": self.token})
