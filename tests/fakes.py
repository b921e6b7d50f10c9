"""A fake upstream registry for in-process tests: dicts of content, call counters.

Used through ``httpx.MockTransport``; its blob bodies are real async streams that
a test can hold mid-way with ``hold_blobs`` to make requests overlap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from mirror.manifest import OCI_INDEX, OCI_MANIFEST

TOKEN_REALM = "http://auth.fake/token"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """Callable as an httpx transport handler; counts every request by (method, kind)."""

    token_auth: bool = False
    basic_auth: tuple[str, str] | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)
    down: bool = False  # every request fails to connect
    status: int | None = None  # every registry request answers this status
    corrupt: set[str] = field(default_factory=set)  # blob digests served with wrong bytes
    hold_blobs: asyncio.Event | None = None  # blob bodies pause halfway until set
    no_length: bool = False  # blob answers carry no Content-Length
    halfway: asyncio.Event = field(default_factory=asyncio.Event)
    expires_in: int = 300
    headers: dict[str, str] = field(default_factory=dict)  # added to manifest and status answers
    referrers: list[dict[str, object]] = field(default_factory=list)  # descriptors
    # Which repository holds which digests; with ``strict``, content by digest is
    # served only under a repository holding it, as real registries do.
    held: dict[str, set[str]] = field(default_factory=dict)
    strict: bool = False

    # content

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repository: str, tag: str | None, media_type: str, body: bytes) -> str:
        digest = digest_of(body)
        self.manifests[digest] = (media_type, body)
        self.hold(repository, digest)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def add_image(
        self, repository: str, tag: str | None, layers: list[bytes], media_type: str = OCI_MANIFEST
    ) -> tuple[str, bytes]:
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": len(layers)}).encode()
        blobs = [
            self._descriptor(config, "application/vnd.oci.image.config.v1+json"),
            *(
                self._descriptor(layer, "application/vnd.oci.image.layer.v1.tar+gzip")
                for layer in layers
            ),
        ]
        document = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": blobs[0],
            "layers": blobs[1:],
        }
        body = json.dumps(document, indent=3).encode()
        self.hold(repository, *(str(blob["digest"]) for blob in blobs))
        return self.add_manifest(repository, tag, media_type, body), body

    def add_index(self, repository: str, tag: str, manifests: list[str]) -> str:
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": self.manifests[d][0], "digest": d, "size": len(self.manifests[d][1])}
                for d in manifests
            ],
        }
        return self.add_manifest(repository, tag, OCI_INDEX, json.dumps(document).encode())

    def hold(self, repository: str, *digests: str) -> None:
        self.held.setdefault(repository, set()).update(digests)

    def _descriptor(self, data: bytes, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": self.add_blob(data), "size": len(data)}

    def count(self, method: str, kind: str) -> int:
        return self.calls[(method, kind)]

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    # transport

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(f"{request.method} {path}")
        if self.down:
            self.calls[(request.method, "refused")] += 1
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "auth.fake":
            return self._token(request)
        kind = self._kind(path)
        self.calls[(request.method, kind)] += 1
        challenge = self._challenge(request)
        if challenge is not None:
            return challenge
        if self.status is not None:
            errors = {"errors": [{"code": "UNKNOWN"}]}
            return httpx.Response(self.status, json=errors, headers=self.headers)
        name, _, rest = path[len("/v2/") :].rpartition(f"/{kind}s/" if kind != "tags" else "/tags/")
        if path == "/v2/":
            return httpx.Response(200, json={})
        if self.strict and kind in ("manifest", "blob") and ":" in rest:
            if rest not in self.held.get(name, set()):
                code = "MANIFEST_UNKNOWN" if kind == "manifest" else "BLOB_UNKNOWN"
                return httpx.Response(404, json={"errors": [{"code": code}]})
        if kind == "manifest":
            return self._manifest(request, name, rest)
        if kind == "blob":
            return self._blob(request, rest)
        if kind == "tags":
            tags = sorted(t for (r, t) in self.tags if r == name)
            if not tags:
                return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
            return httpx.Response(200, json={"name": name, "tags": tags})
        if kind == "referrer":
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.referrers}
            headers = {"Content-Type": OCI_INDEX}
            artifact_type = request.url.params.get("artifactType")
            if artifact_type:
                index["manifests"] = [
                    m for m in self.referrers if m.get("artifactType") == artifact_type
                ]
                headers["OCI-Filters-Applied"] = "artifactType"
            return httpx.Response(200, json=index, headers=headers)
        return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND"}]})

    @staticmethod
    def _kind(path: str) -> str:
        """By the segment before the last, as a registry routes (``myorg/manifests`` is
        a repository name)."""
        parent = path.rpartition("/")[0].rpartition("/")[2]
        kind = {"manifests": "manifest", "blobs": "blob", "referrers": "referrer"}.get(parent)
        if kind is not None:
            return kind
        return "tags" if path.endswith("/tags/list") else "other"

    def _challenge(self, request: httpx.Request) -> httpx.Response | None:
        auth = request.headers.get("Authorization", "")
        if self.token_auth and auth != "Bearer good-token":
            scope = ""
            if "/" in request.url.path[4:]:
                name = request.url.path[4:].rsplit("/", 2)[0]
                scope = f',scope="repository:{name}:pull"'
            header = f'Bearer realm="{TOKEN_REALM}",service="fake"{scope}'
            return httpx.Response(401, headers={"WWW-Authenticate": header})
        if self.basic_auth is not None:
            expected = httpx.BasicAuth(*self.basic_auth)._auth_header
            if auth != expected:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.calls[("GET", "token")] += 1
        return httpx.Response(200, json={"token": "good-token", "expires_in": self.expires_in})

    def _manifest(self, request: httpx.Request, name: str, reference: str) -> httpx.Response:
        digest = reference if ":" in reference else self.tags.get((name, reference))
        if digest is None or digest not in self.manifests:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        media_type, body = self.manifests[digest]
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(body)),
            **self.headers,
        }
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=body)

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        if digest in self.corrupt:
            data = bytes(reversed(data))
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest}
        if self.no_length:
            del headers["Content-Length"]
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=self._stream(data))

    async def _stream(self, data: bytes) -> AsyncIterator[bytes]:
        half = len(data) // 2
        step = 256 * 1024
        for offset in range(0, len(data), step):
            if self.hold_blobs is not None and offset >= half and not self.hold_blobs.is_set():
                self.halfway.set()
                await self.hold_blobs.wait()
            yield data[offset : offset + step]
