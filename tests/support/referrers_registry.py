"""A tiny read-only registry that has the referrers API (OCI distribution 1.1), for an
upstream such as zot or distribution 3, neither of which can be installed here.

Serves manifests, blobs and ``GET /v2/<name>/referrers/<digest>`` from memory, the
referrers computed from the stored manifests' ``subject`` as the spec says (the
manifest's artifactType, else its config's media type; its annotations), filtered by
``artifactType`` with ``OCI-Filters-Applied``, and in pages of ``page_size`` with a
``Link`` header when one is set. Run it with ``tests.conftest.live_server``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _not_found(code: str) -> Response:
    return JSONResponse({"errors": [{"code": code, "message": code.lower()}]}, status_code=404)


@dataclass
class ReferrersRegistry:
    page_size: int | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    repositories: dict[str, list[str]] = field(default_factory=dict)  # manifest digests
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "METHOD path?query"

    def add_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        self.blobs[_digest(data)] = data
        return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}

    def add_manifest(
        self, repository: str, document: dict[str, Any], tag: str | None = None
    ) -> str:
        body = json.dumps(document).encode()
        digest = _digest(body)
        self.manifests[digest] = (document["mediaType"], body)
        self.repositories.setdefault(repository, []).append(digest)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def referrers(self, repository: str, subject: str) -> list[dict[str, Any]]:
        found = []
        for digest in self.repositories.get(repository, []):
            media_type, body = self.manifests[digest]
            document = json.loads(body)
            if (document.get("subject") or {}).get("digest") != subject:
                continue
            descriptor = {"mediaType": media_type, "digest": digest, "size": len(body)}
            artifact_type = document.get("artifactType") or document.get("config", {}).get(
                "mediaType"
            )
            if artifact_type:
                descriptor["artifactType"] = artifact_type
            if document.get("annotations"):
                descriptor["annotations"] = document["annotations"]
            found.append(descriptor)
        return found

    @property
    def app(self) -> Starlette:
        async def root(request: Request) -> Response:
            return JSONResponse({})

        async def manifest(request: Request) -> Response:
            self._log(request)
            name, reference = request.path_params["name"], request.path_params["reference"]
            digest = reference if ":" in reference else self.tags.get((name, reference))
            if digest is None or digest not in self.repositories.get(name, []):
                return _not_found("MANIFEST_UNKNOWN")
            media_type, body = self.manifests[digest]
            headers = {"Docker-Content-Digest": digest, "Content-Type": media_type}
            return Response(b"" if request.method == "HEAD" else body, headers=headers)

        async def blob(request: Request) -> Response:
            self._log(request)
            data = self.blobs.get(request.path_params["digest"])
            if data is None:
                return _not_found("BLOB_UNKNOWN")
            headers = {"Docker-Content-Digest": request.path_params["digest"]}
            return Response(data, media_type="application/octet-stream", headers=headers)

        async def referrers(request: Request) -> Response:
            self._log(request)
            found = self.referrers(request.path_params["name"], request.path_params["digest"])
            headers = {}
            artifact_type = request.query_params.get("artifactType")
            if artifact_type:
                found = [d for d in found if d.get("artifactType") == artifact_type]
                headers["OCI-Filters-Applied"] = "artifactType"
            start = int(request.query_params.get("page", "0"))
            if self.page_size is not None:
                if start + self.page_size < len(found):
                    query = f"page={start + self.page_size}"
                    headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
                found = found[start : start + self.page_size]
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
            return JSONResponse(index, media_type=OCI_INDEX, headers=headers)

        return Starlette(
            routes=[
                Route("/v2/", root),
                Route("/v2/{name:path}/manifests/{reference}", manifest, methods=["GET", "HEAD"]),
                Route("/v2/{name:path}/blobs/{digest}", blob, methods=["GET", "HEAD"]),
                Route("/v2/{name:path}/referrers/{digest}", referrers),
            ]
        )

    def _log(self, request: Request) -> None:
        query = f"?{request.url.query}" if request.url.query else ""
        self.requests.append(f"{request.method} {request.url.path}{query}")
