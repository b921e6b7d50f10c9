from __future__ import annotations

import pytest

from mirror.errors import DigestInvalid, ManifestInvalid, NameInvalid
from mirror.manifest import DOCKER_MANIFEST, MANIFEST_TYPES, OCI_INDEX, accepted_types
from mirror.reference import Digest, parse_digest, parse_image_reference, parse_repository


@pytest.mark.parametrize("name", ["a", "library/debian", "a-b/c__d/e.f", "x" * 200])
def test_valid_names(name: str) -> None:
    assert parse_repository(name) == name


@pytest.mark.parametrize("name", ["", "A", "a/../b", "a//b", "/a", "a/", "-a", "a" * 256, "a:b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_repository(name)


def test_digests() -> None:
    digest = parse_digest("sha256:" + "a" * 64)
    assert digest == Digest("sha256", "a" * 64)
    assert str(Digest.of(b"")) == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    for bad in ("sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:abc", "sha256", ""):
        with pytest.raises(DigestInvalid):
            parse_digest(bad)


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference"),
    [
        ("debian", None, "debian", "latest"),
        ("debian:stable-slim", None, "debian", "stable-slim"),
        ("library/debian:12", None, "library/debian", "12"),
        ("ghcr.io/org/img:1.0", "ghcr.io", "org/img", "1.0"),
        ("localhost:5000/x:y", "localhost:5000", "x", "y"),
    ],
)
def test_image_references(text: str, registry: str, repository: str, reference: str) -> None:
    parsed = parse_image_reference(text)
    assert (parsed.registry, parsed.repository, parsed.reference) == (
        registry,
        repository,
        reference,
    )


def test_image_reference_by_digest() -> None:
    digest = "sha256:" + "b" * 64
    parsed = parse_image_reference(f"docker.io/library/debian@{digest}")
    assert parsed.registry == "docker.io"
    assert str(parsed.reference) == digest


def test_bad_image_references() -> None:
    with pytest.raises(NameInvalid):
        parse_image_reference("Not A Ref")
    with pytest.raises(ManifestInvalid):
        parse_image_reference("debian:-x")


def test_accept_lines_are_read_whichever_way_clients_send_them() -> None:
    assert accepted_types([]) == MANIFEST_TYPES
    assert accepted_types(["*/*"]) == MANIFEST_TYPES
    assert accepted_types([f"{OCI_INDEX}, {DOCKER_MANIFEST};q=0.5"]) == (
        OCI_INDEX,
        DOCKER_MANIFEST,
    )
    assert accepted_types([DOCKER_MANIFEST, "application/json"]) == (DOCKER_MANIFEST,)
