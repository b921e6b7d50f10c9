"""Auth dialects of real registries (issue 17), against a real-HTTP fake upstream on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.config import Settings, parse
from mirror.web.app import create_app
from tests.conftest import app_client
from tests.support.dialects import OCI_MANIFEST, ChallengeStyle, DialectRegistry
from tests.support.hosts import AppServer

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-upstream-password"
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture
def registry() -> Iterator[DialectRegistry]:
    registry = DialectRegistry(users={"alice": PASSWORD})
    with AppServer(registry.app) as server:
        registry.url = server.url
        yield registry


def settings_for(tmp_path: Path, url: str, *, user: str | None = None) -> Settings:
    entry: dict[str, object] = {"name": "reg.test", "url": url, "retries": 0}
    if user is not None:
        entry.update(username_env="U", password_env="P")
    return parse(
        {"cache": {"directory": str(tmp_path / "cache")}, "upstreams": [entry]},
        {"U": user or "", "P": PASSWORD},
    )


@pytest.mark.parametrize("style", ["bearer", "two-lines", "basic-first"])
async def test_bearer_is_preferred_and_the_realm_keeps_its_query(
    tmp_path: Path, registry: DialectRegistry, style: ChallengeStyle
) -> None:
    registry.challenge = style
    registry.realm_query = "tenant=acme&client=x"
    layer = registry.add_image("team/a", b"a layer")
    async with app_client(create_app(settings_for(tmp_path, registry.url, user="alice"))) as client:
        manifest = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
        blob = await client.get(f"/v2/team/a/blobs/{layer}")
    assert manifest.status_code == 200 and blob.content == b"a layer"
    (token,) = registry.token_requests  # one token for the repository's scope
    assert "tenant=acme" in token and "client=x" in token and "scope=repository" in token


@pytest.mark.parametrize("private", [False, True])
async def test_insufficient_scope_is_unknown_and_remembered(
    tmp_path: Path, registry: DialectRegistry, private: bool
) -> None:
    """Docker Hub answers a missing repository, and one private to the caller, with a
    401 insufficient_scope: that is a 404 for the client, remembered like one."""
    registry.add_image("team/a", b"a layer")
    layer = registry.add_image("team/private", b"secret layer")
    if private:
        registry.private.add("team/private")
    name = "team/private" if private else "team/missing"
    async with app_client(create_app(settings_for(tmp_path, registry.url))) as client:
        assert (await client.get("/v2/team/a/manifests/1", headers=ACCEPT)).status_code == 200
        before = len(registry.recorder.seen)
        first = await client.get(f"/v2/{name}/manifests/1", headers=ACCEPT)
        upstream_requests = registry.recorder.seen[before:]
        again = await client.get(f"/v2/{name}/manifests/1", headers=ACCEPT)
        blob = await client.get(f"/v2/{name}/blobs/{layer}")
        tags = await client.get(f"/v2/{name}/tags/list")
    for response, code in [
        (first, "MANIFEST_UNKNOWN"),
        (again, "MANIFEST_UNKNOWN"),
        (blob, "BLOB_UNKNOWN"),
        (tags, "NAME_UNKNOWN"),
    ]:
        assert response.status_code == 404, response.text
        assert response.json()["errors"][0]["code"] == code
    # one token, one manifest GET: the token was fresh, asking again would not help
    assert [s.path for s in upstream_requests] == ["/token", f"/v2/{name}/manifests/1"]
    assert len(registry.recorder.seen) == before + 2 + 2  # blob, tags: one GET, same token


async def test_a_private_repository_opens_with_the_mirrors_credentials(
    tmp_path: Path, registry: DialectRegistry
) -> None:
    registry.add_image("team/private", b"secret layer")
    registry.private.add("team/private")
    async with app_client(create_app(settings_for(tmp_path, registry.url, user="alice"))) as client:
        response = await client.get("/v2/team/private/manifests/1", headers=ACCEPT)
    assert response.status_code == 200


async def test_refused_upstream_credentials_are_an_upstream_error_not_the_clients(
    tmp_path: Path, registry: DialectRegistry
) -> None:
    registry.add_image("team/a", b"a layer")
    registry.users["alice"] = "another password"
    async with app_client(create_app(settings_for(tmp_path, registry.url, user="alice"))) as client:
        response = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
        again = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
    for answer in (response, again):
        assert answer.status_code == 503
        assert "WWW-Authenticate" not in answer.headers
        assert "credentials" in answer.json()["errors"][0]["message"]
        assert "circuit" not in answer.json()["errors"][0]["message"]
