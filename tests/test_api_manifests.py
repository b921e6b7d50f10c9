from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from mirror.config import parse
from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, make_settings
from tests.fakes import TOKEN_REALM, FakeRegistry, digest_of

pytestmark = pytest.mark.anyio

ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


async def test_api_root_answers_with_version_header(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/")
    assert response.status_code == 200
    assert response.json() == {}
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_is_fetched_once_then_served_from_disk(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, body = fake.add_image("library/debian", "12", [b"layer"])
    for _ in range(3):
        response = await client.get("/v2/library/debian/manifests/12", headers={"Accept": ALL})
        assert response.status_code == 200
        assert response.content == body
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Content-Length"] == str(len(body))
        assert response.headers["ETag"] == f'"{digest}"'
    assert fake.count("GET", "manifest") == 1
    assert fake.count("HEAD", "manifest") == 0


async def test_manifest_by_digest_never_reaches_upstream_once_cached(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, body = fake.add_image("library/debian", "12", [b"layer"])
    await client.get("/v2/library/debian/manifests/12", headers={"Accept": ALL})
    before = fake.total
    response = await client.get(f"/v2/library/debian/manifests/{digest}", headers={"Accept": ALL})
    assert response.content == body
    head = await client.head(f"/v2/library/debian/manifests/{digest}", headers={"Accept": ALL})
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(body))
    assert fake.total == before


async def test_single_component_names_are_official_images_on_docker_hub(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/alpine", "3", [b"x"])
    response = await client.get("/v2/alpine/manifests/3", headers={"Accept": ALL})
    assert response.status_code == 200
    assert "GET /v2/library/alpine/manifests/3" in fake.paths


async def test_accept_as_one_comma_separated_line_or_several_lines(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.add_image("library/a", "1", [b"x"])
    one_line = await client.get("/v2/library/a/manifests/1", headers={"Accept": ALL})
    several = await client.get(
        "/v2/library/a/manifests/1",
        headers=[("Accept", DOCKER_MANIFEST), ("Accept", OCI_MANIFEST)],
    )
    assert one_line.status_code == several.status_code == 200


async def test_a_type_the_client_does_not_accept_is_never_served(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, _ = fake.add_image("library/a", "1", [b"x"])
    response = await client.get(
        f"/v2/library/a/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST}
    )
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_index_and_docker_types_are_served_verbatim(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    amd, _ = fake.add_image("library/m", None, [b"amd"])
    arm, _ = fake.add_image("library/m", None, [b"arm"], media_type=DOCKER_MANIFEST)
    index = fake.add_index("library/m", "1", [amd, arm])
    response = await client.get("/v2/library/m/manifests/1", headers={"Accept": ALL})
    assert response.headers["Content-Type"] == OCI_INDEX
    assert digest_of(response.content) == index
    child = await client.get(f"/v2/library/m/manifests/{arm}", headers={"Accept": ALL})
    assert child.headers["Content-Type"] == DOCKER_MANIFEST


async def test_unknown_tag_is_manifest_unknown_and_remembered_briefly(
    client: httpx.AsyncClient, fake: FakeRegistry, clock: Clock
) -> None:
    for _ in range(3):
        response = await client.get("/v2/library/a/manifests/nope", headers={"Accept": ALL})
        assert response.status_code == 404
        (error,) = response.json()["errors"]
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert "library/a" in error["message"] and "nope" in error["message"]
    assert fake.count("GET", "manifest") == 1


async def test_manifest_whose_bytes_do_not_match_upstream_digest_is_refused(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, _ = fake.add_image("library/a", "1", [b"x"])
    fake.headers["Docker-Content-Digest"] = "sha256:" + "0" * 64
    response = await client.get("/v2/library/a/manifests/1", headers={"Accept": ALL})
    assert response.status_code >= 400
    fake.headers.clear()
    fake.status = 503
    again = await client.get(f"/v2/library/a/manifests/{digest}", headers={"Accept": ALL})
    assert again.status_code == 503  # nothing was cached from the bad answer


async def test_schema1_manifests_are_refused_clearly(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "library/old", "tag": "1"}).encode()
    fake.add_manifest(
        "library/old", "1", "application/vnd.docker.distribution.manifest.v1+prettyjws", body
    )
    response = await client.get("/v2/library/old/manifests/1", headers={"Accept": ALL})
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_INVALID"
    assert "schema 1" in error["message"]


async def test_oversized_manifest_is_refused(client: httpx.AsyncClient, fake: FakeRegistry) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "pad": "x" * (5 << 20)})
    fake.add_manifest("library/big", "1", OCI_MANIFEST, body.encode())
    response = await client.get("/v2/library/big/manifests/1", headers={"Accept": ALL})
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Upper/manifests/1", "NAME_INVALID"),
        ("/v2/a/%2e%2e/manifests/1", "NAME_INVALID"),
        ("/v2/a//b/manifests/1", "NAME_INVALID"),
        ("/v2/a/manifests/-bad-tag", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/sha256:xyz", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/sha256:totallywrong", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/md5:" + "0" * 32, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:1234", "BLOB_UNKNOWN"),
        ("/v2/a/blobs/sha512:" + "A" * 128, "BLOB_UNKNOWN"),
        ("/v2/a/blobs/not-a-digest", "BLOB_UNKNOWN"),
        ("/v2/a/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha3+256:" + "0" * 64, "DIGEST_INVALID"),
        ("/v2/a/referrers/sha256:1234", "DIGEST_INVALID"),
    ],
)
async def test_invalid_input_is_rejected_before_any_upstream_call(
    client: httpx.AsyncClient, fake: FakeRegistry, path: str, code: str
) -> None:
    """The spec's endpoints table names only 404 for a failed blob or manifest pull;
    names, unknown algorithms and referrers of a malformed digest are 400."""
    response = await client.get(path)
    assert response.status_code == (404 if code.endswith("_UNKNOWN") else 400)
    assert (await client.head(path)).status_code == response.status_code
    assert response.json()["errors"][0]["code"] == code
    assert fake.total == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/library/a/manifests/1"),
        ("DELETE", "/v2/library/a/manifests/1"),
        ("POST", "/v2/library/a/blobs/uploads/"),
        ("PATCH", "/v2/library/a/blobs/uploads/1234"),
        ("PUT", "/v2/library/a/blobs/uploads/1234"),
        ("DELETE", "/v2/library/a/blobs/sha256:" + "0" * 64),
    ],
)
async def test_push_and_delete_are_unsupported(
    client: httpx.AsyncClient, fake: FakeRegistry, method: str, path: str
) -> None:
    response = await client.request(method, path, content=b"data")
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert fake.total == 0


async def test_bearer_token_is_fetched_once_per_scope(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    fake.token_auth = True
    fake.add_image("library/a", "1", [b"x"])
    fake.add_image("library/a", "2", [b"y"])
    app = create_app(
        make_settings(tmp_path), upstream_transport=httpx.MockTransport(fake), now=clock
    )
    async with app_client(app) as client:
        for tag in ("1", "2"):
            response = await client.get(f"/v2/library/a/manifests/{tag}", headers={"Accept": ALL})
            assert response.status_code == 200
    assert fake.count("GET", "token") == 1
    # one 401 to learn the realm, then the token goes with every request
    assert fake.count("GET", "manifest") == 3


async def test_upstream_unreachable_is_unavailable(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    fake.down = True
    response = await client.get("/v2/library/a/manifests/1", headers={"Accept": ALL})
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("status", "answer", "code"), [(401, 503, "UNAVAILABLE"), (403, 403, "DENIED")]
)
async def test_upstream_refusals_map_to_oci_codes(
    client: httpx.AsyncClient, fake: FakeRegistry, status: int, answer: int, code: str
) -> None:
    # An upstream 401 is about the mirror's credentials, not the client's: never a
    # 401 (which would need a challenge, and send the client to log in).
    fake.status = status
    response = await client.get("/v2/library/a/manifests/1", headers={"Accept": ALL})
    assert response.status_code == answer
    assert response.json()["errors"][0]["code"] == code
    assert "WWW-Authenticate" not in response.headers


async def test_no_credential_or_token_reaches_a_response_or_a_log_line(
    tmp_path: Path, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    fake.token_auth = True
    fake.add_image("library/a", "1", [b"x"])
    settings = parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [
                {
                    "name": "docker.io",
                    "url": "http://upstream.fake",
                    "retries": 0,
                    "username_env": "U",
                    "password_env": "P",
                    "auth_realms": [TOKEN_REALM],
                }
            ],
        },
        {"U": "alice", "P": "s3cret-password"},
    )
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    caplog.set_level(logging.DEBUG)
    async with app_client(app) as client:
        responses = [
            await client.get("/v2/library/a/manifests/1", headers={"Accept": ALL}),
            await client.get("/v2/library/a/manifests/nope", headers={"Accept": ALL}),
            await client.get("/metrics"),
        ]
        fake.status = 401
        responses.append(await client.get("/v2/library/b/manifests/1", headers={"Accept": ALL}))
    assert responses[0].status_code == 200 and responses[-1].status_code == 503
    wire = "".join(str(r.headers) + r.text for r in responses)
    for secret in ("s3cret-password", "good-token"):
        assert secret not in wire
        assert secret not in caplog.text
