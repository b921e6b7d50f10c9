"""Access rules: which users and anonymous clients may pull which repositories,
enforced on every path that names a repository, with the catalog filtered."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.config import ConfigError, Settings, parse
from mirror.manifest import OCI_MANIFEST
from mirror.security.rules import Authorizer, Rule, compile_pattern
from mirror.web.app import create_app
from tests.conftest import Clock, app_client
from tests.fakes import FakeRegistry
from tests.support.htpasswd import basic, write_htpasswd

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}
ALICE = basic("alice", "alice-pw")  # in group acme
BOB = basic("bob", "bob-pw")  # only what every user may read
UPSTREAMS = [
    {"name": "docker.io", "url": "http://upstream.fake", "retries": 0},
    {"name": "ghcr.io", "url": "http://ghcr.fake", "retries": 0},
]
ACCESS: dict[str, Any] = {
    "anonymous": ["docker.io/library/*"],
    "groups": {"acme": ["alice"]},
    "rules": [
        {"users": ["group:acme"], "repositories": ["ghcr.io/acme/**", "docker.io/someone/*"]},
        {"users": ["*"], "repositories": ["ghcr.io/public/*"]},
    ],
}


def rules_settings(tmp_path: Path, **auth: Any) -> Settings:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": "alice-pw", "bob": "bob-pw"})
    return parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": UPSTREAMS,
            "auth": {"htpasswd": str(htpasswd), **auth},
        },
        {},
    )


@pytest.fixture
async def client(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    settings = rules_settings(tmp_path, **ACCESS)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as http:
        yield http


def paths_of(fake: FakeRegistry, repository: str) -> list[tuple[str, str]]:
    """Every way to name ``ghcr.io/<repository>`` (or docker.io's) through the mirror."""
    digest, _ = fake.add_image(repository, "1", [f"layer of {repository}".encode()])
    blob = fake.add_blob(f"blob of {repository}".encode())
    routes = [(f"/v2/ghcr.io/{repository}", ""), (f"/v2/{repository}", "?ns=ghcr.io")]
    paths = []
    for base, query in routes:
        paths += [
            ("GET", f"{base}/manifests/1{query}"),
            ("HEAD", f"{base}/manifests/1{query}"),
            ("GET", f"{base}/manifests/{digest}{query}"),
            ("GET", f"{base}/blobs/{blob}{query}"),
            ("HEAD", f"{base}/blobs/{blob}{query}"),
            ("GET", f"{base}/tags/list{query}"),
            ("GET", f"{base}/referrers/{digest}{query}"),
        ]
    return paths


async def test_a_user_denied_a_repository_is_denied_through_every_path(
    client: httpx.AsyncClient, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    allowed = paths_of(fake, "acme/app")
    # Alice reads it all, and it is cached now: the cache must not widen Bob's access.
    for method, path in allowed:
        response = await client.request(method, path, headers={**ACCEPT, **ALICE})
        assert response.status_code == 200, (method, path, response.text)
    calls = fake.total
    for method, path in allowed:
        response = await client.request(method, path, headers={**ACCEPT, **BOB})
        assert response.status_code == 403, (method, path)
        assert "WWW-Authenticate" not in response.headers
        if method == "GET":
            assert response.json()["errors"][0]["code"] == "DENIED"
        anonymous = await client.request(method, path, headers=ACCEPT)
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
    assert fake.total == calls  # nothing denied went upstream
    assert "denied bob pull of ghcr.io/acme/app" in caplog.text
    assert "user=bob" in caplog.text
    metrics = (await client.get("/metrics", headers=ALICE)).text
    assert f'mirror_auth_denials_total{{reason="forbidden"}} {float(len(allowed))}' in metrics
    assert "bob" not in "".join(line for line in metrics.splitlines() if "{" in line)


async def test_anonymous_rules_and_every_user_rules(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/debian", "12", [b"debian layer"])
    fake.add_image("someone/tool", "1", [b"tool layer"])
    fake.add_image("public/thing", "1", [b"public layer"])
    fake.add_image("acme/deep/nested", "1", [b"nested layer"])
    cases = [
        ("/v2/library/debian/manifests/12", {}, 200),
        ("/v2/debian/manifests/12", {}, 200),  # Docker Hub's short name is library/debian
        ("/v2/docker.io/library/debian/manifests/12", {}, 200),
        ("/v2/library/debian/manifests/12?ns=docker.io", {}, 200),
        ("/v2/someone/tool/manifests/1", {}, 401),
        ("/v2/someone/tool/manifests/1", BOB, 403),
        ("/v2/library/debian/manifests/12", BOB, 200),  # what anonymous reads, users read
        ("/v2/ghcr.io/public/thing/manifests/1", BOB, 200),
        ("/v2/ghcr.io/public/thing/manifests/1", {}, 401),
        ("/v2/ghcr.io/acme/deep/nested/manifests/1", ALICE, 200),
        ("/v2/ghcr.io/acme/deep/nested/manifests/1", BOB, 403),
    ]
    for path, headers, status in cases:
        response = await client.get(path, headers={**ACCEPT, **headers})
        assert response.status_code == status, (path, headers, response.text)
    # /v2/ asks anonymous clients for credentials (docker login needs the challenge).
    assert (await client.get("/v2/")).status_code == 401
    assert (await client.get("/v2/", headers=BOB)).status_code == 200


async def test_the_catalog_lists_only_what_the_client_may_read(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    for repository in ("library/debian", "someone/tool", "acme/app", "public/thing"):
        fake.add_image(repository, "1", [f"{repository} layer".encode()])
    for path in (
        "/v2/library/debian/manifests/1",
        "/v2/someone/tool/manifests/1",
        "/v2/ghcr.io/acme/app/manifests/1",
        "/v2/ghcr.io/public/thing/manifests/1",
    ):
        response = await client.get(path, headers={**ACCEPT, **ALICE})
        assert response.status_code == 200, path

    async def catalog(headers: dict[str, str], n: int = 100) -> list[str]:
        response = await client.get("/v2/_catalog", params={"n": n}, headers=headers)
        assert response.status_code == 200
        names: list[str] = response.json()["repositories"]
        return names

    everything = ["ghcr.io/acme/app", "ghcr.io/public/thing", "library/debian", "someone/tool"]
    assert await catalog(ALICE) == everything
    assert await catalog(BOB) == ["ghcr.io/public/thing", "library/debian"]
    assert await catalog({}) == ["library/debian"]
    assert await catalog(BOB, n=1) == ["ghcr.io/public/thing"]  # pages count visible names


async def test_without_anonymous_rules_every_route_challenges_anonymous(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = rules_settings(tmp_path, rules=ACCESS["rules"], groups=ACCESS["groups"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    fake.add_image("library/debian", "12", [b"debian layer"])
    async with app_client(app) as client:
        for path in ("/v2/", "/v2/_catalog", "/v2/library/debian/manifests/12", "/v2/x/y/z"):
            response = await client.get(path, headers=ACCEPT)
            assert response.status_code == 401 and "WWW-Authenticate" in response.headers
        # No rule gives bob docker.io: only the rules, not "everything", once rules exist.
        response = await client.get("/v2/library/debian/manifests/12", headers={**ACCEPT, **BOB})
        assert response.status_code == 403


async def test_anonymous_clients_get_anonymous_tokens_when_rules_let_them_read(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = rules_settings(tmp_path, tokens=True, **ACCESS)
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    fake.add_image("library/debian", "12", [b"debian layer"])
    fake.add_image("acme/app", "1", [b"app layer"])
    async with app_client(app) as client:
        challenge = (await client.get("/v2/")).headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="http://mirror/token"')
        response = await client.get(
            "/token", params={"service": "mirror", "scope": "repository:library/debian:pull"}
        )
        assert response.status_code == 200 and "refresh_token" not in response.json()
        token = {"Authorization": f"Bearer {response.json()['token']}"}
        assert (await client.get("/v2/", headers=token)).status_code == 200
        ok = await client.get("/v2/library/debian/manifests/12", headers={**ACCEPT, **token})
        assert ok.status_code == 200
        refused = await client.get("/v2/ghcr.io/acme/app/manifests/1", headers={**ACCEPT, **token})
        assert refused.status_code == 401
        assert 'scope="repository:ghcr.io/acme/app:pull"' in refused.headers["WWW-Authenticate"]
        assert (await client.get("/metrics", headers=token)).status_code == 401


def test_patterns() -> None:
    rules = Authorizer(
        ["docker.io/library/*"],
        [Rule(("alice",), ("ghcr.io/acme/*",)), Rule(("*",), ("*/shared/**",))],
    )
    assert rules.may_read(None, "docker.io", "library/debian")
    assert not rules.may_read(None, "docker.io", "library/debian/extra")
    assert not rules.may_read(None, "docker.io", "libraryx/debian")
    assert rules.may_read("alice", "ghcr.io", "acme/app")
    assert not rules.may_read("alice", "ghcr.io", "acme/app/sub")
    assert not rules.may_read("alice", "ghcr.io.evil", "acme/app")
    assert rules.may_read("bob", "quay.io", "shared/a/b")
    assert not rules.may_read("bob", "ghcr.io", "acme/app")
    assert compile_pattern("ghcr.io/a?c/*").fullmatch("ghcr.io/abc/x")
    assert not compile_pattern("ghcr.io/a.c/*").fullmatch("ghcr.io/abc/x")  # dots are dots
    for bad in ("docker.io", "Docker.io/x", "docker.io//x", "docker.io/x[y]", ""):
        with pytest.raises(ValueError):
            compile_pattern(bad)


def test_rule_configuration_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.anonymous.*names no configured upstream"):
        rules_settings(tmp_path, anonymous=["dockerhub/library/*"])
    with pytest.raises(ConfigError, match=r"auth\.rules\[0\]\.users.*no such group"):
        rules_settings(tmp_path, rules=[{"users": ["group:x"], "repositories": ["ghcr.io/*"]}])
    with pytest.raises(ConfigError, match=r"auth\.rules\[0\]\.repositories"):
        rules_settings(tmp_path, rules=[{"users": ["bob"], "repositories": ["ghcr.io"]}])
    with pytest.raises(ConfigError, match=r"auth\.rules\[0\]\.who"):
        rules_settings(tmp_path, rules=[{"who": ["bob"], "repositories": ["ghcr.io/*"]}])
    with pytest.raises(ConfigError, match=r"auth\.htpasswd"):
        parse(
            {"upstreams": UPSTREAMS, "auth": {"anonymous": ["docker.io/library/*"]}},
            {},
        )
    (tmp_path / "h").write_text("")
    settings = parse(
        {"upstreams": UPSTREAMS, "auth": {"htpasswd": str(tmp_path / "h")}},
        {"MIRROR_AUTH_ANONYMOUS": "docker.io/library/*, ghcr.io/public/*"},
    )
    assert settings.auth.anonymous == ("docker.io/library/*", "ghcr.io/public/*")
