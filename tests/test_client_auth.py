"""Client authentication: htpasswd + bcrypt with the Basic challenge, the failed-login
throttle, and the bearer tokens the mirror issues at /token."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

import mirror.security.users
from mirror.config import ConfigError, Settings, parse
from mirror.manifest import OCI_MANIFEST
from mirror.security.tokens import TokenIssuer
from mirror.web.app import create_app
from tests.conftest import Clock, app_client
from tests.fakes import FakeRegistry
from tests.support.htpasswd import basic, htpasswd_line, write_htpasswd

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": OCI_MANIFEST}
ALICE = basic("alice", "alice-pw-1")


def auth_settings(tmp_path: Path, environ: dict[str, str] | None = None, **auth: Any) -> Settings:
    htpasswd = tmp_path / "htpasswd"
    if not htpasswd.exists():
        write_htpasswd(htpasswd, {"alice": "alice-pw-1", "bob": "bob-pw-2"})
    return parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [{"name": "docker.io", "url": "http://upstream.fake", "retries": 0}],
            "auth": {"htpasswd": str(htpasswd), **auth},
        },
        environ or {},
    )


class Checks:
    """Counts bcrypt runs (the slow part that must not repeat)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = bcrypt.checkpw

        def counted(password: bytes, hashed: bytes) -> bool:
            self.count += 1
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", counted)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Checks:
    return Checks(monkeypatch)


MakeClient = Callable[..., Any]  # make_client(**auth keys) → an httpx client of a new app


@pytest.fixture
async def make_client(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> AsyncIterator[MakeClient]:
    opened: list[app_client] = []

    async def make(**auth: Any) -> httpx.AsyncClient:
        settings = auth_settings(tmp_path, **auth)
        app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
        opened.append(app_client(app))
        return await opened[-1].__aenter__()

    yield make
    for opened_client in opened:
        await opened_client.__aexit__(None, None, None)


def every_route(fake: FakeRegistry) -> list[tuple[str, str]]:
    digest, _ = fake.add_image("library/a", "1", [b"layer"])
    blob = fake.add_blob(b"some blob")
    return [
        ("GET", "/v2/"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v2/library/a/manifests/1"),
        ("HEAD", "/v2/library/a/manifests/1"),
        ("GET", f"/v2/library/a/manifests/{digest}"),
        ("GET", f"/v2/library/a/blobs/{blob}"),
        ("HEAD", f"/v2/library/a/blobs/{blob}"),
        ("GET", "/v2/library/a/tags/list"),
        ("GET", f"/v2/library/a/referrers/{digest}"),
        ("GET", "/v2/docker.io/library/a/manifests/1"),
        ("GET", "/v2/library/a/manifests/1?ns=docker.io"),
        ("PUT", "/v2/library/a/manifests/1"),
        ("POST", "/v2/library/a/blobs/uploads/"),
        ("GET", "/v2/no/such/endpoint"),
        ("GET", "/metrics"),
    ]


async def test_auth_off_by_default_needs_no_credentials(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/a", "1", [b"layer"])
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 200
    assert "WWW-Authenticate" not in response.headers
    assert (await client.get("/token")).status_code == 404


async def test_every_route_challenges_an_anonymous_client(
    make_client: MakeClient, fake: FakeRegistry
) -> None:
    client = await make_client()
    for method, path in every_route(fake):
        response = await client.request(method, path, headers=ACCEPT)
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="mirror"', (method, path)
        if method != "HEAD":
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert fake.total == 0
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status_code == 200


async def test_a_user_pulls_with_basic_credentials(
    make_client: MakeClient, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    caplog.set_level(logging.INFO, "mirror.access")
    for method, path in every_route(fake):
        response = await client.request(method, path, headers={**ACCEPT, **ALICE})
        expected = {"PUT": 405, "POST": 405}.get(method, 404 if "no/such" in path else 200)
        assert response.status_code == expected, (method, path, response.text)
    assert "user=alice" in caplog.text
    # Podman and skopeo send empty Basic credentials when they have none: anonymous.
    response = await client.get("/v2/", headers=basic("", ""))
    assert response.status_code == 401


async def test_wrong_or_malformed_credentials_are_refused_never_anonymous(
    make_client: MakeClient, fake: FakeRegistry
) -> None:
    client = await make_client()
    for headers in (
        basic("alice", "wrong"),
        basic("nobody", "alice-pw-1"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Digest x"},
        {"Authorization": "Bearer x"},  # tokens are off
    ):
        response = await client.get("/v2/", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == 'Basic realm="mirror"'


async def test_thirty_blob_requests_cost_one_bcrypt_run(
    make_client: MakeClient, fake: FakeRegistry, checks: Checks
) -> None:
    client = await make_client()
    blobs = [fake.add_blob(f"blob {i}".encode()) for i in range(30)]
    responses = await asyncio.gather(
        *(client.get(f"/v2/library/a/blobs/{digest}", headers=ALICE) for digest in blobs)
    )
    assert [r.status_code for r in responses] == [200] * 30
    assert checks.count == 1
    assert (await client.get("/v2/", headers=ALICE)).status_code == 200
    assert checks.count == 1


async def test_a_remembered_login_ends_with_a_password_change(
    make_client: MakeClient, tmp_path: Path, clock: Clock, checks: Checks
) -> None:
    client = await make_client()
    assert (await client.get("/v2/", headers=ALICE)).status_code == 200
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": "alice-new", "carol": "carol-pw"})
    os.utime(htpasswd, ns=(1, 1))  # a new mtime even within the clock's granularity
    assert (await client.get("/v2/", headers=ALICE)).status_code == 401
    assert (await client.get("/v2/", headers=basic("alice", "alice-new"))).status_code == 200
    assert (await client.get("/v2/", headers=basic("carol", "carol-pw"))).status_code == 200
    assert (await client.get("/v2/", headers=basic("bob", "bob-pw-2"))).status_code == 401
    # Remembered for a while, then checked again.
    runs = checks.count
    assert (await client.get("/v2/", headers=basic("carol", "carol-pw"))).status_code == 200
    assert checks.count == runs
    clock.now += 61
    assert (await client.get("/v2/", headers=basic("carol", "carol-pw"))).status_code == 200
    assert checks.count == runs + 1


async def test_failed_logins_are_throttled_per_address(
    make_client: MakeClient, clock: Clock, checks: Checks
) -> None:
    client = await make_client(failed_logins=3, failed_login_window="30s")
    assert (await client.get("/v2/", headers=ALICE)).status_code == 200  # remembered
    for _ in range(3):
        assert (await client.get("/v2/", headers=basic("alice", "guess"))).status_code == 401
    runs = checks.count
    throttled = await client.get("/v2/", headers=basic("alice", "guess"))
    assert throttled.status_code == 429
    assert throttled.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert throttled.headers["Retry-After"] == "10"
    # Even the right password waits (guessing must not pay off), no bcrypt run spent...
    assert (await client.get("/v2/", headers=basic("bob", "bob-pw-2"))).status_code == 429
    assert checks.count == runs
    # ...but credentials proven a moment ago still pass: one bad client behind a NAT
    # does not lock out the others.
    assert (await client.get("/v2/", headers=ALICE)).status_code == 200
    clock.now += 10
    assert (await client.get("/v2/", headers=basic("bob", "bob-pw-2"))).status_code == 200
    assert (await client.get("/v2/", headers=basic("alice", "guess"))).status_code == 401
    assert (await client.get("/v2/", headers=basic("alice", "guess"))).status_code == 429
    metrics = (await client.get("/metrics", headers=ALICE)).text
    assert 'mirror_auth_denials_total{reason="throttled"} 3.0' in metrics
    assert 'mirror_auth_denials_total{reason="bad_credentials"} 4.0' in metrics


def test_only_bcrypt_hashes_are_users(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(
        [
            htpasswd_line("alice", "pw"),
            "md5user:$apr1$abc$0123456789abcdefghijk.",
            "shauser:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "# a comment",
            "garbage",
        ]
    )
    users = mirror.security.users.parse_htpasswd(text)
    assert list(users) == ["alice"]
    assert "md5user" in caplog.text and "$apr1$" not in caplog.text


def test_auth_configuration_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.htpasswd"):
        auth_settings(tmp_path, htpasswd=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"auth\.token_key_env"):
        auth_settings(tmp_path, tokens=True, token_key_env="UNSET_VARIABLE")
    with pytest.raises(ConfigError, match=r"auth\.token_key_env"):
        auth_settings(tmp_path, {"K": "short"}, tokens=True, token_key_env="K")
    with pytest.raises(ConfigError, match=r"auth\.realm"):
        auth_settings(tmp_path, realm='x" evil')
    with pytest.raises(ConfigError, match=r"auth\.tokens"):
        auth_settings(tmp_path, tokens="maybe")
    settings = auth_settings(
        tmp_path, {"K": "k" * 40, "MIRROR_AUTH_TOKEN_TTL": "1m"}, tokens=True, token_key_env="K"
    )
    assert settings.auth.token_ttl == 60 and settings.auth.token_key == "k" * 40
    assert "k" * 40 not in repr(settings)


# ---------------------------------------------------------------- bearer tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_bearer_challenge_names_the_token_endpoint_and_scope(make_client: MakeClient) -> None:
    client = await make_client(tokens=True)
    response = await client.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="http://mirror/token",service="mirror",scope="repository:library/a:pull"'
    )
    response = await client.get("/v2/")
    assert (
        response.headers["WWW-Authenticate"]
        == 'Bearer realm="http://mirror/token",service="mirror"'
    )
    # Anonymous clients get no token while anonymous clients may read nothing.
    response = await client.get("/token", params={"service": "mirror"})
    assert response.status_code == 401


async def test_docker_login_flow_then_a_token_is_reused(
    make_client: MakeClient, fake: FakeRegistry, checks: Checks
) -> None:
    client = await make_client(tokens=True)
    fake.add_image("library/a", "1", [b"layer"])
    # What docker login sends (DESIGN.md, Round 2 facts §3).
    response = await client.get(
        "/token",
        params={
            "account": "alice",
            "client_id": "docker",
            "offline_token": "true",
            "service": "mirror",
        },
        headers=ALICE,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert body["issued_at"] and body["refresh_token"]
    assert response.headers["Cache-Control"] == "no-store"
    token = body["token"]
    runs = checks.count
    for _ in range(5):
        response = await client.get(
            "/v2/library/a/manifests/1", headers={**ACCEPT, **bearer(token)}
        )
        assert response.status_code == 200
    assert (await client.get("/v2/", headers=bearer(token))).status_code == 200
    assert checks.count == runs  # no password, no bcrypt
    # Later pulls: OAuth2 refresh with the stored identity token, per repository scope.
    response = await client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": "docker",
            "service": "mirror",
            "scope": "repository:library/a:pull",
        },
    )
    assert response.status_code == 200, response.text
    assert "refresh_token" not in response.json()
    refreshed = response.json()["access_token"]
    assert (await client.get("/v2/", headers=bearer(refreshed))).status_code == 200
    # A refresh token is not an access token, and the other way round.
    assert (await client.get("/v2/", headers=bearer(body["refresh_token"]))).status_code == 401
    response = await client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": token}
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


async def test_oauth2_password_grant_and_bad_requests(make_client: MakeClient) -> None:
    client = await make_client(tokens=True)
    response = await client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": "bob",
            "password": "bob-pw-2",
            "service": "mirror",
            "access_type": "offline",
        },
    )
    assert response.status_code == 200 and "refresh_token" in response.json()
    bad = await client.post(
        "/token", data={"grant_type": "password", "username": "bob", "password": "nope"}
    )
    assert bad.status_code == 401
    assert (await client.post("/token", data={"grant_type": "magic"})).status_code == 405
    assert (await client.post("/token", content=b"x" * 100_000)).status_code == 405


async def test_expired_and_foreign_tokens_are_refused(
    make_client: MakeClient, clock: Clock, tmp_path: Path
) -> None:
    client = await make_client(tokens=True, token_ttl="5m")
    token = (await client.get("/token", headers=ALICE)).json()["token"]
    assert (await client.get("/v2/", headers=bearer(token))).status_code == 200
    clock.now += 300 + 61  # past expiry and the minute of clock skew allowed
    response = await client.get("/v2/", headers=bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    # Same claims, another key: refused.
    other = TokenIssuer(b"x" * 32, service="mirror", ttl=300, refresh_ttl=300, now=clock)
    assert (await client.get("/v2/", headers=bearer(other.issue("alice", None)))).status_code == 401
    assert (await client.get("/v2/", headers=bearer("not.a.jwt"))).status_code == 401


async def test_a_token_ends_when_its_user_is_removed_or_changes_password(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(tokens=True)
    alice = (await client.get("/token", headers=ALICE)).json()["token"]
    bob = (await client.get("/token", headers=basic("bob", "bob-pw-2"))).json()["token"]
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": "alice-new"})
    os.utime(htpasswd, ns=(1, 1))
    assert (await client.get("/v2/", headers=bearer(alice))).status_code == 401
    assert (await client.get("/v2/", headers=bearer(bob))).status_code == 401


async def test_tokens_verify_in_every_worker_through_the_key_file(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = auth_settings(tmp_path, tokens=True)
    first = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    second = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    key = tmp_path / "cache" / "auth" / "token.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    async with app_client(first) as one, app_client(second) as two:
        token = (await one.get("/token", headers=ALICE)).json()["token"]
        assert (await two.get("/v2/", headers=bearer(token))).status_code == 200
    # A key from the environment instead (several mirrors behind one name).
    env_settings = auth_settings(
        tmp_path / "..", {"KEY": "e" * 48}, tokens=True, token_key_env="KEY"
    )
    third = create_app(env_settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(third) as three:
        assert (await three.get("/v2/", headers=bearer(token))).status_code == 401
        other = (await three.get("/token", headers=ALICE)).json()["token"]
        mine = TokenIssuer(b"e" * 48, service="mirror", ttl=1, refresh_ttl=1, now=clock)
        assert mine.verify(other).user == "alice"


async def test_secrets_never_reach_logs_metrics_or_error_bodies(
    make_client: MakeClient, tmp_path: Path, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(tokens=True, failed_logins=2)
    fake.add_image("library/a", "1", [b"layer"])
    responses = []
    login = await client.get("/token", params={"offline_token": "true"}, headers=ALICE)
    token, refresh = login.json()["token"], login.json()["refresh_token"]
    for headers in (
        ALICE,
        bearer(token),
        basic("alice", "a-wrong-secret"),
        basic("a-password-in-the-user-field", "x"),
        basic("alice", "a-wrong-secret"),
        bearer(token + "tampered"),
    ):
        for path in ("/v2/", "/v2/library/a/manifests/1", "/token"):
            responses.append(await client.get(path, headers={**ACCEPT, **headers}))
    responses.append(await client.get("/metrics", headers=ALICE))
    wire = "".join(str(r.headers) + r.text for r in responses[:-1] if r.status_code != 200)
    wire += responses[-1].text
    hashes = [line.split(":", 1)[1] for line in (tmp_path / "htpasswd").read_text().split()]
    for secret in (
        "alice-pw-1",
        "a-wrong-secret",
        "a-password-in-the-user-field",
        token,
        refresh,
        *hashes,
    ):
        assert secret not in wire, secret
        assert secret not in caplog.text, secret
    assert json.loads(responses[6].text)["errors"][0]["code"] == "UNAUTHORIZED"  # wrong password


async def test_an_unknown_user_costs_a_bcrypt_run_like_a_wrong_password(
    make_client: MakeClient, checks: Checks
) -> None:
    """So that the time a refusal takes does not tell which users exist."""
    client = await make_client()
    assert (await client.get("/v2/", headers=basic("alice", "wrong"))).status_code == 401
    assert checks.count == 1
    assert (await client.get("/v2/", headers=basic("nobody", "wrong"))).status_code == 401
    assert checks.count == 2
