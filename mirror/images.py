"""What a manifest points at: the children of an index, the blobs of an image."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import ManifestInvalid
from .manifest import DOCKER_MANIFEST_LIST, OCI_INDEX
from .reference import Digest, parse_digest

__all__ = ["Descriptor", "Platform", "children", "is_index", "parse_platform", "referenced_blobs"]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def matches(self, other: Platform) -> bool:
        same = (self.os, self.architecture) == (other.os, other.architecture)
        return same and (self.variant is None or self.variant == other.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {text!r} is not os/arch[/variant], e.g. linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def is_index(media_type: str) -> bool:
    return media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST)


def _document(body: bytes) -> dict[str, object]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestInvalid("manifest is not JSON") from exc
    if not isinstance(document, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    return document


def _descriptor(raw: object) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid("descriptor is not an object")
    platform = raw.get("platform")
    size = raw.get("size")
    if not isinstance(size, int) or size < 0:
        raise ManifestInvalid("descriptor has no valid size")
    return Descriptor(
        media_type=str(raw.get("mediaType", "")),
        digest=parse_digest(str(raw.get("digest", ""))),
        size=size,
        platform=Platform(
            str(platform.get("os", "")),
            str(platform.get("architecture", "")),
            platform.get("variant"),
        )
        if isinstance(platform, dict)
        else None,
    )


def children(body: bytes) -> list[Descriptor]:
    """The manifests an index lists."""
    manifests = _document(body).get("manifests")
    if not isinstance(manifests, list):
        raise ManifestInvalid("index has no manifests list")
    return [_descriptor(raw) for raw in manifests]


def referenced_blobs(body: bytes) -> list[Descriptor]:
    """The config and layers an image manifest references."""
    document = _document(body)
    layers = document.get("layers")
    if "config" not in document or not isinstance(layers, list):
        raise ManifestInvalid("image manifest lacks config or layers")
    return [_descriptor(document["config"]), *(_descriptor(raw) for raw in layers)]
