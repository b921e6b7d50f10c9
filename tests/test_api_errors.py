"""Every answer under /v2/ that is an error is OCI error JSON, and bad input never
makes a server error: unmatched paths, odd methods, bad names, digests and queries."""

from __future__ import annotations

import random
import re
import string

import httpx
import pytest

from tests.fakes import FakeRegistry
from tests.support.oci import DISTRIBUTION_CODES

pytestmark = pytest.mark.anyio

_CODE = re.compile(r"[A-Z_]+")


def oci_error_codes(response: httpx.Response) -> list[str]:
    """The codes of an OCI error body; fails the test if the body is not one."""
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:200]
    errors = response.json()["errors"]
    assert isinstance(errors, list) and errors
    codes = [error["code"] for error in errors]
    assert all(isinstance(c, str) and _CODE.fullmatch(c) for c in codes), codes
    assert all(isinstance(error["message"], str) for error in errors)
    return codes


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/library/a/nothing/here", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/library/a/manifests/", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/library/a/blobs/uploads/", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/" + "x/" * 300, 404, "NAME_UNKNOWN"),
        ("OPTIONS", "/v2/library/a/manifests/1", 405, "UNSUPPORTED"),
        ("PROPFIND", "/v2/", 405, "UNSUPPORTED"),
        ("TRACE", "/v2/library/a/blobs/sha256:" + "0" * 64, 405, "UNSUPPORTED"),
        ("FOO", "/v2/anything", 405, "UNSUPPORTED"),
        ("GET", "/v2/library/a/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/_catalog?n=" + "9" * 5000, 200, None),
        ("GET", "/v2/library/a/manifests/1?ns=" + "x" * 5000, 404, "NAME_UNKNOWN"),
        ("GET", "/v2/library/a/manifests/1?x=" + "y" * 20_000, 400, "UNSUPPORTED"),
    ],
)
async def test_every_error_under_v2_is_oci_json(
    client: httpx.AsyncClient, fake: FakeRegistry, method: str, path: str, status: int, code: str
) -> None:
    fake.add_image("library/a", "1", [b"layer"])
    response = await client.request(method, path)
    assert response.status_code == status
    if code is not None:
        assert oci_error_codes(response) == [code]
        assert len(response.content) < 2048  # nothing a client sent is echoed at length
    if status == 405:
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


async def test_paths_outside_v2_keep_their_plain_answers(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).text == "ok\n"
    assert (await client.get("/nothing")).status_code == 404


_METHODS = ["GET"] * 12 + ["HEAD"] * 3 + ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "X"]
_KINDS = ["manifests", "blobs", "tags/list", "referrers", "blobs/uploads", "_catalog", "", "zz"]


def _hostile_request(rng: random.Random, known: list[str]) -> tuple[str, str, dict[str, str]]:
    def junk(n: int) -> str:
        alphabet = string.ascii_letters + string.digits + "._-:/%~+@!$&'()*,;= é☃\\"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    names = ["library/a", "a", "Upper", "a//b", "..", "%2e%2e/x", "a" * 300, "ghcr.io/x", junk(20)]
    references = [
        "1",
        "latest",
        ".INVALID_MANIFEST_NAME",
        "-x",
        "sha256:" + "0" * 64,
        "sha256:totallywrong",
        "sha512:" + "a" * 128,
        "sha512:" + "a" * 127,
        "md5:" + "0" * 32,
        "SHA256:" + "0" * 64,
        "a" * 200,
        ":",
        junk(40),
        *known,
    ]
    queries = [
        "",
        "n=abc",
        "n=-1",
        "n=" + "9" * rng.choice([3, 50, 5000]),
        "n=%C2%B2",
        "last=" + junk(30),
        "ns=" + rng.choice(["docker.io", "nope.example", "x" * 400, junk(10)]),
        "artifactType=" + rng.choice(["application/x", junk(50), "%00"]),
        junk(60),
        "%ff%fe=%80",
    ]
    kind = rng.choice(_KINDS)
    path = "/v2/"
    if rng.random() < 0.15:  # a real blob, for the Range header to act on
        path += f"library/a/blobs/{rng.choice(known)}"
    elif kind == "_catalog":
        path += "_catalog"
    elif kind:
        path += f"{rng.choice(names)}/{kind}"
        if kind not in ("tags/list",):
            path += "/" + rng.choice(references)
    else:
        path += junk(80)
    query = "&".join(rng.sample(queries, rng.randint(0, 3)))
    headers = {}
    if rng.random() < 0.3:
        headers["Range"] = rng.choice(
            ["bytes=0-", "bytes=5-2", "bytes=-", "bytes=999999-", "bytes=" + "9" * 5000]
        )
    if rng.random() < 0.3:
        headers["Accept"] = rng.choice(["*/*", "text/html", junk(30), ",,,;q="])
    return rng.choice(_METHODS), path + ("?" + query if query else ""), headers


async def test_hostile_sweep_gets_no_server_error_and_only_oci_errors(
    client: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    digest, _ = fake.add_image("library/a", "1", [b"layer"])
    known = [digest, *fake.blobs]
    rng = random.Random(12)
    seen: dict[int, int] = {}
    for _ in range(3000):
        method, url, headers = _hostile_request(rng, known)
        try:
            request = client.build_request(method, url, headers=headers)
        except (httpx.InvalidURL, UnicodeEncodeError):
            continue  # not something a client can send
        response = await client.send(request)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (method, url, headers, response.text[:300])
        under_v2 = request.url.path.startswith("/v2/")  # httpx resolves "/v2/../x"
        if response.status_code >= 400 and method != "HEAD" and under_v2:
            content_type = response.headers.get("Content-Type", "")
            assert content_type.startswith("application/json"), (method, url, response.text)
            assert set(oci_error_codes(response)) <= DISTRIBUTION_CODES, (method, url)
    # The sweep reached every kind of answer, not only one error.
    assert {200, 206, 400, 404, 405, 416} <= set(seen), seen
