"""Manifest media types and the client's ``Accept`` header.

Only the four manifest types of today's registries are served; schema 1 is long
dead and refused clearly instead of being passed on to clients that would choke.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable

from .errors import ManifestInvalid

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "accepted_types",
    "manifest_media_type",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES: tuple[str, ...] = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
# distribution refuses manifests above this size; so do we, before buffering more.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def accepted_types(accept_lines: Iterable[str]) -> tuple[str, ...]:
    """The manifest types a client accepts, in our canonical order.

    Clients send ``Accept`` as several header lines (docker, podman, skopeo) or as
    one comma-separated line (containerd); both are read. No header, or a
    wildcard, accepts every type.
    """
    return _accepted_types(tuple(accept_lines))


# A fleet sends a few distinct Accept headers, each on every manifest request.
@functools.lru_cache(maxsize=64)
def _accepted_types(accept_lines: tuple[str, ...]) -> tuple[str, ...]:
    wanted: set[str] = set()
    seen_any = False
    for line in accept_lines:
        for item in line.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if not media_type:
                continue
            seen_any = True
            if media_type in ("*/*", "application/*"):
                return MANIFEST_TYPES
            wanted.add(media_type)
    if not seen_any:
        return MANIFEST_TYPES
    return tuple(t for t in MANIFEST_TYPES if t in wanted)


def manifest_media_type(content_type: str | None, body: bytes) -> str:
    """The media type of a manifest, from the upstream's header or the body itself.

    Raises ManifestInvalid for schema 1, for unknown types, and when the body's own
    ``mediaType`` contradicts the header.
    """
    header = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestInvalid("upstream manifest is not JSON") from exc
    declared = document.get("mediaType") if isinstance(document, dict) else None
    if (
        header in _SCHEMA1
        or declared in _SCHEMA1
        or (isinstance(document, dict) and document.get("schemaVersion") == 1)
    ):
        raise ManifestInvalid("schema 1 manifests are not supported; push a schema 2 or OCI image")
    if header in MANIFEST_TYPES:
        if isinstance(declared, str) and declared and declared != header:
            raise ManifestInvalid(
                f"manifest declares mediaType {declared!r} but was served as {header!r}"
            )
        return header
    if isinstance(declared, str) and declared in MANIFEST_TYPES:
        return declared
    raise ManifestInvalid(f"unsupported manifest media type {header or declared!r}")
