"""Upstream credentials go only where they belong (issue 10), over real HTTP on loopback.

127.0.0.1 is the upstream (token auth with Basic-credentialed token requests), 127.0.0.2
its blob storage, 127.0.0.3 a stranger nobody configured. The mirror runs in process and
talks to them over real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mirror.config import Settings, parse
from mirror.upstream.auth import MAX_TOKEN_ANSWER, parse_challenges, realm_allowed
from mirror.web.app import create_app
from tests.conftest import app_client
from tests.support.dialects import OCI_MANIFEST, BlobStorage, DialectRegistry, Stranger
from tests.support.hosts import AppServer
from tests.support.upstream_ca import TlsFiles, make_tls_files

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-upstream-password"
ACCEPT = {"Accept": OCI_MANIFEST}


def settings_for(tmp_path: Path, url: str, **upstream: object) -> Settings:
    entry = {"name": "reg.test", "url": url, "retries": 0, **upstream}
    entry.update(username_env="U", password_env="P")
    return parse(
        {"cache": {"directory": str(tmp_path / "cache")}, "upstreams": [entry]},
        {"U": "alice", "P": PASSWORD},
    )


class Hosts:
    def __init__(self) -> None:
        self.stranger = Stranger()
        self.registry = DialectRegistry(users={"alice": PASSWORD}, anonymous={"open/x"})
        self.storage = BlobStorage(self.registry.blobs)
        self.servers: list[AppServer] = []
        self.stranger_url = ""

    def serve(self, app: Starlette, host: str, tls: TlsFiles | None = None) -> AppServer:
        cert, key = (tls.cert, tls.key) if tls else (None, None)
        server = AppServer(app, host, certfile=cert, keyfile=key)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    hosts = Hosts()
    try:
        hosts.stranger_url = hosts.serve(hosts.stranger.app, "127.0.0.3").url
        hosts.storage.challenge_realm = f"{hosts.stranger_url}/steal"
        hosts.registry.blob_storage = hosts.serve(hosts.storage.app, "127.0.0.2").url
        hosts.registry.url = hosts.serve(hosts.registry.app, "127.0.0.1").url
        yield hosts
    finally:
        hosts.stop()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("upstream-ca"))


async def test_a_stranger_realm_named_by_blob_storage_gets_nothing(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    registry = hosts.registry
    open_blob = registry.add_image("open/x", b"open layer")
    team_blob = registry.add_image("team/a", b"team layer")
    registry.add_image("team/b", b"other layer")
    caplog.set_level(logging.DEBUG)
    async with app_client(create_app(settings_for(tmp_path, registry.url))) as client:
        answers = [
            # before the upstream ever challenged: blob storage's challenge comes first
            await client.get(f"/v2/open/x/blobs/{open_blob}"),
            await client.get("/v2/team/a/manifests/1", headers=ACCEPT),
            await client.get(f"/v2/team/a/blobs/{team_blob}"),
            # later repositories still get their tokens from the upstream's own realm
            await client.get("/v2/team/b/manifests/1", headers=ACCEPT),
            await client.get(f"/v2/open/x/blobs/{open_blob}"),
        ]
    assert [a.status_code for a in answers] == [503, 200, 503, 200, 503]
    assert {a.json()["errors"][0]["code"] for a in answers[::2]} == {"UNAVAILABLE"}
    assert hosts.stranger.recorder.seen == []
    assert hosts.storage.recorder.seen  # the redirects were followed, without credentials
    assert not any(s.carries_secrets for s in hosts.storage.recorder.seen)
    tokens = [s for s in registry.recorder.seen if s.path == "/token"]
    assert [t.query.rpartition("scope=")[2] for t in tokens] == [
        "repository%3Ateam%2Fa%3Apull",
        "repository%3Ateam%2Fb%3Apull",
        "repository%3Aopen%2Fx%3Apull",  # the realm is known now: asked before the GET
    ]
    assert all(t.headers["authorization"].startswith("Basic ") for t in tokens)
    sent = {s.headers.get("authorization", "") for s in registry.recorder.seen}
    assert not any("stolen" in header for header in sent)
    for secret in (PASSWORD, *(h.partition(" ")[2] for h in sent if h.startswith("Bearer"))):
        assert secret not in caplog.text
        assert all(secret not in a.text for a in answers)


async def test_blob_storage_gets_neither_credentials_nor_tokens(
    tmp_path: Path, hosts: Hosts
) -> None:
    hosts.storage.challenge_realm = None
    blob = hosts.registry.add_image("team/a", b"layer bytes" * 1000)
    async with app_client(create_app(settings_for(tmp_path, hosts.registry.url))) as client:
        response = await client.get(f"/v2/team/a/blobs/{blob}")
    assert response.status_code == 200 and response.content == b"layer bytes" * 1000
    (seen,) = hosts.storage.recorder.seen
    assert not seen.carries_secrets
    assert not any("token" in value.lower() for value in seen.headers.values())


async def test_a_realm_on_a_host_not_allowed_is_refused(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    hosts.registry.add_image("team/a", b"layer")
    hosts.registry.realm_override = f"{hosts.stranger_url}/token"
    async with app_client(create_app(settings_for(tmp_path, hosts.registry.url))) as client:
        response = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 503
    assert "WWW-Authenticate" not in response.headers
    assert "auth_realms" in response.json()["errors"][0]["message"]
    assert "auth_realms" in caplog.text
    assert hosts.stranger.recorder.seen == []


async def test_an_https_upstream_never_sends_credentials_to_an_http_realm(
    tmp_path: Path, hosts: Hosts, tls: TlsFiles
) -> None:
    hosts.registry.add_image("team/a", b"layer")
    plain = hosts.serve(hosts.stranger.app, "127.0.0.1")  # same host, plain http
    secure = hosts.serve(hosts.registry.app, "127.0.0.1", tls)
    hosts.registry.url = secure.url
    hosts.registry.realm_override = f"{plain.url}/token"
    settings = settings_for(tmp_path, secure.url, ca_bundle=str(tls.ca))
    async with app_client(create_app(settings)) as client:
        refused = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
        hosts.registry.realm_override = None  # its own https realm
        served = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
    assert refused.status_code == 503
    assert hosts.stranger.recorder.seen == []
    assert served.status_code == 200


def test_an_http_realm_for_an_https_upstream_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="auth_realms"):
        parse(
            {
                "upstreams": [
                    {"name": "a.io", "url": "https://a.io", "auth_realms": ["http://b.io/t"]}
                ]
            },
            {},
        )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("not a list", "expected http"),
        (["ftp://a/t"], "expected http"),
        ([3], "expected a non-empty string"),
    ],
)
def test_auth_realms_are_checked(value: object, error: str) -> None:
    with pytest.raises(ValueError, match=f"upstreams\\[0\\].auth_realms: {error}"):
        parse({"upstreams": [{"name": "a.io", "url": "http://a.io", "auth_realms": value}]}, {})


def test_auth_realms_from_the_environment_are_a_comma_separated_list() -> None:
    settings = parse(
        {"upstreams": [{"name": "a.io", "url": "https://a.io"}]},
        {"MIRROR_UPSTREAMS_0_AUTH_REALMS": "https://b.io/token, https://c.io/auth"},
    )
    assert settings.default_upstream.auth_realms == ("https://b.io/token", "https://c.io/auth")


def test_docker_hub_realm_is_allowed_by_default_and_no_other() -> None:
    settings = parse(
        {"upstreams": [{"name": "docker.io", "url": "https://registry-1.docker.io"}]}, {}
    )
    upstream = httpx.URL(settings.default_upstream.url)
    realms = settings.default_upstream.auth_realms
    assert realm_allowed(upstream, "https://auth.docker.io/token", realms)
    assert not realm_allowed(upstream, "http://auth.docker.io/token", realms)
    assert not realm_allowed(upstream, "https://auth.docker.io.evil/token", realms)
    assert not realm_allowed(upstream, "https://evil.example/token", realms)
    assert realm_allowed(upstream, "https://registry-1.docker.io:8443/token", ())


def test_each_challenge_is_parsed_apart() -> None:
    two_lines = parse_challenges(['Bearer realm="https://a/t?x=1,2",scope="s"', 'Basic realm="b"'])
    one_line = parse_challenges(
        ['Basic realm="b", Bearer realm="https://a/t",error="insufficient_scope"']
    )
    assert [(c.scheme, c.realm) for c in two_lines] == [
        ("bearer", "https://a/t?x=1,2"),
        ("basic", "b"),
    ]
    assert two_lines[0].scope == "s"
    assert [(c.scheme, c.realm, c.error) for c in one_line] == [
        ("basic", "b", ""),
        ("bearer", "https://a/t", "insufficient_scope"),
    ]
    assert parse_challenges(['Bearer realm="a \\"quoted\\" b"'])[0].realm == 'a "quoted" b'
    assert parse_challenges(["Negotiate abc", ""]) == []


@pytest.mark.parametrize("answer", ["oversized", "endless"])
async def test_a_token_answer_is_read_with_a_cap(tmp_path: Path, hosts: Hosts, answer: str) -> None:
    async def token(request: Request) -> Response:
        if answer == "oversized":
            return Response(b"{" + b" " * (2 * MAX_TOKEN_ANSWER) + b"}")

        async def forever() -> AsyncIterator[bytes]:
            for _ in range(16 * 1024):  # 1 GiB, no Content-Length: endless for the mirror
                if await request.is_disconnected():
                    return
                yield b" " * 65536

        return StreamingResponse(forever())

    hostile = hosts.serve(Starlette(routes=[Route("/token", token)]), "127.0.0.1")
    hosts.registry.add_image("team/a", b"layer")
    hosts.registry.realm_override = f"{hostile.url}/token"
    async with app_client(create_app(settings_for(tmp_path, hosts.registry.url))) as client:
        response = await client.get("/v2/team/a/manifests/1", headers=ACCEPT)
    assert response.status_code == 503
    assert "larger than" in response.json()["errors"][0]["message"]


# Redirect targets, in process: the upstreams are address literals, and so are the
# targets (no name is looked up, nothing is connected to: the transport is a mock).
PUBLIC_UPSTREAM = "93.184.216.34"


@pytest.mark.parametrize(
    ("upstream", "target", "status"),
    [
        (PUBLIC_UPSTREAM, "http://127.0.0.2/blob", 503),
        (PUBLIC_UPSTREAM, "http://10.1.2.3/blob", 503),
        (PUBLIC_UPSTREAM, "http://169.254.169.254/latest/meta-data", 503),
        (PUBLIC_UPSTREAM, "http://[::1]/blob", 503),
        (PUBLIC_UPSTREAM, "http://[::ffff:192.168.1.1]/blob", 503),
        (PUBLIC_UPSTREAM, "http://93.184.216.35/blob", 200),
        # a registry beside the mirror, its storage on the machine or on the LAN
        ("127.0.0.1", "http://127.0.0.2/blob", 200),
        ("127.0.0.1", "http://10.1.2.3/blob", 200),
        ("127.0.0.1", "http://169.254.169.254/latest/meta-data", 503),
        # a registry on the LAN: its storage on the LAN, never the mirror's own loopback
        ("10.0.0.5", "http://10.0.0.6/blob", 200),
        ("10.0.0.5", "http://127.0.0.1:2375/blob", 503),
    ],
)
async def test_a_redirect_may_not_lead_more_inside_than_the_upstream(
    tmp_path: Path, upstream: str, target: str, status: int
) -> None:
    data = b"blob bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    reached: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield data  # a stream, as a real transport gives: bytes count as read already

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == upstream:
            return httpx.Response(307, headers={"Location": target})
        reached.append(str(request.url))
        return httpx.Response(200, content=body(), headers={"Content-Length": str(len(data))})

    settings = parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [{"name": "docker.io", "url": f"http://{upstream}", "retries": 0}],
        },
        {},
    )
    app = create_app(settings, upstream_transport=httpx.MockTransport(handler))
    async with app_client(app) as client:
        response = await client.get(f"/v2/library/a/blobs/{digest}")
    assert response.status_code == status, response.text
    assert len(reached) == (status == 200)


async def test_no_secret_reaches_a_log_line_a_metric_or_an_answer(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    """The credential grep of test_api_manifests, over the paths of this module."""
    registry = hosts.registry
    registry.add_image("team/a", b"layer")
    blob = registry.add_image("team/b", b"other layer")
    caplog.set_level(logging.DEBUG)
    async with app_client(create_app(settings_for(tmp_path, registry.url))) as client:
        answers = [
            await client.get("/v2/team/a/manifests/1", headers=ACCEPT),  # served
            await client.get(f"/v2/team/b/blobs/{blob}"),  # blob storage's stranger realm
            await client.get("/v2/team/missing/manifests/1", headers=ACCEPT),  # 404
        ]
        registry.users["alice"] = "changed upstream password"
        answers.append(await client.get("/v2/team/c/manifests/1", headers=ACCEPT))  # refused
        answers.append(await client.get("/metrics"))
    assert [a.status_code for a in answers] == [200, 503, 404, 503, 200]
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    tokens = [
        h["authorization"][7:]
        for h in (s.headers for s in registry.recorder.seen)
        if h.get("authorization", "").startswith("Bearer ")
    ]
    assert tokens
    wire = "".join(str(a.headers) + a.text for a in answers)
    for secret in (PASSWORD, basic, *tokens):
        assert secret not in wire
        assert secret not in caplog.text
