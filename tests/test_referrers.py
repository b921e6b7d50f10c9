"""The referrers API for every upstream: passed through and cached like a tag when
the upstream has it, built from the referrers tag schema when it has not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.manifest import OCI_INDEX, OCI_MANIFEST
from mirror.reference import Digest, parse_image_reference
from mirror.referrers import referrers_tag
from mirror.warm import warm
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, live_server, make_settings
from tests.fakes import FakeRegistry
from tests.support.referrers_registry import ReferrersRegistry

pytestmark = pytest.mark.anyio

SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
SUBJECT = "sha256:" + "d" * 64
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def descriptor(artifact_type: str, n: int) -> dict[str, object]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": "sha256:" + f"{n:x}" * 64,
        "size": 100 + n,
        "artifactType": artifact_type,
        "annotations": {"n": str(n)},
    }


def index(*manifests: dict[str, object]) -> dict[str, object]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}


class Referrers:
    """The upstream's referrers endpoint as a test scripts it; the rest is the fake."""

    def __init__(self, fake: FakeRegistry) -> None:
        self.fake = fake
        self.answer: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(404)
        self.urls: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.urls)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if "/referrers/" in request.url.path and not self.fake.down:
            self.urls.append(str(request.url))
            return self.answer(request)
        return await self.fake(request)


@pytest.fixture
def referrers(fake: FakeRegistry) -> Referrers:
    return Referrers(fake)


@pytest.fixture
async def mirror(
    tmp_path: Path, referrers: Referrers, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        make_settings(tmp_path), upstream_transport=httpx.MockTransport(referrers), now=clock
    )
    async with app_client(app) as client:
        yield client


async def test_an_upstream_answer_is_cached_like_a_tag_and_served_stale(
    mirror: httpx.AsyncClient, referrers: Referrers, fake: FakeRegistry, clock: Clock
) -> None:
    answer = index(descriptor(SIG, 1), descriptor(SBOM, 2))
    # An odd Content-Type from the upstream is not passed on.
    referrers.answer = lambda r: httpx.Response(200, json=answer)
    first = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert first.status_code == 200
    assert first.headers["Content-Type"] == OCI_INDEX
    assert first.json()["manifests"] == answer["manifests"]
    again = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert again.content == first.content
    assert referrers.calls == 1  # fresh within tag_ttl
    clock.now += 301
    answer["manifests"] = [descriptor(SIG, 1)]
    moved = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert len(moved.json()["manifests"]) == 1
    assert referrers.calls == 2
    clock.now += 301
    fake.down = True
    stale = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert stale.status_code == 200
    assert stale.content == moved.content
    assert stale.headers["Warning"] == '110 mirror "Response is Stale"'
    assert "Warning" not in moved.headers


async def test_the_filter_is_applied_when_the_upstream_ignores_it(
    mirror: httpx.AsyncClient, referrers: Referrers
) -> None:
    answer = index(descriptor(SIG, 1), descriptor(SBOM, 2), descriptor(SIG, 3))
    referrers.answer = lambda r: httpx.Response(200, json=answer)  # no filtering, no header
    filtered = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}", params={"artifactType": SIG})
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["annotations"] for m in filtered.json()["manifests"]] == [{"n": "1"}, {"n": "3"}]
    none = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}", params={"artifactType": "x/y"})
    assert none.json()["manifests"] == []
    assert none.headers["OCI-Filters-Applied"] == "artifactType"
    assert referrers.calls == 1
    assert "artifactType" not in referrers.urls[0]  # asked unfiltered, for every filter


async def test_every_page_of_the_upstream_answer_is_served_as_one(
    mirror: httpx.AsyncClient, referrers: Referrers
) -> None:
    def paged(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("page") == "2":
            return httpx.Response(200, json=index(descriptor(SBOM, 2)))
        link = f'<{request.url.path}?page=2>; rel="next"'
        return httpx.Response(200, json=index(descriptor(SIG, 1)), headers={"Link": link})

    referrers.answer = paged
    response = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}", params={"artifactType": SBOM})
    assert [m["artifactType"] for m in response.json()["manifests"]] == [SBOM]
    assert referrers.calls == 2


@pytest.mark.parametrize(
    "no_api",
    [
        httpx.Response(404, text="404 page not found"),
        httpx.Response(200, text="<html>hello</html>", headers={"Content-Type": "text/html"}),
        httpx.Response(200, json={"errors": []}),
    ],
)
async def test_without_the_api_the_tag_schema_answers(
    mirror: httpx.AsyncClient, referrers: Referrers, fake: FakeRegistry, no_api: httpx.Response
) -> None:
    referrers.answer = lambda r: no_api
    empty = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert empty.status_code == 200
    assert empty.headers["Content-Type"] == OCI_INDEX
    assert empty.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    other = "sha512:" + "e" * 128
    tag = referrers_tag(Digest("sha512", "e" * 128))
    assert tag == "sha512-" + "e" * 64
    tagged = index(descriptor(SIG, 1), descriptor(SBOM, 2))
    fake.add_manifest("library/a", tag, OCI_INDEX, json.dumps(tagged).encode())
    found = await mirror.get(f"/v2/library/a/referrers/{other}", params={"artifactType": SBOM})
    assert found.status_code == 200
    assert found.json()["manifests"] == [descriptor(SBOM, 2)]
    assert found.headers["OCI-Filters-Applied"] == "artifactType"


async def test_a_referrers_tag_that_holds_no_valid_index_means_no_referrers(
    mirror: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    tag = referrers_tag(Digest("sha256", "d" * 64))
    fake.add_manifest("library/a", tag, "application/vnd.oci.image.index.v1+json", b"[not json")
    fake.add_image("library/b", tag, [b"an image, not an index"])
    for repository in ("library/a", "library/b"):
        response = await mirror.get(f"/v2/{repository}/referrers/{SUBJECT}")
        assert response.status_code == 200
        assert response.json()["manifests"] == []


async def test_an_oversized_upstream_answer_is_refused(
    mirror: httpx.AsyncClient, referrers: Referrers
) -> None:
    huge = index(*[descriptor(SIG, n % 10) for n in range(30_000)])
    referrers.answer = lambda r: httpx.Response(200, json=huge)
    response = await mirror.get(f"/v2/library/a/referrers/{SUBJECT}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_offline_serves_cached_referrers_and_an_empty_index_otherwise(
    tmp_path: Path, referrers: Referrers, fake: FakeRegistry
) -> None:
    referrers.answer = lambda r: httpx.Response(200, json=index(descriptor(SIG, 1)))
    settings = make_settings(tmp_path)
    online = create_app(settings, upstream_transport=httpx.MockTransport(referrers))
    async with app_client(online) as client:
        cached = await client.get(f"/v2/library/a/referrers/{SUBJECT}")
    offline_settings = replace(settings, cache=replace(settings.cache, offline=True))
    offline = create_app(offline_settings, upstream_transport=httpx.MockTransport(referrers))
    async with app_client(offline) as client:
        again = await client.get(f"/v2/library/a/referrers/{SUBJECT}")
        unknown = await client.get("/v2/library/a/referrers/sha256:" + "0" * 64)
    assert again.content == cached.content
    assert unknown.status_code == 200 and unknown.json()["manifests"] == []
    assert referrers.calls == 1 and fake.total == 0


async def test_an_upstream_with_the_api_is_passed_through_warmed_and_served_offline(
    tmp_path: Path, clock: Clock
) -> None:
    registry = ReferrersRegistry(page_size=1)
    empty = registry.add_blob(b"{}", "application/vnd.oci.empty.v1+json")
    config = registry.add_blob(b'{"os":"linux","architecture":"amd64"}', OCI_CONFIG)
    layer = registry.add_blob(b"layer", "application/vnd.oci.image.layer.v1.tar")
    image = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
    subject = registry.add_manifest("library/signed", image, tag="1")
    subject_descriptor = {"mediaType": OCI_MANIFEST, "digest": subject, "size": 0}
    for artifact_type in (SIG, SBOM):
        payload = registry.add_blob(artifact_type.encode(), artifact_type)
        artifact = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": empty,
            "layers": [payload],
            "subject": subject_descriptor,
            "annotations": {"kind": artifact_type},
        }
        registry.add_manifest("library/signed", artifact)
    expected = registry.referrers("library/signed", subject)
    async with live_server(registry.app) as upstream:
        settings = make_settings(tmp_path, url=upstream.url)
        app = create_app(settings, now=clock)
        async with app_client(app) as client:
            listed = await client.get(f"/v2/library/signed/referrers/{subject}")
            assert listed.headers["Content-Type"] == OCI_INDEX
            assert listed.json()["manifests"] == expected  # both pages, as one
            signed = await client.get(
                f"/v2/library/signed/referrers/{subject}", params={"artifactType": SIG}
            )
            assert signed.json()["manifests"] == [d for d in expected if d["artifactType"] == SIG]
            asked = [r for r in registry.requests if "/referrers/" in r]
            assert len(asked) == 2  # two pages, once: the filter was applied from the cache
            summary = await warm(
                app.state.cache, [parse_image_reference("library/signed:1")], None, 4
            )
            assert summary.referrers == 2 and not summary.failures
    offline_settings = replace(settings, cache=replace(settings.cache, offline=True))
    async with app_client(create_app(offline_settings, now=clock)) as client:
        again = await client.get(f"/v2/library/signed/referrers/{subject}")
        assert again.json()["manifests"] == expected
        for descriptor in expected:
            served = await client.get(
                f"/v2/library/signed/manifests/{descriptor['digest']}",
                headers={"Accept": OCI_MANIFEST},
            )
            assert served.status_code == 200
            for blob in served.json()["layers"]:
                got = await client.get(f"/v2/library/signed/blobs/{blob['digest']}")
                assert got.content == registry.blobs[blob["digest"]]
