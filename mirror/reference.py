"""Pure parsing of what clients name: repositories, tags, digests.

Everything a client sends is checked here before it can reach the disk or an
upstream, so a name can never climb out of the cache directory or smuggle a
host into an upstream URL.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid, OCIError

__all__ = [
    "Digest",
    "ImageReference",
    "parse_digest",
    "parse_image_reference",
    "parse_reference",
    "parse_repository",
    "requested_digest",
    "requested_reference",
    "upstream_repository",
]

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HEX = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
# The digest grammar of the image spec, whatever the algorithm.
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# distribution's limit on a repository name, host included.
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(text: str) -> Digest:
    algorithm, sep, hex_ = text.partition(":")
    pattern = _HEX.get(algorithm)
    if not sep or pattern is None or not pattern.fullmatch(hex_):
        raise DigestInvalid(f"invalid digest {text[:140]!r}", detail={"digest": text[:140]})
    return Digest(algorithm, hex_)


def parse_repository(name: str) -> str:
    if len(name) > _MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}", detail={"name": name[:300]})
    return name


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference: a tag, or a digest when it has a colon."""
    if ":" in reference:
        return parse_digest(reference)
    if not _TAG.fullmatch(reference):
        raise ManifestInvalid(
            f"invalid tag {reference[:140]!r}", detail={"reference": reference[:140]}
        )
    return reference


def requested_digest(text: str, unknown: type[OCIError]) -> Digest:
    """A digest a client asked for in a pull path (a blob's, a manifest's).

    The spec names only 404 as the failure of a blob or manifest pull (its
    endpoints table, end-2 and end-3): what cannot exist, such as ``sha256:xyz``,
    is ``unknown``. A well-formed digest of an algorithm we do not speak (``md5:…``)
    is ``400 DIGEST_INVALID``, as the spec asks of uploads and distribution answers.
    """
    try:
        return parse_digest(text)
    except DigestInvalid:
        if _ANY_DIGEST.fullmatch(text) and text.partition(":")[0] not in _HEX:
            raise DigestInvalid(
                f"unsupported digest algorithm in {text[:140]!r}: only sha256 and sha512",
                detail={"digest": text[:140]},
            ) from None
        raise unknown(
            f"{text[:140]!r} is not a valid digest", detail={"digest": text[:140]}
        ) from None


def requested_reference(text: str) -> str | Digest:
    """A manifest reference from a pull path: a tag that cannot be one is unknown (404)."""
    if ":" in text:
        return requested_digest(text, ManifestUnknown)
    if not _TAG.fullmatch(text):
        raise ManifestUnknown(
            f"{text[:140]!r} is not a valid tag", detail={"reference": text[:140]}
        )
    return text


def upstream_repository(name: str, *, official_prefix: bool) -> str:
    """The name an upstream knows: Docker Hub keeps official images under ``library/``."""
    if official_prefix and "/" not in name:
        return f"library/{name}"
    return name


@dataclass(frozen=True)
class ImageReference:
    """An image as people type it: ``debian:12``, ``ghcr.io/org/img@sha256:…``."""

    registry: str | None  # None: the default upstream
    repository: str
    tag: str | None
    digest: Digest | None

    @property
    def reference(self) -> str | Digest:
        """What to ask the manifests endpoint for: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def path_name(self) -> str:
        """The name as a request path carries it, registry prefix included."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        text = self.path_name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_reference(text: str) -> ImageReference:
    """Parse ``[registry/]repository[:tag][@digest]``; the tag defaults to ``latest``."""
    rest, _, digest_text = text.strip().partition("@")
    digest = parse_digest(digest_text) if digest_text else None
    registry = None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first.lower(), remainder
    name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    tag_value = None
    if colon:
        parse_reference(tag)  # raises ManifestInvalid for a bad tag
        tag_value = tag
    elif digest is None:
        tag_value = "latest"
    return ImageReference(registry, parse_repository(name), tag_value, digest)
